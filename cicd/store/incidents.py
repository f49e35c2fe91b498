"""Incidents: opening one, finding the open ones, closing it, and what the detector and the
verifier read and write around an incident (its call for a human, the history of its attempts).

Core statements, built once: they run for every signal and every verified attempt (`make
bench`). Each function works inside the caller's transaction (a connection from
store.transaction), so a step's read-check-write stays one transaction.
"""
from __future__ import annotations

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Connection, ScalarResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cicd.core.events import Signal
from cicd.core.lifecycle import IncidentStatus, transition
from cicd.store.db import update_incident
from cicd.store.models import App, Execution, Incident


class AlreadyOpen(Exception):
    """The app has an open incident already (its open key is taken): another detector won."""


_LAST_CLOSED = select(func.max(Incident.closed_at)).where(Incident.env == bindparam("env"),
                                                          Incident.app == bindparam("app"),
                                                          Incident.status != IncidentStatus.OPEN)
_OPEN_INCIDENT = select(Incident.id).where(Incident.open_key == bindparam("open_key"))
_OPEN_ROW = select(Incident.__table__).where(Incident.open_key == bindparam("open_key"))
_NEW_INCIDENT = insert(Incident.__table__)
_SET_ATTENTION = (update(App.__table__).where(App.__table__.c.env == bindparam("k_env"),
                                              App.__table__.c.name == bindparam("k_name"))
                  .values(attention=bindparam("attention")))
ATTENTION_CHARS = 200  # what the apps table keeps of why a human was called


def open_key(env: str, app: str) -> str:
    """The key an open incident holds; unique, so an app has at most one open incident."""
    return f"{env}/{app}"


def last_closed_at(conn: Connection, env: str, app: str):
    """When the app's last closed incident was closed; None if it never had one."""
    return conn.execute(_LAST_CLOSED, {"env": env, "app": app}).scalar()


def has_open(conn: Connection, env: str, app: str) -> bool:
    return conn.execute(_OPEN_INCIDENT, {"open_key": open_key(env, app)}).first() is not None


def open_row(conn: Connection, env: str, app: str):
    """The app's open incident (the whole row), or None."""
    return conn.execute(_OPEN_ROW, {"open_key": open_key(env, app)}).first()


def widen(conn: Connection, incident, kind: str, severity: str, signal: dict, context: dict) -> None:
    """What the open incident is about, from its next decision on: a failure found while it was open."""
    update_incident(conn, incident.id, kind=kind, severity=severity, signal=signal, context=context)


def insert_open(conn: Connection, incident_id: str, env: str, signal: Signal, kind: str, severity: str,
                context: dict, opened_at) -> None:
    """Add the app's open incident, at its first attempt, for the signal; raises AlreadyOpen if the
    app has one (the unique open key settles a race between two detectors)."""
    try:
        conn.execute(_NEW_INCIDENT, {
            "id": incident_id, "env": env, "app": signal.app, "kind": kind, "severity": severity,
            "status": transition(None, IncidentStatus.OPEN), "attempt": 1,
            "slot": signal.slots[0] if signal.slots else 0,
            "signal": signal.to_dict(), "context": context, "resolution": "", "decision": None,
            "open_key": open_key(env, signal.app), "opened_at": opened_at})
    except IntegrityError as exc:
        # Raised on, not swallowed: the caller's transaction must still roll back (on PostgreSQL
        # it is aborted and can take no more statements).
        raise AlreadyOpen(f"{open_key(env, signal.app)} has an open incident") from exc


def close(conn: Connection, incident, status: IncidentStatus, resolution: str, closed_at) -> None:
    """Close the incident with status; freeing its open key lets the app have the next one."""
    update_incident(conn, incident.id, status=transition(incident.status, status), resolution=resolution,
                    closed_at=closed_at, open_key=None)


def set_attention(conn: Connection, env: str, app: str, why: str) -> None:
    """Mark the app as needing a human: the detector opens no incident for it until it is healthy."""
    conn.execute(_SET_ATTENTION, {"k_env": env, "k_name": app, "attention": why[:ATTENTION_CHARS]})


def attempt_history(conn: Connection, incident_id: str) -> list[dict]:
    """The incident's attempts so far, first to last: what was tried and how it went."""
    e = Execution.__table__.c
    rows = conn.execute(select(e.attempt, e.action, e.status, e.reason).where(e.incident_id == incident_id)
                        .order_by(e.attempt))
    return [{"attempt": r.attempt, "action": r.action, "status": r.status, "reason": r.reason} for r in rows]


def incident_of(session: Session, row) -> Incident | None:
    """The incident a claim (or an approval request: anything with an incident_id) is for."""
    return session.get(Incident, row.incident_id)


def open_incidents(session: Session, env: str) -> ScalarResult[Incident]:
    """The environment's open incidents, each one a chain that should be moving."""
    return session.scalars(select(Incident).where(Incident.env == env, Incident.status == IncidentStatus.OPEN))
