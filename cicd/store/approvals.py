"""Approval rows: a request for a human's answer (a promotion into an environment, or an action
held back in prod), made pending with an expiry, found by id, listed, and swept when it expires;
and the live release a promotion request copies.

Every function works inside the caller's transaction (a session_scope session; a new request may
also be made on a Core connection, inside the orchestrator's claim). Status changes are made on
the ORM objects returned here, by the caller, which checks them against cicd.core.lifecycle.
"""
from __future__ import annotations

import secrets
from datetime import datetime, timedelta

from sqlalchemy import insert, select
from sqlalchemy.engine import Connection, ScalarResult
from sqlalchemy.orm import Session

from cicd.config import Settings
from cicd.core.lifecycle import ApprovalStatus, transition
from cicd.store import Approval, connection_of

_NEW_APPROVAL = insert(Approval.__table__)


def add(tx: Session | Connection, settings: Settings, kind: str, app: str, payload: dict, summary: str,
        requested_by: str, incident_id: str | None = None, attempt: int | None = None) -> dict:
    """A new pending request, expiring after settings.approval_ttl_s; the row as written."""
    now = settings.clock.now()
    row = {"id": f"apr-{settings.env}-{secrets.token_hex(4)}", "env": settings.env, "kind": kind, "app": app,
           "incident_id": incident_id, "attempt": attempt, "payload": payload, "summary": summary,
           "status": transition(None, ApprovalStatus.PENDING), "requested_by": requested_by, "requested_at": now,
           "expires_at": now + timedelta(seconds=settings.approval_ttl_s), "decided_by": None, "decided_at": None,
           "reason": ""}
    connection_of(tx).execute(_NEW_APPROVAL, row)
    return row


def get(session: Session, approval_id: str, lock: bool = False) -> Approval | None:
    """lock: to answer it (a row lock on PostgreSQL; SQLite's writer holds the file)."""
    return session.get(Approval, approval_id, with_for_update=True if lock else None)


def listing(session: Session, env: str, include_decided: bool = False) -> ScalarResult[Approval]:
    """The environment's pending requests (or all of them), oldest first."""
    query = select(Approval).where(Approval.env == env)
    if not include_decided:
        query = query.where(Approval.status == ApprovalStatus.PENDING)
    return session.scalars(query.order_by(Approval.requested_at))


def expired(session: Session, env: str, now: datetime) -> list[Approval]:
    """Pending requests whose time is up at `now`, still to be marked expired."""
    return session.scalars(select(Approval).where(Approval.env == env, Approval.status == ApprovalStatus.PENDING,
                                                  Approval.expires_at <= now)).all()
