"""The healing loop's steps without the store: what the agents and the simulator both run.

detect (a signal from a probe's replica statuses) -> decide (policy.make_decision) -> gate
(gate_context, gates.evaluate, restart_wait_s) -> act (actions.perform) -> verify (is_stable)
-> conclude (attempt_outcome) -> learn (policy.reward, policy.q_update).

The DB-bound steps (detector, policy, orchestrator, verifier) read their inputs from the store
and call these; learning.Simulation calls the same ones on the in-memory fleet. So the policy
is trained on the loop that runs in production, and tests/unit/test_one_loop.py checks that the
two give the same decisions, verdicts and outcomes.
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta

from cicd.config import Settings
from cicd.core import gates
from cicd.core.events import SEVERITIES, Signal, as_utc, iso
from cicd.core.lifecycle import DEPLOY_ALLOWANCE_S, RELEASE_UNDER_WAY, AttemptEnd, Outcome, ReleaseStatus
from cicd.runtime.base import ReplicaStatus

# A probe's statuses for a replica that is gone, and for one failing its health check.
GONE = ("down", "refused")
FAILING = ("degraded", "timeout")



# -- detect ------------------------------------------------------------------------------------
KIND_OF_SIGNAL = {
    "replica_down": "crash",          # process gone or connection refused
    "replica_unhealthy": "crash",     # alive but failing its health check for K probes in a row
    "replica_hung": "crash",          # alive but its probes time out K times in a row: a liveness failure
    "replica_leak": "crash",          # resident memory close to the spec's limit: before the OOM killer
    "replica_hot": "overload",        # utilization over the threshold for K probes in a row
    "replica_blip": "false_alarm",    # failed a probe or two, then recovered by itself
    "replica_cold": "underload",      # more replicas than the spec asks for, and idle for a while
    "deploy_slow": "slow_deploy",     # a release not healthy long after it started
    "deploy_failed": "failed_deploy", # fetch, build or health gate failed; the live release serves
}


# A hang and a leak heal as a crash does (restart the replica; roll back a fresh release that
# brought it), so they are crashes to the policy, whose states stay (kind, severity, attempt,
# fresh); the incident's context says which it was.
CAUSE_OF_SIGNAL = {"replica_down": "exited", "replica_unhealthy": "unhealthy", "replica_hung": "hang",
                   "replica_leak": "leak"}


def saturated(status: ReplicaStatus) -> bool:
    """A replica whose probe timed out while its process runs (alive, not stopped): its queue is
    longer than the probe timeout, as loaded as a replica can be. A stopped one (SIGSTOP) serves
    nothing."""
    return status.status == "timeout" and status.alive and not status.stopped


def serving(status: ReplicaStatus) -> bool:
    """Answering its probes, or saturated: counted in the app's load (left out, a saturated one
    would make an app read less loaded the more loaded it is)."""
    return status.healthy or saturated(status)


def replica_load(settings: Settings, status: ReplicaStatus) -> float:
    """How loaded one replica is, 0..1, from what the platform measures and what it says: the most
    of its own utilization (if it reports one), its CPU as a share of cpu_cores_per_replica, and
    its probe's latency and its app's mean latency through the proxy, each as a share of the probe
    timeout (at 1 a probe would time out, so a saturated replica is at 1)."""
    if saturated(status):
        return 1.0
    cpu = status.cpu / settings.cpu_cores_per_replica
    timeout_ms = settings.probe_timeout_s * 1000.0
    return min(1.0, max(status.utilization, cpu, status.latency_ms / timeout_ms, status.proxy_latency_ms / timeout_ms))


def mean_load(settings: Settings, statuses: list[ReplicaStatus]) -> float:
    """Overload is judged on this: the mean load across the serving replicas."""
    serving_loads = [replica_load(settings, s) for s in statuses if serving(s)]
    return sum(serving_loads) / len(serving_loads) if serving_loads else 0.0


def over_memory(settings: Settings, status: ReplicaStatus) -> bool:
    return bool(status.alive and status.memory_limit_mb
                and status.rss_mb >= settings.memory_restart_at * status.memory_limit_mb)


def mean_utilization(statuses: list[ReplicaStatus]) -> float:
    reported = [s.utilization for s in statuses if s.healthy]
    return sum(reported) / len(reported) if reported else 0.0


def slots_signalled(kind: str, statuses: list[ReplicaStatus]) -> list[int]:
    """The replicas a signal of this kind is about, as one probe shows them."""
    if kind == "replica_down":
        return [s.slot for s in statuses if s.status in GONE]
    if kind in ("replica_unhealthy", "replica_blip"):
        return [s.slot for s in statuses if s.status in FAILING]
    if kind == "replica_hung":
        return [s.slot for s in statuses if s.status == "timeout"]
    if kind == "replica_leak":
        return [s.slot for s in statuses if over_memory(Settings(), s)]
    if kind == "replica_hot":
        return [s.slot for s in statuses if s.healthy]
    return [s.slot for s in statuses]


def replica_signal(env: str, app: str, kind: str, statuses: list[ReplicaStatus], now: datetime,
                   slots: list[int] | None = None, load: float | None = None) -> dict:
    """The signal (as the detector takes it) for what a probe of the app's replicas saw. slots:
    the replicas it is about, when earlier probes decided that (a blip, K failed checks); load:
    the measured load (mean_load), else the replicas' own utilization is the signal's."""
    slots = sorted(slots_signalled(kind, statuses) if slots is None else slots)
    detail = ", ".join(f"{s.slot}:{s.status}" for s in statuses)
    measured = [_measured(s) for s in statuses if s.slot in slots and (s.rss_mb or s.stopped)]
    if measured:
        detail += "; " + ", ".join(measured)
    return {"env": env, "app": app, "kind": kind, "slots": slots, "observed_at": iso(now),
            "utilization": round(mean_utilization(statuses) if load is None else load, 4),
            "replicas_total": len(statuses), "detail": detail[:500]}


def _measured(status: ReplicaStatus) -> str:
    limit = f"/{status.memory_limit_mb}" if status.memory_limit_mb else ""
    return (f"{status.slot}: rss {status.rss_mb:.0f}{limit} MB, cpu {status.cpu:.2f}"
            + (", stopped" if status.stopped else ""))


def classify(signal: Signal) -> tuple[str, str]:
    """(incident kind, severity) of a signal."""
    kind = KIND_OF_SIGNAL[signal.kind]
    if kind == "crash":
        all_down = signal.replicas_total and len(signal.slots) >= signal.replicas_total
        return kind, "critical" if all_down else "high"
    if kind == "overload":
        return kind, "high" if signal.utilization >= 0.95 else "medium"
    if kind == "failed_deploy":
        return kind, "high"
    if kind == "slow_deploy":
        return kind, "medium"
    return kind, "low"


# The kinds an open incident may be widened from: about replicas, like the crash that widens it.
# A deploy's incident waits on its release (the verifier's own rules), and is left as it is.
WIDENABLE_KINDS = ("crash", "false_alarm", "overload", "underload")


def widening(kind: str, severity: str, slots: list[int], signal: Signal) -> tuple[str, str, list[int]] | None:
    """What an open incident (kind, severity, slots) becomes when the signal arrives while it is
    open: (kind, severity, slots), or None if it already covers the signal.

    Only a replica that is down widens it: a dead process never comes back by itself, and the open
    incident's attempts act on their own kind and slots, so dropped, the crash would outlive the
    incident (its verification fails attempt after attempt, it escalates, and the app is left to a
    human with a replica down). Anything else (a failing or hung replica, often the very overload
    being healed) is still left to the open incident's verification."""
    if signal.kind != "replica_down" or kind not in WIDENABLE_KINDS:
        return None
    _, new_severity = classify(signal)
    if kind == "crash" and set(signal.slots) <= set(slots):
        return None  # already being healed
    worst = max(severity, new_severity, key=lambda s: SEVERITIES.index(s) if s in SEVERITIES else -1)
    return "crash", worst, sorted(set(slots) | set(signal.slots))


def release_context(settings: Settings, kind: str, signal: Signal, spec: dict, releases) -> dict:
    """What the policy needs to know beyond the signal, from the app's releases (newest first;
    each with number, status, sha, finished_at)."""
    live = next((r for r in releases if r.status == ReleaseStatus.LIVE), None)
    good_before = next((r for r in releases if r.status == ReleaseStatus.SUPERSEDED and r.sha
                        and (live is None or r.number < live.number)), None)
    # A crash or an overload soon after a release may be the release's fault.
    fresh = bool(kind in ("crash", "overload") and live and live.finished_at
                 and settings.clock.now() - as_utc(live.finished_at) < timedelta(seconds=settings.fresh_release_s))
    context = {"live_release": live.number if live else None, "fresh_release": fresh}
    if signal.kind in CAUSE_OF_SIGNAL:
        context["cause"] = CAUSE_OF_SIGNAL[signal.kind]
    if kind in ("crash", "overload"):
        context["rollback_to"] = good_before.number if good_before else None
    elif kind in ("slow_deploy", "failed_deploy"):
        context["release"] = signal.release
        context["rollback_to"] = live.number if live else None  # keep serving what serves now
    elif kind == "underload":
        context["can_scale_in"] = signal.replicas_total > spec.get("replicas", 1)
    return context


# -- gate --------------------------------------------------------------------------------------
Acted = list[tuple[str, datetime, dict]]   # (action, when it started, params) of the app's executions that ran


def gate_context(settings: Settings, key: bytes, acted: Acted, current_replicas: int, spec: dict,
                 approved: bool = False) -> gates.GateContext:
    """What the gates judge a decision against: now, and the app's restarts and scalings within
    the budget window."""
    now = settings.clock.now()
    since = now - timedelta(seconds=settings.budget_window_s)
    return gates.GateContext(
        env=settings.env, key=key, now=now, demo_mode=settings.demo_mode,
        max_age_s=settings.decision_max_age_s,
        restarts_in_window=sum(1 for action, at, _ in acted if action == "restart_service" and at >= since),
        scales_in_window=sum(1 for action, at, _ in acted if action == "scale_workers" and at >= since),
        restart_budget=settings.restart_budget, scale_budget=settings.scale_budget,
        current_replicas=current_replicas,
        min_replicas=spec.get("min_replicas", 1), max_replicas=spec.get("max_replicas", 1), approved=approved,
    )


def restart_wait_s(settings: Settings, acted: Acted, slots: list[int]) -> float:
    """Per replica, as Kubernetes backs off per container: the longest wait any of these slots owes."""
    restarts = [(at, params) for action, at, params in acted if action == "restart_service"]
    return max((gates.restart_backoff_s([at for at, params in restarts if slot in params.get("slots", [])],
                                        settings.clock.now(), settings.backoff_base_s, settings.backoff_max_s,
                                        settings.backoff_reset_s) for slot in slots), default=0.0)


def forget_acted(settings: Settings, acted: Acted) -> Acted:
    """What can no longer count for a budget or a backoff (for a caller that keeps its own history,
    as the simulator does: the store keeps every execution)."""
    now = settings.clock.now()
    since = now - timedelta(seconds=settings.budget_window_s)
    last_restart = max((at for action, at, _ in acted if action == "restart_service"), default=None)
    # A restart streak ends once reset_s pass without a restart; then only the window counts.
    streak_over = last_restart is None or (now - last_restart).total_seconds() > settings.backoff_reset_s
    return [row for row in acted
            if row[1] >= since or (row[0] == "restart_service" and not streak_over)]


# -- verify and conclude -----------------------------------------------------------------------
def is_stable(settings: Settings, kind: str, statuses: list[ReplicaStatus], expected: int) -> bool:
    if not statuses or len(statuses) < expected:
        return False
    if kind == "overload":
        # Capacity is what an overload is about: judged on the mean load, where a probe that timed
        # out on a running replica counts fully loaded, not as a failure (on a busy machine one
        # does, now and then, in any queue). Were that replica hung, the detector says so next.
        return all(serving(s) for s in statuses) and mean_load(settings, statuses) <= settings.overload_threshold
    return all(s.healthy for s in statuses)




def verify_timeout_s(settings: Settings, spec: dict, awaiting_release: bool) -> float:
    """How long an attempt may take to become stable before it counts as failed."""
    timeout = settings.verify_timeout_s
    if awaiting_release:
        timeout += spec["health_deadline_s"] + DEPLOY_ALLOWANCE_S
    return timeout


def polled_verdict_s(settings: Settings, stable: bool, timeout_s: float) -> float:
    """How long the verifier, looking every verify_interval_s, takes to reach its verdict on a
    fleet that does not change meanwhile: the stable_checks-th stable look, or the first look
    past the timeout."""
    interval = settings.verify_interval_s
    if stable:
        return (settings.stable_checks - 1) * interval
    return (math.floor(timeout_s / interval + 1e-9) + 1) * interval


def release_result(status: str | None) -> str | None:
    """For an attempt that waits on a release: "wait" while it is under way (or not made yet),
    "failed" if it failed, None once it is live (then the replicas decide)."""
    if status is None or status in RELEASE_UNDER_WAY:
        return "wait"
    return Outcome.FAILED if status == ReleaseStatus.FAILED else None


def attempt_outcome(settings: Settings, result: str, attempt: int, gate: str = "") -> str:
    """How an attempt whose result is stable, failed or refused ends the incident (or does not)."""
    if result == Outcome.STABLE:
        return AttemptEnd.STABLE
    if result == Outcome.REFUSED:
        # Past a budget the design says escalate; any other refusal closes the incident as refused.
        return AttemptEnd.ESCALATE if gate == "budget" else AttemptEnd.REFUSE
    return AttemptEnd.NEXT_ATTEMPT if attempt < settings.max_attempts else AttemptEnd.ESCALATE
