"""One healing loop: the simulator the policy is trained on and the chain that runs in production
make the same decisions, get the same gate verdicts and reach the same outcomes.

The same seeded faults go through learning.Simulation.run (in memory) and through the chain's
own steps (detector.open_incident -> policy.decide -> orchestrator.execute -> verifier.check ->
policy.learn_from_outcome) against a real SQLite store, both on the simulated fleet and on a
manual clock, incident by incident. Incidents come seconds apart, so the restart backoff and
the budget window both bite.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest

from cicd import store
from cicd.config import Settings, signing_key
from cicd.core.clock import ManualClock
from cicd.core.events import REFUSAL_EVENTS, parse_iso
from cicd.core.lifecycle import AttemptEnd
from cicd.delivery import onboarding
from cicd.healing import detector, learning, loop, orchestrator, policy, verifier
from cicd.runtime.sim import Fault, SimRuntime
from cicd.store import proof

APP = learning.APP
GAP_S = 5.0  # between incidents: close enough for the backoff and the restart budget to matter
# Steady crashes and overloads, and false alarms: what the greedy priors heal without a deploy
# (the chain's deploy actions go through the deploy agent, which this in-process chain has not).
MIX = [(0.35, "crash", False, "high"), (0.1, "crash", False, "critical"), (0.25, "overload", False, "medium"),
       (0.1, "overload", False, "high"), (0.2, "false_alarm", False, "low")]
# A crash no restart or scaling is likely to fix (a bad release nobody knows about): escalates.
STUBBORN = Fault("crash", False, "high", "bad_release")
OUTCOME_OF = {"SYSTEM_STABLE": AttemptEnd.STABLE, "ATTEMPT_FAILED": AttemptEnd.NEXT_ATTEMPT,
              "ESCALATED": AttemptEnd.ESCALATE, "INCIDENT_REFUSED": AttemptEnd.REFUSE}


def fault_sequence(seed: int = 4) -> list[Fault]:
    return [STUBBORN] + learning.faults(seed, 40, MIX)


def chain_settings(tmp_path, **overrides) -> Settings:
    return Settings(env="stage", home=tmp_path, restart_budget=4, budget_window_s=300.0,
                    clock=ManualClock(learning.SIM_START), **overrides)


class ChainFleet(SimRuntime):
    """The simulated fleet for the chain. The fault model draws an action's outcome by its op key
    (incident id / attempt); the chain names incidents inc-<random>, the simulator sim-<n>, so
    the chain's ids are mapped to the simulator's: the same incident draws the same outcome."""

    def __init__(self, settings, seed):
        super().__init__(settings, seed)
        self.alias: dict[str, str] = {}

    def note_action(self, app, action, params, op_key):
        incident_id, attempt = op_key.rsplit("/", 1)
        super().note_action(app, action, params, f"{self.alias[incident_id]}/{attempt}")


def simulated_trace(settings: Settings, faults: list[Fault], seed: int) -> list[list[dict]]:
    simulation = learning.Simulation(settings, seed, incident_gap_s=GAP_S)
    choose = learning.greedy(policy.prior_table())
    rewards: list[float] = []
    trace = []
    for fault in faults:
        rewards.clear()
        episode = simulation.run(fault, choose, learn=lambda state, action, r, next_state: rewards.append(r))
        trace.append([{**step, "reward": r, "context": episode.context} for step, r in zip(episode.steps, rewards)])
    return trace


def _seed_releases(settings: Settings) -> None:
    """The history SimRuntime.set_fault gives the app: release 1 superseded by a long-live 2."""
    long_ago = settings.clock.now() - timedelta(days=30)
    with store.session_scope(settings) as session:
        for number, status in ((1, "superseded"), (2, "live")):
            session.add(store.Release(env=settings.env, app=APP, number=number, status=status, ref="main",
                                      sha=str(number) * 40, replicas=2, request_id=f"seed-{number}",
                                      started_at=long_ago, finished_at=long_ago))


def chain_trace(settings: Settings, faults: list[Fault], seed: int) -> list[list[dict]]:
    clock = settings.clock
    signing_key(settings, create=True)
    assert onboarding.register(settings, APP, "https://sim.invalid/sim-app.git", "backend")["ok"]
    _seed_releases(settings)
    fleet = ChainFleet(settings, seed)
    fleet.add_app(onboarding.generate_spec(APP, "https://sim.invalid/sim-app.git", "backend", settings.env))
    trace = []
    for n, fault in enumerate(faults, start=1):
        clock.advance(GAP_S)
        fleet.set_fault(APP, fault)
        signal = loop.replica_signal(settings.env, APP, learning.SIGNAL_OF_FAULT[fault.kind],
                                     fleet.probe([APP])[APP], clock.now())
        opened = detector.open_incident(settings, signal)
        assert opened is not None, f"incident {n} was not opened"
        incident_id = opened["incident_id"]
        fleet.alias[incident_id] = f"sim-{n:09d}"
        rewards, attempt = [], 1
        while attempt:
            decision = policy.decide(settings, incident_id, attempt)
            before = fleet.elapsed(APP)[0]
            execution = orchestrator.execute(settings, fleet, decision, fleet.request_deploy)
            while execution["status"] == "deferred":
                # What housekeeping does: once the backoff is over, send the decision on again.
                clock.advance((parse_iso(execution["result"]["due_at"]) - clock.now()).total_seconds())
                [resent] = orchestrator.due_deferred(settings)
                execution = orchestrator.execute(settings, fleet, resent, fleet.request_deploy)
            clock.advance(fleet.elapsed(APP)[0] - before)  # what the action itself took
            state, value, started_at = "wait", 0, clock.now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            while state == "wait":
                state, value = verifier.check(settings, fleet, execution, value, started_at)
                if state == "wait":
                    clock.advance(settings.verify_interval_s)
            rewards.append(policy.transition(settings, value)[1])
            policy.learn_from_outcome(settings, value)
            attempt = value["next_attempt"]
        trace.append([{**step, "reward": r} for step, r in zip(_steps_on_record(settings, incident_id), rewards)])
        # Escalated or refused: a human was called for the app, and until they clear it the
        # detector leaves the app alone. Here they fix it at once (the simulator's ESCALATION_S).
        with store.session_scope(settings) as session:
            store.get_app(session, settings.env, APP).attention = None
    return trace


def _steps_on_record(settings: Settings, incident_id: str) -> list[dict]:
    """The incident's attempts as its proof records tell them."""
    steps: dict[int, dict] = {}
    for record in proof.tail(settings, 500, incident_id=incident_id):
        name, payload = record["event_name"], record["payload"]
        attempt = payload.get("attempt")
        if name == "INCIDENT_DETECTED":
            context = payload["context"]
        elif name == "RL_DECISION":
            steps[attempt] = {"attempt": attempt, "action": payload["action"], "params": payload["params"],
                              "waited_s": 0.0, "context": context}
        elif name == "RESTART_BACKOFF":
            steps[attempt]["waited_s"] += payload["wait_s"]
        elif name == "EXECUTION_GATE_PASSED":
            steps[attempt]["verdict"] = "allowed"
        elif name in REFUSAL_EVENTS:
            steps[attempt].update(verdict=name, result="refused")
        elif name in OUTCOME_OF:
            steps[attempt]["outcome"] = OUTCOME_OF[name]
            steps[attempt].setdefault("result", "stable" if name == "SYSTEM_STABLE" else "failed")
    return [steps[a] for a in sorted(steps)]


def comparable(trace: list[list[dict]]) -> list[list[tuple]]:
    return [[(s["context"], s["attempt"], s["action"], s["params"], s["verdict"], round(s["waited_s"], 3),
              s["result"], s["outcome"]) for s in steps] for steps in trace]


SEED = 4


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    settings = chain_settings(tmp_path_factory.mktemp("chain"))
    try:
        return settings, chain_trace(settings, fault_sequence(), SEED)
    finally:
        store.dispose_engines()


def test_the_simulator_and_the_chain_decide_gate_and_conclude_alike_incident_by_incident(chain):
    settings, on_record = chain
    simulated = simulated_trace(settings, fault_sequence(), SEED)
    assert len(simulated) == len(on_record) == len(fault_sequence())
    for n, (sim_steps, chain_steps) in enumerate(zip(comparable(simulated), comparable(on_record)), start=1):
        assert sim_steps == chain_steps, f"incident {n}"
    # The same rewards too: the two loops kept the same time (a reward falls with the time to recover).
    for n, (sim_steps, chain_steps) in enumerate(zip(simulated, on_record), start=1):
        assert [s["reward"] for s in sim_steps] == pytest.approx([s["reward"] for s in chain_steps], abs=1e-3), \
            f"incident {n}"


def test_the_fault_sequence_exercises_every_way_an_attempt_ends(chain):
    """So the comparison above means something: recoveries, failed attempts, restarts held back by
    their backoff, restarts refused by the budget and allowed again once the window has moved on,
    escalation after the last attempt, and every action the mix needs."""
    _, on_record = chain
    steps = [s for incident in on_record for s in incident]
    assert {s["outcome"] for s in steps} >= {AttemptEnd.STABLE, AttemptEnd.NEXT_ATTEMPT, AttemptEnd.ESCALATE}
    assert any(s["waited_s"] > 0 for s in steps)
    verdicts = [(s["action"], s["verdict"]) for s in steps]
    refused = verdicts.index(("restart_service", "BUDGET_EXCEEDED"))
    assert ("restart_service", "allowed") in verdicts[refused:]  # the window moved on: restarts again
    assert any(s["outcome"] == AttemptEnd.ESCALATE and s["result"] == "failed" for s in steps)
    assert {s["action"] for s in steps} >= {"noop", "restart_service", "scale_workers"}


@pytest.mark.parametrize("drift", [
    {"max_attempts": 2},          # an attempt limit of its own
    {"budget_window_s": 1.0},     # restarts counted outside the budget window
    {"backoff_base_s": 0.0},      # no restart backoff
])
def test_a_simulator_that_drifts_from_the_chain_is_caught(chain, drift):
    settings, on_record = chain
    assert comparable(simulated_trace(replace(settings, **drift), fault_sequence(), SEED)) != comparable(on_record)
