"""The demo's scenarios end to end: real Redis, real agent workers, real processes really broken.

Each fault is injected with `cicd inject KIND APP --wait`, which follows the incident through
detect -> decide -> orchestrate -> verify -> learn and exits 0 only if the app ended stable.
"""
from __future__ import annotations

import re

import pytest

from cicd.core import actions
from cicd.store import proof, reports

pytestmark = pytest.mark.integration

APP = "shop-api"
CHAIN = ["INCIDENT_DETECTED", "RL_CONSUME", "RL_DECISION", "RL_INTAKE_VALIDATED", "EXECUTION_GATE_PASSED",
         "ORCH_EXEC", "SYSTEM_STABLE", "RL_UPDATE"]


@pytest.fixture(scope="module")
def app(stack):
    stack.onboard(APP)
    return APP


def incident_of(output: str) -> str:
    return re.search(r"(inc-[0-9a-f]{12}) ", output).group(1)


def run_fault(stack, kind: str, *extra: str) -> dict:
    stack.wait_steady(APP)
    out = stack.cicd("inject", kind, APP, "--wait", "--timeout", "60", *extra)
    assert "stable; time to recover" in out.stdout, out.stdout
    incident_id = incident_of(out.stdout)
    incident = [i for i in reports.incidents(stack.settings, 50) if i["id"] == incident_id][0]
    return {"incident": incident, "events": stack.events(incident_id=incident_id), "stdout": out.stdout}


def test_onboarding_exports_the_spec_and_deploys(stack, app):
    spec_file = stack.home / "apps" / "registry" / "stage" / f"{APP}.json"
    assert spec_file.exists() and '"health_path": "/health"' in spec_file.read_text()
    names = [r["event_name"] for r in stack.events() if r["app"] == APP]
    for expected in ["ONBOARDING_STARTED", "ONBOARDING_VALIDATION_PASSED", "SPEC_GENERATED", "DEPLOYMENT_TRIGGERED",
                     "DEPLOY_STARTED", "BUILD_SUCCEEDED", "REPLICAS_STARTED", "HEALTH_GATE_PASSED", "DEPLOY_SUCCEEDED"]:
        assert expected in names
    assert stack.runtime.replica_count(APP) == 2


def test_crash_is_healed_by_a_restart(stack, app):
    before = {s.slot: s.pid for s in stack.runtime.probe([APP])[APP]}
    result = run_fault(stack, "crash")
    assert result["incident"]["kind"] == "crash" and result["incident"]["action"] == "restart_service"
    assert [r["event_name"] for r in result["events"]] == CHAIN
    after = {s.slot: s.pid for s in stack.runtime.probe([APP])[APP]}
    assert after[0] != before[0] and after[1] == before[1]  # only the killed replica was replaced
    assert all(s.healthy for s in stack.runtime.probe([APP])[APP])


def test_hang_is_healed_by_a_restart(stack, app):
    # Slot 1: the crash tests restart slot 0, and its restart backoff is not what this is about.
    before = {s.slot: s.pid for s in stack.runtime.probe([APP])[APP]}
    result = run_fault(stack, "hang", "--slot", "1")
    assert result["incident"]["kind"] == "crash" and result["incident"]["action"] == "restart_service"
    detected = [r for r in result["events"] if r["event_name"] == "INCIDENT_DETECTED"][0]["payload"]
    assert detected["signal"]["kind"] == "replica_hung" and detected["context"]["cause"] == "hang"
    after = {s.slot: s.pid for s in stack.runtime.probe([APP])[APP]}
    assert after[1] != before[1] and after[0] == before[0]  # only the stopped replica was replaced
    assert all(s.healthy and not s.stopped for s in stack.runtime.probe([APP])[APP])


def test_overload_is_healed_by_scaling_out(stack, app):
    try:
        result = run_fault(stack, "overload", "--duration", "40")
        decision = [r for r in result["events"] if r["event_name"] == "RL_DECISION"][0]["payload"]
        assert result["incident"]["kind"] == "overload" and decision["action"] == "scale_workers"
        assert decision["params"]["replicas"] > 2
        assert stack.runtime.replica_count(APP) == decision["params"]["replicas"]
        assert [r["event_name"] for r in result["events"]] == CHAIN
    finally:
        stack.runtime.stop_load(APP)
    stack.wait_steady(APP)
    stack.cicd("scale", APP, "2")
    assert stack.runtime.replica_count(APP) == 2


def test_false_alarm_gets_a_noop(stack, app):
    pids = {s.pid for s in stack.runtime.probe([APP])[APP]}
    result = run_fault(stack, "false-alarm")
    assert (result["incident"]["kind"], result["incident"]["action"]) == ("false_alarm", "noop")
    executed = [r for r in result["events"] if r["event_name"] == "ORCH_EXEC"][0]["payload"]
    assert executed["result"] == {"effect": "none"}
    assert {s.pid for s in stack.runtime.probe([APP])[APP]} == pids  # nothing was restarted


def test_stage_is_deterministic(stack, app):
    """The same scenario twice gives the same RL_DECISION sequence (all but nonce and time)."""
    def decisions():
        result = run_fault(stack, "crash")
        return [{k: v for k, v in r["payload"].items() if k not in ("nonce", "issued_at")}
                for r in result["events"] if r["event_name"] == "RL_DECISION"]
    first, second = decisions(), decisions()
    assert first == second
    assert first[0]["mode"] == "greedy" and first[0]["action"] == "restart_service"
    assert set(first[0]["q_values"]) == set(actions.ACTIONS)  # every action's Q-value is recorded


def test_the_proof_chain_verifies_after_all_that(stack, app):
    assert proof.verify(stack.settings).ok
    assert proof.verify_file(stack.settings.proof_mirror_path).ok
    out = stack.cicd("proof", "verify")
    assert "chain intact" in out.stdout
    csv_out = stack.cicd("proof", "export", "--format", "csv").stdout.splitlines()
    assert csv_out[0] == ",".join(proof.EXPORT_COLUMNS) and len(csv_out) - 1 == len(stack.events())
