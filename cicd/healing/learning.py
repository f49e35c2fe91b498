"""Training and evaluating the recovery policy on the simulated fleet.

An episode is one incident, healed the way the agents heal it, in-process: the fault's signal
is classified, the policy chooses among the actions the shield offers, the decision is signed
and goes through the same gates, the action runs through the same catalogue (actions.perform)
against the simulated runtime, and the outcome is verified; a failed attempt leads to the next
state (attempt + 1), up to the escalation limit. Four policies are compared on the same faults:
the learned Q-table, the hand-written playbook (Keptn style: per problem type, an ordered list
of actions, least invasive first), random, and an oracle that knows each fault's hidden cause.
"""
from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from cicd.core import actions, gates, signing
from cicd.delivery import onboarding
from cicd.healing import policy
from cicd.config import Settings
from cicd.core.events import Decision, iso, utcnow
from cicd.core.lifecycle import Outcome
from cicd.runtime.base import RuntimeFailure
from cicd.runtime.sim import FAULT_MIX, Fault, SimRuntime, effect_of, sample_fault

APP = "sim-app"
DETECTION_S = {"crash": 0.5, "overload": 3.0, "false_alarm": 2.0, "underload": 10.0, "slow_deploy": 10.0,
               "failed_deploy": 0.3}
CONFIRM_S = 0.4           # the stable checks after a fix
VERIFY_TIMEOUT_S = 10.0   # what a failed attempt costs before the next one
ESCALATION_S = 600.0      # a human takes over after the last failed attempt
REWARD_SCALE_S = 30.0     # the time over which a recovery's reward falls from 1 to 0.5
MAX_ATTEMPTS = 3
ALPHA_FLOOR = 0.01
SIM_KEY = b"simulation-only-key-not-a-secret-000"

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


Chooser = Callable[[policy.State, tuple, SimpleNamespace, list], str]


def _signal(fault: Fault, sim: SimRuntime) -> dict:
    statuses = sim.probe([APP])[APP]
    kind = {"crash": "replica_down", "overload": "replica_hot", "false_alarm": "replica_blip",
            "underload": "replica_cold", "slow_deploy": "deploy_slow", "failed_deploy": "deploy_failed"}[fault.kind]
    slots = [s.slot for s in statuses if s.status == "down"] or [0]
    serving = [s.utilization for s in statuses if s.healthy]
    return {"env": "sim", "app": APP, "kind": kind, "slots": slots, "observed_at": iso(utcnow()),
            "utilization": sum(serving) / len(serving) if serving else 0.0, "replicas_total": len(statuses)}


class Simulation:
    """One settings, one simulated app, one gate key: runs episodes with any chooser."""

    def __init__(self, settings: Settings, seed: int):
        self.settings = settings
        self.sim = SimRuntime(settings, seed)
        self.spec = onboarding.generate_spec(APP, "https://sim.invalid/sim-app.git", "backend", settings.env)
        self.sim.add_app(self.spec)
        self.context = actions.ActionContext(runtime=self.sim, release_info=self.sim.release_info,
                                             request_deploy=self.sim.request_deploy,
                                             cancel_release=self.sim.cancel_release)
        self.count = 0

    def _decision(self, incident, attempt: int, action: str) -> dict:
        decision = Decision(env=self.settings.env, incident_id=incident.id, attempt=attempt, app=APP, action=action,
                            params=policy.action_params(action, incident, self.spec), issued_at=iso(utcnow()),
                            nonce=secrets.token_hex(8), mode=self.settings.policy_mode)
        return {**decision.to_dict(), "signature": signing.sign(decision.signed_body(), SIM_KEY)}

    def _gate_context(self, done: list[str]) -> gates.GateContext:
        return gates.GateContext(
            env=self.settings.env, key=SIM_KEY, now=utcnow(), demo_mode=self.settings.demo_mode,
            restarts_in_window=done.count("restart_service"), scales_in_window=done.count("scale_workers"),
            restart_budget=self.settings.restart_budget, scale_budget=self.settings.scale_budget,
            current_replicas=self.sim.replica_count(APP), min_replicas=self.spec["min_replicas"],
            max_replicas=self.spec["max_replicas"])

    def run(self, fault: Fault, choose: Chooser,
            learn: Callable[[policy.State, str, float, policy.State | None], None] | None = None,
            context: dict | None = None) -> Episode:
        """One incident. context overrides what the detector would know (a replay's record)."""
        self.count += 1
        self.sim.set_fault(APP, fault)
        signal = _signal(fault, self.sim)
        incident = SimpleNamespace(id=f"sim-{self.count:09d}", kind=fault.kind, severity=fault.severity,
                                   signal=signal, slot=signal["slots"][0],
                                   context={**self.sim.context(APP), **(context or {})})
        episode, clock, done = Episode(fault), DETECTION_S[fault.kind], []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            state = policy.State.of(fault.kind, fault.severity, attempt, fault.fresh)
            action = choose(state, policy.allowed_actions(self.settings, incident), incident, episode.actions)
            episode.actions.append(action)
            raw = self._decision(incident, attempt, action)
            verdict, _ = gates.evaluate(raw, self._gate_context(done))
            last = attempt == MAX_ATTEMPTS
            if not verdict.allowed:
                # Refused: a noop that teaches a negative reward (verdict.approval is a refusal here too:
                # nobody answers in a simulation).
                episode.refused += 1
                if learn:
                    learn(state, action, policy.reward(Outcome.REFUSED, action, None, REWARD_SCALE_S),
                          None if last else policy.State.of(fault.kind, fault.severity, attempt + 1, fault.fresh))
                continue
            before = self.sim.elapsed(APP)[0]
            op_key = f"{incident.id}/{attempt}"
            self.sim.note_action(APP, action, raw["params"], op_key)
            try:
                actions.perform(self.context, APP, action, raw["params"], op_key)
                fixed = self.sim.fault(APP) is None
            except RuntimeFailure:
                fixed = False  # as in the orchestrator: the execution failed, the attempt too
            done.append(action)
            step_s = self.sim.elapsed(APP)[0] - before + (CONFIRM_S if fixed else VERIFY_TIMEOUT_S)
            clock += step_s
            if learn:
                result = Outcome.STABLE if fixed else Outcome.FAILED
                next_state = None if fixed or last else policy.State.of(fault.kind, fault.severity, attempt + 1,
                                                                        fault.fresh)
                learn(state, action, policy.reward(result, action, step_s, REWARD_SCALE_S), next_state)
            if fixed:
                episode.success = True
                break
        disruption = self.sim.elapsed(APP)[1]
        episode.time_to_recover_s = clock if episode.success else clock + ESCALATION_S
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
