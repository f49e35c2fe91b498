"""The recovery policy: tabular Q-learning on numpy over (fault kind, severity, attempt, fresh).

`fresh` is context: the incident came soon after a release went live. A crash then is most
likely the release's fault (roll it back); the same crash of a long-stable release wants a
restart. Priors encode the playbook an operator would write (crash -> restart, fresh crash ->
rollback, overload -> scale out, idle -> scale in, false alarm -> nothing, failed deploy -> retry
then roll back); learning moves away from them only on evidence. Modes, per environment: stage
is greedy and frozen (the same incident always gets the same decision), dev explores and
learns, prod learns with little exploration, and only among the actions that need no approval.
"""
from __future__ import annotations

import hashlib
import logging
import math
import secrets
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cicd.core import actions, signing
from cicd.store import policy_values, proof
from cicd.config import Settings, signing_key
from cicd.core.events import INCIDENT_KINDS, SEVERITIES, Decision, iso, utcnow
from cicd.core.lifecycle import IncidentStatus, Outcome
from cicd.store import Incident, app_row, incident_row, transaction, update_incident

log = logging.getLogger(__name__)

MAX_ATTEMPT = 3            # attempts 3, 4, ... share one state: "still failing after two tries"
ALPHA, GAMMA = 0.2, 0.9
EPSILON = {"explore": 0.10, "cautious": 0.02, "greedy": 0.0}
# What prod may explore (the deploy actions need approval there, so it never tries them at random).
SAFE_ACTIONS = ("noop", "restart_service", "scale_workers")
TARGET_UTILIZATION = 0.6   # what scaling aims for, comfortably under the overload threshold
ACTION_COST = {"noop": 0.0, "restart_service": 0.1, "scale_workers": 0.2, "retry_deployment": 0.3,
               "rollback_deployment": 0.4}

# Priors per kind, freshness and attempt, in catalogue order:
# (noop, restart_service, scale_workers, retry_deployment, rollback_deployment).
_STEADY = {
    "crash":         {1: (-0.6, 0.9, 0.3, -0.4, 0.1), 2: (-0.6, 0.7, 0.5, -0.4, 0.3), 3: (-0.6, 0.4, 0.6, -0.4, 0.5)},
    "overload":      {1: (-0.3, 0.1, 0.9, -0.5, -0.2), 2: (-0.3, 0.1, 0.8, -0.5, -0.2), 3: (-0.3, 0.2, 0.7, -0.5, 0.0)},
    "false_alarm":   {1: (0.8, 0.2, 0.0, -0.5, -0.5), 2: (0.3, 0.6, 0.2, -0.5, -0.3), 3: (0.0, 0.6, 0.4, -0.5, -0.2)},
    "underload":     {1: (0.2, -0.3, 0.8, -0.5, -0.5), 2: (0.5, -0.3, 0.4, -0.5, -0.5), 3: (0.6, -0.3, 0.2, -0.5, -0.5)},
    "slow_deploy":   {1: (0.7, -0.3, -0.2, 0.1, 0.4), 2: (0.1, -0.3, -0.2, 0.2, 0.8), 3: (0.0, -0.3, -0.2, 0.3, 0.7)},
    # noop still beats restart/scale: the failed release never took traffic, the live one serves.
    "failed_deploy": {1: (-0.2, -0.5, -0.5, 0.7, 0.6), 2: (-0.2, -0.5, -0.5, 0.3, 0.8), 3: (-0.2, -0.5, -0.5, 0.2, 0.7)},
}
_FRESH = {**_STEADY,
          "crash": {1: (-0.6, 0.5, 0.2, -0.4, 0.9), 2: (-0.6, 0.6, 0.3, -0.4, 0.7), 3: (-0.6, 0.5, 0.5, -0.4, 0.3)}}


@dataclass(frozen=True)
class State:
    kind: str
    severity: str
    attempt: int
    fresh: bool = False

    @classmethod
    def of(cls, kind: str, severity: str, attempt: int, fresh: bool = False) -> "State":
        return cls(kind, severity, min(max(attempt, 1), MAX_ATTEMPT), bool(fresh))

    @classmethod
    def from_key(cls, key: str) -> "State":
        kind, severity, attempt, fresh = key.split("|")
        return cls.of(kind, severity, int(attempt), fresh == "fresh")

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.severity}|{self.attempt}|{'fresh' if self.fresh else 'steady'}"

    @property
    def index(self) -> tuple[int, int, int, int]:
        return (INCIDENT_KINDS.index(self.kind), SEVERITIES.index(self.severity), self.attempt - 1,
                int(self.fresh))

    def to_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity, "attempt": self.attempt, "fresh": self.fresh}


# The states the detector produces: which severities each kind comes with, and which kinds can be
# fresh (a crash or an overload soon after a release).
DETECTED = {"crash": ("high", "critical"), "overload": ("medium", "high"), "false_alarm": ("low",),
            "underload": ("low",), "slow_deploy": ("medium",), "failed_deploy": ("high",)}
CAN_BE_FRESH = ("crash", "overload")


def detected_states() -> list[State]:
    return [State.of(kind, severity, attempt, fresh)
            for kind, severities in DETECTED.items() for severity in severities
            for fresh in ((False, True) if kind in CAN_BE_FRESH else (False,))
            for attempt in range(1, MAX_ATTEMPT + 1)]


def prior_table() -> np.ndarray:
    table = np.zeros((len(INCIDENT_KINDS), len(SEVERITIES), MAX_ATTEMPT, 2, len(actions.ACTIONS)))
    for fresh, priors in ((0, _STEADY), (1, _FRESH)):
        for k, kind in enumerate(INCIDENT_KINDS):
            for attempt, values in priors[kind].items():
                table[k, :, attempt - 1, fresh, :] = values
    return table


_tables: dict = {}


def load_table(tx: policy_values.Transaction, env: str) -> np.ndarray:
    """Priors overlaid with what this environment has learned (a read-only copy, cached while
    nothing has been learned since: one small query instead of every row, on every decision)."""
    key = (env, *policy_values.version(tx, env))
    cached = _tables.get(key)
    if cached is None:
        cached = _build_table(tx, env)
        cached.setflags(write=False)
        _tables.clear()  # one table per environment and process is enough
        _tables[key] = cached
    return cached


def _build_table(tx: policy_values.Transaction, env: str) -> np.ndarray:
    table = prior_table()
    for row in policy_values.learned(tx, env):
        try:
            state = State.from_key(row.state)
            table[state.index + (actions.ACTIONS.index(row.action),)] = row.q
        except ValueError:
            continue  # a state or action this version no longer has
    return table


def choose(table: np.ndarray, state: State, mode: str, allowed: tuple[str, ...], rng: np.random.Generator | None,
           epsilon: float | None = None):
    """(action, q_values, reason). Greedy ties go to the earliest action in the catalogue.

    epsilon overrides the mode's exploration rate; greedy (stage) never explores."""
    q = table[state.index]
    q_values = {a: round(float(q[i]), 6) for i, a in enumerate(actions.ACTIONS)}
    candidates = [a for a in actions.ACTIONS if a in allowed]
    if not candidates:
        raise ValueError(f"no action is allowed for {state.key}")
    best = max(candidates, key=lambda a: (q_values[a], -actions.ACTIONS.index(a)))
    epsilon = 0.0 if mode == "greedy" else (EPSILON[mode] if epsilon is None else epsilon)
    # Prod explores only among the actions that need no approval: a random pick must never be
    # the one a human has to be woken for.
    explorable = [a for a in candidates if mode != "cautious" or a in SAFE_ACTIONS]
    if epsilon and len(explorable) > 1 and rng.random() < epsilon:
        action = explorable[int(rng.integers(len(explorable)))]
        return action, q_values, f"explored (epsilon {epsilon}): random pick; greedy would be {best}"
    others = sorted((q_values[a], a) for a in candidates if a != best)
    margin = f", ahead of {others[-1][1]} ({others[-1][0]:+.3f})" if others else ""
    return best, q_values, f"greedy: highest Q {q_values[best]:+.3f}{margin}"


def rng_for(incident_id: str, attempt: int) -> np.random.Generator:
    """Exploration is random per incident but repeatable: the same incident explores the same way."""
    seed = int.from_bytes(hashlib.sha256(f"{incident_id}/{attempt}".encode()).digest()[:8], "big")
    return np.random.default_rng(seed)


def action_params(action: str, incident: Incident, spec: dict) -> dict:
    """What exactly to do: computed here, signed with the decision, executed as signed."""
    signal, context = incident.signal, incident.context or {}
    current = max(int(signal.get("replicas_total") or spec.get("replicas", 1)), 1)
    utilization = float(signal.get("utilization", 0.0))
    if action == "restart_service":
        return {"slots": sorted(set(signal.get("slots") or [incident.slot]))}
    if action == "scale_workers":
        if incident.kind == "underload":
            wanted = math.ceil(current * utilization / TARGET_UTILIZATION)
            return {"replicas": max(spec.get("replicas", 1), min(current - 1, wanted))}
        wanted = math.ceil(current * utilization / TARGET_UTILIZATION) if incident.kind == "overload" else 0
        return {"replicas": max(current + 1, wanted)}
    if action == "retry_deployment":
        return {"release": context["release"]}
    if action == "rollback_deployment":
        params = {"to_release": context["rollback_to"]}
        if incident.kind == "slow_deploy" and context.get("release"):
            params["cancel_release"] = context["release"]
        return params
    return {}


def allowed_actions(settings: Settings, incident: Incident) -> tuple[str, ...]:
    """Shielding: the policy only picks what the gates could allow here and what can be done."""
    context = incident.context or {}
    allowed = []
    for action in actions.SAFE_CATALOGUE:
        if settings.demo_mode and action not in ("noop", "restart_service", "scale_workers"):
            continue  # DEMO_MODE executes only noop, restart and scaling
        if action == "rollback_deployment" and not context.get("rollback_to"):
            continue  # no earlier good release to go back to
        if action == "retry_deployment" and not (context.get("release") and incident.kind in actions.DEPLOY_KINDS):
            continue  # only a failed or slow deploy can be retried
        if action == "scale_workers" and incident.kind == "underload" and not context.get("can_scale_in"):
            continue
        allowed.append(action)
    return tuple(allowed)


def state_of(incident, attempt: int) -> State:
    return State.of(incident.kind, incident.severity, attempt, (incident.context or {}).get("fresh_release"))


# (state, allowed actions) -> (action, q_values, reason): the Q-table's choice, or a baseline's.
Pick = Callable[[State, tuple[str, ...]], tuple[str, dict, str]]


def make_decision(settings: Settings, incident, attempt: int, spec: dict, key: bytes, pick: Pick) -> dict:
    """The signed decision for an incident's attempt: its state, what the shield allows, the pick
    among those, the params it is executed with, and an HMAC over all of it."""
    state = state_of(incident, attempt)
    action, q_values, reason = pick(state, allowed_actions(settings, incident))
    decision = Decision(env=settings.env, incident_id=incident.id, attempt=attempt, app=incident.app, action=action,
                        params=action_params(action, incident, spec), issued_at=iso(settings.clock.now()),
                        nonce=secrets.token_hex(16), mode=settings.policy_mode,
                        state=state.to_dict(), q_values=q_values, reason=reason)
    return {**decision.to_dict(), "signature": signing.sign(decision.signed_body(), key)}


def q_pick(table: np.ndarray, mode: str, rng: np.random.Generator | None, epsilon: float | None = None) -> Pick:
    return lambda state, allowed: choose(table, state, mode, allowed, rng, epsilon)


def decide(settings: Settings, incident_id: str, attempt: int) -> dict | None:
    """Choose and sign an action for the incident's attempt; None if the incident is closed.

    The decision is stored on the incident, so a redelivered decide task returns the same
    decision (same nonce) instead of deciding twice.
    """
    env = settings.env
    # Decide without the write lock; then store the decision under it, unless another delivery of
    # this task stored one first (that one stands: same incident, same attempt, one decision).
    with transaction(settings, readonly=True) as conn:
        incident = incident_row(conn, incident_id)
        if incident is None or incident.env != env or incident.status != IncidentStatus.OPEN \
                or incident.attempt != attempt:
            return None
        if (incident.decision or {}).get("attempt") == attempt:
            return incident.decision
        # (greedy never draws a random number: no generator to seed)
        rng = rng_for(incident_id, attempt) if settings.policy_mode != "greedy" else None
        pick = q_pick(load_table(conn, env), settings.policy_mode, rng, settings.exploration)
        app = app_row(conn, env, incident.app)
        if app is None:  # removed meanwhile (its removal closes the incident too): nothing to decide
            log.info("no decision for %s: %s was removed from %s", incident_id, incident.app, env)
            return None
        spec = app.spec
    signed = make_decision(settings, incident, attempt, spec, signing_key(settings), pick)
    with transaction(settings) as conn:
        incident = incident_row(conn, incident_id, lock=True)
        if incident.status != IncidentStatus.OPEN or incident.attempt != attempt:
            return None
        if (incident.decision or {}).get("attempt") == attempt:
            return incident.decision
        proof.append(conn, env, "RL_CONSUME", incident_id=incident_id, app=incident.app,
                     payload={"attempt": attempt, "kind": incident.kind, "severity": incident.severity,
                              "context": incident.context or {}})
        update_incident(conn, incident_id, decision=signed)
        proof.append(conn, env, "RL_DECISION", incident_id=incident_id, app=incident.app,
                     payload={k: signed[k] for k in ("attempt", "action", "params", "mode", "state", "q_values",
                                                      "reason", "issued_at", "nonce")})
        return signed


def reward(result: Outcome, action: str, time_to_recover_s: float | None, timeout_s: float) -> float:
    cost = ACTION_COST.get(action, 0.5)
    if result == Outcome.STABLE:
        slowness = min(1.0, (time_to_recover_s or 0.0) / timeout_s)
        return round(1.0 - 0.5 * slowness - cost, 6)
    return round(-1.0 - cost, 6)


def q_update(old: float, r: float, future: float, alpha: float = ALPHA) -> float:
    """One step of Q-learning: move toward reward plus the discounted best of the next state."""
    return old + alpha * (r + GAMMA * future - old)


def store_table(session, env: str, table: np.ndarray, visits: np.ndarray, replace: bool = False) -> int:
    """Write every state-action a training run visited (after forgetting everything learned, if
    replace) in the session; returns how many rows were written."""
    if replace:
        policy_values.forget(session, env)
    written = 0
    for index in zip(*np.nonzero(visits)):
        k, sev, attempt, fresh, a = (int(i) for i in index)
        state = State.of(INCIDENT_KINDS[k], SEVERITIES[sev], attempt + 1, bool(fresh))
        policy_values.save_trained(session, env, state.key, actions.ACTIONS[a], float(table[index]),
                                   int(visits[index]), utcnow())
        written += 1
    return written


def learn(settings: Settings, tx: policy_values.Transaction, state: State, action: str, r: float,
          next_state: State | None) -> dict:
    """One Q update, read-modify-write under the row lock, so concurrent learners lose nothing."""
    if settings.policy_mode == "greedy":
        return {"applied": False, "why": "stage policy is frozen (deterministic)"}
    env = settings.env
    row = policy_values.locked_value(tx, env, state.key, action)
    old = row.q if row else float(prior_table()[state.index + (actions.ACTIONS.index(action),)])
    future = float(np.max(load_table(tx, env)[next_state.index])) if next_state is not None else 0.0
    new = q_update(old, r, future)
    policy_values.save_learned(tx, env, state.key, action, new, settings.clock.now(), previous=row)
    return {"applied": True, "old_q": round(old, 6), "new_q": round(new, 6), "target": round(r + GAMMA * future, 6)}


def transition(settings: Settings, outcome: dict) -> tuple[State, float, State | None]:
    """What a verified outcome teaches: (state, reward, next state or None at the end)."""
    fresh = outcome.get("fresh", False)
    state = State.of(outcome["kind"], outcome["severity"], outcome["attempt"], fresh)
    next_state = (State.of(outcome["kind"], outcome["severity"], outcome["next_attempt"], fresh)
                  if outcome.get("next_attempt") else None)
    r = reward(outcome["result"], outcome["action"], outcome.get("time_to_recover_s"), settings.verify_timeout_s)
    return state, r, next_state


def learn_from_outcome(settings: Settings, outcome: dict) -> dict:
    """RL_UPDATE from a verified outcome (applied unless the environment's policy is frozen)."""
    state, r, next_state = transition(settings, outcome)
    with transaction(settings) as conn:
        change = {"applied": False, "why": f"{outcome['action']!r} is not a catalogued action"}
        if outcome["action"] in actions.ACTIONS:
            change = learn(settings, conn, state, outcome["action"], r, next_state)
        proof.append(conn, settings.env, "RL_UPDATE", incident_id=outcome["incident_id"], app=outcome["app"],
                     payload={"state": state.to_dict(), "action": outcome["action"], "result": outcome["result"],
                              "reward": r, "mode": settings.policy_mode, **change})
    return change
