"""Training and evaluating the recovery policy on the simulated fleet.

An episode is one incident, healed by the healing loop's own steps, in-process and on a virtual
clock: the fault's signal is built and classified as the detector does (loop.replica_signal,
loop.classify), the decision is made and signed as the decide agent does (policy.make_decision,
with any chooser), it goes through the same gates with the same context (loop.gate_context: the
budget window, and the restart backoff), the action runs through the same catalogue
(actions.perform) against the simulated runtime, it is judged as the verifier judges it
(loop.is_stable), and the attempt ends as verifier.conclude ends it (loop.attempt_outcome, up to
settings.max_attempts; a refusal closes the incident); the reward is policy.transition's. Four
policies are compared on the same faults: the learned Q-table, the hand-written playbook (Keptn
style: per problem type, an ordered list of actions, least invasive first), random, and an
oracle that knows each fault's hidden cause.
"""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from cicd.core import actions, gates
from cicd.core.clock import ManualClock
from cicd.delivery import deployer, onboarding
from cicd.healing import loop, policy
from cicd.config import Settings
from cicd.core.events import Signal
from cicd.core.lifecycle import AttemptEnd, ExecutionStatus, Outcome
from cicd.runtime.base import RuntimeFailure
from cicd.runtime.sim import FAULT_MIX, Fault, SimRuntime, effect_of, sample_fault

APP = "sim-app"
DETECTION_S = {"crash": 0.5, "overload": 3.0, "false_alarm": 2.0, "underload": 10.0, "slow_deploy": 10.0,
               "failed_deploy": 0.3}
ESCALATION_S = 600.0      # a human takes over after the last failed attempt
ALPHA_FLOOR = 0.01
SIM_KEY = b"simulation-only-key-not-a-secret-000"
SIM_START = datetime(2026, 1, 1, tzinfo=timezone.utc)   # virtual time: the same for every run
# What the probes (or the deploy agent) report for each kind of fault, once their counters say so.
SIGNAL_OF_FAULT = {"crash": "replica_down", "overload": "replica_hot", "false_alarm": "replica_blip",
                   "underload": "replica_cold", "slow_deploy": "deploy_slow", "failed_deploy": "deploy_failed"}
DEPLOY_FAULT_RELEASE = 3  # the release a deploy fault is about (SimRuntime.set_fault makes it)

# The hand-written playbook: per problem type, least invasive first.
PLAYBOOK = {
    "crash": ("restart_service", "scale_workers", "rollback_deployment"),
    "overload": ("scale_workers", "restart_service", "rollback_deployment"),
    "false_alarm": ("noop", "restart_service"),
    "underload": ("scale_workers", "noop"),
    "slow_deploy": ("noop", "rollback_deployment"),
    "failed_deploy": ("retry_deployment", "rollback_deployment"),
}


@dataclass
class Episode:
    fault: Fault
    actions: list[str] = field(default_factory=list)
    success: bool = False
    time_to_recover_s: float = 0.0
    downtime_s: float = 0.0
    refused: int = 0
    context: dict = field(default_factory=dict)   # what the detector knew (the incident's context)
    # Per attempt, what the chain would record: {attempt, action, params, verdict, result, outcome}.
    steps: list[dict] = field(default_factory=list)


Chooser = Callable[[policy.State, tuple, SimpleNamespace, list], str]


class Simulation:
    """One settings, one simulated app, one gate key, one virtual clock: runs episodes with any
    chooser, through the healing loop's own steps (cicd.healing.loop, policy.make_decision,
    gates.evaluate, actions.perform, policy.transition), in memory.

    Incidents come incident_gap_s apart on the virtual clock; by default longer than the budget
    window and the backoff reset, so each episode is an independent incident."""

    def __init__(self, settings: Settings, seed: int, incident_gap_s: float | None = None):
        self.clock = ManualClock(SIM_START)
        self.settings = replace(settings, clock=self.clock)
        self.sim = SimRuntime(self.settings, seed)
        self.spec = onboarding.generate_spec(APP, "https://sim.invalid/sim-app.git", "backend", settings.env)
        self.sim.add_app(self.spec)
        self.context = actions.ActionContext(runtime=self.sim, release_info=self.sim.release_info,
                                             request_deploy=self.sim.request_deploy,
                                             cancel_release=self.sim.cancel_release)
        self.gap_s = (max(settings.budget_window_s, settings.backoff_reset_s) + 1.0 if incident_gap_s is None
                      else incident_gap_s)
        self.acted: loop.Acted = []   # the app's restarts and scalings that ran, as the store keeps them
        self.count = 0

    def signal(self, fault: Fault) -> dict:
        """What the probes (or the deploy agent) send the detector about the fault now."""
        kind = SIGNAL_OF_FAULT[fault.kind]
        if fault.kind in actions.DEPLOY_KINDS:
            return deployer.deploy_signal(self.settings, APP, kind, DEPLOY_FAULT_RELEASE, "simulated")
        return loop.replica_signal(self.settings.env, APP, kind, self.sim.probe([APP])[APP], self.clock.now())

    def _releases(self, fault: Fault) -> list[SimpleNamespace]:
        """The app's releases as the detector reads them from the store, newest first. The fault
        model says whether the fault is the live release's (fresh): then it went live a moment
        ago, else long ago."""
        went_live = self.clock.now() - (timedelta(seconds=self.settings.fresh_release_s / 2) if fault.fresh
                                        else timedelta(days=30))
        return [SimpleNamespace(number=r["release"], status=r["status"], sha=r["sha"], finished_at=went_live)
                for r in self.sim.release_history(APP)]

    def _gate(self, raw: dict) -> tuple[gates.Verdict, float]:
        """The gates, and a restart held back by its backoff run when it is due (as the
        orchestrator defers it and housekeeping sends it on): (verdict, seconds waited)."""
        waited = 0.0
        while True:
            ctx = loop.gate_context(self.settings, SIM_KEY, self.acted, self.sim.replica_count(APP), self.spec)
            verdict, decision = gates.evaluate(raw, ctx)
            wait = (loop.restart_wait_s(self.settings, self.acted, decision.params["slots"])
                    if verdict.allowed and decision.action == "restart_service" else 0.0)
            if wait <= 0:
                return verdict, waited
            self.clock.advance(wait)
            waited += wait

    def _act_and_verify(self, incident, raw: dict, claimed_at) -> str:
        """Execute the allowed action once, then judge it as the verifier would: stable or failed.
        claimed_at: when the orchestrator claimed the execution (what the budget and backoff count
        from; for a deferred restart, when it was deferred)."""
        action, params, op_key = raw["action"], raw["params"], f"{incident.id}/{raw['attempt']}"
        before = self.sim.elapsed(APP)[0]
        self.sim.note_action(APP, action, params, op_key)
        try:
            result = actions.perform(self.context, APP, action, params, op_key)
        except RuntimeFailure:
            result = None  # as in the orchestrator: the execution failed, the attempt too
        else:
            self.acted.append((action, claimed_at, params))
        self.clock.advance(self.sim.elapsed(APP)[0] - before)  # what the action itself took
        if result is None:
            return Outcome.FAILED
        awaited = self._awaited_release(incident, action, result)
        timeout = loop.verify_timeout_s(self.settings, self.spec, awaited is not False)
        waiting_on = loop.release_result(awaited["status"] if awaited else None) if awaited is not False else None
        statuses = self.sim.probe([APP])[APP]
        if waiting_on is None and loop.is_stable(self.settings, incident.kind, statuses, self.sim.replica_count(APP)):
            self.clock.advance(loop.polled_verdict_s(self.settings, True, timeout))
            return Outcome.STABLE
        # Nothing changes on its own in the simulated fleet: a failed release fails at the first
        # look, the rest once the verifier gives up.
        self.clock.advance(0.0 if waiting_on == Outcome.FAILED else loop.polled_verdict_s(self.settings, False, timeout))
        return Outcome.FAILED

    def _awaited_release(self, incident, action: str, result: dict):
        """The release this attempt's outcome depends on (as verifier._awaited_release): False if none."""
        if result.get("effect") == "deploy_requested":
            return self.sim.release_of_request(APP, result["request_id"])
        if incident.kind == "slow_deploy" and action == "noop":
            return self.sim.release_info(APP, incident.context.get("release"))
        return False

    def run(self, fault: Fault, choose: Chooser,
            learn: Callable[[policy.State, str, float, policy.State | None], None] | None = None,
            context: dict | None = None) -> Episode:
        """One incident. context overrides what the detector would know (a replay's record)."""
        self.count += 1
        self.clock.advance(self.gap_s)
        self.acted = loop.forget_acted(self.settings, self.acted)
        self.sim.set_fault(APP, fault)
        # (built by our own steps, so not validated again: Signal.from_dict's time parsing was a
        # tenth of an episode)
        raw_signal = self.signal(fault)
        signal = Signal(**{**raw_signal, "slots": tuple(raw_signal["slots"])})
        kind, severity = loop.classify(signal)
        known = loop.release_context(self.settings, kind, signal, self.spec, self._releases(fault))
        incident = SimpleNamespace(id=f"sim-{self.count:09d}", app=APP, kind=kind, severity=severity,
                                   signal=signal.to_dict(), slot=signal.slots[0] if signal.slots else 0,
                                   context={**known, **(context or {})})
        episode, opened_at = Episode(fault, context=incident.context), self.clock.now()
        pick = lambda state, allowed: (choose(state, allowed, incident, episode.actions), {}, "")  # noqa: E731
        for attempt in itertools.count(1):
            raw = policy.make_decision(self.settings, incident, attempt, self.spec, SIM_KEY, pick)
            episode.actions.append(raw["action"])
            claimed_at = self.clock.now()
            verdict, waited = self._gate(raw)
            step = {"attempt": attempt, "action": raw["action"], "params": raw["params"],
                    "verdict": "allowed" if verdict.allowed else verdict.event, "waited_s": waited}
            episode.steps.append(step)
            if verdict.approval:
                # Held for a human, and nobody answers in a simulation: the request expires and the
                # incident escalates, with no outcome to learn from (as approvals.expire_due).
                episode.refused += 1
                step.update(result=ExecutionStatus.AWAITING_APPROVAL, outcome=AttemptEnd.ESCALATE)
                break
            if not verdict.allowed:
                episode.refused += 1
                result = Outcome.REFUSED
            else:
                result = self._act_and_verify(incident, raw, claimed_at)
            ending = loop.attempt_outcome(self.settings, result, attempt, verdict.gate)
            step.update(result=result, outcome=ending)
            if learn:
                outcome = {"kind": kind, "severity": severity, "fresh": bool(incident.context.get("fresh_release")),
                           "attempt": attempt, "action": raw["action"], "result": result,
                           "time_to_recover_s": ((self.clock.now() - opened_at).total_seconds()
                                                 if result == Outcome.STABLE else None),
                           "next_attempt": attempt + 1 if ending == AttemptEnd.NEXT_ATTEMPT else None}
                state, r, next_state = policy.transition(self.settings, outcome)
                learn(state, raw["action"], r, next_state)
            if ending != AttemptEnd.NEXT_ATTEMPT:
                episode.success = ending == AttemptEnd.STABLE
                break
        disruption = self.sim.elapsed(APP)[1]
        recovery_s = DETECTION_S[fault.kind] + (self.clock.now() - opened_at).total_seconds()
        episode.time_to_recover_s = recovery_s if episode.success else recovery_s + ESCALATION_S
        episode.downtime_s = fault.impact * episode.time_to_recover_s + disruption
        return episode


# -- choosers ----------------------------------------------------------------------------------
def greedy(table: np.ndarray, mode: str = "greedy") -> Chooser:
    rng = np.random.default_rng(0)
    return lambda state, allowed, incident, tried: policy.choose(table, state, mode, allowed, rng, 0.0)[0]


def epsilon_greedy(table: np.ndarray, epsilon: Callable[[], float], rng: np.random.Generator) -> Chooser:
    return lambda state, allowed, incident, tried: policy.choose(table, state, "explore", allowed, rng, epsilon())[0]


def playbook() -> Chooser:
    def choose(state, allowed, incident, tried):
        steps = [a for a in PLAYBOOK[state.kind] if a in allowed] or list(allowed)
        untried = [a for a in steps if a not in tried]
        return untried[0] if untried else steps[-1]
    return choose


def uniform(rng: random.Random) -> Chooser:
    return lambda state, allowed, incident, tried: rng.choice(list(allowed))


def oracle(sim: SimRuntime) -> Chooser:
    """Knows the hidden cause: the action most likely to fix it, the quickest on a tie."""
    def choose(state, allowed, incident, tried):
        cause = sim.fault(APP).cause
        return max(allowed, key=lambda a: (effect_of(cause, a).p_fix,
                                           -(effect_of(cause, a).seconds + effect_of(cause, a).disruption_s)))
    return choose


# -- training ----------------------------------------------------------------------------------
@dataclass
class Training:
    table: np.ndarray
    visits: np.ndarray
    curve: list[dict]            # {"episode", "downtime_per_incident", "success_rate"} on a validation set
    playbook_downtime: float     # the playbook's downtime per incident on the same validation set
    converged_at: int | None


def faults(seed: int, count: int, mix=FAULT_MIX) -> list[Fault]:
    rng = random.Random(seed)
    return [sample_fault(rng, mix) for _ in range(count)]


def run_policy(settings: Settings, chooser_for: Callable[[Simulation], Chooser], fault_list: list[Fault],
               seed: int) -> list[Episode]:
    simulation = Simulation(settings, seed)
    choose = chooser_for(simulation)
    return [simulation.run(fault, choose) for fault in fault_list]


def train(settings: Settings, episodes: int, seed: int, table: np.ndarray | None = None, mix=FAULT_MIX,
          validate_every: int = 0, validation_size: int = 1000,
          progress: Callable[[int, int], None] = lambda done, total: None) -> Training:
    """Q-learning from the priors (or a given table): epsilon falls from 0.3 to 0.02 over the first
    60% of the episodes. Every validate_every episodes, the greedy policy is scored on a fixed
    validation set (its own seed), which gives the learning curve."""
    table = policy.prior_table() if table is None else table.copy()
    visits = np.zeros_like(table, dtype=np.int64)
    np_rng = np.random.default_rng(seed)
    simulation = Simulation(settings, seed)
    done = 0
    epsilon = lambda: max(0.02, 0.3 - 0.28 * done / max(1.0, 0.6 * episodes))  # noqa: E731

    def learn(state, action, r, next_state):
        # The step size shrinks with visits (down to a floor): early outcomes move the estimate a
        # lot, later ones refine it, so the greedy choice settles instead of flipping on noise.
        index = state.index + (actions.ACTIONS.index(action),)
        future = float(np.max(table[next_state.index])) if next_state is not None else 0.0
        alpha = max(ALPHA_FLOOR, policy.ALPHA / (1 + visits[index] / 25))
        table[index] = policy.q_update(float(table[index]), r, future, alpha)
        visits[index] += 1

    validation = faults(seed + 10_000, validation_size, mix)  # the same incidents at every point
    validate_every = validate_every or max(50, episodes // 20)
    base = run_policy(settings, lambda s: playbook(), validation, seed + 20_000)
    def score(episode: int) -> dict:
        scored = run_policy(settings, lambda s: greedy(table), validation, seed + 20_000)
        return {"episode": episode, "downtime_per_incident": _downtime(scored) / len(scored),
                "success_rate": sum(e.success for e in scored) / len(scored), "greedy": greedy_actions(table, mix)}

    curve = [score(0)]  # where learning starts: the priors (or the table given)
    choose = epsilon_greedy(table, epsilon, np_rng)
    for done, fault in enumerate(faults(seed, episodes, mix), start=1):
        simulation.run(fault, choose, learn)
        if done % validate_every == 0 or done == episodes:
            curve.append(score(done))
            progress(done, episodes)
    return Training(table, visits, curve, _downtime(base) / len(base), converged(curve))


def greedy_actions(table: np.ndarray, mix=FAULT_MIX) -> dict[str, str]:
    """The greedy first and second action for every state the fault mix produces."""
    out = {}
    for _, kind, fresh, severity in mix:
        for attempt in (1, 2):
            state = policy.State.of(kind, severity, attempt, fresh)
            out[state.key] = actions.ACTIONS[int(np.argmax(table[state.index]))]
    return out


def converged(curve: list[dict]) -> int | None:
    """The first validation point from which the greedy policy no longer changes."""
    if not curve:
        return None
    final = curve[-1]["greedy"]
    for point in curve:
        if all(p["greedy"] == final for p in curve[curve.index(point):]):
            return point["episode"]
    return None


def _downtime(episodes: list[Episode]) -> float:
    return sum(e.downtime_s for e in episodes)


# -- evaluation --------------------------------------------------------------------------------
def metrics(episodes: list[Episode]) -> dict:
    recovered = [e for e in episodes if e.success]
    return {"incidents": len(episodes),
            "success_rate": round(len(recovered) / len(episodes), 4),
            "mean_actions": round(sum(len(e.actions) for e in episodes) / len(episodes), 4),
            "mean_time_to_recover_s": round(sum(e.time_to_recover_s for e in recovered) / max(1, len(recovered)), 3),
            "downtime_s": round(_downtime(episodes), 2),
            "refused": sum(e.refused for e in episodes)}


def evaluate(settings: Settings, table: np.ndarray, episodes: int, seed: int, mix=FAULT_MIX) -> dict:
    """The four policies on the same faults and the same outcome randomness."""
    fault_list = faults(seed, episodes, mix)
    results = {
        "learned": run_policy(settings, lambda s: greedy(table), fault_list, seed),
        "playbook": run_policy(settings, lambda s: playbook(), fault_list, seed),
        "random": run_policy(settings, lambda s: uniform(random.Random(seed)), fault_list, seed),
        "oracle": run_policy(settings, lambda s: oracle(s.sim), fault_list, seed),
    }
    out = {name: metrics(eps) for name, eps in results.items()}
    base = out["playbook"]
    for row in out.values():
        row["ratio_to_playbook"] = {
            key: round(row[key] / base[key], 4) if base[key] else None
            for key in ("success_rate", "mean_actions", "mean_time_to_recover_s", "downtime_s")}
    out["learned"]["actions_vs_oracle"] = round(out["learned"]["mean_actions"] / out["oracle"]["mean_actions"], 4)
    return {"episodes": episodes, "seed": seed, "env": settings.env, "policies": out}


# -- results on disk ---------------------------------------------------------------------------
def rl_dir(settings: Settings) -> Path:
    path = settings.env_dir / "rl"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_training(settings: Settings, training: Training, episodes: int, seed: int) -> Path:
    path = rl_dir(settings) / "training.json"
    path.write_text(json.dumps({"episodes": episodes, "seed": seed, "curve": training.curve,
                                "playbook_downtime_per_incident": training.playbook_downtime,
                                "converged_at": training.converged_at}, indent=2))
    return path


@dataclass
class StoredTraining:
    training: Training
    states_written: int   # state-actions written to the environment's Q-table
    curve_path: Path      # the learning curve, for `cicd rl eval`'s plot


def current_table(settings: Settings) -> np.ndarray:
    """The environment's Q-table: the priors overlaid with what it has learned (read-only)."""
    from cicd.store import session_scope  # the simulation itself needs no database
    with session_scope(settings) as session:
        return policy.load_table(session, settings.env)


def train_and_store(settings: Settings, episodes: int, seed: int, keep: bool = False,
                    progress: Callable[[int, int], None] = lambda done, total: None) -> StoredTraining:
    """Train from the priors (or, with keep, from the environment's current table), store the table
    in the environment (RL_TRAINED in its proof chain says how it was made) and save the curve."""
    from cicd.store import proof, session_scope
    env = settings.env
    training = train(settings, episodes, seed, current_table(settings) if keep else None, progress=progress)
    with session_scope(settings) as session:
        written = policy.store_table(session, env, training.table, training.visits, replace=not keep)
        proof.append(session, env, "RL_TRAINED", payload={
            "episodes": episodes, "seed": seed, "from": "current table" if keep else "priors",
            "states_written": written, "converged_at": training.converged_at,
            "final": {k: v for k, v in training.curve[-1].items() if k != "greedy"}})
    return StoredTraining(training, written, save_training(settings, training, episodes, seed))


def load_training(settings: Settings) -> dict | None:
    try:
        return json.loads((settings.env_dir / "rl" / "training.json").read_text())
    except (OSError, ValueError):
        return None


def plot(settings: Settings, evaluation: dict, path: Path) -> Path:
    """The learning curve (if a training run was saved) and the comparison, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    training = load_training(settings)
    fig, (curve_ax, bars_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    if training and training["curve"]:
        xs = [p["episode"] for p in training["curve"]]
        curve_ax.plot(xs, [p["downtime_per_incident"] for p in training["curve"]], marker="o", label="learned (greedy)")
        curve_ax.axhline(training["playbook_downtime_per_incident"], color="tab:red", linestyle="--", label="playbook")
        if training.get("converged_at"):
            curve_ax.axvline(training["converged_at"], color="grey", linestyle=":", label="converged")
        curve_ax.set_xlabel("training episodes")
        curve_ax.set_ylabel("downtime per incident (s), validation set")
        curve_ax.set_title(f"Learning curve (seed {training['seed']})")
        curve_ax.legend()
    else:
        curve_ax.text(0.5, 0.5, "no training run saved\n(cicd rl train)", ha="center", va="center")
        curve_ax.set_axis_off()
    names = list(evaluation["policies"])
    downtime = [evaluation["policies"][n]["downtime_s"] for n in names]
    colors = ["tab:blue", "tab:red", "tab:grey", "tab:green"]
    bars = bars_ax.bar(names, downtime, color=colors[:len(names)])
    for bar, name in zip(bars, names):
        row = evaluation["policies"][name]
        bars_ax.annotate(f"success {row['success_rate']:.3f}\nactions {row['mean_actions']:.2f}",
                         (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    bars_ax.set_yscale("log")
    bars_ax.set_ylim(top=max(downtime) * 4)  # room for the labels above the tallest bar
    bars_ax.set_ylabel("total downtime (s, log scale)")
    bars_ax.set_title(f"{evaluation['episodes']} incidents, seed {evaluation['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
