"""cicd.gates: the orchestrator's gates as pure functions, without a broker or a database."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from cicd.core import actions, events, gates, signing
from cicd.core.events import Decision
from cicd.core.gates import GateContext, Verdict

KEY = b"k" * 32
OTHER_KEY = b"d" * 32  # as if dev's key were presented to stage


def make_decision(*, key: bytes = KEY, env: str = "stage", action: str = "restart_service",
                  params: dict | None = None, issued_at: datetime | None = None, mode: str = "greedy",
                  **fields) -> dict:
    """A decision dict with every field of events.Decision, signed with `key`."""
    raw = {
        "env": env,
        "incident_id": "inc-0001",
        "attempt": 1,
        "app": "shop-api",
        "action": action,
        "params": {"slots": [0]} if params is None else params,
        "issued_at": events.iso(issued_at or events.utcnow()),
        "nonce": "nonce-0001",
        "mode": mode,
        **fields,
    }
    raw["signature"] = signing.sign(Decision.from_dict(raw).signed_body(), key)
    return raw


def make_ctx(**overrides) -> GateContext:
    values = dict(key=KEY, env="stage", now=events.utcnow(), current_replicas=2, min_replicas=1, max_replicas=6)
    values.update(overrides)
    return GateContext(**values)


def assert_refused(verdict: Verdict, gate: str, event: str) -> None:
    assert verdict.allowed is False
    assert (verdict.gate, verdict.event) == (gate, event)
    assert verdict.reason
    assert verdict.event in events.PROOF_EVENTS


def assert_allowed(verdict: Verdict) -> None:
    assert verdict == Verdict(True), verdict.reason


# --- the helper itself -----------------------------------------------------------------------

def test_helper_signs_exactly_the_signed_fields():
    raw = make_decision()
    decision = Decision.from_dict(raw)
    assert set(Decision.SIGNED_FIELDS) <= set(raw)
    assert signing.is_valid(decision.signed_body(), raw["signature"], KEY)
    assert not signing.is_valid(decision.signed_body(), raw["signature"], OTHER_KEY)


# --- valid decisions -------------------------------------------------------------------------

@pytest.mark.parametrize("action, params", [
    pytest.param("restart_service", {"slots": [0]}, id="restart-slot-0"),
    pytest.param("restart_service", {"slots": [0, 1, 63]}, id="restart-several-slots"),
    pytest.param("noop", {}, id="noop"),
    pytest.param("scale_workers", {"replicas": 3}, id="scale-to-3"),
])
def test_valid_decision_passes_every_gate(action, params):
    raw = make_decision(action=action, params=params)
    verdict, decision = gates.evaluate(raw, make_ctx())
    assert_allowed(verdict)
    assert decision == Decision.from_dict(raw)


def test_unsigned_extras_do_not_break_the_signature():
    raw = make_decision(state={"kind": "crash"}, q_values={"noop": 0.1}, reason="replica 0 is down")
    assert_allowed(gates.evaluate(raw, make_ctx())[0])


# --- gate 1: intake --------------------------------------------------------------------------

def _unsigned():
    raw = make_decision()
    raw["signature"] = ""
    return raw


def _no_signature_field():
    raw = make_decision()
    del raw["signature"]
    return raw


def _tampered(**changes):
    def build():
        raw = make_decision()
        raw.update(changes)
        return raw
    return build


def _garbage_signature():
    raw = make_decision()
    raw["signature"] = "0" * 64
    return raw


def _signature_of_another_decision():
    raw = make_decision()
    raw["signature"] = make_decision(incident_id="inc-0002")["signature"]
    return raw


@pytest.mark.parametrize("build", [
    pytest.param(_unsigned, id="unsigned"),
    pytest.param(_no_signature_field, id="signature-missing"),
    pytest.param(_garbage_signature, id="garbage-signature"),
    pytest.param(_signature_of_another_decision, id="signature-of-another-decision"),
    pytest.param(_tampered(action="scale_workers"), id="forged-action"),
    pytest.param(_tampered(params={"slots": [0, 1]}), id="forged-params"),
    pytest.param(_tampered(attempt=2), id="forged-attempt"),
    pytest.param(_tampered(app="other-app"), id="forged-app"),
    pytest.param(_tampered(nonce="nonce-0002"), id="forged-nonce"),
    pytest.param(_tampered(mode="explore"), id="forged-mode"),
    pytest.param(lambda: make_decision(key=OTHER_KEY), id="signed-with-another-key"),
    pytest.param(lambda: make_decision(env="dev"), id="env-mismatch-signed-with-stage-key"),
    pytest.param(lambda: make_decision(env="dev", key=OTHER_KEY), id="env-mismatch-signed-with-dev-key"),
    pytest.param(lambda: make_decision(env="prod"), id="env-mismatch-prod"),
])
def test_intake_refuses_unsigned_forged_and_foreign_decisions(build):
    verdict, _ = gates.evaluate(build(), make_ctx())
    assert_refused(verdict, "intake", "INTAKE_REFUSED")


def test_env_mismatch_reason_names_both_environments():
    verdict, decision = gates.evaluate(make_decision(env="dev"), make_ctx())
    assert_refused(verdict, "intake", "INTAKE_REFUSED")
    assert "'dev'" in verdict.reason and "'stage'" in verdict.reason
    assert decision is not None and decision.env == "dev"


@pytest.mark.parametrize("age_s, allowed", [
    pytest.param(-10, False, id="10s-in-the-future"),
    pytest.param(-4, True, id="4s-in-the-future-clock-skew"),
    pytest.param(0, True, id="now"),
    pytest.param(299, True, id="299s-old"),
    pytest.param(301, False, id="301s-old-stale"),
    pytest.param(3600, False, id="an-hour-old"),
])
def test_intake_freshness(age_s, allowed):
    now = events.utcnow()
    raw = make_decision(issued_at=now - timedelta(seconds=age_s))
    verdict, _ = gates.evaluate(raw, make_ctx(now=now, max_age_s=300.0))
    if allowed:
        assert_allowed(verdict)
    else:
        assert_refused(verdict, "intake", "INTAKE_REFUSED")


def test_intake_max_age_comes_from_the_context():
    now = events.utcnow()
    raw = make_decision(issued_at=now - timedelta(seconds=30))
    assert_allowed(gates.evaluate(raw, make_ctx(now=now, max_age_s=60.0))[0])
    assert_refused(gates.evaluate(raw, make_ctx(now=now, max_age_s=10.0))[0], "intake", "INTAKE_REFUSED")


def test_intake_refuses_unparseable_issued_at_even_when_signed():
    raw = make_decision(issued_at=None)
    raw["issued_at"] = "yesterday"
    raw["signature"] = signing.sign(Decision.from_dict(raw).signed_body(), KEY)
    assert_refused(gates.evaluate(raw, make_ctx())[0], "intake", "INTAKE_REFUSED")


def _without(field):
    def build():
        raw = make_decision()
        del raw[field]
        return raw
    return build


def _with(**changes):
    def build():
        raw = make_decision()
        raw.update(changes)
        return raw
    return build


@pytest.mark.parametrize("build", [
    *[pytest.param(_without(f), id=f"missing-{f}") for f in Decision.SIGNED_FIELDS],
    pytest.param(_with(attempt="1"), id="attempt-as-string"),
    pytest.param(_with(attempt=True), id="attempt-as-bool"),
    pytest.param(_with(attempt=1.0), id="attempt-as-float"),
    pytest.param(_with(params=[0]), id="params-as-list"),
    pytest.param(_with(params=None), id="params-none"),
    pytest.param(_with(params="slots=0"), id="params-as-string"),
    pytest.param(_with(env=None), id="env-none"),
    pytest.param(_with(action=7), id="action-as-int"),
    pytest.param(_with(action="a" * 81), id="action-too-long"),
    pytest.param(_with(params={"slots": list(range(1000))}), id="params-too-large"),
    pytest.param(lambda: [make_decision()], id="list-not-dict"),
    pytest.param(lambda: None, id="none-not-dict"),
    pytest.param(lambda: "restart_service", id="string-not-dict"),
])
def test_intake_refuses_malformed_decisions(build):
    verdict, decision = gates.evaluate(build(), make_ctx())
    assert_refused(verdict, "intake", "INTAKE_REFUSED")
    assert verdict.reason.startswith("malformed decision")
    assert decision is None


def test_unsignable_params_are_refused_not_raised():
    raw = make_decision()
    raw["params"] = {"slots": [float("nan")]}
    assert_refused(gates.evaluate(raw, make_ctx())[0], "intake", "INTAKE_REFUSED")


# --- gate 2: blocklist -----------------------------------------------------------------------

@pytest.mark.parametrize("action", sorted(actions.BLOCKLIST))
def test_every_blocklisted_action_is_refused_even_when_signed(action):
    verdict, _ = gates.evaluate(make_decision(action=action, params={}), make_ctx())
    assert_refused(verdict, "blocklist", "UNSAFE_ACTION_REFUSED")


BLOCKLIST_SPELLINGS = [
    pytest.param("DROP_DATABASE", id="uppercase"),
    pytest.param("drop-database", id="hyphen"),
    pytest.param("Drop Database", id="title-case-space"),
    pytest.param("dropdatabase", id="no-separator"),
    pytest.param("drop__database", id="double-underscore"),
    pytest.param("\uff44\uff52\uff4f\uff50\uff3f\uff44\uff41\uff54\uff41\uff42\uff41\uff53\uff45", id="fullwidth"),
    pytest.param("drop_d\u0430tabase", id="cyrillic-a"),
    pytest.param("DROP_DAT\u0410BASE", id="cyrillic-capital-a"),
    pytest.param("drop_dat\u03b1base", id="greek-alpha"),
    pytest.param("drop_data\u200dbase", id="zero-width-joiner"),
    pytest.param("drop_\u200bdatabase", id="zero-width-space"),
    pytest.param("please_drop_database_now", id="embedded"),
    pytest.param("Execute-Shell-Commands", id="another-entry-mixed-case"),
    pytest.param("drop_databa\u0301se", id="combining-acute-composes"),
]

@pytest.mark.parametrize("action", BLOCKLIST_SPELLINGS)
def test_blocklisted_spellings_are_refused_by_the_blocklist_gate(action):
    verdict, _ = gates.evaluate(make_decision(action=action, params={}), make_ctx())
    assert_refused(verdict, "blocklist", "UNSAFE_ACTION_REFUSED")


@pytest.mark.parametrize("action", BLOCKLIST_SPELLINGS
                         + [pytest.param(a, id=a) for a in sorted(actions.BLOCKLIST)])
def test_is_blocklisted_catches_every_spelling(action):
    assert actions.is_blocklisted(action)


def test_combining_mark_that_does_not_compose_is_stripped():
    # U+0336 (long stroke overlay) has no precomposed form, so the Mn filter does remove it.
    assert actions.canonical_action("dro\u0336p_database") == "drop_database"


@pytest.mark.parametrize("action", actions.ACTIONS)
def test_no_catalogued_action_is_blocklisted(action):
    assert not actions.is_blocklisted(action)


@pytest.mark.parametrize("action", ["reboot_host", "drop_cache", "database_backup", "restart"])
def test_harmless_names_near_blocklisted_ones_are_not_blocklisted(action):
    assert not actions.is_blocklisted(action)


# --- gate 3: allowlist -----------------------------------------------------------------------

@pytest.mark.parametrize("action, params", [
    pytest.param("reboot_host", {}, id="uncatalogued-reboot_host"),
    pytest.param("Noop", {}, id="catalogued-name-wrong-case"),
    pytest.param("restart_service ", {"slots": [0]}, id="catalogued-name-trailing-space"),
    pytest.param("restart_service", {"slots": []}, id="restart-no-slots"),
    pytest.param("restart_service", {"slots": [-1]}, id="restart-negative-slot"),
    pytest.param("restart_service", {"slots": [64]}, id="restart-slot-64"),
    pytest.param("restart_service", {"slots": [True]}, id="restart-bool-slot"),
    pytest.param("restart_service", {"slots": ["0"]}, id="restart-string-slot"),
    pytest.param("restart_service", {"slots": 0}, id="restart-slots-not-a-list"),
    pytest.param("restart_service", {"slots": [0], "force": True}, id="restart-extra-key"),
    pytest.param("restart_service", {}, id="restart-no-params"),
    pytest.param("scale_workers", {"replicas": "3"}, id="scale-string"),
    pytest.param("scale_workers", {"replicas": -1}, id="scale-negative"),
    pytest.param("scale_workers", {"replicas": 65}, id="scale-65"),
    pytest.param("scale_workers", {"replicas": 3.0}, id="scale-float"),
    pytest.param("scale_workers", {"replicas": True}, id="scale-bool"),
    pytest.param("scale_workers", {"replicas": 3, "app": "x"}, id="scale-extra-key"),
    pytest.param("noop", {"slots": [0]}, id="noop-with-params"),
])
def test_allowlist_refuses_uncatalogued_actions_and_bad_params(action, params):
    verdict, _ = gates.evaluate(make_decision(action=action, params=params), make_ctx())
    assert_refused(verdict, "allowlist", "ACTION_NOT_ALLOWED")


# --- DEMO_MODE -------------------------------------------------------------------------------

@pytest.mark.parametrize("action, params", [
    pytest.param("restart_service", {"slots": [1]}, id="restart"),
    pytest.param("noop", {}, id="noop"),
    pytest.param("scale_workers", {"replicas": 3}, id="scale-up"),
    pytest.param("scale_workers", {"replicas": 1}, id="scale-down"),
])
def test_demo_mode_allows_restart_noop_and_scaling(action, params):
    verdict, _ = gates.evaluate(make_decision(action=action, params=params), make_ctx(demo_mode=True))
    assert_allowed(verdict)


@pytest.mark.parametrize("action, params, expected", [
    pytest.param("scale_workers", {"replicas": 3}, "scale_up", id="3-of-2-is-up"),
    pytest.param("scale_workers", {"replicas": 1}, "scale_down", id="1-of-2-is-down"),
    pytest.param("restart_service", {"slots": [0]}, "restart_service", id="restart-is-itself"),
    pytest.param("noop", {}, "noop", id="noop-is-itself"),
])
def test_action_class(action, params, expected):
    assert actions.action_class(action, params, current_replicas=2) == expected
    assert expected in actions.DEMO_MODE_ALLOWED


def test_demo_mode_does_not_relax_the_blocklist():
    verdict, _ = gates.evaluate(make_decision(action="drop_database", params={}), make_ctx(demo_mode=True))
    assert_refused(verdict, "blocklist", "UNSAFE_ACTION_REFUSED")


# --- gate 4: environment ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["explore", "cautious", ""])
def test_stage_refuses_non_greedy_decisions(mode):
    verdict, _ = gates.evaluate(make_decision(mode=mode), make_ctx())
    assert_refused(verdict, "environment", "ENVIRONMENT_REFUSED")


@pytest.mark.parametrize("mode", ["explore", "greedy"])
def test_dev_accepts_exploring_decisions(mode):
    verdict, _ = gates.evaluate(make_decision(env="dev", mode=mode), make_ctx(env="dev"))
    assert_allowed(verdict)


# --- gate 5: budget --------------------------------------------------------------------------

@pytest.mark.parametrize("action, params, ctx_overrides, allowed", [
    pytest.param("restart_service", {"slots": [0]}, dict(restarts_in_window=6, restart_budget=6), False,
                 id="restarts-at-budget"),
    pytest.param("restart_service", {"slots": [0]}, dict(restarts_in_window=5, restart_budget=6), True,
                 id="restarts-one-below-budget"),
    pytest.param("restart_service", {"slots": [0]}, dict(restarts_in_window=0, restart_budget=0), False,
                 id="restart-budget-zero"),
    pytest.param("scale_workers", {"replicas": 3}, dict(scales_in_window=6, scale_budget=6), False,
                 id="scales-at-budget"),
    pytest.param("scale_workers", {"replicas": 3}, dict(scales_in_window=5, scale_budget=6), True,
                 id="scales-one-below-budget"),
    pytest.param("scale_workers", {"replicas": 7}, dict(max_replicas=6), False, id="above-max-replicas"),
    pytest.param("scale_workers", {"replicas": 6}, dict(max_replicas=6), True, id="at-max-replicas"),
    pytest.param("scale_workers", {"replicas": 0}, dict(min_replicas=1), False, id="below-min-replicas"),
    pytest.param("scale_workers", {"replicas": 1}, dict(min_replicas=1), True, id="at-min-replicas"),
    # each budget counts only its own kind of action
    pytest.param("scale_workers", {"replicas": 3}, dict(restarts_in_window=6, restart_budget=6), True,
                 id="restart-budget-does-not-limit-scaling"),
    pytest.param("restart_service", {"slots": [0]}, dict(scales_in_window=6, scale_budget=6), True,
                 id="scale-budget-does-not-limit-restarts"),
    pytest.param("noop", {}, dict(restarts_in_window=6, scales_in_window=6), True, id="noop-is-never-over-budget"),
])
def test_budget(action, params, ctx_overrides, allowed):
    verdict, _ = gates.evaluate(make_decision(action=action, params=params), make_ctx(**ctx_overrides))
    if allowed:
        assert_allowed(verdict)
    else:
        assert_refused(verdict, "budget", "BUDGET_EXCEEDED")


# --- order: the first refusal wins -----------------------------------------------------------

def _unsigned_blocklisted():
    raw = make_decision(action="drop_database", params={})
    raw["signature"] = ""
    return raw


@pytest.mark.parametrize("build, ctx_overrides, gate", [
    pytest.param(_unsigned_blocklisted, {}, "intake", id="unsigned-blocklisted-is-intake"),
    pytest.param(lambda: make_decision(action="drop_database", params={"slots": "all"}, mode="explore"),
                 dict(restarts_in_window=99), "blocklist", id="blocklisted-bad-params-is-blocklist"),
    pytest.param(lambda: make_decision(action="reboot_host", params={}, mode="explore"), {}, "allowlist",
                 id="uncatalogued-explore-is-allowlist"),
    pytest.param(lambda: make_decision(mode="explore"), dict(restarts_in_window=99), "environment",
                 id="explore-over-budget-is-environment"),
    pytest.param(lambda: make_decision(env="dev", action="drop_database", params={}), {}, "intake",
                 id="foreign-env-blocklisted-is-intake"),
])
def test_first_refusal_wins(build, ctx_overrides, gate):
    verdict, _ = gates.evaluate(build(), make_ctx(**ctx_overrides))
    assert verdict.allowed is False
    assert verdict.gate == gate


# --- every refusal is a complete, loggable verdict -------------------------------------------

def test_every_gate_refusal_names_a_proof_event_and_a_reason():
    now = events.utcnow()
    cases = [
        (make_decision(key=OTHER_KEY), make_ctx()),
        (make_decision(issued_at=now - timedelta(hours=1)), make_ctx(now=now)),
        (make_decision(action="drop_database", params={}), make_ctx()),
        (make_decision(action="reboot_host", params={}), make_ctx()),
        (make_decision(mode="explore"), make_ctx()),
        (make_decision(), make_ctx(restarts_in_window=6)),
        (make_decision(action="scale_workers", params={"replicas": 9}), make_ctx()),
    ]
    seen = set()
    for raw, ctx in cases:
        verdict, _ = gates.evaluate(raw, ctx)
        assert verdict.allowed is False
        assert verdict.reason.strip()
        assert verdict.event in events.PROOF_EVENTS
        seen.add(verdict.gate)
    assert seen == {"intake", "blocklist", "allowlist", "environment", "budget"}


# --- prod: deploy actions and scaling past the limit wait for a human --------------------------

@pytest.mark.parametrize("action, params", [
    ("retry_deployment", {"release": 3}),
    ("rollback_deployment", {"to_release": 2}),
    ("rollback_deployment", {"to_release": 2, "cancel_release": 3}),
    ("scale_workers", {"replicas": 9}),
], ids=["retry", "rollback", "rollback-cancelling", "scale-past-limit"])
def test_prod_holds_risky_actions_for_approval(action, params):
    verdict, _ = gates.evaluate(make_decision(env="prod", action=action, params=params, mode="cautious"),
                                make_ctx(env="prod"))
    assert (verdict.allowed, verdict.approval, verdict.gate, verdict.event) == \
        (False, True, "environment", "APPROVAL_REQUESTED")
    assert verdict.reason


@pytest.mark.parametrize("action, params", [
    ("noop", {}), ("restart_service", {"slots": [1]}), ("scale_workers", {"replicas": 6}),
])
def test_prod_acts_alone_on_restart_and_scaling_within_limits(action, params):
    verdict, _ = gates.evaluate(make_decision(env="prod", action=action, params=params, mode="cautious"),
                                make_ctx(env="prod"))
    assert_allowed(verdict)


def test_outside_prod_scaling_past_the_limit_is_a_budget_refusal_not_an_approval():
    verdict, _ = gates.evaluate(make_decision(action="scale_workers", params={"replicas": 9}), make_ctx())
    assert_refused(verdict, "budget", "BUDGET_EXCEEDED")
    assert not verdict.approval


def test_an_approved_decision_skips_age_environment_and_budget_but_not_signature_or_blocklist():
    old = events.utcnow() - timedelta(hours=2)
    approved = make_ctx(env="prod", approved=True, restarts_in_window=99)
    risky = make_decision(env="prod", action="rollback_deployment", params={"to_release": 2}, issued_at=old)
    assert_allowed(gates.evaluate(risky, approved)[0])
    forged = {**risky, "params": {"to_release": 1}}
    assert_refused(gates.evaluate(forged, approved)[0], "intake", "INTAKE_REFUSED")
    unsafe = make_decision(env="prod", action="drop_database", params={}, issued_at=old)
    assert_refused(gates.evaluate(unsafe, approved)[0], "blocklist", "UNSAFE_ACTION_REFUSED")


def test_demo_mode_blocks_deploy_actions():
    for action, params in [("retry_deployment", {"release": 3}), ("rollback_deployment", {"to_release": 2})]:
        verdict, _ = gates.evaluate(make_decision(action=action, params=params), make_ctx(demo_mode=True))
        assert_refused(verdict, "allowlist", "DEMO_MODE_BLOCK")


# --- restart backoff: 10 s doubling to 300 s, reset after 600 s without a restart ---------------

def _ago(now, *seconds):
    return [now - timedelta(seconds=s) for s in seconds]


@pytest.mark.parametrize("ago, expected", [
    ((), 0.0),                          # never restarted
    ((700,), 0.0),                      # the last one long ago: forgotten
    ((4,), 6.0),                        # 1st restart 4 s ago: 10 s backoff, 6 s left
    ((15,), 0.0),                       # ... over
    ((1, 30), 19.0),                    # 2nd in the streak: 20 s
    ((5, 50, 100), 35.0),               # 3rd: 40 s
    ((0, 10, 20, 30, 40, 50, 60), 300.0),   # capped at 300 s
    ((0, 700), 10.0),                   # a gap over 600 s breaks the streak
])
def test_restart_backoff(ago, expected):
    now = events.utcnow()
    assert gates.restart_backoff_s(_ago(now, *ago), now, 10, 300, 600) == pytest.approx(expected, abs=1e-6)
