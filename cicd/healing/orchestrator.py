"""Run the gates on a decision and execute the allowed action exactly once, or refuse.

Exactly once: (incident id, attempt) is the execution's key, claimed with a unique constraint
before acting, and passed to the runtime as the op key. A redelivered or replayed decision finds
the key and does nothing twice. A refusal is a noop: logged, never retried. In prod, a decision
the environment gate holds back waits, claimed, for a human (`cicd approve`), then runs here.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cicd.core import actions, gates
from cicd.healing import approvals, loop
from cicd.delivery import deployer
from cicd.store import approvals as approval_rows
from cicd.store import executions, incidents, proof
from cicd.config import Settings, signing_key
from cicd.core.events import Decision, iso, parse_iso
from cicd.core.lifecycle import EXECUTION_RESUMABLE, ApprovalStatus, ExecutionStatus, IncidentStatus, transition
from cicd.runtime.base import Runtime, RuntimeFailure
from cicd.store import app_row, connection_of, incident_row, session_scope, transaction

GATE_NAMES = ("intake", "blocklist", "allowlist", "environment", "budget")
# What a host's agent does for an app placed on that host: its replicas are there. (A deploy action
# asks the deploy agent, which hands the deploy to the host itself; noop acts nowhere.)
HOST_ACTIONS = ("restart_service", "scale_workers")


def summary(ex, **extra) -> dict:
    """An execution (row or dict) as the chain passes it on."""
    if hasattr(ex, "_mapping"):       # a Core row
        ex = ex._mapping
    elif not isinstance(ex, dict):    # an ORM Execution (the reconciler's)
        ex = {name: getattr(ex, name, None) for name in
              ("env", "incident_id", "attempt", "app", "action", "params", "status", "gate", "reason", "result")}
    return {"env": ex["env"], "incident_id": ex["incident_id"], "attempt": ex["attempt"], "app": ex["app"],
            "action": ex["action"], "params": ex["params"], "status": ex["status"], "gate": ex.get("gate", ""),
            "reason": ex.get("reason", ""), "result": ex.get("result") or {}, **extra}


def _field(raw, name: str, kind: type):
    value = raw.get(name) if isinstance(raw, dict) else None
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _gate_context(settings: Settings, conn, runtime: Runtime, app_name: str | None, acted: list,
                  approved: bool = False) -> gates.GateContext:
    app = app_row(conn, settings.env, app_name) if app_name else None
    return loop.gate_context(settings, signing_key(settings), acted,
                             runtime.replica_count(app_name) if app else 0, app.spec if app else {}, approved)


def action_context(settings: Settings, runtime: Runtime, request_deploy) -> actions.ActionContext:
    return actions.ActionContext(
        runtime=runtime,
        release_info=lambda app, number: deployer.release_info(settings, app, number),
        request_deploy=request_deploy,
        cancel_release=lambda app, number, why: deployer.cancel(settings, runtime, app, number, why))


def _refuse(conn, settings: Settings, verdict: gates.Verdict, raw, decision: Decision | None,
            incident) -> dict:
    """Log the refusal (ORCH_REFUSE, the gate's own event, REFUSAL_EMIT_SUCCESS) and return a noop."""
    env = settings.env
    refusal = {"gate": verdict.gate, "reason": verdict.reason,
               "action": (_field(raw, "action", str) or "")[:80], "attempt": _field(raw, "attempt", int)}
    owner, app = (incident.id, incident.app) if incident else (None, None)
    proof.append(conn, env, "ORCH_REFUSE", incident_id=owner, app=app, payload=refusal)
    proof.append(conn, env, verdict.event, incident_id=owner, app=app, payload=refusal)
    # Only an authentic decision for a real incident may take the execution key: a forged one must
    # not be able to block the real decision for the same attempt.
    if verdict.gate != "intake" and decision is not None and incident is not None:
        executions.add_claim(conn, settings, decision, ExecutionStatus.REFUSED, gate=verdict.gate,
                             reason=verdict.reason)
    proof.append(conn, env, "REFUSAL_EMIT_SUCCESS", incident_id=owner, app=app, payload={"gate": verdict.gate})
    return {"env": env, "incident_id": owner, "attempt": refusal["attempt"], "app": app,
            "action": refusal["action"], "params": {}, "status": ExecutionStatus.REFUSED, "gate": verdict.gate,
            "reason": verdict.reason, "result": {}}


def _hold_for_approval(conn, settings: Settings, verdict: gates.Verdict, raw: dict, decision: Decision) -> dict:
    """Claim the key and wait for a human; the incident stays open, and visible, meanwhile."""
    approval = approvals.request_action(conn, settings, raw, verdict.reason)
    claim = executions.add_claim(conn, settings, decision, ExecutionStatus.AWAITING_APPROVAL, gate=verdict.gate,
                                 reason=verdict.reason, result={"approval": approval["id"]})
    return summary(claim, approval=approval["id"])


def execute(settings: Settings, runtime: Runtime, raw: dict, request_deploy) -> dict:
    """request_deploy(app, request_id, kind, ref, sha, reason) hands a deploy to the deploy agent."""
    env = settings.env
    incident_id, attempt = _field(raw, "incident_id", str), _field(raw, "attempt", int)
    app_name = _field(raw, "app", str)
    # Look first, without the write lock: the gates read a lot and write nothing.
    with transaction(settings, readonly=True) as conn:
        incident = incident_row(conn, incident_id) if incident_id else None
        if incident is not None and incident.env != env:
            incident = None
        acted = executions.recent_actions(conn, env, app_name) if app_name else []
        verdict, decision = gates.evaluate(raw, _gate_context(settings, conn, runtime, app_name, acted))
        host = _host_acting(settings, conn, decision) if verdict.allowed else ""
    names_open_incident = (incident is not None and decision is not None and incident.app == decision.app
                           and incident.status == IncidentStatus.OPEN)
    if (verdict.allowed or verdict.approval) and not names_open_incident:
        verdict = gates.Verdict(False, "intake", "INTAKE_REFUSED", "decision names no open incident of that app")
    wait = (loop.restart_wait_s(settings, acted, decision.params["slots"])
            if verdict.allowed and decision.action == "restart_service" else 0.0)
    # Then record, under the lock, with the claim checked again: another delivery of this decision
    # may have got here first, and the unique key says which one acts.
    with transaction(settings) as conn:
        claim = None
        if incident is not None and attempt is not None:
            claim = executions.claim_row(conn, incident_id, attempt)
        if claim is not None and claim.status not in EXECUTION_RESUMABLE:
            proof.append(conn, env, "EXECUTION_DEDUPLICATED", incident_id=incident_id, app=claim.app,
                         payload={"attempt": attempt, "status": claim.status})
            return summary(claim, deduplicated=True)
        if (verdict.allowed or verdict.approval) and incident_row(conn, incident_id).status != IncidentStatus.OPEN:
            # Closed since the look (its app removed meanwhile): nothing to act on, a logged noop.
            verdict = gates.Verdict(False, "intake", "INTAKE_REFUSED", "decision names no open incident of that app")
        if verdict.approval:
            return _hold_for_approval(conn, settings, verdict, raw, decision)
        if not verdict.allowed:
            return _refuse(conn, settings, verdict, raw, decision, incident)
        if wait > 0:
            return _defer(conn, settings, decision, claim, wait)
        proof.append(conn, env, "RL_INTAKE_VALIDATED", incident_id=incident_id, app=decision.app,
                     payload={"attempt": attempt, "nonce": decision.nonce})
        proof.append(conn, env, "EXECUTION_GATE_PASSED", incident_id=incident_id, app=decision.app,
                     payload={"attempt": attempt, "action": decision.action, "params": decision.params,
                              "gates": list(GATE_NAMES)})
        if claim is None:
            claim_id = executions.add_claim(conn, settings, decision, ExecutionStatus.STARTED)["id"]
        else:
            claim_id = claim.id
            executions.set_status(conn, claim_id, transition(claim.status, ExecutionStatus.STARTED))
        if host:
            return _dispatch(conn, settings, claim_id, decision, host)
    return _act(settings, runtime, request_deploy, claim_id, decision)


def _host_acting(settings: Settings, conn, decision: Decision | None) -> str:
    """The host whose agent must run the decision's action ("": this process runs it)."""
    if decision is None or decision.action not in HOST_ACTIONS:
        return ""
    app = app_row(conn, settings.env, decision.app)
    host = str(((app.spec if app else None) or {}).get("host") or "")
    return host if host != settings.host_name else ""


def _dispatch(conn, settings: Settings, claim_id: int, decision: Decision, host: str) -> dict:
    """The claim is started; its action is the host agent's (the caller sends it to {env}.host.{host}).
    If that agent is down, the message waits in its queue, and the incident with it: nothing runs
    until the agent is back, and then exactly once (the op key)."""
    proof.append(conn, settings.env, "HOST_DISPATCHED", incident_id=decision.incident_id, app=decision.app,
                 payload={"attempt": decision.attempt, "action": decision.action, "host": host,
                          "queue": settings.host_queue(host)})
    return summary(executions.claim_row_by_id(conn, claim_id), host=host)


@dataclass(frozen=True)
class _Claimed:
    """What acting needs of a decision, as its claim recorded it (the claim is the authority)."""
    incident_id: str
    attempt: int
    app: str
    action: str
    params: dict


def act_dispatched(settings: Settings, runtime: Runtime, incident_id: str, attempt: int, request_deploy) -> dict | None:
    """On the host agent: run the started claim (incident_id, attempt) by its key. A claim that is
    no longer started (done by an earlier delivery) is reported as it is, nothing done twice;
    None if there is no such claim."""
    with transaction(settings, readonly=True) as conn:
        claim = executions.claim_row(conn, incident_id, attempt)
    if claim is None:
        return None
    if claim.status != ExecutionStatus.STARTED:
        return summary(claim, deduplicated=True)
    decision = _Claimed(incident_id, attempt, claim.app, claim.action, dict(claim.params or {}))
    return _act(settings, runtime, request_deploy, claim.id, decision, host=settings.host_name)


def _defer(conn, settings: Settings, decision: Decision, claim, wait: float) -> dict:
    """Hold the restart until its backoff is over: a row with a due time (the housekeeping task
    sends it on then), not a message held for minutes in a worker."""
    due = settings.clock.now() + timedelta(seconds=wait)
    result = {"due_at": iso(due)}
    if claim is None:
        row = executions.add_claim(conn, settings, decision, ExecutionStatus.DEFERRED, result=result)
    else:
        executions.set_result(conn, claim.id, result)
        row = {**claim._mapping, "result": result}
    proof.append(conn, settings.env, "RESTART_BACKOFF", incident_id=decision.incident_id, app=decision.app,
                 payload={"attempt": decision.attempt, "wait_s": round(wait, 3), "due_at": iso(due)})
    return summary(row)


def due_deferred(settings: Settings, resend_after_s: float = 60.0) -> list[dict]:
    """Decisions whose backoff is over, to send through the chain again (each at most once a
    minute: a resend lost with a killed worker is made again)."""
    now, out = settings.clock.now(), []
    with session_scope(settings) as session:
        for claim in executions.deferred_claims(session, settings.env):
            result = dict(claim.result or {})
            resent = result.get("resent_at")
            if parse_iso(result["due_at"]) > now or (resent and (now - parse_iso(resent)).total_seconds() < resend_after_s):
                continue
            incident = incidents.incident_of(session, claim)
            if incident is None or incident.status != IncidentStatus.OPEN \
                    or (incident.decision or {}).get("attempt") != claim.attempt:
                continue
            claim.result = {**result, "resent_at": iso(now)}
            out.append(incident.decision)
    return out


def execute_approved(settings: Settings, runtime: Runtime, approval_id: str, request_deploy) -> dict | None:
    """Run a decision a human approved: signature, blocklist and catalogue are checked again."""
    env = settings.env
    with session_scope(settings) as session:
        approval = approval_rows.get(session, approval_id)
        if approval is None or approval.env != env or approval.kind != "action" \
                or approval.status != ApprovalStatus.GRANTED:
            return None
        raw = approval.payload["decision"]
        claim = executions.get_claim(session, approval.incident_id, approval.attempt)
        incident = incidents.incident_of(session, approval)
        if claim is None or claim.status not in (ExecutionStatus.AWAITING_APPROVAL, ExecutionStatus.STARTED) \
                or incident is None or incident.status != IncidentStatus.OPEN:
            return summary(claim, deduplicated=True) if claim else None
        conn, app_name = connection_of(session), _field(raw, "app", str)
        acted = executions.recent_actions(conn, env, app_name) if app_name else []
        verdict, decision = gates.evaluate(raw, _gate_context(settings, conn, runtime, app_name, acted,
                                                              approved=True))
        if not verdict.allowed:
            claim.status = transition(claim.status, ExecutionStatus.REFUSED)
            claim.gate, claim.reason = verdict.gate, verdict.reason
            return _refuse(session, settings, verdict, raw, None, incident)
        proof.append(session, env, "EXECUTION_GATE_PASSED", incident_id=incident.id, app=decision.app,
                     payload={"attempt": decision.attempt, "action": decision.action, "params": decision.params,
                              "approval": approval_id, "approved_by": approval.decided_by})
        claim.status = transition(claim.status, ExecutionStatus.STARTED)
        host = _host_acting(settings, conn, decision)
        if host:
            session.flush()
            return _dispatch(conn, settings, claim.id, decision, host)
    return _act(settings, runtime, request_deploy, claim.id, decision, approval=approval_id)


def _act(settings: Settings, runtime: Runtime, request_deploy, claim_id: int, decision: Decision, **extra) -> dict:
    # The claim is committed. A redelivery from here on resumes it, and the runtime's op key
    # keeps the effect single even if we die between acting and recording.
    op_key = f"{decision.incident_id}/{decision.attempt}"
    try:
        runtime.note_action(decision.app, decision.action, decision.params, op_key)
        result = actions.perform(action_context(settings, runtime, request_deploy), decision.app, decision.action,
                                 decision.params, op_key)
        status = ExecutionStatus.DONE
    except RuntimeFailure as exc:
        result, status = {"error": str(exc)}, ExecutionStatus.FAILED
    transition(ExecutionStatus.STARTED, status)  # _act runs only on a claim its caller set to started
    with transaction(settings) as conn:
        executions.record_outcome(conn, claim_id, status, result, settings.clock.now())
        proof.append(conn, settings.env, "ORCH_EXEC", incident_id=decision.incident_id, app=decision.app,
                     payload={"attempt": decision.attempt, "action": decision.action, "params": decision.params,
                              "status": status, "result": result, **extra})
        return summary(executions.claim_row_by_id(conn, claim_id))
