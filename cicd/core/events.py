"""The things that flow through the healing chain, their schemas, and the proof event names.

Messages between agents are plain JSON dicts (Celery's json serializer); each type here turns a
dict into a checked value or raises MalformedEvent naming the field and the rule, so bad input
is refused at the door instead of failing somewhere deep inside an agent.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from cicd.core.lifecycle import INCIDENT_END_STATES, IncidentStatus  # noqa: F401 (re-exported)

# Proof event names. One list, so a typo in an agent is an error, not a new kind of event.
PROOF_EVENTS = frozenset({
    # onboarding and deploys
    "ONBOARDING_STARTED", "ONBOARDING_VALIDATION_PASSED", "ONBOARDING_REFUSED", "SPEC_GENERATED",
    "DEPLOYMENT_TRIGGERED", "DEPLOY_STARTED", "BUILD_SUCCEEDED", "BUILD_FAILED", "REPLICAS_STARTED",
    "HEALTH_GATE_PASSED", "DEPLOY_SUCCEEDED", "DEPLOY_FAILED", "ROLLBACK", "SCALE_REQUESTED", "SCALED",
    "RELEASE_RESUMED",  # the reconciler took over a release its deploy stopped moving
    "APP_REMOVED", "APP_REMOVE_REFUSED",  # `cicd remove`
    "APP_ADOPTED", "ADOPTION_REFUSED",  # `cicd adopt`: containers cicd-heal did not start
    "CONFIG_CHANGED",  # `cicd config set/unset`: key names and the new version, never a value
    # faults on purpose
    "FAILURE_INJECTED",
    # promotion and human approval
    "APPROVAL_REQUESTED", "APPROVAL_GRANTED", "APPROVAL_DENIED", "APPROVAL_EXPIRED", "PROMOTED",
    # the healing chain
    "INCIDENT_DETECTED", "RL_CONSUME", "RL_DECISION", "RL_INTAKE_VALIDATED", "EXECUTION_GATE_PASSED",
    "ORCH_EXEC", "ORCH_REFUSE", "EXECUTION_DEDUPLICATED", "REFUSAL_EMIT_SUCCESS",
    "SYSTEM_STABLE", "ATTEMPT_FAILED", "ESCALATED", "INCIDENT_REFUSED", "RL_UPDATE", "RL_TRAINED",
    "INCIDENT_RESUMED",
    "HOST_DISPATCHED",  # an action handed to the agent of the host that runs the app ({env}.host.{name})
    "INCIDENT_WIDENED",  # a crash found while the incident was open, folded into it (the detector)
    # specific refusals, one per gate
    "INTAKE_REFUSED", "UNSAFE_ACTION_REFUSED", "ACTION_NOT_ALLOWED", "DEMO_MODE_BLOCK",
    "ENVIRONMENT_REFUSED", "BUDGET_EXCEEDED", "RESTART_BACKOFF",
    # dead letters, by an operator
    "DLQ_RETRIED", "DLQ_PURGED",
})
# The specific refusal each gate writes after ORCH_REFUSE (see cicd.gates).
REFUSAL_EVENTS = ("INTAKE_REFUSED", "UNSAFE_ACTION_REFUSED", "ACTION_NOT_ALLOWED", "DEMO_MODE_BLOCK",
                  "ENVIRONMENT_REFUSED", "BUDGET_EXCEEDED")

INCIDENT_KINDS = ("crash", "overload", "false_alarm", "underload", "slow_deploy", "failed_deploy")
SEVERITIES = ("low", "medium", "high", "critical")

# What a probe (or the deploy agent) can report about an app; the detector turns these into
# incident kinds.
REPLICA_SIGNALS = ("replica_down", "replica_unhealthy", "replica_hung", "replica_leak", "replica_hot",
                   "replica_blip", "replica_cold")
DEPLOY_SIGNALS = ("deploy_slow", "deploy_failed")
SIGNAL_KINDS = REPLICA_SIGNALS + DEPLOY_SIGNALS

# The incident statuses, as cicd.core.lifecycle defines them (kept here for older imports).
OPEN, STABLE, ESCALATED, REFUSED = (IncidentStatus.OPEN, IncidentStatus.STABLE, IncidentStatus.ESCALATED,
                                    IncidentStatus.REFUSED)


class Unprocessable(ValueError):
    """Input an agent cannot act on (malformed, unknown app, wrong environment): a dead letter."""


class MalformedEvent(Unprocessable):
    """An input that does not match its schema; `field` and `rule` say what is wrong."""

    def __init__(self, field_name: str, rule: str):
        super().__init__(f"{field_name}: {rule}")
        self.field = field_name
        self.rule = rule


def canonical(obj) -> str:
    """The one JSON spelling of a value, for hashing and signing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(ts: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts


def iso(ts: datetime) -> str:
    return as_utc(ts).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def _require(data: dict, name: str, kind: type | tuple, *, max_len: int = 200):
    if not isinstance(data, dict):
        raise MalformedEvent("event", "must be a JSON object")
    if name not in data:
        raise MalformedEvent(name, "is required")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is a subclass of int in Python; JSON true is never a valid count or slot.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        want = " or ".join(k.__name__ for k in kinds)
        raise MalformedEvent(name, f"must be {want}, not {type(value).__name__}")
    if isinstance(value, str) and len(value) > max_len:
        raise MalformedEvent(name, f"must be at most {max_len} characters")
    if isinstance(value, float) and not math.isfinite(value):
        raise MalformedEvent(name, "must be a finite number")
    return value


def _one_of(data: dict, name: str, choices: tuple) -> str:
    value = _require(data, name, str)
    if value not in choices:
        raise MalformedEvent(name, f"must be one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class Signal:
    """What a probe saw: an anomaly on one replica of one app."""
    env: str
    app: str
    kind: str
    slots: tuple[int, ...]
    observed_at: str
    utilization: float = 0.0
    detail: str = ""
    replicas_total: int = 0
    release: int = 0

    @classmethod
    def from_dict(cls, data: dict) -> "Signal":
        sig = cls(
            env=_require(data, "env", str, max_len=10),
            app=_require(data, "app", str, max_len=40),
            kind=_one_of(data, "kind", SIGNAL_KINDS),
            slots=tuple(_require(data, "slots", list)),
            observed_at=_require(data, "observed_at", str, max_len=40),
            utilization=float(_require(data, "utilization", (int, float))) if "utilization" in data else 0.0,
            detail=_require(data, "detail", str, max_len=500) if "detail" in data else "",
            replicas_total=_require(data, "replicas_total", int) if "replicas_total" in data else 0,
            release=_require(data, "release", int) if "release" in data else 0,
        )
        try:
            parse_iso(sig.observed_at)
        except ValueError:
            raise MalformedEvent("observed_at", "must be an ISO-8601 UTC time like 2026-01-02T03:04:05.000000Z") from None
        if len(sig.slots) > 64 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 64
                                          for s in sig.slots):
            raise MalformedEvent("slots", "must be a list of replica numbers 0-63")
        if sig.kind in REPLICA_SIGNALS and not sig.slots:
            raise MalformedEvent("slots", f"a {sig.kind} signal must name at least one replica")
        if sig.kind in DEPLOY_SIGNALS and sig.release < 1:
            raise MalformedEvent("release", f"a {sig.kind} signal must name its release (1 or more)")
        return sig

    def to_dict(self) -> dict:
        # (not dataclasses.asdict: its deep copy was a tenth of a hop's time; the values are plain)
        return {**{name: getattr(self, name) for name in self.__dataclass_fields__}, "slots": list(self.slots)}


@dataclass(frozen=True)
class Decision:
    """A recovery action chosen by the decide agent, signed so the orchestrator can trust it."""
    env: str
    incident_id: str
    attempt: int
    app: str
    action: str
    params: dict
    issued_at: str
    nonce: str
    mode: str
    state: dict = field(default_factory=dict)
    q_values: dict = field(default_factory=dict)
    reason: str = ""
    signature: str = ""

    SIGNED_FIELDS = ("env", "incident_id", "attempt", "app", "action", "params", "issued_at", "nonce", "mode")

    @classmethod
    def from_dict(cls, data: dict) -> "Decision":
        params = _require(data, "params", dict)
        if len(repr(params)) > 2000:
            raise MalformedEvent("params", "must be at most 2000 characters when serialised")
        return cls(
            env=_require(data, "env", str, max_len=10),
            incident_id=_require(data, "incident_id", str, max_len=64),
            attempt=_require(data, "attempt", int),
            app=_require(data, "app", str, max_len=40),
            action=_require(data, "action", str, max_len=80),
            params=params,
            issued_at=_require(data, "issued_at", str, max_len=40),
            nonce=_require(data, "nonce", str, max_len=64),
            mode=_require(data, "mode", str, max_len=20),
            state=data.get("state") if isinstance(data.get("state"), dict) else {},
            q_values=data.get("q_values") if isinstance(data.get("q_values"), dict) else {},
            reason=data.get("reason") if isinstance(data.get("reason"), str) else "",
            signature=data.get("signature") if isinstance(data.get("signature"), str) else "",
        )

    def signed_body(self) -> dict:
        return {name: getattr(self, name) for name in self.SIGNED_FIELDS}

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
