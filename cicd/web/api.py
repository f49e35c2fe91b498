"""What the dashboard (and any script) reads: recent events, app health, incidents with their
chain of decisions and gates, and the policy table. Plain dicts, ready for JSON.

Every function takes `env`: an environment name (settings from the environment variables, as
the `cicd` command reads them), a Settings, or None for $CICD_ENV. The queries live in
cicd.store.reports and cicd.store.proof; this module shapes what they return for a reader.

    >>> from cicd import api
    >>> api.events(5)                      # the last 5 proof records of $CICD_ENV, newest last
    >>> api.health("stage")                # each app: replicas, health, uptime, open incident
    >>> api.incidents(10, app="demo-api")  # newest first, each with its decisions and gates
"""
from __future__ import annotations

from collections import Counter

from cicd.core import actions
from cicd.healing import policy
from cicd.store import proof, reports
from cicd.config import Settings
from cicd.core.events import REFUSAL_EVENTS, SEVERITIES, parse_iso, utcnow
from cicd.core.lifecycle import OUTCOME_OF_EVENT, STEPS, ExecutionStatus, Outcome, Step
from cicd.healing.orchestrator import GATE_NAMES
from cicd.runtime import make_runtime
from cicd.store import session_scope

MAX_EVENTS = 1000
MAX_INCIDENTS = 500
# A probe older than this many probe intervals (and at least STALE_MIN_S) means nobody is probing:
# the stack is down, and the last health seen is no longer news.
STALE_PROBES, STALE_MIN_S = 5, 5.0


class ApiError(ValueError):
    """A request the API cannot answer; `field` and `rule` say what to change."""

    def __init__(self, field_name: str, rule: str):
        super().__init__(f"{field_name}: {rule}")
        self.field = field_name
        self.rule = rule


def settings_for(env: str | Settings | None) -> Settings:
    return env if isinstance(env, Settings) else Settings.load(env)


def check_count(value, name: str, maximum: int) -> int:
    """A whole number from 1 to maximum (bool is not a number here, though Python says it is)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise ApiError(name, f"must be a whole number from 1 to {maximum}, not {value!r}")
    return value


def check_seq(value, name: str = "after") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ApiError(name, f"must be a proof sequence number (0 or more), not {value!r}")
    return value


# -- events ------------------------------------------------------------------------------------
def events(n: int, env: str | Settings | None = None) -> list[dict]:
    """The last n proof-log records, oldest first (newest last), payloads parsed."""
    return proof.tail(settings_for(env), check_count(n, "n", MAX_EVENTS))


def events_since(after_seq: int, env: str | Settings | None = None, limit: int = MAX_EVENTS) -> list[dict]:
    """Records after a sequence number, oldest first, at most `limit`: for tailing the log."""
    check_seq(after_seq)
    check_count(limit, "limit", MAX_EVENTS)
    settings = settings_for(env)
    head = proof.head_seq(settings)
    if head <= after_seq:
        return []
    # Only the newest `limit` of a long gap: a reader that fell far behind wants now, not history.
    return proof.records_since(settings, max(after_seq, head - limit))[:limit]


def head_seq(env: str | Settings | None = None) -> int:
    return proof.head_seq(settings_for(env))


# -- health ------------------------------------------------------------------------------------
def app_state(row: dict, stale_after_s: float, now=None) -> str:
    """One word for an app: unknown, stale, attention, down, degraded or healthy."""
    if not row.get("last_probe_at"):
        return "unknown"
    age = ((now or utcnow()) - parse_iso(row["last_probe_at"])).total_seconds()
    if age > stale_after_s:
        return "stale"
    if row.get("attention"):
        return "attention"
    healthy, probed = row.get("healthy") or 0, row.get("probed_replicas") or 0
    if healthy == 0:
        return "down"
    return "healthy" if healthy >= probed else "degraded"


def health(env: str | Settings | None = None) -> list[dict]:
    """Each app: release, replicas (now and at the last probe), healthy replicas, utilization,
    uptime ratio (healthy probes / probes), open incident, attention, and a one-word state."""
    settings = settings_for(env)
    stale_after_s = max(STALE_MIN_S, STALE_PROBES * settings.probe_interval_s)
    now = utcnow()
    rows = reports.apps(settings, make_runtime(settings))
    for row in rows:
        row["state"] = app_state(row, stale_after_s, now)
    return rows


# -- incidents ---------------------------------------------------------------------------------
def _attempt_of(payload: dict, current: int) -> int:
    attempt = payload.get("attempt")
    return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) and attempt >= 1 else current


# What each step of an attempt shows in its chain (detection belongs to the incident, not an attempt).
_VIEW_OF_STEP = {Step.DECIDE: ("decision",), Step.EXECUTE: ("gates", "execution"), Step.VERIFY: ("outcome",),
                 Step.LEARN: ("learning",)}


def chain_of(records: list[dict]) -> list[dict]:
    """An incident's proof records as its attempts: for each, the decision, the gates (passed,
    refused, held for a human, or not reached), what was executed, the outcome and the learning."""
    attempts: dict[int, dict] = {}
    current = 1

    def step(number: int) -> dict:
        if number not in attempts:
            attempts[number] = {"attempt": number, **{key: [] if key == "gates" else None
                                                      for s in STEPS for key in _VIEW_OF_STEP.get(s, ())}}
        return attempts[number]

    for record in records:
        name, payload = record["event_name"], record.get("payload") or {}
        current = _attempt_of(payload, current)
        at = step(current)
        if name == "RL_DECISION":
            at["decision"] = {"action": payload.get("action"), "params": payload.get("params"),
                              "reason": payload.get("reason"), "mode": payload.get("mode"),
                              "q_values": payload.get("q_values") or {}, "ts": record["ts"]}
        elif name == "EXECUTION_GATE_PASSED":
            gates = [{"gate": g, "verdict": "passed"} for g in payload.get("gates") or GATE_NAMES]
            if payload.get("approval"):
                gates.append({"gate": "approval", "verdict": "passed",
                              "reason": f"{payload['approval']} granted by {payload.get('approved_by')}"})
            at["gates"] = gates
        elif name == "ORCH_REFUSE":
            at["gates"] = _gates_until(payload.get("gate"), "refused", payload.get("reason"))
        elif name in REFUSAL_EVENTS:
            for gate in at["gates"]:
                if gate["verdict"] == "refused":
                    gate["event"] = name
        elif name == "APPROVAL_REQUESTED":
            at["gates"] = _gates_until("environment", "held", payload.get("summary"))
            at["execution"] = {"status": ExecutionStatus.AWAITING_APPROVAL, "approval": payload.get("approval")}
        elif name == "RESTART_BACKOFF":
            at["execution"] = {"status": ExecutionStatus.DEFERRED, "wait_s": payload.get("wait_s"),
                               "due_at": payload.get("due_at")}
        elif name == "ORCH_EXEC":
            at["execution"] = {"status": payload.get("status"), "action": payload.get("action"),
                               "params": payload.get("params"), "result": payload.get("result"), "ts": record["ts"]}
        elif name == "SYSTEM_STABLE":
            at["outcome"] = {"result": Outcome.STABLE, "time_to_recover_s": payload.get("time_to_recover_s"),
                             "ts": record["ts"]}
        elif name == "ATTEMPT_FAILED":
            at["outcome"] = {"result": Outcome.FAILED, "detail": payload.get("detail"), "ts": record["ts"]}
        elif name in ("ESCALATED", "INCIDENT_REFUSED"):
            at["outcome"] = {"result": OUTCOME_OF_EVENT[name], "detail": payload.get("reason"), "ts": record["ts"]}
        elif name == "RL_UPDATE":
            at["learning"] = {"reward": payload.get("reward"), "applied": payload.get("applied"),
                              "new_q": payload.get("new_q"), "why": payload.get("why")}
    return [attempts[n] for n in sorted(attempts) if any(v for k, v in attempts[n].items() if k != "attempt")]


def _gates_until(gate: str | None, verdict: str, reason: str | None) -> list[dict]:
    """The gates in order: passed before `gate`, `verdict` at it, not reached after it."""
    if gate not in GATE_NAMES:
        return [{"gate": gate or "?", "verdict": verdict, "reason": reason}]
    at = GATE_NAMES.index(gate)
    return ([{"gate": g, "verdict": "passed"} for g in GATE_NAMES[:at]]
            + [{"gate": gate, "verdict": verdict, "reason": reason}]
            + [{"gate": g, "verdict": "not reached"} for g in GATE_NAMES[at + 1:]])


def incidents(limit: int = 20, env: str | Settings | None = None, app: str | None = None) -> list[dict]:
    """Recent incidents, newest first, each with `chain` (its attempts: decision, gates, execution,
    outcome, learning), `time_to_recover_s` when it recovered, and `events` (its proof records)."""
    check_count(limit, "limit", MAX_INCIDENTS)
    if app is not None and (not isinstance(app, str) or not 1 <= len(app) <= 40):
        raise ApiError("app", f"must be an app name of 1 to 40 characters, not {app!r}")
    settings = settings_for(env)
    rows = reports.incidents(settings, limit, app)
    records = reports.timelines(settings, [row["id"] for row in rows])
    for row in rows:
        row["events"] = records[row["id"]]
        row["chain"] = chain_of(row["events"])
        stable = [at["outcome"] for at in row["chain"] if (at["outcome"] or {}).get("result") == Outcome.STABLE]
        row["time_to_recover_s"] = stable[-1]["time_to_recover_s"] if stable else None
        row["severity_rank"] = SEVERITIES.index(row["severity"]) if row["severity"] in SEVERITIES else None
    return rows


# -- the policy --------------------------------------------------------------------------------
def policy_table(env: str | Settings | None = None) -> dict:
    """The Q-table (`cicd rl show`): every state the detector produces, each action's Q-value,
    which were learned (the rest are priors), and the greedy action."""
    settings = settings_for(env)
    with session_scope(settings, readonly=True) as session:
        learned = Counter(reports.policy_updates(session, settings.env))
        table = policy.load_table(session, settings.env)
    states = []
    for state in policy.detected_states():
        q = table[state.index]
        states.append({"state": state.key, **state.to_dict(),
                       "greedy": actions.ACTIONS[int(q.argmax())],
                       "q": {a: round(float(q[i]), 6) for i, a in enumerate(actions.ACTIONS)},
                       "learned": {a: learned[(state.key, a)] for a in actions.ACTIONS if (state.key, a) in learned}})
    return {"env": settings.env, "mode": settings.policy_mode, "actions": list(actions.ACTIONS), "states": states}
