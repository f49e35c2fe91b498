"""The tamper-evident proof log: a hash chain per environment.

Each record's hash is sha256 over the canonical JSON of every other field, prev_hash included,
so any edit, deletion, insertion or reordering breaks the chain at that record; the head row
(last seq and hash) catches a truncated tail. Appends happen inside the caller's transaction:
the incident and its proof event commit together or not at all.
"""
from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from cicd.config import Settings
from cicd.core.clock import SYSTEM_CLOCK
from cicd.core.events import PROOF_EVENTS, canonical, iso
from cicd.store import PROOF_CLOCK, PROOF_PENDING, ProofHead, ProofRecord, connection_of, session_scope
from cicd.store.db import after_proof_commit

GENESIS = "0" * 64
EXPORT_COLUMNS = ("seq", "ts", "env", "event_name", "incident_id", "app", "payload", "prev_hash", "hash")


class ProofError(RuntimeError):
    pass


def record_hash(seq: int, ts: str, env: str, event_name: str, incident_id, app, payload: str,
                prev_hash: str) -> str:
    body = {"seq": seq, "ts": ts, "env": env, "event_name": event_name, "incident_id": incident_id,
            "app": app, "payload": json.loads(payload), "prev_hash": prev_hash}
    return hashlib.sha256(canonical(body).encode()).hexdigest()


_HEADS, _RECORDS = ProofHead.__table__, ProofRecord.__table__
_HEAD = select(_HEADS.c.seq, _HEADS.c.hash).where(_HEADS.c.env == bindparam("env")).with_for_update()
_NEW_HEAD = insert(_HEADS)
_MOVE_HEAD = update(_HEADS).where(_HEADS.c.env == bindparam("head_env")).values(seq=bindparam("seq"),
                                                                              hash=bindparam("hash"))
_ADD_RECORD = insert(_RECORDS)


def append(tx: Session | Connection, env: str, event_name: str, *, incident_id: str | None = None,
           app: str | None = None, payload: dict | None = None) -> dict:
    """Add one record to the chain inside the caller's transaction (an ORM session, or a Core
    connection from store.transaction); returns the record as a dict."""
    if event_name not in PROOF_EVENTS:
        raise ProofError(f"unknown proof event {event_name!r}")
    if isinstance(tx, Session):
        conn, pending = connection_of(tx), tx.info.setdefault(PROOF_PENDING, [])
        clock = tx.info.get(PROOF_CLOCK, SYSTEM_CLOCK)
    else:
        conn, pending = tx, tx.info.get(PROOF_PENDING)
        if pending is None:
            raise ProofError("proof.append needs a connection from store.transaction")
        clock = tx.info.get(PROOF_CLOCK, SYSTEM_CLOCK)
    # This transaction's own last record is the head (it holds the lock: nobody else moved it);
    # otherwise read it and lock the row. No head yet: the first append creates it, safely,
    # because store's writer lock (both backends) lets one writer at a time get this far.
    mine = next((r for r in reversed(pending) if r["env"] == env), None)
    head = (mine["seq"], mine["hash"]) if mine else conn.execute(_HEAD, {"env": env}).first()
    if head is None:
        conn.execute(_NEW_HEAD, {"env": env, "seq": 0, "hash": GENESIS})
        head = (0, GENESIS)
    prev_seq, prev_hash = head
    payload_text = canonical(payload or {})
    # The record as it is hashed (payload as the JSON the stored text parses back to).
    record = {"seq": prev_seq + 1, "ts": iso(clock.now()), "env": env, "event_name": event_name,
              "incident_id": incident_id, "app": app, "payload": json.loads(payload_text), "prev_hash": prev_hash}
    record["hash"] = hashlib.sha256(canonical(record).encode()).hexdigest()
    conn.execute(_ADD_RECORD, {**record, "payload": payload_text})
    conn.execute(_MOVE_HEAD, {"head_env": env, "seq": record["seq"], "hash": record["hash"]})
    # Kept for the mirror: after commit these lines go to the file without reading them back.
    pending.append(record)
    return record


def as_dict(record) -> dict:
    """A stored record (ORM object or row) as the chain's dict, payload parsed."""
    return {"seq": record.seq, "ts": record.ts, "env": record.env, "event_name": record.event_name,
            "incident_id": record.incident_id, "app": record.app, "payload": json.loads(record.payload),
            "prev_hash": record.prev_hash, "hash": record.hash}


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    first_bad_seq: int | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"OK: {self.records} records, chain intact"
        return f"BROKEN at record {self.first_bad_seq}: {self.reason} ({self.records} records checked)"


def verify_records(rows: Iterable[dict], head: tuple[int, str] | None = None,
                   payload_is_text: bool = False) -> VerifyResult:
    """Walk the chain in order; the first record that does not fit is named.

    Rows from the database carry the payload as the canonical text that was hashed
    (payload_is_text); rows from an exported file carry it as a JSON object.
    """
    expected_seq, prev, count = 1, GENESIS, 0
    for row in rows:
        seq = row.get("seq")
        if seq != expected_seq:
            return VerifyResult(False, count, expected_seq,
                                f"expected seq {expected_seq}, found {seq!r} (deleted, inserted or reordered?)")
        if row.get("prev_hash") != prev:
            return VerifyResult(False, count, seq, "prev_hash does not match the previous record's hash")
        payload = row.get("payload")
        if isinstance(payload, str) != payload_is_text or (not payload_is_text and not isinstance(payload, dict)):
            return VerifyResult(False, count, seq, "payload is not a JSON object")
        try:
            payload_text = payload if payload_is_text else canonical(payload)
            digest = record_hash(seq, row.get("ts"), row.get("env"), row.get("event_name"),
                                 row.get("incident_id"), row.get("app"), payload_text, prev)
        except (TypeError, ValueError):
            return VerifyResult(False, count, seq, "payload is not valid JSON")
        if digest != row.get("hash"):
            return VerifyResult(False, count, seq, "hash does not match the record's contents (edited?)")
        prev, expected_seq, count = row["hash"], expected_seq + 1, count + 1
    if head is not None and (head[0], head[1]) != (count, prev):
        if head[0] > count:
            return VerifyResult(False, count, count + 1, f"chain head says {head[0]} records but only {count} "
                                "exist: the tail was deleted (truncated)")
        if head[0] < count:
            return VerifyResult(False, count, head[0] + 1, f"records after the chain head (seq {head[0]}) "
                                "were added behind its back")
        return VerifyResult(False, count, count, "the last record's hash does not match the chain head")
    return VerifyResult(True, count)


def _db_rows(session: Session, env: str, after_seq: int = 0, batch: int = 2000) -> Iterator[ProofRecord]:
    last = after_seq
    while True:
        rows = session.scalars(select(ProofRecord).where(ProofRecord.env == env, ProofRecord.seq > last)
                               .order_by(ProofRecord.seq).limit(batch)).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def verify(settings: Settings) -> VerifyResult:
    with session_scope(settings, readonly=True) as session:
        head = session.get(ProofHead, settings.env)
        rows = ({"seq": r.seq, "ts": r.ts, "env": r.env, "event_name": r.event_name,
                 "incident_id": r.incident_id, "app": r.app, "payload": r.payload,
                 "prev_hash": r.prev_hash, "hash": r.hash} for r in _db_rows(session, settings.env))
        return verify_records(rows, (head.seq, head.hash) if head else (0, GENESIS), payload_is_text=True)


def verify_file(path) -> VerifyResult:
    """Verify an exported JSONL file (or the mirror) on its own, without the database."""
    def rows():
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    yield json.loads(line)
                except ValueError:
                    yield {"seq": f"unparseable line {n}"}
    return verify_records(rows())


def tail(settings: Settings, n: int = 20, incident_id: str | None = None) -> list[dict]:
    with session_scope(settings, readonly=True) as session:
        query = select(ProofRecord).where(ProofRecord.env == settings.env)
        if incident_id:
            query = query.where(ProofRecord.incident_id == incident_id)
        rows = session.scalars(query.order_by(ProofRecord.seq.desc()).limit(n)).all()
        return [as_dict(r) for r in reversed(rows)]


def records_since(settings: Settings, after_seq: int) -> list[dict]:
    with session_scope(settings, readonly=True) as session:
        return [as_dict(r) for r in _db_rows(session, settings.env, after_seq)]


def head_seq(settings: Settings) -> int:
    with session_scope(settings, readonly=True) as session:
        head = session.get(ProofHead, settings.env)
        return head.seq if head else 0


def export(settings: Settings, fmt: str, out) -> int:
    """Write the whole chain as JSONL or CSV (payload as a JSON string); returns the count."""
    count = 0
    with session_scope(settings, readonly=True) as session:
        if fmt == "jsonl":
            for r in _db_rows(session, settings.env):
                out.write(canonical(as_dict(r)) + "\n")
                count += 1
        elif fmt == "csv":
            writer = csv.writer(out)
            writer.writerow(EXPORT_COLUMNS)
            for r in _db_rows(session, settings.env):
                writer.writerow([r.seq, r.ts, r.env, r.event_name, r.incident_id or "", r.app or "",
                                 r.payload, r.prev_hash, r.hash])
                count += 1
        else:
            raise ProofError(f"format {fmt!r}: must be jsonl or csv")
    return count


def _mirror_tail(fh) -> int:
    """The last seq in the mirror; a partly written last line (a crash mid-write) is cut off."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return 0
    for chunk in (4096, 65536, size):  # most records are short: read little first
        start = max(0, size - chunk)
        fh.seek(start)
        tail = fh.read()
        if start == 0 or tail.count(b"\n") >= 2:
            break
    if not tail.endswith(b"\n"):
        cut = tail.rfind(b"\n")
        fh.truncate(start + cut + 1 if cut >= 0 else start)
        tail = tail[:cut + 1] if cut >= 0 else b""
    for line in reversed(tail.split(b"\n")):
        try:
            return int(json.loads(line.decode("utf-8"))["seq"])
        except (ValueError, KeyError, TypeError):
            continue  # blank, or the first, partial line of the chunk
    return 0


@after_proof_commit
def sync_mirror(settings: Settings, committed: list[dict] | None = None) -> None:
    """Bring logs/ENV/proof.jsonl up to the database, in order, whichever process appended.

    Under an exclusive file lock: two workers that commit seq 7 and 8 may reach this point in
    either order, and the file must not. If the file ends just before what this transaction
    committed, those records are written as they are; otherwise the file catches up from the
    database. Bytes, not text: a seek into the middle of a multi-byte character must not break
    the reader.
    """
    path = settings.proof_mirror_path
    try:
        fh = open(path, "a+b")
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+b")
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            last = _mirror_tail(fh)
            if committed and committed[0]["seq"] == last + 1:
                records = committed
            elif committed and committed[-1]["seq"] <= last:
                records = []  # a later transaction's sync already caught the file up past these
            else:
                records = records_since(settings, last)
            if records:
                fh.seek(0, os.SEEK_END)
                fh.write("".join(canonical(record) + "\n" for record in records).encode("utf-8"))
                fh.flush()
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def last_ts(session: Session, env: str, incident_id: str) -> str | None:
    """When the incident's chain last wrote a proof record (its last sign of progress)."""
    return session.scalar(select(ProofRecord.ts).where(ProofRecord.env == env, ProofRecord.incident_id == incident_id)
                          .order_by(ProofRecord.seq.desc()).limit(1))
