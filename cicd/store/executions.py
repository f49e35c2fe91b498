"""Execution claims: the (incident id, attempt) key an action is claimed under before it runs,
and what became of it (refused, awaiting approval, deferred, started, done or failed, with its
result); the recent actions of an app that the budget and backoff gates count; and what the
housekeeping scan reads to find a chain that stopped moving.

Two ways in, as in cicd.store.db: the healing chain's hops run the Core statements built once
below (`make bench` measures them) on a connection from store.transaction; housekeeping and the
approval path get ORM objects from a session_scope session and change them there. Every function
works inside the caller's transaction: the steps own their read-check-write.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection, Row, ScalarResult
from sqlalchemy.orm import Session

from cicd.config import Settings
from cicd.core.events import Decision, as_utc
from cicd.core.lifecycle import ExecutionStatus, transition
from cicd.store import Execution

_EXECUTIONS = Execution.__table__
_E = _EXECUTIONS.c
# What the budget and backoff gates count: this app's restarts and scalings that ran.
_ACTED = select(_E.action, _E.started_at, _E.params).where(
    _E.env == bindparam("env"), _E.app == bindparam("app"), _E.status == ExecutionStatus.DONE,
    _E.action.in_(("restart_service", "scale_workers")))
_CLAIM = select(_EXECUTIONS).where(_E.incident_id == bindparam("incident_id"), _E.attempt == bindparam("attempt"))
_CLAIM_BY_ID = select(_EXECUTIONS).where(_E.id == bindparam("id"))
_NEW_CLAIM = insert(_EXECUTIONS)
# The SET clause is taken from the parameters given: one statement for every change of a claim.
_UPDATE_CLAIM = update(_EXECUTIONS).where(_E.id == bindparam("k_id"))


# -- The healing chain's hops (Core) --

def recent_actions(conn: Connection, env: str, app: str) -> list[tuple[str, datetime, dict]]:
    """The app's restarts and scalings that ran, as (action, started_at in UTC, params)."""
    return [(action, as_utc(at), params) for action, at, params in conn.execute(_ACTED, {"env": env, "app": app})]


def claim_row(conn: Connection, incident_id: str, attempt: int) -> Row | None:
    """The claim on the key (incident id, attempt), if one was made."""
    return conn.execute(_CLAIM, {"incident_id": incident_id, "attempt": attempt}).first()


def claim_row_by_id(conn: Connection, claim_id: int) -> Row:
    return conn.execute(_CLAIM_BY_ID, {"id": claim_id}).one()


def add_claim(conn: Connection, settings: Settings, decision: Decision, status: ExecutionStatus,
              **fields) -> dict:
    """Claim the decision's key in the status it is created in (refused, awaiting approval,
    deferred or started); the row as written, with its id. The unique key on (incident id,
    attempt) makes a second claim of the same key fail instead of acting twice."""
    row = {"env": settings.env, "app": decision.app, "incident_id": decision.incident_id,
           "attempt": decision.attempt, "action": decision.action, "params": decision.params,
           "status": transition(None, status), "gate": "", "reason": "", "nonce": decision.nonce, "result": {},
           "started_at": settings.clock.now(), "finished_at": None, **fields}
    claim_id = conn.execute(_NEW_CLAIM, row).inserted_primary_key[0]
    return {**row, "id": claim_id}


def set_status(conn: Connection, claim_id: int, status: ExecutionStatus) -> None:
    """The caller checked the transition (cicd.core.lifecycle.transition)."""
    conn.execute(_UPDATE_CLAIM, {"k_id": claim_id, "status": status})


def set_result(conn: Connection, claim_id: int, result: dict) -> None:
    conn.execute(_UPDATE_CLAIM, {"k_id": claim_id, "result": result})


def record_outcome(conn: Connection, claim_id: int, status: ExecutionStatus, result: dict,
                   finished_at: datetime) -> None:
    """What the action did (done or failed), and when it finished."""
    conn.execute(_UPDATE_CLAIM, {"k_id": claim_id, "status": status, "result": result, "finished_at": finished_at})


# -- Housekeeping and the approval path (ORM objects, changed in the caller's session) --

def get_claim(session: Session, incident_id: str, attempt: int) -> Execution | None:
    """The claim on the key (incident id, attempt), if one was made."""
    return session.scalar(select(Execution).where(Execution.incident_id == incident_id,
                                                  Execution.attempt == attempt))


def deferred_claims(session: Session, env: str) -> ScalarResult[Execution]:
    """The environment's claims held back until their backoff's due time."""
    return session.scalars(select(Execution).where(Execution.env == env,
                                                   Execution.status == ExecutionStatus.DEFERRED))
