"""The learner: it learns what context needs, stays deterministic where it must, never picks an
unsafe action however much it explores, and a refusal teaches it."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cicd.core import actions, gates, signing
from cicd.healing import learning, policy
from cicd.config import Settings
from cicd.core.events import Decision, iso, utcnow

REGRESSIONS = [(1.0, "overload", True, "high")]  # an overload right after a release: a slow release


@pytest.fixture
def dev(tmp_path):
    return Settings(env="dev", home=tmp_path)


def test_a_policy_trained_on_a_context_dependent_fault_beats_the_playbook_on_it(dev):
    before = policy.State.of("overload", "high", 1, fresh=True)
    assert learning.greedy(policy.prior_table())(before, actions.ACTIONS, None, []) == "scale_workers"
    trained = learning.train(dev, 800, seed=11, mix=REGRESSIONS, validation_size=100)
    assert learning.greedy(trained.table)(before, actions.ACTIONS, None, []) == "rollback_deployment"
    result = learning.evaluate(dev, trained.table, 500, seed=12, mix=REGRESSIONS)["policies"]
    assert result["learned"]["downtime_s"] < 0.6 * result["playbook"]["downtime_s"]
    assert result["learned"]["mean_actions"] < result["playbook"]["mean_actions"]
    assert result["learned"]["success_rate"] >= result["playbook"]["success_rate"]


def test_training_and_evaluation_are_deterministic_for_a_seed(dev):
    a = learning.train(dev, 300, seed=5, validation_size=50)
    b = learning.train(dev, 300, seed=5, validation_size=50)
    assert np.array_equal(a.table, b.table) and a.curve == b.curve
    assert learning.evaluate(dev, a.table, 300, 9) == learning.evaluate(dev, b.table, 300, 9)
    c = learning.train(dev, 300, seed=6, validation_size=50)
    assert not np.array_equal(a.table, c.table)


def test_the_greedy_stage_policy_gives_the_same_decision_for_the_same_incident(tmp_path):
    stage = Settings(env="stage", home=tmp_path)
    table = policy.prior_table()
    incident = SimpleNamespace(kind="crash", context={"rollback_to": 1, "fresh_release": False})
    picks = {(action, reason) for action, _, reason in (
        policy.choose(table, policy.State.of("crash", "high", 1), stage.policy_mode,
                      policy.allowed_actions(stage, incident), policy.rng_for(f"inc-{i}", 1))
        for i in range(500))}
    assert len(picks) == 1 and next(iter(picks))[0] == "restart_service"


def test_stage_never_explores_whatever_the_exploration_setting(tmp_path):
    stage = Settings(env="stage", home=tmp_path, exploration=1.0)
    incident = SimpleNamespace(kind="crash", context={"rollback_to": 1})
    actions_taken = {policy.choose(policy.prior_table(), policy.State.of("crash", "high", 1), stage.policy_mode,
                                   policy.allowed_actions(stage, incident), policy.rng_for(f"inc-{i}", 1),
                                   stage.exploration)[0] for i in range(1000)}
    assert actions_taken == {"restart_service"}


def random_incident(rng: random.Random):
    state = rng.choice(policy.detected_states())
    context = {"fresh_release": state.fresh, "rollback_to": rng.choice([None, 1, 7]),
               "release": rng.choice([None, 3]), "can_scale_in": rng.choice([True, False])}
    signal = {"slots": [0], "replicas_total": rng.choice([1, 2, 5]), "utilization": rng.random()}
    return state, SimpleNamespace(id="inc-safety", kind=state.kind, severity=state.severity, signal=signal, slot=0,
                                  context=context)


@pytest.mark.parametrize("env, demo_mode", [("dev", False), ("dev", True), ("stage", False), ("prod", False)])
def test_no_unsafe_action_in_25000_decisions_while_exploring_at_the_maximum(tmp_path, env, demo_mode):
    """4 x 25,000 = 100,000 decisions with exploration at 1.0 (every pick random): every one is
    an action the shield offered, none is destructive, the gates never call it unsafe or out of
    the catalogue, DEMO_MODE never has to block, and prod's random picks never need a human."""
    settings = Settings(env=env, home=tmp_path, demo_mode=demo_mode, exploration=1.0)
    rng, np_rng, table = random.Random(env), np.random.default_rng(1), policy.prior_table()
    spec = {"replicas": 2, "min_replicas": 1, "max_replicas": 6}
    key = b"k" * 32
    ctx = gates.GateContext(env=env, key=key, now=utcnow(), demo_mode=demo_mode, current_replicas=2, max_replicas=6)
    seen = set()
    for n in range(25_000):
        state, incident = random_incident(rng)
        allowed = policy.allowed_actions(settings, incident)
        action, _, reason = policy.choose(table, state, settings.policy_mode, allowed, np_rng, settings.exploration)
        assert action in allowed and not actions.is_blocklisted(action)
        if env == "prod" and reason.startswith("explored"):
            assert action in policy.SAFE_ACTIONS
        seen.add(action)
        if n % 10 == 0:  # the gates as well, on a tenth of them (signing makes them slower)
            d = Decision(env=env, incident_id="inc-safety", attempt=state.attempt, app="sim-app", action=action,
                         params=policy.action_params(action, incident, spec), issued_at=iso(utcnow()),
                         nonce=f"n{n}", mode=settings.policy_mode)
            verdict, _ = gates.evaluate({**d.to_dict(), "signature": signing.sign(d.signed_body(), key)}, ctx)
            assert verdict.event not in ("UNSAFE_ACTION_REFUSED", "ACTION_NOT_ALLOWED", "DEMO_MODE_BLOCK"), verdict
    if demo_mode or env == "prod":
        assert seen == {"noop", "restart_service", "scale_workers"}  # explored all it may, and no more
    elif env == "dev":
        assert seen == set(actions.ACTIONS)


def test_a_refused_action_teaches_a_negative_reward(tmp_path):
    no_restarts = Settings(env="dev", home=tmp_path, restart_budget=0)
    crashes = [(1.0, "crash", False, "high")]
    trained = learning.train(no_restarts, 300, seed=3, mix=crashes, validation_size=50)
    restart = policy.State.of("crash", "high", 1).index + (actions.ACTIONS.index("restart_service"),)
    assert trained.table[restart] < policy.prior_table()[restart] - 0.5
    assert learning.greedy(trained.table)(policy.State.of("crash", "high", 1), actions.ACTIONS, None, []) != \
        "restart_service"


def test_train_and_store_writes_the_table_the_proof_record_and_the_curve(dev):
    from cicd.store import proof
    stored = learning.train_and_store(dev, 300, seed=4)
    assert stored.states_written > 0
    assert np.array_equal(learning.current_table(dev), stored.training.table)
    trained = [r for r in proof.records_since(dev, 0) if r["event_name"] == "RL_TRAINED"]
    assert [(r["payload"]["from"], r["payload"]["states_written"]) for r in trained] == [("priors", stored.states_written)]
    assert json.loads(stored.curve_path.read_text())["episodes"] == 300
    again = learning.train_and_store(dev, 100, seed=5, keep=True)  # from the stored table, not the priors
    assert proof.records_since(dev, trained[0]["seq"])[0]["payload"]["from"] == "current table"
    assert again.curve_path == stored.curve_path


def cicd(home, *args):
    env = {**os.environ, "CICD_HOME": str(home)}
    return subprocess.run([str(Path(sys.executable).with_name("cicd")), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_rl_commands_train_evaluate_and_show(tmp_path):
    trained = cicd(tmp_path, "rl", "train", "--episodes", "400", "--seed", "4")
    assert trained.returncode == 0, trained.stderr
    assert "state-actions written to dev" in trained.stdout
    out = cicd(tmp_path, "rl", "eval", "--episodes", "300", "--seed", "5", "--json", "--plot", str(tmp_path / "e.png"))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["episodes"], result["seed"]) == (300, 5)
    assert set(result["policies"]) == {"learned", "playbook", "random", "oracle"}
    for row in result["policies"].values():
        assert {"success_rate", "mean_actions", "mean_time_to_recover_s", "downtime_s"} <= set(row)
    assert (tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = json.loads(cicd(tmp_path, "rl", "show", "--json").stdout)
    assert any("*" in row["restart_service"] for row in shown["states"])  # learned values are marked
    assert {row["state"] for row in shown["states"]} == {s.key for s in policy.detected_states()}


def test_replay_of_the_sample_trace(tmp_path):
    trace = Path(__file__).resolve().parents[2] / "examples" / "traces" / "stage-demo.csv"
    out = cicd(tmp_path, "replay", str(trace), "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) >= 5 and {r["kind"] for r in rows} >= {"crash", "false_alarm", "failed_deploy"}
    for row in rows:
        assert row["recorded"]["outcome"] in ("stable", "escalated", "refused")
        assert row["replayed"]["actions"] and row["replayed"]["outcome"] in ("stable", "escalated")
    bad = cicd(tmp_path, "replay", str(Path(__file__)))
    assert bad.returncode != 0
