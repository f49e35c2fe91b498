"""The registry's rows of one app, for `cicd remove`: what goes with the app, and what stays.

Its releases, incidents and proof records stay as history; its registry row, its health
counters and its deploy lease go.
"""
from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cicd.core.lifecycle import ReleaseStatus, transition
from cicd.store.models import App, AppHealth, DeployLock, Release


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
