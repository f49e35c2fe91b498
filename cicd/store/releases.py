"""The release repository: release rows (one per deploy of an app, numbered per app), the deploy
lock that is each app's lease on deploying, and the queries the deployer makes over them (the
newest number, the live releases, the releases under way).

The deployer's functions are ORM, like the deployer: each takes the caller's open session first,
so a deploy step's read-check-write stays one transaction of its own making; rows come back as
the session's objects, and changes made to them are written when the caller commits. The
detector's and verifier's reads (at the end) are Core statements built once, on the caller's
connection: they run for every signal and every verified attempt.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import bindparam, func, select
from sqlalchemy.engine import Connection
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


def live(session: Session, env: str, app: str) -> Release | None:
    """The app's live release in `env`: what a promotion out of it deploys."""
    return session.scalar(select(Release).where(Release.env == env, Release.app == app,
                                                Release.status == ReleaseStatus.LIVE))


# -- the detector's and verifier's reads (Core, prebuilt: they run for every signal and attempt) ---
_RELEASES = Release.__table__
_RELEASES_NEWEST_FIRST = (select(_RELEASES).where(_RELEASES.c.env == bindparam("env"),
                                                  _RELEASES.c.app == bindparam("app"))
                          .order_by(_RELEASES.c.number.desc()))
_RELEASE_OF_REQUEST = select(_RELEASES).where(_RELEASES.c.request_id == bindparam("request_id"))
_RELEASE_NUMBERED = select(_RELEASES).where(_RELEASES.c.env == bindparam("env"), _RELEASES.c.app == bindparam("app"),
                                            _RELEASES.c.number == bindparam("number"))


def newest_first(conn: Connection, env: str, app: str) -> list:
    return conn.execute(_RELEASES_NEWEST_FIRST, {"env": env, "app": app}).all()


def row_of_request(conn: Connection, request_id: str):
    """The release a deploy request made, or None if it has not made one (yet)."""
    return conn.execute(_RELEASE_OF_REQUEST, {"request_id": request_id}).first()


def row_numbered(conn: Connection, env: str, app: str, number):
    return conn.execute(_RELEASE_NUMBERED, {"env": env, "app": app, "number": number}).first()
