"""The lifecycle of everything that has a status: incidents, executions, releases, approvals.

Each status is a str-valued enum, so a member compares equal to, is stored as and serialises as
the plain string the database columns and the JSON already hold ("open", "live", ...). Each kind
has one table of allowed transitions; `transition(old, new)` is called wherever the code changes a
status, and a move the table does not allow raises IllegalTransition instead of quietly writing a
state nobody handles (a release finished twice, an approval answered after it expired).

`next_step` is the one place that knows the order of an incident's attempt: the reconciler,
housekeeping and the read views ask it (or read STEPS) instead of each rebuilding the order.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Mapping


class IllegalTransition(ValueError):
    """A status change the lifecycle does not allow."""

    def __init__(self, old, new, allowed=frozenset()):
        since = old or "(new)"
        super().__init__(f"{type(new).__name__}: {since} -> {new} is not allowed "
                         f"(from {since}: {', '.join(sorted(allowed)) or 'nothing'})")
        self.old, self.new = old, new


class IncidentStatus(StrEnum):
    OPEN = "open"
    STABLE = "stable"
    ESCALATED = "escalated"
    REFUSED = "refused"


class ExecutionStatus(StrEnum):
    STARTED = "started"
    DEFERRED = "deferred"                    # a restart held until its backoff is over
    AWAITING_APPROVAL = "awaiting_approval"  # held for a human (prod)
    DONE = "done"
    FAILED = "failed"
    REFUSED = "refused"


class ReleaseStatus(StrEnum):
    FETCHING = "fetching"        # fetch and build
    STARTING = "starting"        # replicas started beside the live ones; the health gate runs
    SWITCHING = "switching"      # claimed by whoever concludes it (gate, cancel, reconciler)
    LIVE = "live"
    FAILED = "failed"            # never took traffic; the live release kept serving
    SUPERSEDED = "superseded"    # was live, replaced by a newer deploy
    ROLLED_BACK = "rolled_back"  # was live, replaced by a rollback


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    GRANTED = "granted"
    DENIED = "denied"
    EXPIRED = "expired"


class Outcome(StrEnum):
    """What the verifier concluded about an attempt (what learning is rewarded for)."""
    STABLE = "stable"
    FAILED = "failed"
    ESCALATED = "escalated"
    REFUSED = "refused"


class AttemptEnd(StrEnum):
    """How a verified attempt ends (verifier.conclude writes the matching proof event)."""
    STABLE = "stable"              # SYSTEM_STABLE: the incident is closed
    NEXT_ATTEMPT = "next_attempt"  # ATTEMPT_FAILED: the incident stays open, attempt + 1
    ESCALATE = "escalate"          # ESCALATED: attempts spent, or a budget refused the action
    REFUSE = "refuse"              # INCIDENT_REFUSED: any other gate refused it


_I, _E, _R, _A = IncidentStatus, ExecutionStatus, ReleaseStatus, ApprovalStatus
# None: the row is being created with that status.
TRANSITIONS: dict[type, dict[StrEnum | None, frozenset]] = {
    IncidentStatus: {
        None: frozenset({_I.OPEN}),
        _I.OPEN: frozenset({_I.STABLE, _I.ESCALATED, _I.REFUSED}),
    },
    ExecutionStatus: {
        None: frozenset({_E.STARTED, _E.DEFERRED, _E.AWAITING_APPROVAL, _E.REFUSED}),
        # started -> started: a redelivered execute (or approved execute) resumes its own claim;
        # started -> refused: the gates, checked again on a redelivered approved execute, refuse.
        _E.STARTED: frozenset({_E.STARTED, _E.DONE, _E.FAILED, _E.REFUSED}),
        # deferred -> refused: the app was removed before the backoff was over (`cicd remove`).
        _E.DEFERRED: frozenset({_E.STARTED, _E.REFUSED}),
        _E.AWAITING_APPROVAL: frozenset({_E.STARTED, _E.REFUSED}),
    },
    ReleaseStatus: {
        None: frozenset({_R.FETCHING}),
        # fetching -> switching: a fetch or build failure concludes it without a gate.
        _R.FETCHING: frozenset({_R.STARTING, _R.SWITCHING}),
        _R.STARTING: frozenset({_R.SWITCHING}),
        _R.SWITCHING: frozenset({_R.LIVE, _R.FAILED}),
        _R.LIVE: frozenset({_R.SUPERSEDED, _R.ROLLED_BACK}),
    },
    ApprovalStatus: {
        None: frozenset({_A.PENDING}),
        _A.PENDING: frozenset({_A.GRANTED, _A.DENIED, _A.EXPIRED}),
    },
}

INCIDENT_END_STATES = (_I.STABLE, _I.ESCALATED, _I.REFUSED)
# A release still on its way: someone (a deploy task, or the reconciler) must conclude it.
RELEASE_UNDER_WAY = (_R.FETCHING, _R.STARTING, _R.SWITCHING)
# How long past its spec's health deadline a release may still be under way (fetching and
# building): the verifier waits that long for it, and the reconciler gives it that long.
DEPLOY_ALLOWANCE_S = 60.0
# What the gate or a cancel may claim (switching is already claimed).
RELEASE_CLAIMABLE = (_R.FETCHING, _R.STARTING)
# An execution that is waiting on purpose: for a human, or for a backoff's due time.
EXECUTION_WAITING = (_E.AWAITING_APPROVAL, _E.DEFERRED)
# An execution claim that may still act (a redelivery resumes it rather than deduplicating).
EXECUTION_RESUMABLE = (_E.STARTED, _E.DEFERRED)


def allowed_from(old, kind: type) -> frozenset:
    table = TRANSITIONS[kind]
    return table.get(kind(old) if old is not None else None, frozenset())


def transition(old, new: StrEnum):
    """`new`, if the lifecycle allows old -> new (old may be the stored string, or None for a
    new row); else IllegalTransition."""
    kind = type(new)
    if kind not in TRANSITIONS:
        raise TypeError(f"{new!r} is not a lifecycle status")
    try:
        allowed = allowed_from(old, kind)
    except ValueError:
        raise IllegalTransition(old, new) from None  # a stored value no member has
    if new not in allowed:
        raise IllegalTransition(old, new, allowed)
    return new


# -- an incident's attempt, step by step --------------------------------------------------------
class Step(StrEnum):
    DETECT = "detect"
    DECIDE = "decide"
    EXECUTE = "execute"
    VERIFY = "verify"
    LEARN = "learn"


# The order of one attempt through the chain; a failed attempt starts again at DECIDE.
STEPS = tuple(Step)


class Idle(StrEnum):
    """What next_step says when no step is due."""
    WAITING = "waiting"    # on purpose: for a human, or a backoff's due time (housekeeping resumes it)
    FINISHED = "finished"  # the incident is closed


def next_step(status, attempt: int, decision: Mapping | None, execution_status) -> Step | Idle:
    """Which step an incident's current attempt needs next, from what is stored: the incident's
    status and attempt, its stored decision, and the status of the attempt's execution (None if
    there is none). Learning follows a verdict inside the chain; it is never resumed alone."""
    if IncidentStatus(status) != IncidentStatus.OPEN:
        return Idle.FINISHED
    if not decision or decision.get("attempt") != attempt:
        return Step.DECIDE
    if execution_status is None or execution_status == ExecutionStatus.STARTED:
        return Step.EXECUTE
    if execution_status in EXECUTION_WAITING:
        return Idle.WAITING
    return Step.VERIFY  # done, failed or refused: the verdict is what is left


# Where each proof event of an incident belongs in the attempt.
STEP_OF_EVENT: dict[str, Step] = {
    "INCIDENT_DETECTED": Step.DETECT,
    "RL_CONSUME": Step.DECIDE, "RL_DECISION": Step.DECIDE,
    **{name: Step.EXECUTE for name in (
        "RL_INTAKE_VALIDATED", "EXECUTION_GATE_PASSED", "ORCH_REFUSE", "REFUSAL_EMIT_SUCCESS", "INTAKE_REFUSED",
        "UNSAFE_ACTION_REFUSED", "ACTION_NOT_ALLOWED", "DEMO_MODE_BLOCK", "ENVIRONMENT_REFUSED", "BUDGET_EXCEEDED",
        "RESTART_BACKOFF", "APPROVAL_REQUESTED", "APPROVAL_GRANTED", "APPROVAL_DENIED", "APPROVAL_EXPIRED",
        "ORCH_EXEC", "EXECUTION_DEDUPLICATED", "HOST_DISPATCHED")},
    "ATTEMPT_FAILED": Step.VERIFY, "SYSTEM_STABLE": Step.VERIFY, "ESCALATED": Step.VERIFY,
    "INCIDENT_REFUSED": Step.VERIFY,
    "RL_UPDATE": Step.LEARN,
}
# The verdict each verify event records.
OUTCOME_OF_EVENT: dict[str, Outcome] = {
    "SYSTEM_STABLE": Outcome.STABLE, "ATTEMPT_FAILED": Outcome.FAILED, "ESCALATED": Outcome.ESCALATED,
    "INCIDENT_REFUSED": Outcome.REFUSED,
}
