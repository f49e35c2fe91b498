"""The orchestrator's gates, in order; the first refusal wins. Each is a small pure function.

A refusal is a noop that is logged and never retried. The gates see only the decision and a
GateContext the orchestrator filled from the store, so every rule is testable without a broker.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cicd.core import actions, signing
from cicd.core.events import Decision, MalformedEvent, parse_iso


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    gate: str = ""
    event: str = ""    # the specific refusal event for the proof log
    reason: str = ""
    approval: bool = False  # not refused: held back until a human approves it

    @classmethod
    def allow(cls) -> "Verdict":
        return cls(True)


@dataclass(frozen=True)
class GateContext:
    env: str
    key: bytes
    now: datetime
    demo_mode: bool = False
    max_age_s: float = 300.0
    restarts_in_window: int = 0
    scales_in_window: int = 0
    restart_budget: int = 6
    scale_budget: int = 6
    current_replicas: int = 0
    min_replicas: int = 1
    max_replicas: int = 6
    # A human approved this very decision: its age, the environment rule and the budget that held
    # it back no longer apply (signature, blocklist and catalogue still do).
    approved: bool = False


def _refuse(gate: str, event: str, reason: str) -> Verdict:
    return Verdict(False, gate, event, reason)


def refuse_bad_intake(raw: dict, ctx: GateContext) -> tuple[Verdict, Decision | None]:
    """Gate 1: only well-formed, fresh decisions signed with this environment's key.

    Replays of a valid decision are stopped one step earlier, by the execution key.
    """
    try:
        decision = Decision.from_dict(raw)
    except MalformedEvent as exc:
        return _refuse("intake", "INTAKE_REFUSED", f"malformed decision: {exc}"), None
    if decision.env != ctx.env:
        return _refuse("intake", "INTAKE_REFUSED",
                       f"decision is for environment {decision.env!r}, this orchestrator serves {ctx.env!r}"), decision
    if not decision.signature:
        return _refuse("intake", "INTAKE_REFUSED", "decision is unsigned"), decision
    if not signing.is_valid(decision.signed_body(), decision.signature, ctx.key):
        return _refuse("intake", "INTAKE_REFUSED", "signature does not verify (forged, altered or "
                       "signed with another environment's key)"), decision
    try:
        issued = parse_iso(decision.issued_at)
    except ValueError:
        return _refuse("intake", "INTAKE_REFUSED", "issued_at is not an ISO-8601 UTC time"), decision
    if issued > ctx.now + timedelta(seconds=5):
        return _refuse("intake", "INTAKE_REFUSED", "decision is issued in the future"), decision
    if not ctx.approved and ctx.now - issued > timedelta(seconds=ctx.max_age_s):
        return _refuse("intake", "INTAKE_REFUSED",
                       f"decision is stale: issued more than {ctx.max_age_s:.0f} s ago"), decision
    return Verdict.allow(), decision


def refuse_blocklisted(decision: Decision, ctx: GateContext) -> Verdict:
    """Gate 2: destructive actions are refused everywhere, under any spelling."""
    if actions.is_blocklisted(decision.action):
        return _refuse("blocklist", "UNSAFE_ACTION_REFUSED",
                       f"{decision.action!r} is a destructive action, refused in every environment")
    return Verdict.allow()


def refuse_uncatalogued(decision: Decision, ctx: GateContext) -> Verdict:
    """Gate 3: only catalogued actions with well-formed params; fewer still in DEMO_MODE."""
    if decision.action not in actions.CATALOGUE:
        return _refuse("allowlist", "ACTION_NOT_ALLOWED",
                       f"{decision.action!r} is not in the action catalogue ({', '.join(actions.ACTIONS)})")
    problem = actions.params_problem(decision.action, decision.params)
    if problem:
        return _refuse("allowlist", "ACTION_NOT_ALLOWED", problem)
    if ctx.demo_mode:
        klass = actions.action_class(decision.action, decision.params, ctx.current_replicas)
        if klass not in actions.DEMO_MODE_ALLOWED:
            return _refuse("allowlist", "DEMO_MODE_BLOCK",
                           f"{klass} is not allowed in DEMO_MODE (only {', '.join(sorted(actions.DEMO_MODE_ALLOWED))})")
    return Verdict.allow()


def refuse_by_environment(decision: Decision, ctx: GateContext) -> Verdict:
    """Gate 4: stage takes only deterministic decisions; in prod, deploy actions and scaling past
    the spec's limit wait for a human (not a refusal: the incident stays open meanwhile)."""
    if ctx.approved:
        return Verdict.allow()
    if ctx.env == "stage" and decision.mode != "greedy":
        return _refuse("environment", "ENVIRONMENT_REFUSED",
                       f"stage is deterministic: a {decision.mode!r} decision is refused")
    if ctx.env == "prod":
        if decision.action in actions.DEPLOY_ACTIONS:
            return Verdict(False, "environment", "APPROVAL_REQUESTED", f"{decision.action} in prod needs approval",
                           approval=True)
        if decision.action == "scale_workers" and decision.params["replicas"] > ctx.max_replicas:
            return Verdict(False, "environment", "APPROVAL_REQUESTED",
                           f"scaling to {decision.params['replicas']} is past the spec's limit of "
                           f"{ctx.max_replicas} in prod", approval=True)
    return Verdict.allow()


def refuse_over_budget(decision: Decision, ctx: GateContext) -> Verdict:
    """Gate 5: no flapping. Past the restart/scale budget or the spec's replica limits: escalate."""
    if ctx.approved:
        return Verdict.allow()
    if decision.action == "restart_service" and ctx.restarts_in_window >= ctx.restart_budget:
        return _refuse("budget", "BUDGET_EXCEEDED",
                       f"restart budget spent: {ctx.restarts_in_window} restarts in the window (limit {ctx.restart_budget})")
    if decision.action == "scale_workers":
        if ctx.scales_in_window >= ctx.scale_budget:
            return _refuse("budget", "BUDGET_EXCEEDED",
                           f"scale budget spent: {ctx.scales_in_window} scalings in the window (limit {ctx.scale_budget})")
        target = decision.params["replicas"]
        if not ctx.min_replicas <= target <= ctx.max_replicas:
            return _refuse("budget", "BUDGET_EXCEEDED",
                           f"{target} replicas is outside the spec's limits {ctx.min_replicas}-{ctx.max_replicas}")
    return Verdict.allow()


CHECKS = (refuse_blocklisted, refuse_uncatalogued, refuse_by_environment, refuse_over_budget)


def evaluate(raw: dict, ctx: GateContext) -> tuple[Verdict, Decision | None]:
    verdict, decision = refuse_bad_intake(raw, ctx)
    if not verdict.allowed:
        return verdict, decision
    for check in CHECKS:
        verdict = check(decision, ctx)
        if not verdict.allowed:
            return verdict, decision
    return Verdict.allow(), decision


def restart_backoff_s(restarts: list[datetime], now: datetime, base_s: float, max_s: float, reset_s: float) -> float:
    """Seconds a restart must still wait (0: it may run now). Not a refusal: a delay.

    restarts: when the app's earlier restarts ran. The streak is the run of restarts each within
    reset_s of the next (and the last within reset_s of now); after the n-th, the next waits
    base_s * 2**(n-1), at most max_s.
    """
    times = sorted(restarts, reverse=True)
    if not times or (now - times[0]).total_seconds() > reset_s:
        return 0.0
    streak = 1
    while streak < len(times) and (times[streak - 1] - times[streak]).total_seconds() <= reset_s:
        streak += 1
    wait = min(max_s, base_s * 2 ** (streak - 1))
    return max(0.0, wait - (now - times[0]).total_seconds())
