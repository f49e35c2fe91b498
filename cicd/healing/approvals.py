"""Human approval: promotions into an environment, and risky actions and removals in prod, wait
for a person.

A request is a row in the target environment's database and an APPROVAL_REQUESTED record in its
proof chain; the answer (APPROVAL_GRANTED / APPROVAL_DENIED) records who answered and why.
Requests expire: an unanswered one becomes APPROVAL_EXPIRED, and an action it held back
escalates its incident. A grant's work (deploying a promotion, executing an action) is sent
through the control plane the caller hands to `approve`, so this module needs no broker; a
removal's work is done by the one approving, as a removal outside prod is.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Protocol

from cicd.delivery import onboarding, removal
from cicd.store import approvals as approval_rows
from cicd.store import apps as app_rows
from cicd.store import releases as release_rows
from cicd.store import executions, incidents, proof
from cicd.config import ENVIRONMENTS, Settings, check_env_name
from cicd.core.events import as_utc, iso, utcnow
from cicd.core.lifecycle import ApprovalStatus, ExecutionStatus, IncidentStatus, transition
from cicd.store import Approval, get_app, session_scope
from cicd.errors import CicdError
from cicd.runtime.base import Runtime


class ApprovalError(CicdError, ValueError):
    pass


def env_of(approval_id: str) -> str:
    parts = approval_id.split("-") if isinstance(approval_id, str) else []
    if len(parts) != 3 or parts[0] != "apr" or parts[1] not in ENVIRONMENTS:
        raise ApprovalError(f"approval id {approval_id!r}: expected apr-<env>-<hex>, e.g. apr-prod-1a2b3c4d")
    return parts[1]


def as_dict(a, now=None) -> dict:
    """An approval (ORM object or row) as shown and returned."""
    now = now or utcnow()
    status = a.status
    if status == ApprovalStatus.PENDING and as_utc(a.expires_at) <= now:
        status = ApprovalStatus.EXPIRED  # not yet swept by housekeeping, but already unanswerable
    return {"id": a.id, "env": a.env, "kind": a.kind, "app": a.app, "incident_id": a.incident_id,
            "attempt": a.attempt, "summary": a.summary, "status": status, "requested_by": a.requested_by,
            "requested_at": iso(a.requested_at), "expires_at": iso(a.expires_at), "decided_by": a.decided_by,
            "decided_at": iso(a.decided_at) if a.decided_at else None, "reason": a.reason, "payload": a.payload}


def _new(tx, settings: Settings, kind: str, app: str, payload: dict, summary: str, requested_by: str,
         incident_id: str | None = None, attempt: int | None = None) -> dict:
    """Inside the caller's transaction (an ORM session or a Core connection): the request, as_dict."""
    row = approval_rows.add(tx, settings, kind, app, payload, summary, requested_by, incident_id, attempt)
    proof.append(tx, settings.env, "APPROVAL_REQUESTED", incident_id=incident_id, app=app,
                 payload={"approval": row["id"], "kind": kind, "summary": summary, "requested_by": requested_by,
                          "expires_at": iso(row["expires_at"])})
    return as_dict(SimpleNamespace(**row), row["requested_at"])


def request_action(tx, settings: Settings, decision: dict, why: str) -> dict:
    """Inside the orchestrator's transaction: hold a signed decision back for a human."""
    summary = f"{decision['action']} {decision['params']} for {decision['incident_id']} ({why})"
    return _new(tx, settings, "action", decision["app"], {"decision": decision}, summary, "orchestrator",
                decision["incident_id"], decision["attempt"])


def request_promotion(target: Settings, source: Settings, app: str, requested_by: str) -> dict:
    """Ask to promote the app's live release in `source` into `target` (a later environment)."""
    if ENVIRONMENTS.index(check_env_name(target.env)) <= ENVIRONMENTS.index(check_env_name(source.env)):
        raise ApprovalError(f"--to {target.env}: promotion goes forward ({' -> '.join(ENVIRONMENTS)}), "
                            f"not from {source.env} to {target.env}")
    with session_scope(source) as session:
        record = get_app(session, source.env, app)
        if record is None:
            raise ApprovalError(f"{app} is not onboarded in {source.env}")
        live = release_rows.live(session, source.env, app)
        if live is None or not live.sha:
            raise ApprovalError(f"{app} has no live release in {source.env} to promote")
        spec = {**record.spec, "env": target.env}
        payload = {"from": source.env, "release": live.number, "sha": live.sha, "ref": live.ref, "spec": spec}
    summary = f"promote {app} release {payload['release']} ({payload['sha'][:12]}) from {source.env} to {target.env}"
    with session_scope(target) as session:
        return _new(session, target, "promotion", app, payload, summary, requested_by)


def request_removal(settings: Settings, app: str, requested_by: str) -> dict:
    """Ask to remove the app from prod; `approve` carries it out (see cicd.delivery.removal)."""
    if settings.env != "prod":
        raise ApprovalError(f"removing an app from {settings.env} needs no approval: `cicd remove {app} "
                            f"--env {settings.env}` removes it")
    with session_scope(settings) as session:
        if get_app(session, settings.env, app) is None:
            raise ApprovalError(f"{app} is not onboarded in {settings.env} "
                                f"(`cicd status --env {settings.env}` lists its apps)")
        waiting = app_rows.pending_approvals(session, settings.env, app, removal.KIND)
        if waiting and as_utc(waiting[0].expires_at) > settings.clock.now():
            raise ApprovalError(f"the removal of {app} already waits for approval as {waiting[0].id} "
                                f"(expires {iso(waiting[0].expires_at)})")
        summary = f"remove {app} from {settings.env}: stop its replicas, free its URL, drop its spec (history stays)"
        return _new(session, settings, removal.KIND, app, {"app": app}, summary, requested_by)


def pending(settings: Settings, include_decided: bool = False) -> list[dict]:
    with session_scope(settings) as session:
        now = settings.clock.now()
        return [as_dict(a, now) for a in approval_rows.listing(session, settings.env, include_decided)]


def _answer(session, settings: Settings, approval_id: str, status: ApprovalStatus, who: str,
            reason: str) -> Approval:
    """Record the answer to a pending, unexpired request, with who answered and why."""
    approval = approval_rows.get(session, approval_id, lock=True)
    if approval is None or approval.env != settings.env:
        raise ApprovalError(f"no approval {approval_id} in {settings.env}")
    if approval.status != ApprovalStatus.PENDING:
        raise ApprovalError(f"{approval_id} is already {approval.status}"
                            + (f" by {approval.decided_by}" if approval.decided_by else ""))
    now = settings.clock.now()
    if as_utc(approval.expires_at) <= now:
        raise ApprovalError(f"{approval_id} expired at {iso(approval.expires_at)}; request it again")
    approval.status = transition(approval.status, status)
    approval.decided_by, approval.decided_at, approval.reason = who, now, reason
    event = "APPROVAL_GRANTED" if status == ApprovalStatus.GRANTED else "APPROVAL_DENIED"
    proof.append(session, settings.env, event, incident_id=approval.incident_id, app=approval.app,
                 payload={"approval": approval_id, "kind": approval.kind, "by": who, "reason": reason,
                          "summary": approval.summary})
    return approval


def grant(settings: Settings, approval_id: str, who: str, reason: str) -> dict:
    with session_scope(settings) as session:
        return as_dict(_answer(session, settings, approval_id, ApprovalStatus.GRANTED, who, reason))


class GrantedWorkSender(Protocol):
    """What a grant needs of the control plane (workers.client.ControlPlane): the agents' broker."""

    def require_broker(self) -> None: ...

    def run_approved(self, approval_id: str) -> None: ...

    def deploy(self, app: str, ref: str, reason: str, kind: str, sha: str | None, request_id: str | None) -> str: ...


def approve(settings: Settings, approval_id: str, who: str, reason: str, plane: GrantedWorkSender,
            on_granted: Callable[[dict], None] = lambda granted: None, runtime: Runtime | None = None) -> dict:
    """Grant a request and send the work it held: the held action's chain, or the promoted app,
    registered here with the spec it had and deployed at the same sha (returned as "sha"), or
    the removal, done here on `runtime` (its result returned as "removal").

    The broker must answer first: with it down the grant would be recorded and its work never
    sent, so the request stays pending instead. A removal needs no broker; its grant is recorded
    only with the removal's start (a deploy under way refuses both). `on_granted` hears of the
    grant once it is recorded, before its work is sent.
    """
    with session_scope(settings, readonly=True) as session:
        asked = approval_rows.get(session, approval_id)
        if asked is None or asked.env != settings.env:
            raise ApprovalError(f"no approval {approval_id} in {settings.env}")
        kind, app = asked.kind, asked.app
    if kind == removal.KIND:
        return _approve_removal(settings, approval_id, app, who, reason, runtime, on_granted)
    plane.require_broker()
    granted = grant(settings, approval_id, who, reason)
    on_granted(granted)
    if granted["kind"] == "action":
        plane.run_approved(approval_id)
        return granted
    promoted = onboarding.register_promoted(settings, granted)
    if not promoted["ok"]:
        raise onboarding.OnboardingRefused([onboarding.Refusal(**r) for r in promoted["refusals"]])
    plane.deploy(granted["app"], promoted["ref"], f"promotion {approval_id}", kind="promotion", sha=promoted["sha"],
                 request_id=f"promotion/{approval_id}")
    return {**granted, "sha": promoted["sha"]}


def _approve_removal(settings: Settings, approval_id: str, app: str, who: str, reason: str,
                     runtime: Runtime | None, on_granted: Callable[[dict], None]) -> dict:
    if runtime is None:
        from cicd.runtime import make_runtime
        runtime = make_runtime(settings)

    def grant_in(session) -> dict:  # the same rules as every answer: pending, unexpired, this env
        return as_dict(_answer(session, settings, approval_id, ApprovalStatus.GRANTED, who, reason),
                       settings.clock.now())
    granted = []
    done = removal.remove(settings, runtime, app, who, grant=grant_in,
                          on_granted=lambda g: (granted.append(g), on_granted(g)))
    return {**granted[0], "removal": done}


def deny(settings: Settings, approval_id: str, who: str, reason: str) -> dict:
    """Deny; an action held back for it is refused, and its incident closes as refused."""
    if not reason.strip():
        raise ApprovalError("--reason: say why it is denied (it goes to the proof log)")
    with session_scope(settings) as session:
        approval = _answer(session, settings, approval_id, ApprovalStatus.DENIED, who, reason)
        if approval.kind == "action":
            _close_held_incident(session, settings, approval, IncidentStatus.REFUSED, "INCIDENT_REFUSED",
                                 f"{approval.summary}: denied by {who}: {reason}")
        return as_dict(approval)


def expire_due(settings: Settings) -> list[str]:
    """Housekeeping: pending requests past their time become expired; held actions escalate."""
    expired = []
    with session_scope(settings) as session:
        for approval in approval_rows.expired(session, settings.env, settings.clock.now()):
            approval.status = transition(approval.status, ApprovalStatus.EXPIRED)
            proof.append(session, settings.env, "APPROVAL_EXPIRED", incident_id=approval.incident_id, app=approval.app,
                         payload={"approval": approval.id, "kind": approval.kind, "summary": approval.summary})
            if approval.kind == "action":
                _close_held_incident(session, settings, approval, IncidentStatus.ESCALATED, "ESCALATED",
                                     f"{approval.summary}: nobody answered before {iso(approval.expires_at)}")
            expired.append(approval.id)
    return expired


def _close_held_incident(session, settings: Settings, approval: Approval, status: IncidentStatus, event: str,
                         why: str) -> None:
    incident = incidents.incident_of(session, approval)
    if incident is None or incident.status != IncidentStatus.OPEN:
        return
    execution = executions.get_claim(session, incident.id, approval.attempt)
    if execution is not None:
        execution.status, execution.reason = transition(execution.status, ExecutionStatus.REFUSED), why
    now = settings.clock.now()
    incident.status = transition(incident.status, status)
    incident.resolution, incident.closed_at, incident.open_key = why, now, None
    app = get_app(session, settings.env, incident.app)
    if app is not None:
        app.attention = why[:200]
    proof.append(session, settings.env, event, incident_id=incident.id, app=incident.app,
                 payload={"attempt": incident.attempt, "reason": why, "approval": approval.id})
