"""Time-dependent rules on a manual clock: the restart backoff of a flapping app, approvals that
expire, open incidents that stall, signals that go stale. The clock moves only when the test says
so, so no outcome here depends on how fast or busy the machine is."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cicd.config import Settings, signing_key
from cicd.core.clock import SYSTEM_CLOCK, ManualClock
from cicd.core.events import iso, parse_iso
from cicd.delivery import onboarding
from cicd.healing import detector, loop, orchestrator, policy, reconciler, verifier
from cicd.runtime.sim import Fault, SimRuntime
from cicd.store import proof

APP = "flappy-api"
GLITCH = Fault("crash", False, "high", "glitch")  # a crash any restart fixes


def test_the_manual_clock_moves_only_when_told():
    start = datetime(2026, 3, 1, tzinfo=timezone.utc)
    clock = ManualClock(start)
    assert clock.now() == start and clock.monotonic() == 0.0
    assert clock.advance(1.5) == clock.now() == datetime(2026, 3, 1, 0, 0, 1, 500000, tzinfo=timezone.utc)
    assert clock.monotonic() == 1.5
    with pytest.raises(ValueError):
        clock.advance(-1)
    assert SYSTEM_CLOCK.now().tzinfo is not None and Settings().clock is SYSTEM_CLOCK


@pytest.fixture
def stage(tmp_path):
    settings = Settings(env="stage", home=tmp_path, clock=ManualClock())
    signing_key(settings, create=True)
    assert onboarding.register(settings, APP, "https://git.example.com/flappy.git", "backend")["ok"]
    fleet = SimRuntime(settings, 0)
    fleet.add_app(onboarding.generate_spec(APP, "https://git.example.com/flappy.git", "backend", "stage"))
    return settings, fleet


def crash(settings, fleet) -> dict:
    """A replica of the app goes down; the detector opens an incident, the policy decides, and
    the orchestrator either restarts it or holds the restart back: the execution."""
    fleet.set_fault(APP, GLITCH)
    signal = loop.replica_signal("stage", APP, "replica_down", fleet.probe([APP])[APP], settings.clock.now())
    incident = detector.open_incident(settings, signal)
    decision = policy.decide(settings, incident["incident_id"], 1)
    assert decision["action"] == "restart_service"
    return orchestrator.execute(settings, fleet, decision, fleet.request_deploy)


def verify(settings, fleet, execution) -> dict:
    state, value, started_at = "wait", 0, iso(settings.clock.now())
    while state == "wait":
        state, value = verifier.check(settings, fleet, execution, value, started_at)
        if state == "wait":
            settings.clock.advance(settings.verify_interval_s)
    return value


def run_when_due(settings, fleet, execution) -> dict:
    """What housekeeping does with a deferred restart, a moment before and at its due time."""
    due = parse_iso(execution["result"]["due_at"])
    settings.clock.advance((due - settings.clock.now()).total_seconds() - 0.1)
    assert orchestrator.due_deferred(settings) == []
    settings.clock.advance(0.1)
    [decision] = orchestrator.due_deferred(settings)
    return orchestrator.execute(settings, fleet, decision, fleet.request_deploy)


def backoffs(settings) -> list[float]:
    return [r["payload"]["wait_s"] for r in proof.records_since(settings, 0) if r["event_name"] == "RESTART_BACKOFF"]


def test_restarts_of_a_flapping_app_back_off_doubling_and_reset_after_a_quiet_spell(stage):
    """10 s after the first restart, doubling (Kubernetes' CrashLoopBackOff), counted from each
    restart's recorded start; forgotten after 600 s without one."""
    settings, fleet = stage
    first = crash(settings, fleet)
    assert first["status"] == "done" and verify(settings, fleet, first)["result"] == "stable"   # 0.2 s
    settings.clock.advance(2.0)

    second = crash(settings, fleet)                      # 2.2 s after the first restart
    assert second["status"] == "deferred" and backoffs(settings) == [7.8]
    second = run_when_due(settings, fleet, second)
    assert second["status"] == "done" and verify(settings, fleet, second)["result"] == "stable"
    settings.clock.advance(2.0)

    third = crash(settings, fleet)                       # the streak is two restarts: 20 s
    assert third["status"] == "deferred" and backoffs(settings) == [7.8, 10.0]
    third = run_when_due(settings, fleet, third)
    assert third["status"] == "done" and verify(settings, fleet, third)["result"] == "stable"

    settings.clock.advance(settings.backoff_reset_s + 1)
    assert crash(settings, fleet)["status"] == "done" and backoffs(settings) == [7.8, 10.0]


def test_a_signal_goes_stale_after_its_maximum_age(stage):
    settings, fleet = stage
    fleet.set_fault(APP, GLITCH)
    signal = loop.replica_signal("stage", APP, "replica_down", fleet.probe([APP])[APP], settings.clock.now())
    settings.clock.advance(detector.SIGNAL_MAX_AGE_S + 0.5)
    assert detector.open_incident(settings, signal) is None
    signal = {**signal, "observed_at": iso(settings.clock.now())}
    settings.clock.advance(detector.SIGNAL_MAX_AGE_S - 0.5)
    assert detector.open_incident(settings, signal) is not None


def test_an_incident_that_stops_moving_is_resumed_once_per_stall(stage):
    settings, fleet = stage
    fleet.set_fault(APP, GLITCH)
    signal = loop.replica_signal("stage", APP, "replica_down", fleet.probe([APP])[APP], settings.clock.now())
    incident_id = detector.open_incident(settings, signal)["incident_id"]
    # Its decide message is lost. Nothing is stalled until stall_after_s have passed without a record.
    settings.clock.advance(settings.stall_after_s - 1)
    assert reconciler.stalled(settings) == []
    settings.clock.advance(2)
    [step] = reconciler.stalled(settings)
    assert (step["step"], step["incident_id"]) == ("decide", incident_id)
    assert reconciler.stalled(settings) == []  # its INCIDENT_RESUMED record is progress
