"""After an action: probe until the app is stable, or conclude that the attempt failed.

`check` is one look; the monitor task calls it again (a retry with countdown) while the answer
is "wait". `conclude` closes the incident (stable, escalated, refused) or opens the next attempt.
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from . import proof
from .config import Settings
from .events import ESCALATED, OPEN, REFUSED, STABLE, as_utc, parse_iso, utcnow
from .monitor import mean_utilization
from .runtime.base import ReplicaStatus, Runtime
from .store import App, Execution, Incident, Release, get_app, session_scope


def is_stable(settings: Settings, kind: str, statuses: list[ReplicaStatus], expected: int) -> bool:
    if not statuses or len(statuses) < expected or not all(s.healthy for s in statuses):
        return False
    if kind == "overload":
        return mean_utilization(statuses) <= settings.overload_threshold
    return True


# On top of the verify timeout, a deploy being waited for gets its spec's health deadline plus
# this much for fetching and building.
DEPLOY_ALLOWANCE_S = 60.0


def _awaited_release(session, execution: dict, incident: Incident):
    """The release this attempt's outcome depends on: (True, Release or None) or (False, None)."""
    result = execution.get("result") or {}
    if result.get("effect") == "deploy_requested":
        return True, session.scalar(select(Release).where(Release.request_id == result["request_id"]))
    if incident.kind == "slow_deploy" and execution.get("action") == "noop":
        number = (incident.context or {}).get("release")
        return True, session.scalar(select(Release).where(Release.env == incident.env, Release.app == incident.app,
                                                           Release.number == number))
    return False, None


def check(settings: Settings, runtime: Runtime, execution: dict, stable_checks: int, started_at: str):
    """("wait", stable_checks so far) or ("done", outcome)."""
    if execution.get("status") in ("awaiting_approval", "deferred"):
        return "done", None  # held for a human, or for a backoff: the chain runs again from there
    if execution.get("status") == "refused":
        return "done", conclude(settings, execution, "refused")
    if execution.get("status") == "failed":
        return "done", conclude(settings, execution, "failed", detail=execution.get("result", {}).get("error", ""))
    with session_scope(settings, readonly=True) as session:
        incident = session.get(Incident, execution["incident_id"])
        if incident is None or incident.status != OPEN or incident.attempt != execution["attempt"]:
            return "done", None  # already concluded by an earlier delivery of this task
        kind, app = incident.kind, incident.app
        awaiting, release = _awaited_release(session, execution, incident)
        release_status = (release.number, release.status, release.detail) if release else None
        timeout = settings.verify_timeout_s
        if awaiting:
            timeout += get_app(session, settings.env, app).spec["health_deadline_s"] + DEPLOY_ALLOWANCE_S
    timed_out = utcnow() - parse_iso(started_at) > timedelta(seconds=timeout)
    if awaiting and (release_status is None or release_status[1] in ("fetching", "starting", "switching")):
        if timed_out:
            return "done", conclude(settings, execution, "failed", detail=f"the release did not finish within {timeout:.0f} s")
        return "wait", 0
    if awaiting and release_status[1] == "failed":
        return "done", conclude(settings, execution, "failed",
                                detail=f"release {release_status[0]} failed: {release_status[2]}")
    statuses = runtime.probe([app])[app]
    if is_stable(settings, kind, statuses, runtime.replica_count(app)):
        stable_checks += 1
        if stable_checks >= settings.stable_checks:
            return "done", conclude(settings, execution, "stable")
    else:
        stable_checks = 0
    if timed_out:
        seen = ", ".join(f"{s.slot}:{s.status}" for s in statuses) or "no replicas"
        return "done", conclude(settings, execution, "failed", detail=f"not stable within {timeout:.0f} s ({seen})")
    return "wait", stable_checks


def conclude(settings: Settings, execution: dict, result: str, detail: str = "") -> dict | None:
    """Close the incident or move it to its next attempt; returns the outcome for learning."""
    env = settings.env
    with session_scope(settings) as session:
        incident = session.get(Incident, execution.get("incident_id") or "")
        if incident is None or incident.status != OPEN:
            return None
        attempt = incident.attempt
        now = utcnow()
        ttr = round((now - as_utc(incident.opened_at)).total_seconds(), 3)
        outcome = {"env": env, "incident_id": incident.id, "app": incident.app, "kind": incident.kind,
                   "severity": incident.severity, "fresh": bool((incident.context or {}).get("fresh_release")),
                   "attempt": attempt, "action": execution.get("action") or "",
                   "result": result, "time_to_recover_s": None, "next_attempt": None}
        base = {"attempt": attempt, "action": outcome["action"], "kind": incident.kind}
        if result == "stable":
            outcome["time_to_recover_s"] = ttr
            _close(incident, STABLE, f"recovered by {outcome['action']} on attempt {attempt}", now)
            proof.append(session, env, "SYSTEM_STABLE", incident_id=incident.id, app=incident.app,
                         payload={**base, "time_to_recover_s": ttr})
        elif result == "refused":
            # Past a budget the design says escalate; any other refusal closes the incident as refused.
            over_budget = execution.get("gate") == "budget"
            why = f"{outcome['action'] or 'decision'} refused by the {execution.get('gate')} gate: {execution.get('reason')}"
            _close(incident, ESCALATED if over_budget else REFUSED, why, now)
            _call_a_human(session, env, incident.app, why)
            proof.append(session, env, "ESCALATED" if over_budget else "INCIDENT_REFUSED",
                         incident_id=incident.id, app=incident.app, payload={**base, "reason": why})
        elif attempt < settings.max_attempts:
            incident.attempt, incident.decision = attempt + 1, None
            outcome["next_attempt"] = attempt + 1
            proof.append(session, env, "ATTEMPT_FAILED", incident_id=incident.id, app=incident.app,
                         payload={**base, "detail": detail, "next_attempt": attempt + 1})
        else:
            why = f"not recovered after {attempt} attempts; last: {outcome['action']} ({detail})"
            _close(incident, ESCALATED, why, now)
            _call_a_human(session, env, incident.app, why)
            proof.append(session, env, "ESCALATED", incident_id=incident.id, app=incident.app,
                         payload={**base, "reason": why, "history": _history(session, incident)})
        return outcome


def _close(incident: Incident, status: str, resolution: str, now) -> None:
    incident.status, incident.resolution, incident.closed_at, incident.open_key = status, resolution, now, None


def _call_a_human(session, env: str, app_name: str, why: str) -> None:
    app: App | None = get_app(session, env, app_name)
    if app is not None:
        app.attention = why[:200]


def _history(session, incident: Incident) -> list[dict]:
    rows = session.scalars(select(Execution).where(Execution.incident_id == incident.id).order_by(Execution.attempt))
    return [{"attempt": r.attempt, "action": r.action, "status": r.status, "reason": r.reason} for r in rows]
