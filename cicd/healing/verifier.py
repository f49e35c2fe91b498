"""After an action: probe until the app is stable, or conclude that the attempt failed.

`check` is one look; the monitor task calls it again (a retry with countdown) while the answer
is "wait". `conclude` closes the incident (stable, escalated, refused) or opens the next attempt.
"""
from __future__ import annotations

import logging
from datetime import timedelta

from cicd.store import incidents, proof
from cicd.store import releases as release_rows
from cicd.config import Settings
from cicd.core.events import as_utc, parse_iso
from cicd.core.lifecycle import EXECUTION_WAITING, AttemptEnd, ExecutionStatus, IncidentStatus, Outcome
from cicd.healing.loop import attempt_outcome, is_stable, release_result, verify_timeout_s
from cicd.runtime.base import Runtime
from cicd.store import app_row, incident_row, transaction, update_incident

log = logging.getLogger(__name__)


def _awaited_release(conn, execution: dict, incident):
    """The release this attempt's outcome depends on: (True, release row or None) or (False, None)."""
    result = execution.get("result") or {}
    if result.get("effect") == "deploy_requested":
        return True, release_rows.row_of_request(conn, result["request_id"])
    if incident.kind == "slow_deploy" and execution.get("action") == "noop":
        number = (incident.context or {}).get("release")
        return True, release_rows.row_numbered(conn, incident.env, incident.app, number)
    return False, None


def check(settings: Settings, runtime: Runtime, execution: dict, stable_checks: int, started_at: str):
    """("wait", stable_checks so far) or ("done", outcome)."""
    if execution.get("status") in EXECUTION_WAITING:
        return "done", None  # held for a human, or for a backoff: the chain runs again from there
    if execution.get("status") == ExecutionStatus.REFUSED:
        return "done", conclude(settings, execution, Outcome.REFUSED)
    if execution.get("status") == ExecutionStatus.FAILED:
        return "done", conclude(settings, execution, Outcome.FAILED,
                                detail=execution.get("result", {}).get("error", ""))
    with transaction(settings, readonly=True) as conn:
        incident = incident_row(conn, execution["incident_id"])
        if incident is None or incident.status != IncidentStatus.OPEN or incident.attempt != execution["attempt"]:
            return "done", None  # already concluded by an earlier delivery of this task
        kind, app = incident.kind, incident.app
        widened = (incident.context or {}).get("widened")
        awaiting, release = _awaited_release(conn, execution, incident)
        # A deploy (a rollback, a retry) replaces every replica, the crashed one included: its
        # verdict stands. Only an attempt on some replicas is outrun by a crash on others.
        deploys = (execution.get("result") or {}).get("effect") == "deploy_requested"
        outrun = (widened if widened and not deploys and widened.get("after_attempt", 0) >= execution["attempt"]
                  else None)
        release_status = (release.number, release.status, release.detail) if release else None
        record = app_row(conn, settings.env, app) if awaiting else None
        if awaiting and record is None:  # removed meanwhile (the removal closes the incident too)
            log.info("no verdict for %s: %s was removed from %s", incident.id, app, settings.env)
            return "done", None
        timeout = verify_timeout_s(settings, record.spec if awaiting else {}, awaiting)
    if outrun:
        # A crash was folded into the incident after this attempt was decided: its verdict would
        # only wait out the timeout, since nothing this attempt did heals that crash.
        by = outrun.get("by") or {}
        return "done", conclude(settings, execution, Outcome.FAILED,
                                detail=f"{by.get('kind', 'a crash')} on slots {by.get('slots')} after this "
                                       f"attempt's decision: the next attempt acts on it")
    timed_out = settings.clock.now() - parse_iso(started_at) > timedelta(seconds=timeout)
    waiting_on = release_result(release_status[1] if release_status else None) if awaiting else None
    if waiting_on == "wait":
        if timed_out:
            return "done", conclude(settings, execution, Outcome.FAILED,
                                    detail=f"the release did not finish within {timeout:.0f} s")
        return "wait", 0
    if waiting_on == Outcome.FAILED:
        return "done", conclude(settings, execution, Outcome.FAILED,
                                detail=f"release {release_status[0]} failed: {release_status[2]}")
    statuses = runtime.probe([app])[app]
    if is_stable(settings, kind, statuses, runtime.replica_count(app)):
        stable_checks += 1
        if stable_checks >= settings.stable_checks:
            return "done", conclude(settings, execution, Outcome.STABLE)
    else:
        stable_checks = 0
    if timed_out:
        seen = ", ".join(f"{s.slot}:{s.status}" for s in statuses) or "no replicas"
        return "done", conclude(settings, execution, Outcome.FAILED,
                                detail=f"not stable within {timeout:.0f} s ({seen})")
    return "wait", stable_checks


def conclude(settings: Settings, execution: dict, result: Outcome, detail: str = "") -> dict | None:
    """Close the incident or move it to its next attempt; returns the outcome for learning."""
    env = settings.env
    with transaction(settings) as conn:
        incident = incident_row(conn, execution.get("incident_id") or "", lock=True)
        if incident is None or incident.status != IncidentStatus.OPEN:
            return None
        attempt = incident.attempt
        now = settings.clock.now()
        ttr = round((now - as_utc(incident.opened_at)).total_seconds(), 3)
        outcome = {"env": env, "incident_id": incident.id, "app": incident.app, "kind": incident.kind,
                   "severity": incident.severity, "fresh": bool((incident.context or {}).get("fresh_release")),
                   "attempt": attempt, "action": execution.get("action") or "",
                   "result": result, "time_to_recover_s": None, "next_attempt": None}
        base = {"attempt": attempt, "action": outcome["action"], "kind": incident.kind}
        ending = attempt_outcome(settings, result, attempt, execution.get("gate") or "")
        if ending == AttemptEnd.STABLE:
            outcome["time_to_recover_s"] = ttr
            incidents.close(conn, incident, IncidentStatus.STABLE,
                            f"recovered by {outcome['action']} on attempt {attempt}", now)
            proof.append(conn, env, "SYSTEM_STABLE", incident_id=incident.id, app=incident.app,
                         payload={**base, "time_to_recover_s": ttr})
        elif result == Outcome.REFUSED:
            over_budget = ending == AttemptEnd.ESCALATE
            why = f"{outcome['action'] or 'decision'} refused by the {execution.get('gate')} gate: {execution.get('reason')}"
            incidents.close(conn, incident, IncidentStatus.ESCALATED if over_budget else IncidentStatus.REFUSED,
                            why, now)
            incidents.set_attention(conn, env, incident.app, why)
            proof.append(conn, env, "ESCALATED" if over_budget else "INCIDENT_REFUSED",
                         incident_id=incident.id, app=incident.app, payload={**base, "reason": why})
        elif ending == AttemptEnd.NEXT_ATTEMPT:
            update_incident(conn, incident.id, attempt=attempt + 1, decision=None)
            outcome["next_attempt"] = attempt + 1
            proof.append(conn, env, "ATTEMPT_FAILED", incident_id=incident.id, app=incident.app,
                         payload={**base, "detail": detail, "next_attempt": attempt + 1})
        else:
            why = f"not recovered after {attempt} attempts; last: {outcome['action']} ({detail})"
            incidents.close(conn, incident, IncidentStatus.ESCALATED, why, now)
            incidents.set_attention(conn, env, incident.app, why)
            proof.append(conn, env, "ESCALATED", incident_id=incident.id, app=incident.app,
                         payload={**base, "reason": why, "history": incidents.attempt_history(conn, incident.id)})
        return outcome
