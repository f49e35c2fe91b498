"""The registry's rows of one app, for `cicd remove`: what goes with the app, and what stays.

Its releases, incidents and proof records stay as history; its registry row, its health
counters and its deploy lease go. Its open incidents and the requests waiting on them are found
here for the removal to close (it changes their status, checked by cicd.core.lifecycle).
"""
from __future__ import annotations

from sqlalchemy import bindparam, delete, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from cicd.core.lifecycle import ApprovalStatus, IncidentStatus, ReleaseStatus, transition
from cicd.store.models import App, AppHealth, Approval, DeployLock, Execution, Incident, Release

_ANY_RELEASE = (select(Release.__table__.c.id)
                .where(Release.__table__.c.env == bindparam("env"), Release.__table__.c.app == bindparam("app"))
                .limit(1))


def remove(session: Session, env: str, name: str, detail: str) -> int | None:
    """Drop the app's registry row and health; its live release (returned) becomes superseded."""
    live = session.scalar(select(Release).where(Release.env == env, Release.app == name,
                                                Release.status == ReleaseStatus.LIVE))
    if live is not None:
        live.status = transition(live.status, ReleaseStatus.SUPERSEDED)
        live.detail = detail
    session.execute(delete(AppHealth).where(AppHealth.env == env, AppHealth.app == name))
    session.execute(delete(DeployLock).where(DeployLock.env == env, DeployLock.app == name))
    session.execute(delete(App).where(App.env == env, App.name == name))
    return live.number if live is not None else None


def removed(conn: Connection, env: str, name: str) -> bool:
    """Of an app the registry lacks: whether it was here and was removed, i.e. it has releases
    (only a removal deletes an app's registry row, and its releases stay)."""
    return conn.execute(_ANY_RELEASE, {"env": env, "app": name}).first() is not None


def open_incidents(session: Session, env: str, name: str) -> list[Incident]:
    """The app's open incident (at most one: the open key is unique), locked to be closed."""
    return session.scalars(select(Incident).where(Incident.env == env, Incident.app == name,
                                                  Incident.status == IncidentStatus.OPEN)
                           .with_for_update()).all()


def claim_of(session: Session, incident: Incident) -> Execution | None:
    """The execution claim of the incident's current attempt, if one was made."""
    return session.scalar(select(Execution).where(Execution.incident_id == incident.id,
                                                  Execution.attempt == incident.attempt))


def pending_approvals(session: Session, env: str, name: str, kind: str) -> list[Approval]:
    """The app's pending requests of one kind (held actions, removals), oldest first."""
    return session.scalars(select(Approval).where(Approval.env == env, Approval.app == name,
                                                  Approval.kind == kind,
                                                  Approval.status == ApprovalStatus.PENDING)
                           .order_by(Approval.requested_at)).all()
