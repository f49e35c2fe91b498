"""cicd.api on a store filled as the healing chain fills it: events, app health, incidents with
their chain of decisions and gates, the policy table, and clear errors for bad arguments."""
from __future__ import annotations

import pytest

from cicd.web import api
from cicd.store import proof
from cicd.config import Settings
from cicd.store import session_scope

from .filled_store import HOSTILE, fill


@pytest.fixture
def settings(tmp_path):
    settings = Settings(env="stage", home=tmp_path)
    fill(settings)
    return settings


def test_events_are_the_last_n_newest_last(settings):
    every = proof.records_since(settings, 0)
    assert len(every) == 33
    last = api.events(3, settings)
    assert [r["seq"] for r in last] == [31, 32, 33]
    assert [r["event_name"] for r in last] == ["ORCH_REFUSE", "INTAKE_REFUSED", "REFUSAL_EMIT_SUCCESS"]
    assert last[0]["payload"]["action"] == HOSTILE  # as logged: escaping is the page's job
    assert api.events(1000, settings) == every


def test_events_since_tails_the_log_and_skips_a_long_gap(settings):
    assert [r["seq"] for r in api.events_since(29, settings)] == [30, 31, 32, 33]
    assert api.events_since(33, settings) == []
    # 33 new records but room for 5: the newest 5, not the oldest.
    assert [r["seq"] for r in api.events_since(0, settings, limit=5)] == [29, 30, 31, 32, 33]


@pytest.mark.parametrize("bad", [0, -1, 1001, "5", 2.0, True, None])
def test_bad_counts_are_refused_naming_the_argument_and_the_rule(settings, bad):
    with pytest.raises(api.ApiError) as caught:
        api.events(bad, settings)
    assert (caught.value.field, caught.value.rule) == ("n", f"must be a whole number from 1 to 1000, not {bad!r}")
    with pytest.raises(api.ApiError, match=r"^limit: must be a whole number from 1 to 500"):
        api.incidents(bad, settings)


def test_bad_app_and_after_are_refused(settings):
    with pytest.raises(api.ApiError, match=r"^app: must be an app name of 1 to 40 characters"):
        api.incidents(5, settings, app="x" * 41)
    with pytest.raises(api.ApiError, match=r"^after: must be a proof sequence number"):
        api.events_since(-1, settings)


def test_health_says_one_word_per_app_from_its_last_probe(settings):
    rows = {row["app"]: row for row in api.health(settings)}
    assert {name: row["state"] for name, row in rows.items()} == {
        "api": "degraded", "called": "attention", "down": "down", "new": "unknown", "old": "stale", "web": "healthy"}
    assert (rows["web"]["uptime"], rows["api"]["uptime"], rows["down"]["uptime"]) == (0.9, 0.5, 0.25)
    assert rows["new"]["uptime"] is None and rows["new"]["probes"] == 0
    assert rows["api"]["open_incident"] == "inc-d" and rows["web"]["open_incident"] is None
    assert (rows["api"]["healthy"], rows["api"]["probed_replicas"]) == (1, 2)


def test_incidents_newest_first_with_their_chain(settings):
    rows = api.incidents(10, settings)
    assert [r["id"] for r in rows] == ["inc-d", "inc-c", "inc-b", "inc-a"]
    assert [r["id"] for r in api.incidents(2, settings)] == ["inc-d", "inc-c"]
    assert [r["id"] for r in api.incidents(10, settings, app="web")] == ["inc-c", "inc-a"]
    by_id = {r["id"]: r for r in rows}

    a = by_id["inc-a"]
    assert (a["status"], a["severity"], a["severity_rank"], a["time_to_recover_s"]) == ("stable", "high", 2, 1.5)
    [attempt] = a["chain"]
    assert attempt["decision"]["action"] == "restart_service"
    assert attempt["decision"]["reason"].startswith("greedy: highest Q")
    assert [(g["gate"], g["verdict"]) for g in attempt["gates"]] == [
        ("intake", "passed"), ("blocklist", "passed"), ("allowlist", "passed"), ("environment", "passed"),
        ("budget", "passed")]
    assert attempt["execution"]["status"] == "done" and attempt["outcome"]["result"] == "stable"
    assert attempt["learning"]["reward"] == 0.85
    assert [e["event_name"] for e in a["events"]][0] == "INCIDENT_DETECTED" and len(a["events"]) == 8


def test_a_refused_decision_shows_which_gate_and_why(settings):
    [b] = [r for r in api.incidents(10, settings) if r["id"] == "inc-b"]
    [attempt] = b["chain"]
    assert [(g["gate"], g["verdict"]) for g in attempt["gates"]] == [
        ("intake", "passed"), ("blocklist", "passed"), ("allowlist", "refused"), ("environment", "not reached"),
        ("budget", "not reached")]
    refused = attempt["gates"][2]
    assert refused["event"] == "DEMO_MODE_BLOCK" and "not allowed in DEMO_MODE" in refused["reason"]
    assert attempt["execution"] is None and attempt["outcome"]["result"] == "refused"
    assert b["time_to_recover_s"] is None


def test_a_second_attempt_is_its_own_step(settings):
    [c] = [r for r in api.incidents(10, settings) if r["id"] == "inc-c"]
    first, second = c["chain"]
    assert (first["attempt"], first["decision"]["action"], first["execution"]["status"],
            first["outcome"]["result"]) == (1, "restart_service", "failed", "failed")
    assert "not stable within 6 s" in first["outcome"]["detail"]
    assert (second["attempt"], second["decision"]["action"], second["execution"]["status"],
            second["outcome"]["result"]) == (2, "scale_workers", "done", "stable")
    assert c["time_to_recover_s"] == 7.2


def test_an_open_incident_has_its_decision_and_nothing_after(settings):
    [d] = [r for r in api.incidents(10, settings) if r["id"] == "inc-d"]
    [attempt] = d["chain"]
    assert attempt["decision"]["reason"].startswith("explored")
    assert (attempt["gates"], attempt["execution"], attempt["outcome"]) == ([], None, None)


def test_policy_table_marks_what_was_learned(settings):
    from cicd.healing import policy
    from cicd.healing.policy import State
    table = api.policy_table(settings)
    assert (table["env"], table["mode"], table["actions"][0]) == ("stage", "greedy", "noop")
    states = {s["state"]: s for s in table["states"]}
    crash = states["crash|high|1|steady"]
    assert crash["greedy"] == "restart_service" and crash["learned"] == {}
    assert crash["q"]["restart_service"] == 0.9  # the playbook's prior
    dev = settings.for_env("dev")
    with session_scope(dev) as session:
        policy.learn(dev, session, State.of("crash", "high", 1), "noop", 5.0, None)
    learned = {s["state"]: s for s in api.policy_table(dev)["states"]}["crash|high|1|steady"]
    assert learned["learned"] == {"noop": 1} and learned["q"]["noop"] == pytest.approx(-0.6 + 0.2 * (5.0 + 0.6))
    assert learned["greedy"] == "restart_service"
