"""Run the gates on a decision and execute the allowed action exactly once, or refuse.

Exactly once: (incident id, attempt) is the execution's key, claimed with a unique constraint
before acting, and passed to the runtime as the op key. A redelivered or replayed decision finds
the key and does nothing twice. A refusal is a noop: logged, never retried. In prod, a decision
the environment gate holds back waits, claimed, for a human (`cicd approve`), then runs here.
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from . import actions, approvals, deployer, gates, proof
from .config import Settings, signing_key
from .events import OPEN, Decision, as_utc, iso, parse_iso, utcnow
from .runtime.base import Runtime, RuntimeFailure
from .store import Approval, Execution, Incident, get_app, session_scope

GATE_NAMES = ("intake", "blocklist", "allowlist", "environment", "budget")


def summary(ex: Execution, **extra) -> dict:
    return {"env": ex.env, "incident_id": ex.incident_id, "attempt": ex.attempt, "app": ex.app,
            "action": ex.action, "params": ex.params, "status": ex.status, "gate": ex.gate,
            "reason": ex.reason, "result": ex.result or {}, **extra}


def _field(raw, name: str, kind: type):
    value = raw.get(name) if isinstance(raw, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _done_recently(session, env: str, app: str, action: str, since) -> int:
    return session.scalar(select(func.count()).select_from(Execution).where(
        Execution.env == env, Execution.app == app, Execution.action == action,
        Execution.status == "done", Execution.started_at >= since)) or 0


def _gate_context(settings: Settings, session, runtime: Runtime, app_name: str | None,
                  approved: bool = False) -> gates.GateContext:
    now = utcnow()
    app = get_app(session, settings.env, app_name) if app_name else None
    spec = app.spec if app else {}
    since = now - timedelta(seconds=settings.budget_window_s)
    return gates.GateContext(
        env=settings.env, key=signing_key(settings), now=now, demo_mode=settings.demo_mode,
        max_age_s=settings.decision_max_age_s,
        restarts_in_window=_done_recently(session, settings.env, app_name, "restart_service", since) if app else 0,
        scales_in_window=_done_recently(session, settings.env, app_name, "scale_workers", since) if app else 0,
        restart_budget=settings.restart_budget, scale_budget=settings.scale_budget,
        current_replicas=runtime.replica_count(app_name) if app else 0,
        min_replicas=spec.get("min_replicas", 1), max_replicas=spec.get("max_replicas", 1), approved=approved,
    )


def action_context(settings: Settings, runtime: Runtime, request_deploy) -> actions.ActionContext:
    return actions.ActionContext(
        runtime=runtime,
        release_info=lambda app, number: deployer.release_info(settings, app, number),
        request_deploy=request_deploy,
        cancel_release=lambda app, number, why: deployer.cancel(settings, runtime, app, number, why))


def _refuse(session, settings: Settings, verdict: gates.Verdict, raw, decision: Decision | None,
            incident: Incident | None) -> dict:
    """Log the refusal (ORCH_REFUSE, the gate's own event, REFUSAL_EMIT_SUCCESS) and return a noop."""
    env = settings.env
    refusal = {"gate": verdict.gate, "reason": verdict.reason,
               "action": (_field(raw, "action", str) or "")[:80], "attempt": _field(raw, "attempt", int)}
    owner, app = (incident.id, incident.app) if incident else (None, None)
    proof.append(session, env, "ORCH_REFUSE", incident_id=owner, app=app, payload=refusal)
    proof.append(session, env, verdict.event, incident_id=owner, app=app, payload=refusal)
    # Only an authentic decision for a real incident may take the execution key: a forged one must
    # not be able to block the real decision for the same attempt.
    if verdict.gate != "intake" and decision is not None and incident is not None:
        session.add(Execution(env=env, app=decision.app, incident_id=decision.incident_id, attempt=decision.attempt,
                              action=decision.action, params=decision.params, status="refused", gate=verdict.gate,
                              reason=verdict.reason, nonce=decision.nonce))
    proof.append(session, env, "REFUSAL_EMIT_SUCCESS", incident_id=owner, app=app, payload={"gate": verdict.gate})
    return {"env": env, "incident_id": owner, "attempt": refusal["attempt"], "app": app,
            "action": refusal["action"], "params": {}, "status": "refused", "gate": verdict.gate,
            "reason": verdict.reason, "result": {}}


def _hold_for_approval(session, settings: Settings, verdict: gates.Verdict, raw: dict, decision: Decision) -> dict:
    """Claim the key and wait for a human; the incident stays open, and visible, meanwhile."""
    approval = approvals.request_action(session, settings, raw, verdict.reason)
    claim = Execution(env=settings.env, app=decision.app, incident_id=decision.incident_id, attempt=decision.attempt,
                      action=decision.action, params=decision.params, status="awaiting_approval",
                      gate=verdict.gate, reason=verdict.reason, nonce=decision.nonce, result={"approval": approval.id})
    session.add(claim)
    return summary(claim, approval=approval.id)


def execute(settings: Settings, runtime: Runtime, raw: dict, request_deploy) -> dict:
    """request_deploy(app, request_id, kind, ref, sha, reason) hands a deploy to the deploy agent."""
    env = settings.env
    incident_id, attempt = _field(raw, "incident_id", str), _field(raw, "attempt", int)
    # Look first, without the write lock: the gates read a lot and write nothing.
    with session_scope(settings, readonly=True) as session:
        incident = session.get(Incident, incident_id) if incident_id else None
        if incident is not None and incident.env != env:
            incident = None
        verdict, decision = gates.evaluate(raw, _gate_context(settings, session, runtime, _field(raw, "app", str)))
        names_open_incident = (incident is not None and decision is not None and incident.app == decision.app
                               and incident.status == OPEN)
        if (verdict.allowed or verdict.approval) and not names_open_incident:
            verdict = gates.Verdict(False, "intake", "INTAKE_REFUSED", "decision names no open incident of that app")
        wait = (_restart_backoff(session, settings, decision.app, decision.params["slots"])
                if verdict.allowed and decision.action == "restart_service" else 0.0)
    # Then record, under the lock, with the claim checked again: another delivery of this decision
    # may have got here first, and the unique key says which one acts.
    with session_scope(settings) as session:
        claim = None
        if incident is not None and attempt is not None:
            claim = session.scalar(select(Execution).where(Execution.incident_id == incident_id,
                                                           Execution.attempt == attempt))
        if claim is not None and claim.status not in ("started", "deferred"):
            proof.append(session, env, "EXECUTION_DEDUPLICATED", incident_id=incident_id, app=claim.app,
                         payload={"attempt": attempt, "status": claim.status})
            return summary(claim, deduplicated=True)
        if verdict.approval:
            return _hold_for_approval(session, settings, verdict, raw, decision)
        if not verdict.allowed:
            return _refuse(session, settings, verdict, raw, decision, incident)
        if wait > 0:
            return _defer(session, settings, decision, claim, wait)
        proof.append(session, env, "RL_INTAKE_VALIDATED", incident_id=incident_id, app=decision.app,
                     payload={"attempt": attempt, "nonce": decision.nonce})
        proof.append(session, env, "EXECUTION_GATE_PASSED", incident_id=incident_id, app=decision.app,
                     payload={"attempt": attempt, "action": decision.action, "params": decision.params,
                              "gates": list(GATE_NAMES)})
        if claim is None:
            claim = Execution(env=env, app=decision.app, incident_id=incident_id, attempt=attempt,
                              action=decision.action, params=decision.params, status="started", nonce=decision.nonce)
            session.add(claim)
        claim.status = "started"
    return _act(settings, runtime, request_deploy, claim.id, decision)


def _restart_backoff(session, settings: Settings, app: str, slots: list[int]) -> float:
    """Per replica, as Kubernetes backs off per container: the longest wait any of these slots owes."""
    restarts = session.execute(select(Execution.started_at, Execution.params).where(
        Execution.env == settings.env, Execution.app == app, Execution.action == "restart_service",
        Execution.status == "done")).all()
    return max((gates.restart_backoff_s([as_utc(t) for t, params in restarts if slot in params.get("slots", [])],
                                        utcnow(), settings.backoff_base_s, settings.backoff_max_s,
                                        settings.backoff_reset_s) for slot in slots), default=0.0)


def _defer(session, settings: Settings, decision: Decision, claim: Execution | None, wait: float) -> dict:
    """Hold the restart until its backoff is over: a row with a due time (the housekeeping task
    sends it on then), not a message held for minutes in a worker."""
    due = utcnow() + timedelta(seconds=wait)
    if claim is None:
        claim = Execution(env=settings.env, app=decision.app, incident_id=decision.incident_id,
                          attempt=decision.attempt, action=decision.action, params=decision.params,
                          status="deferred", nonce=decision.nonce)
        session.add(claim)
    claim.result = {"due_at": iso(due)}
    proof.append(session, settings.env, "RESTART_BACKOFF", incident_id=decision.incident_id, app=decision.app,
                 payload={"attempt": decision.attempt, "wait_s": round(wait, 3), "due_at": iso(due)})
    return summary(claim)


def due_deferred(settings: Settings, resend_after_s: float = 60.0) -> list[dict]:
    """Decisions whose backoff is over, to send through the chain again (each at most once a
    minute: a resend lost with a killed worker is made again)."""
    now, out = utcnow(), []
    with session_scope(settings) as session:
        for claim in session.scalars(select(Execution).where(Execution.env == settings.env,
                                                             Execution.status == "deferred")):
            result = dict(claim.result or {})
            resent = result.get("resent_at")
            if parse_iso(result["due_at"]) > now or (resent and (now - parse_iso(resent)).total_seconds() < resend_after_s):
                continue
            incident = session.get(Incident, claim.incident_id)
            if incident is None or incident.status != OPEN or (incident.decision or {}).get("attempt") != claim.attempt:
                continue
            claim.result = {**result, "resent_at": iso(now)}
            out.append(incident.decision)
    return out


def execute_approved(settings: Settings, runtime: Runtime, approval_id: str, request_deploy) -> dict | None:
    """Run a decision a human approved: signature, blocklist and catalogue are checked again."""
    env = settings.env
    with session_scope(settings) as session:
        approval = session.get(Approval, approval_id)
        if approval is None or approval.env != env or approval.kind != "action" or approval.status != "granted":
            return None
        raw = approval.payload["decision"]
        claim = session.scalar(select(Execution).where(Execution.incident_id == approval.incident_id,
                                                       Execution.attempt == approval.attempt))
        incident = session.get(Incident, approval.incident_id)
        if claim is None or claim.status not in ("awaiting_approval", "started") \
                or incident is None or incident.status != OPEN:
            return summary(claim, deduplicated=True) if claim else None
        verdict, decision = gates.evaluate(raw, _gate_context(settings, session, runtime, raw.get("app"), approved=True))
        if not verdict.allowed:
            claim.status, claim.gate, claim.reason = "refused", verdict.gate, verdict.reason
            return _refuse(session, settings, verdict, raw, None, incident)
        proof.append(session, env, "EXECUTION_GATE_PASSED", incident_id=incident.id, app=decision.app,
                     payload={"attempt": decision.attempt, "action": decision.action, "params": decision.params,
                              "approval": approval_id, "approved_by": approval.decided_by})
        claim.status = "started"
    return _act(settings, runtime, request_deploy, claim.id, decision, approval=approval_id)


def _act(settings: Settings, runtime: Runtime, request_deploy, claim_id: int, decision: Decision, **extra) -> dict:
    # The claim is committed. A redelivery from here on resumes it, and the runtime's op key
    # keeps the effect single even if we die between acting and recording.
    op_key = f"{decision.incident_id}/{decision.attempt}"
    try:
        runtime.note_action(decision.app, decision.action, decision.params, op_key)
        result = actions.perform(action_context(settings, runtime, request_deploy), decision.app, decision.action,
                                 decision.params, op_key)
        status = "done"
    except RuntimeFailure as exc:
        result, status = {"error": str(exc)}, "failed"
    with session_scope(settings) as session:
        execution = session.get(Execution, claim_id)
        execution.status, execution.result, execution.finished_at = status, result, utcnow()
        proof.append(session, settings.env, "ORCH_EXEC", incident_id=decision.incident_id, app=decision.app,
                     payload={"attempt": decision.attempt, "action": decision.action, "params": decision.params,
                              "status": status, "result": result, **extra})
        return summary(execution)
