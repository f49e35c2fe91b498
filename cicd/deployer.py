"""Releases: build and start a new release beside the live one, health-gate it, then switch.

For now the code of every release is the bundled sample service (examples/sample_service);
fetching the app's repository over git comes with the deploy pipeline. A failed gate discards
the new replicas and leaves the live release serving.
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from . import proof
from .config import Settings
from .events import as_utc, iso, parse_iso, utcnow
from .runtime.base import Runtime, RuntimeFailure
from .store import Release, get_app, session_scope


class DeployError(ValueError):
    pass


def start(settings: Settings, runtime: Runtime, app_name: str, request_id: str, reason: str) -> dict:
    """Build and start release N+1; returns {"app", "release", "status", "started_at"}."""
    env = settings.env
    with session_scope(settings) as session:
        existing = session.scalar(select(Release).where(Release.request_id == request_id))
        if existing is not None:
            return _state(existing)
        app = get_app(session, env, app_name)
        if app is None:
            raise DeployError(f"app {app_name!r} is not onboarded in {env}")
        number = (session.scalar(select(func.max(Release.number)).where(Release.env == env,
                                                                         Release.app == app_name)) or 0) + 1
        release = Release(env=env, app=app_name, number=number, status="starting", replicas=app.spec["replicas"],
                          request_id=request_id)
        session.add(release)
        proof.append(session, env, "DEPLOY_STARTED", app=app_name,
                     payload={"release": number, "reason": reason, "replicas": app.spec["replicas"]})
        spec = app.spec
    try:
        staged = runtime.stage_release(spec, number)
    except RuntimeFailure as exc:
        return finish(settings, runtime, app_name, number, ok=False, detail=str(exc), build_failed=True)
    with session_scope(settings) as session:
        proof.append(session, env, "BUILD_SUCCEEDED", app=app_name, payload={"release": number})
        proof.append(session, env, "REPLICAS_STARTED", app=app_name, payload={"release": number, **staged})
        release = session.scalar(select(Release).where(Release.request_id == request_id))
        return _state(release)


def _state(release: Release) -> dict:
    return {"app": release.app, "release": release.number, "status": release.status,
            "started_at": iso(release.started_at)}


def gate(settings: Settings, runtime: Runtime, app_name: str, number: int, started_at: str) -> dict | None:
    """One look at the new release: None while waiting, else the finished deploy."""
    with session_scope(settings) as session:
        release = session.scalar(select(Release).where(Release.env == settings.env, Release.app == app_name,
                                                        Release.number == number))
        if release is None or release.status != "starting":
            return _state(release) if release else None
        wanted, deadline = release.replicas, get_app(session, settings.env, app_name).spec["health_deadline_s"]
    statuses = runtime.probe_release(app_name, number)
    if len(statuses) >= wanted and all(s.healthy for s in statuses):
        return finish(settings, runtime, app_name, number, ok=True,
                      detail=f"{len(statuses)} replicas healthy")
    if utcnow() - parse_iso(started_at) > timedelta(seconds=deadline):
        seen = ", ".join(f"{s.slot}:{s.status}" for s in statuses)
        return finish(settings, runtime, app_name, number, ok=False,
                      detail=f"not healthy within {deadline} s ({seen})")
    return None


def finish(settings: Settings, runtime: Runtime, app_name: str, number: int, ok: bool, detail: str,
           build_failed: bool = False) -> dict:
    env = settings.env
    switched = runtime.activate_release(app_name, number) if ok else runtime.discard_release(app_name, number)
    with session_scope(settings) as session:
        release = session.scalar(select(Release).where(Release.env == env, Release.app == app_name,
                                                        Release.number == number))
        release.status, release.detail, release.finished_at = ("live" if ok else "failed"), detail, utcnow()
        seconds = round((release.finished_at - as_utc(release.started_at)).total_seconds(), 3)
        if ok:
            for older in session.scalars(select(Release).where(Release.env == env, Release.app == app_name,
                                                               Release.status == "live", Release.number != number)):
                older.status = "superseded"
            proof.append(session, env, "HEALTH_GATE_PASSED", app=app_name, payload={"release": number, "detail": detail})
            proof.append(session, env, "DEPLOY_SUCCEEDED", app=app_name,
                         payload={"release": number, "seconds": seconds, **switched})
        else:
            if build_failed:
                proof.append(session, env, "BUILD_FAILED", app=app_name, payload={"release": number, "detail": detail})
            proof.append(session, env, "DEPLOY_FAILED", app=app_name,
                         payload={"release": number, "detail": detail, "seconds": seconds})
        return _state(release) | {"detail": detail, "seconds": seconds}


def scale(settings: Settings, runtime: Runtime, app_name: str, replicas: int, request_id: str) -> dict:
    """An operator's scaling (not the healer's): within the spec's limits, logged as such."""
    env = settings.env
    with session_scope(settings) as session:
        app = get_app(session, env, app_name)
        if app is None:
            raise DeployError(f"app {app_name!r} is not onboarded in {env}")
        low, high = app.spec["min_replicas"], app.spec["max_replicas"]
        if not low <= replicas <= high:
            raise DeployError(f"replicas: must be within the spec's limits {low}-{high}, got {replicas}")
        before = runtime.replica_count(app_name)
        proof.append(session, env, "SCALE_REQUESTED", app=app_name, payload={"from": before, "to": replicas})
    result = runtime.scale(app_name, replicas, op_key=f"scale/{request_id}")
    with session_scope(settings) as session:
        proof.append(session, env, "SCALED", app=app_name, payload=result)
    return result
