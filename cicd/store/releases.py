"""The release repository: release rows (one per deploy of an app, numbered per app), the deploy
lock that is each app's lease on deploying, and the queries the deployer makes over them (the
newest number, the live releases, the releases under way).

ORM, like the deployer that calls it: every function takes the caller's open session first, so
a deploy step's read-check-write stays one transaction of its own making. Rows come back as the
session's objects; changes made to them are written when the caller's transaction commits.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cicd.core.events import as_utc
from cicd.core.lifecycle import RELEASE_UNDER_WAY, ReleaseStatus
from cicd.store import DeployLock, Release


# -- release rows -----------------------------------------------------------------------------------
def by_request(session: Session, request_id: str, *, for_update: bool = False) -> Release | None:
    """The release a deploy request made (request ids are unique: a request makes one release)."""
    query = select(Release).where(Release.request_id == request_id)
    return session.scalar(query.with_for_update() if for_update else query)


def get(session: Session, env: str, app: str, number: int, *, for_update: bool = False) -> Release | None:
    """The app's release with that number."""
    query = select(Release).where(Release.env == env, Release.app == app, Release.number == number)
    return session.scalar(query.with_for_update() if for_update else query)


def newest_number(session: Session, env: str, app: str) -> int | None:
    """The highest release number the app has had, whatever became of it; None before its first."""
    return session.scalar(select(func.max(Release.number)).where(Release.env == env, Release.app == app))


def add(session: Session, *, env: str, app: str, number: int, status: str, kind: str, ref: str, sha: str | None,
        replicas: int, request_id: str) -> Release:
    """A new release row, written with the caller's transaction."""
    release = Release(env=env, app=app, number=number, status=status, kind=kind, ref=ref, sha=sha,
                      replicas=replicas, request_id=request_id)
    session.add(release)
    return release


def live_besides(session: Session, env: str, app: str, number: int) -> list[Release]:
    """The app's live releases other than that one (the ones a switch to it replaces)."""
    return session.scalars(select(Release).where(Release.env == env, Release.app == app,
                                                 Release.status == ReleaseStatus.LIVE,
                                                 Release.number != number)).all()


def under_way(session: Session, env: str) -> list[Release]:
    """The environment's releases that are still fetching, starting or switching."""
    return session.scalars(select(Release).where(Release.env == env, Release.status.in_(RELEASE_UNDER_WAY))).all()


# -- the deploy lock: one deploy per app at a time --------------------------------------------------
def take_lock(session: Session, env: str, app: str, holder: str, now: datetime, ttl_s: float) -> bool:
    """Take or renew the app's deploy lock for `holder` until `now + ttl_s`; False while another
    holder's lock has not run out. Read for update, in a write transaction (one writer at a time,
    see cicd.store.db), so two deploys cannot both take it."""
    lock = session.get(DeployLock, (env, app), with_for_update=True)
    if lock is not None and lock.holder != holder and as_utc(lock.expires_at) > now:
        return False
    if lock is None:
        lock = DeployLock(env=env, app=app, holder=holder, expires_at=now)
        session.add(lock)
    lock.holder, lock.expires_at = holder, now + timedelta(seconds=ttl_s)
    return True


def drop_lock(session: Session, env: str, app: str, holder: str) -> None:
    """Give the app's deploy lock up, if `holder` still holds it (a lock taken over is not ours)."""
    lock = session.get(DeployLock, (env, app), with_for_update=True)
    if lock is not None and lock.holder == holder:
        session.delete(lock)


def lease_lapsed(session: Session, release: Release, now: datetime) -> bool:
    """Nobody works on this release: its deploy's lease is gone, taken by another deploy, or run out."""
    lock = session.get(DeployLock, (release.env, release.app))
    return lock is None or lock.holder != release.request_id or as_utc(lock.expires_at) <= now
