"""The dead-letter store: what could not be processed, kept with why, until someone retries or
purges it (`cicd dlq`). Malformed input, an unknown app, a message for another environment, a
task that failed or exhausted its retries: all end up here, none is dropped.

If the database itself cannot take the letter, it goes to logs/ENV/dead-letters.jsonl instead.
"""
from __future__ import annotations

import json
from typing import Callable

from sqlalchemy import delete, select

from cicd.store import proof
from cicd.config import Settings
from cicd.core.events import iso, utcnow
from cicd.store import DeadLetter, session_scope
from cicd.errors import CicdError

LIMIT_CHARS = 100_000


class DeadLetterError(CicdError, ValueError):
    pass


def _bounded(value):
    """Hostile input can be huge: keep it, but bounded (as JSON text past the limit)."""
    text = json.dumps(value, default=repr)
    return value if len(text) <= LIMIT_CHARS else {"truncated_json": text[:LIMIT_CHARS]}


def keep(settings: Settings, task: str, args, kwargs, reason: str, chain=None) -> int | None:
    """Store a dead letter; returns its id (None if only the fallback file could take it)."""
    row = {"task": task, "args": _bounded(list(args or [])), "kwargs": _bounded(dict(kwargs or {})),
           "chain": _bounded(chain) if chain else None, "reason": reason[:4000]}
    try:
        with session_scope(settings) as session:
            letter = DeadLetter(env=settings.env, **row)
            session.add(letter)
            session.flush()
            return letter.id
    except Exception as exc:  # the store is down: the letter still must not vanish
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        with open(settings.logs_dir / "dead-letters.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**row, "env": settings.env, "at": iso(utcnow()),
                                 "store_error": f"{type(exc).__name__}: {exc}"}, default=repr) + "\n")
        return None


def as_dict(letter: DeadLetter) -> dict:
    return {"id": letter.id, "env": letter.env, "task": letter.task, "args": letter.args, "kwargs": letter.kwargs,
            "chain": letter.chain, "reason": letter.reason, "status": letter.status, "retries": letter.retries,
            "created_at": iso(letter.created_at), "retried_at": iso(letter.retried_at) if letter.retried_at else None}


def listing(settings: Settings, include_retried: bool = False) -> list[dict]:
    with session_scope(settings) as session:
        query = select(DeadLetter).where(DeadLetter.env == settings.env)
        if not include_retried:
            query = query.where(DeadLetter.status == "kept")
        return [as_dict(letter) for letter in session.scalars(query.order_by(DeadLetter.id))]


def get(settings: Settings, letter_id: int) -> dict:
    with session_scope(settings) as session:
        letter = session.get(DeadLetter, letter_id)
        if letter is None or letter.env != settings.env:
            raise DeadLetterError(f"no dead letter {letter_id} in {settings.env}")
        return as_dict(letter)


def mark_retried(settings: Settings, letter_id: int, who: str) -> dict:
    """Record that the letter was sent again (the caller sends it: this module has no broker)."""
    with session_scope(settings) as session:
        letter = session.get(DeadLetter, letter_id, with_for_update=True)
        if letter is None or letter.env != settings.env:
            raise DeadLetterError(f"no dead letter {letter_id} in {settings.env}")
        letter.status, letter.retries, letter.retried_at = "retried", letter.retries + 1, utcnow()
        proof.append(session, settings.env, "DLQ_RETRIED", payload={"dead_letter": letter_id, "task": letter.task,
                                                                    "by": who, "retries": letter.retries})
        return as_dict(letter)


def retry(settings: Settings, letter_id: int, who: str, resend: Callable[[str, list, dict, list | None], None]) -> dict:
    """Send a letter to its task again with `resend(task, args, kwargs, chain)` (the control plane's),
    then record that it was; returns the letter."""
    letter = get(settings, letter_id)
    resend(letter["task"], letter["args"], letter["kwargs"], letter["chain"])
    mark_retried(settings, letter_id, who)
    return letter


def purge(settings: Settings, letter_ids: list[int] | None, who: str) -> int:
    """Delete the given letters (or all of the environment's); the proof log keeps what went."""
    with session_scope(settings) as session:
        query = select(DeadLetter).where(DeadLetter.env == settings.env)
        if letter_ids is not None:
            query = query.where(DeadLetter.id.in_(letter_ids))
        letters = session.scalars(query).all()
        if letter_ids is not None and len(letters) != len(set(letter_ids)):
            missing = sorted(set(letter_ids) - {letter.id for letter in letters})
            raise DeadLetterError(f"no dead letter {', '.join(map(str, missing))} in {settings.env}")
        if not letters:
            return 0
        proof.append(session, settings.env, "DLQ_PURGED", payload={
            "by": who, "count": len(letters),
            "letters": [{"id": letter.id, "task": letter.task, "reason": letter.reason[:200]} for letter in letters]})
        session.execute(delete(DeadLetter).where(DeadLetter.id.in_([letter.id for letter in letters])))
        return len(letters)
