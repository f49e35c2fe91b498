"""The recovery policy: priors, choice by mode, rewards, Q updates and action parameters."""
from __future__ import annotations

import math
import multiprocessing
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import func, select

from cicd.core import actions
from cicd.healing import policy
from cicd import store
from cicd.config import Settings
from cicd.core.events import INCIDENT_KINDS, SEVERITIES

PLAYBOOK = {"crash": "restart_service", "overload": "scale_workers", "false_alarm": "noop",
            "underload": "scale_workers", "slow_deploy": "noop", "failed_deploy": "retry_deployment"}


def _greedy(table, state, allowed=actions.ACTIONS):
    return policy.choose(table, state, "greedy", allowed, policy.rng_for("inc-x", 1))


def _q(table, state: policy.State, action: str) -> float:
    return float(table[state.index + (actions.ACTIONS.index(action),)])


# --- priors and greedy choice ----------------------------------------------------------------

@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("kind", INCIDENT_KINDS)
def test_priors_pick_the_playbook_action_at_the_first_attempt(kind, severity):
    action, q_values, reason = _greedy(policy.prior_table(), policy.State.of(kind, severity, 1))

    assert action == PLAYBOOK[kind]
    assert set(q_values) == set(actions.ACTIONS)
    assert q_values[action] == max(q_values.values())
    assert reason.startswith("greedy")


def test_prior_table_has_one_cell_per_kind_severity_attempt_action():
    table = policy.prior_table()
    assert table.shape == (len(INCIDENT_KINDS), len(SEVERITIES), policy.MAX_ATTEMPT, 2, len(actions.ACTIONS))
    # Severity does not change the priors: every severity row of a kind is the same.
    for k in range(len(INCIDENT_KINDS)):
        for s in range(1, len(SEVERITIES)):
            assert np.array_equal(table[k, s], table[k, 0])


def test_greedy_choice_is_deterministic_whatever_the_rng():
    table = policy.prior_table()
    state = policy.State.of("crash", "high", 2)
    first = policy.choose(table, state, "greedy", actions.ACTIONS, policy.rng_for("inc-x", 1))
    for i in range(200):
        again = policy.choose(table, state, "greedy", actions.ACTIONS, np.random.default_rng(i))
        assert again == first


def test_greedy_tie_goes_to_the_earlier_action_in_the_catalogue():
    state = policy.State.of("crash", "high", 1)
    table = policy.prior_table().copy()
    table[state.index + (actions.ACTIONS.index("scale_workers"),)] = _q(table, state, "restart_service")
    assert actions.ACTIONS.index("restart_service") < actions.ACTIONS.index("scale_workers")

    action, q_values, _ = _greedy(table, state)
    assert q_values["restart_service"] == q_values["scale_workers"]
    assert action == "restart_service"

    # Raise noop to the same value: noop comes first in the catalogue, so it wins the tie.
    table[state.index + (actions.ACTIONS.index("noop"),)] = _q(table, state, "restart_service")
    assert _greedy(table, state)[0] == actions.ACTIONS[0] == "noop"
    # The copy was changed, not the priors.
    assert _greedy(policy.prior_table(), state)[0] == "restart_service"


def test_greedy_mode_never_explores():
    table = policy.prior_table()
    state = policy.State.of("overload", "low", 1)
    picks = {policy.choose(table, state, "greedy", actions.ACTIONS, policy.rng_for(f"inc-{i}", 1))[0]
             for i in range(500)}
    assert picks == {"scale_workers"}


# --- exploration -----------------------------------------------------------------------------

def test_explore_mode_strays_from_greedy_sometimes_and_repeatably():
    table = policy.prior_table()
    state = policy.State.of("crash", "medium", 1)
    best = _greedy(table, state)[0]
    n = 2000

    picks = [policy.choose(table, state, "explore", actions.ACTIONS, policy.rng_for(f"inc-{i}", 1))
             for i in range(n)]
    strays = [p for p in picks if p[0] != best]

    # Exploration picks uniformly among 3 actions with probability EPSILON: about 2/3 of 10%.
    share = len(strays) / n
    assert 0.02 <= share <= 0.25, share
    assert {p[0] for p in strays} == set(actions.ACTIONS) - {best}
    assert all(p[2].startswith("explored") and best in p[2] for p in strays)
    # The same incident and attempt always explores the same way.
    for i in range(0, n, 7):
        again = policy.choose(table, state, "explore", actions.ACTIONS, policy.rng_for(f"inc-{i}", 1))
        assert again == picks[i]
    # ...while another attempt of the same incident gets its own draw.
    other_attempt = [policy.choose(table, state, "explore", actions.ACTIONS, policy.rng_for(f"inc-{i}", 2))[0]
                     for i in range(n)]
    assert other_attempt != [p[0] for p in picks]


def test_rng_for_is_repeatable_per_incident_and_attempt():
    assert policy.rng_for("inc-1", 1).random() == policy.rng_for("inc-1", 1).random()
    assert policy.rng_for("inc-1", 1).random() != policy.rng_for("inc-1", 2).random()
    assert policy.rng_for("inc-1", 1).random() != policy.rng_for("inc-2", 1).random()


# --- allowed actions and cautious mode -------------------------------------------------------

def test_cautious_choice_stays_within_allowed_even_against_a_higher_q():
    # actions.ACTIONS holds only safe actions today, so the unsafe-action filter of cautious
    # mode cannot be reached without editing the catalogue; the `allowed` filter can.
    state = policy.State.of("crash", "critical", 1)
    table = policy.prior_table()
    assert _q(table, state, "restart_service") > _q(table, state, "noop")
    for i in range(300):  # one candidate: nothing to explore among
        action, q_values, _ = policy.choose(table, state, "cautious", ("noop",), policy.rng_for(f"inc-{i}", 1))
        assert action == "noop"
        assert q_values["restart_service"] == pytest.approx(0.9)  # all Q values are still reported


def test_cautious_mode_explores_only_among_safe_allowed_actions():
    state = policy.State.of("crash", "high", 1)
    allowed = ("noop", "restart_service", "drop_database")  # not in the catalogue: never picked
    picks = {policy.choose(policy.prior_table(), state, "cautious", allowed, policy.rng_for(f"inc-{i}", 1))[0]
             for i in range(2000)}
    assert picks <= set(policy.SAFE_ACTIONS) & set(allowed)
    assert "restart_service" in picks


def test_allowed_filter_falls_back_to_the_next_best_action():
    state = policy.State.of("crash", "low", 1)
    assert _greedy(policy.prior_table(), state, ("noop", "scale_workers"))[0] == "scale_workers"


@pytest.mark.parametrize("mode", ["greedy", "explore", "cautious"])
@pytest.mark.parametrize("allowed", [(), ("drop_database",)], ids=["nothing", "only-uncatalogued"])
def test_choose_raises_when_no_action_is_allowed(mode, allowed):
    with pytest.raises(ValueError, match="no action is allowed"):
        policy.choose(policy.prior_table(), policy.State.of("crash", "low", 1), mode, allowed,
                      policy.rng_for("inc-x", 1))


# --- state -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attempt, expected", [
    (-5, 1), (0, 1), (1, 1), (2, 2), (policy.MAX_ATTEMPT, policy.MAX_ATTEMPT),
    (policy.MAX_ATTEMPT + 1, policy.MAX_ATTEMPT), (99, policy.MAX_ATTEMPT),
])
def test_state_of_caps_the_attempt(attempt, expected):
    state = policy.State.of("overload", "high", attempt)
    assert state.attempt == expected
    assert state.key == f"overload|high|{expected}|steady"
    assert state.index == (INCIDENT_KINDS.index("overload"), SEVERITIES.index("high"), expected - 1, 0)


# --- reward ----------------------------------------------------------------------------------

def test_reward_orders_outcomes():
    timeout = 20.0
    fast = policy.reward("stable", "restart_service", 1.0, timeout)
    slow = policy.reward("stable", "restart_service", 18.0, timeout)
    failed = policy.reward("failed", "restart_service", None, timeout)
    refused = policy.reward("refused", "restart_service", None, timeout)

    assert fast > slow > failed
    assert fast == pytest.approx(1.0 - 0.5 * (1.0 / timeout) - policy.ACTION_COST["restart_service"])
    assert refused < 0
    # Slower than the timeout counts as the timeout, not worse.
    assert policy.reward("stable", "noop", 100.0, timeout) == policy.reward("stable", "noop", timeout, timeout)
    assert policy.reward("stable", "noop", timeout, timeout) > failed


@pytest.mark.parametrize("result, ttr", [("stable", 3.0), ("failed", None), ("refused", None)])
def test_costlier_action_earns_less_for_the_same_outcome(result, ttr):
    by_cost = sorted(policy.ACTION_COST, key=policy.ACTION_COST.get)
    rewards = [policy.reward(result, a, ttr, 20.0) for a in by_cost]
    assert rewards == sorted(rewards, reverse=True)
    assert len(set(rewards)) == len(rewards)


# --- learning --------------------------------------------------------------------------------

def _policy_row(settings: Settings, state: policy.State, action: str):
    with store.session_scope(settings) as s:
        row = s.get(store.PolicyValue, (settings.env, state.key, action))
        return None if row is None else (row.q, row.updates)


def _row_count(settings: Settings) -> int:
    with store.session_scope(settings) as s:
        return s.scalar(select(func.count()).select_from(store.PolicyValue))


def test_learn_moves_q_from_the_prior_by_alpha(tmp_path):
    settings = Settings(env="dev", home=tmp_path)
    assert settings.policy_mode == "explore"
    state = policy.State.of("crash", "high", 1)
    prior = _q(policy.prior_table(), state, "restart_service")
    r1, r2 = 0.85, -1.1

    with store.session_scope(settings) as s:
        out = policy.learn(settings, s, state, "restart_service", r1, None)
    q1 = prior + policy.ALPHA * (r1 - prior)
    assert out["applied"] is True
    assert out["old_q"] == pytest.approx(prior) and out["new_q"] == pytest.approx(q1)
    assert out["target"] == pytest.approx(r1)
    q, updates = _policy_row(settings, state, "restart_service")
    assert q == pytest.approx(q1, abs=1e-12) and updates == 1

    with store.session_scope(settings) as s:
        out = policy.learn(settings, s, state, "restart_service", r2, None)
    q2 = q1 + policy.ALPHA * (r2 - q1)
    assert out["old_q"] == pytest.approx(q1)
    q, updates = _policy_row(settings, state, "restart_service")
    assert q == pytest.approx(q2, abs=1e-12) and updates == 2
    assert _row_count(settings) == 1

    with store.session_scope(settings) as s:
        table = policy.load_table(s, "dev")
    assert _q(table, state, "restart_service") == pytest.approx(q2, abs=1e-12)
    changed = np.argwhere(table != policy.prior_table())
    assert [tuple(c) for c in changed] == [state.index + (actions.ACTIONS.index("restart_service"),)]


def test_learn_target_includes_discounted_best_q_of_the_next_state(tmp_path):
    settings = Settings(env="dev", home=tmp_path)
    state = policy.State.of("crash", "high", 1)
    nxt = policy.State.of("crash", "high", 2)
    prior = _q(policy.prior_table(), state, "restart_service")
    next_best = float(policy.prior_table()[nxt.index].max())
    r = -1.1

    with store.session_scope(settings) as s:
        out = policy.learn(settings, s, state, "restart_service", r, nxt)
    expected = prior + policy.ALPHA * (r + policy.GAMMA * next_best - prior)
    assert out["target"] == pytest.approx(r + policy.GAMMA * next_best)
    assert _policy_row(settings, state, "restart_service")[0] == pytest.approx(expected, abs=1e-12)

    # A learned value in the next state is what the target uses, not the prior.
    with store.session_scope(settings) as s:
        policy.learn(settings, s, nxt, "scale_workers", 5.0, None)
    learned_next = _policy_row(settings, nxt, "scale_workers")[0]
    assert learned_next > next_best
    with store.session_scope(settings) as s:
        out = policy.learn(settings, s, state, "noop", r, nxt)
    noop_prior = _q(policy.prior_table(), state, "noop")
    assert _policy_row(settings, state, "noop")[0] == pytest.approx(
        noop_prior + policy.ALPHA * (r + policy.GAMMA * learned_next - noop_prior), abs=1e-12)


def test_stage_policy_is_frozen(tmp_path):
    settings = Settings(env="stage", home=tmp_path)
    assert settings.policy_mode == "greedy"
    state = policy.State.of("overload", "high", 1)

    with store.session_scope(settings) as s:
        out = policy.learn(settings, s, state, "scale_workers", -1.2, policy.State.of("overload", "high", 2))
    assert out["applied"] is False
    assert _row_count(settings) == 0
    with store.session_scope(settings) as s:
        assert np.array_equal(policy.load_table(s, "stage"), policy.prior_table())


def test_load_table_ignores_other_environments_and_unknown_rows(tmp_path):
    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    dev = Settings(env="dev", home=tmp_path, database_url_override=shared)
    state = policy.State.of("false_alarm", "low", 1)
    with store.session_scope(dev) as s:
        policy.learn(dev, s, state, "noop", -1.0, None)
        s.add(store.PolicyValue(env="dev", state="meltdown|low|1", action="noop", q=9.0, updates=1))
        s.add(store.PolicyValue(env="dev", state="crash|low|1", action="drop_database", q=9.0, updates=1))
    with store.session_scope(dev) as s:
        dev_table = policy.load_table(s, "dev")
        prod_table = policy.load_table(s, "prod")
    learned = _policy_row(dev, state, "noop")[0]
    assert learned < _q(policy.prior_table(), state, "noop")
    expected = policy.prior_table()
    expected[state.index + (actions.ACTIONS.index("noop"),)] = learned
    assert np.array_equal(dev_table, expected)  # the unknown kind and action rows changed nothing
    assert np.array_equal(prod_table, policy.prior_table())


LEARNERS, UPDATES_EACH = 4, 25


def _learn_worker(settings: Settings, barrier) -> None:
    state = policy.State.of("crash", "high", 1)
    barrier.wait(timeout=60)
    for _ in range(UPDATES_EACH):
        with store.session_scope(settings) as s:
            policy.learn(settings, s, state, "restart_service", 1.0, None)


def test_concurrent_learners_lose_no_update(db):
    # fork, like Celery's prefork pool: store keys its engines by pid, so each child opens its
    # own connections and only the writer lock keeps them apart. All start with no row for the
    # state: the first update's insert is raced too.
    settings = db.settings("dev")
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(LEARNERS)
    procs = [ctx.Process(target=_learn_worker, args=(settings, barrier)) for _ in range(LEARNERS)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * LEARNERS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()

    state = policy.State.of("crash", "high", 1)
    q, updates = _policy_row(settings, state, "restart_service")
    assert updates == LEARNERS * UPDATES_EACH
    # Same reward every time, so the order does not matter: q_n = r + (prior - r) * (1 - ALPHA)^n.
    prior = _q(policy.prior_table(), state, "restart_service")
    n = LEARNERS * UPDATES_EACH
    assert q == pytest.approx(1.0 + (prior - 1.0) * (1 - policy.ALPHA) ** n, abs=1e-9)


# --- action parameters -----------------------------------------------------------------------

SPEC = {"replicas": 2, "min_replicas": 1, "max_replicas": 6}


def _incident(slot: int = 0, kind: str = "overload", context: dict | None = None, **signal):
    return SimpleNamespace(signal=signal, slot=slot, kind=kind, context=context or {})


def test_restart_targets_the_sorted_unique_signalled_slots():
    assert policy.action_params("restart_service", _incident(slot=0, slots=[3, 1, 3, 2]), SPEC) == {"slots": [1, 2, 3]}
    # Without slots in the signal, the incident's own slot.
    assert policy.action_params("restart_service", _incident(slot=4), SPEC) == {"slots": [4]}
    assert policy.action_params("restart_service", _incident(slot=5, slots=[]), SPEC) == {"slots": [5]}


def test_scale_aims_for_target_utilization_and_always_adds_a_replica():
    params = policy.action_params("scale_workers", _incident(utilization=0.9, replicas_total=2), SPEC)
    wanted = math.ceil(2 * 0.9 / policy.TARGET_UTILIZATION)
    assert params == {"replicas": max(wanted, 3)}
    assert params["replicas"] == 3  # 2 replicas at 90% carry 1.8 replicas' work: 3 at 60%
    assert actions.params_problem("scale_workers", params) is None

    heavy = policy.action_params("scale_workers", _incident(utilization=0.95, replicas_total=4), SPEC)
    assert heavy == {"replicas": math.ceil(4 * 0.95 / policy.TARGET_UTILIZATION)} == {"replicas": 7}

    # Low utilization still scales up by one: the detector only asks when it is overloaded.
    assert policy.action_params("scale_workers", _incident(utilization=0.3, replicas_total=2), SPEC) == {"replicas": 3}


def test_scale_without_utilization_adds_one_replica():
    assert policy.action_params("scale_workers", _incident(replicas_total=3), SPEC) == {"replicas": 4}
    # Without a replica count in the signal, the spec's count is the current one.
    assert policy.action_params("scale_workers", _incident(replicas_total=0), SPEC) == {"replicas": 3}
    assert policy.action_params("scale_workers", _incident(), SPEC) == {"replicas": 3}


def test_noop_takes_no_params():
    params = policy.action_params("noop", _incident(slot=1, slots=[1], utilization=0.9, replicas_total=2), SPEC)
    assert params == {}
    assert actions.params_problem("noop", params) is None


def test_a_crash_soon_after_a_release_is_rolled_back_not_restarted():
    steady = _greedy(policy.prior_table(), policy.State.of("crash", "high", 1, fresh=False))[0]
    fresh = _greedy(policy.prior_table(), policy.State.of("crash", "high", 1, fresh=True))[0]
    assert (steady, fresh) == ("restart_service", "rollback_deployment")


def test_a_failed_deploy_is_retried_then_rolled_back():
    first = _greedy(policy.prior_table(), policy.State.of("failed_deploy", "high", 1))[0]
    second = _greedy(policy.prior_table(), policy.State.of("failed_deploy", "high", 2))[0]
    assert (first, second) == ("retry_deployment", "rollback_deployment")


def test_scaling_in_stays_at_or_above_the_spec_and_below_the_current_count():
    idle = _incident(kind="underload", utilization=0.05, replicas_total=5)
    assert policy.action_params("scale_workers", idle, SPEC) == {"replicas": 2}  # ceil(5*.05/.6)=1 < spec
    busy = _incident(kind="underload", utilization=0.18, replicas_total=6)
    assert policy.action_params("scale_workers", busy, SPEC) == {"replicas": 2}
    warm = _incident(kind="underload", utilization=0.19, replicas_total=12)
    assert policy.action_params("scale_workers", warm, {**SPEC, "max_replicas": 12}) == {"replicas": 4}


def test_deploy_action_params_come_from_the_incident_context():
    failed = _incident(kind="failed_deploy", context={"release": 7, "rollback_to": 6})
    assert policy.action_params("retry_deployment", failed, SPEC) == {"release": 7}
    assert policy.action_params("rollback_deployment", failed, SPEC) == {"to_release": 6}
    slow = _incident(kind="slow_deploy", context={"release": 9, "rollback_to": 8})
    assert policy.action_params("rollback_deployment", slow, SPEC) == {"to_release": 8, "cancel_release": 9}
    for params in ({"release": 7}, {"to_release": 8, "cancel_release": 9}):
        action = "retry_deployment" if "release" in params else "rollback_deployment"
        assert actions.params_problem(action, params) is None


def test_the_shield_offers_only_what_can_be_done_and_the_gates_allow(tmp_path):
    stage = Settings(env="stage", home=tmp_path)
    demo = Settings(env="stage", home=tmp_path, demo_mode=True)
    no_target = _incident(kind="crash", context={"rollback_to": None})
    with_target = _incident(kind="crash", context={"rollback_to": 3})
    failed = _incident(kind="failed_deploy", context={"release": 4, "rollback_to": 3})
    cold_at_spec = _incident(kind="underload", context={"can_scale_in": False})
    assert "rollback_deployment" not in policy.allowed_actions(stage, no_target)
    assert "rollback_deployment" in policy.allowed_actions(stage, with_target)
    assert "retry_deployment" not in policy.allowed_actions(stage, with_target)  # a crash is not a deploy
    assert {"retry_deployment", "rollback_deployment"} <= set(policy.allowed_actions(stage, failed))
    assert set(policy.allowed_actions(demo, failed)) == {"noop", "restart_service", "scale_workers"}
    assert "scale_workers" not in policy.allowed_actions(stage, cold_at_spec)
