"""A crash that lands while another incident of the same app is open is healed, not dropped.

`make bench` (recover_real, exits watched) once waited 120 s for a SIGKILLed replica: a blip had
opened a false_alarm incident just before the kill, the watcher's replica_down was dropped as
"already being healed", the probes stayed quiet for a busy app, and the incident's attempts
(noop, then restarts of the blip's slot) never touched the dead one: escalated, the app was left
to a human with one replica down. Driven here step by step on a manual clock and a fleet whose
replica states the test sets: no process, no timing.
"""
from __future__ import annotations

import pytest

from cicd import store
from cicd.config import Settings, signing_key
from cicd.core.clock import ManualClock
from cicd.core.events import iso
from cicd.delivery import onboarding
from cicd.healing import detector, loop, orchestrator, policy, verifier
from cicd.runtime.base import ReplicaStatus, Runtime
from cicd.signals import probes
from cicd.store import Incident, proof, session_scope
from tests.unit.test_clock import verify

APP = "shop-api"


class Fleet(Runtime):
    """Two replicas whose status the test sets; a restart makes its slots healthy."""

    def __init__(self):
        self.status = {0: "ok", 1: "ok"}
        self.restarted: list[list[int]] = []

    def probe(self, apps):
        return {app: [ReplicaStatus(slot, 100 + slot, 9000 + slot, alive=status != "down", status=status)
                      for slot, status in sorted(self.status.items())] for app in apps}

    def replica_count(self, app):
        return len(self.status)

    def restart(self, app, slots, op_key):
        self.restarted.append(list(slots))
        self.status.update({slot: "ok" for slot in slots})
        return {"effect": "restarted", "replicas": [{"slot": s} for s in slots], "failed": []}

    def apps(self):
        return [APP]

    def _unused(self, *args, **kwargs):
        raise NotImplementedError

    stage_release = probe_release = activate_release = discard_release = scale = inject = _unused
    stop_load = stop_app = remove_app = _unused


@pytest.fixture
def settings(tmp_path):
    settings = Settings(env="stage", home=tmp_path, clock=ManualClock(), backoff_base_s=0)
    signing_key(settings, create=True)
    assert onboarding.register(settings, APP, "https://git.example.com/shop-api.git", "backend")["ok"]
    yield settings
    store.dispose_engines()


def watched_exit(settings, slot):
    """What the exit watcher sends for a replica that exited."""
    return {"env": settings.env, "app": APP, "kind": "replica_down", "slots": [slot], "replicas_total": 2,
            "observed_at": iso(settings.clock.now()), "detail": f"{slot}:exited"}


def attempt(settings, fleet, incident_id, number):
    """One attempt as the chain runs it: decide, execute, verify until a verdict (clock moved by hand)."""
    decision = policy.decide(settings, incident_id, number)
    execution = orchestrator.execute(settings, fleet, decision, request_deploy=None)
    return decision, execution


verdict = verify  # the verifier run to its end on the manual clock (test_clock's)


def incident(settings, incident_id):
    with session_scope(settings, readonly=True) as session:
        row = session.get(Incident, incident_id)
        return row.status, row.kind, (row.signal or {}).get("slots"), row.attempt


def test_a_crash_during_a_false_alarm_is_healed_by_the_open_incident(settings):
    fleet = Fleet()
    blip = loop.replica_signal(settings.env, APP, "replica_blip", fleet.probe([APP])[APP], settings.clock.now(),
                               slots=[0])
    opened = detector.open_incident(settings, blip)
    incident_id = opened["incident_id"]
    decision, execution = attempt(settings, fleet, incident_id, 1)
    assert decision["action"] == "noop"  # a blip: nothing to do but watch it clear

    # Replica 1 is SIGKILLed while the false alarm is being verified.
    settings.clock.advance(0.1)
    fleet.status[1] = "down"
    assert detector.open_incident(settings, watched_exit(settings, 1)) is None  # still one incident per app...
    assert incident(settings, incident_id)[:3] == ("open", "crash", [0, 1])   # ...now about the crash too
    assert [r["event_name"] for r in proof.tail(settings, 1)] == ["INCIDENT_WIDENED"]

    # The noop attempt was decided before the crash: it ends at once, not after verify_timeout_s.
    started = settings.clock.now()
    outcome = verdict(settings, fleet, execution)
    assert outcome["next_attempt"] == 2
    assert (settings.clock.now() - started).total_seconds() < settings.verify_timeout_s

    decision, execution = attempt(settings, fleet, incident_id, 2)
    assert (decision["action"], decision["params"]) == ("restart_service", {"slots": [0, 1]})
    assert verdict(settings, fleet, execution)["result"] == "stable"
    assert incident(settings, incident_id)[0] == "stable"
    assert fleet.status == {0: "ok", 1: "ok"}


def test_a_crash_of_another_replica_during_a_crash_incident_widens_its_slots(settings):
    fleet = Fleet()
    fleet.status[0] = "down"
    opened = detector.open_incident(settings, watched_exit(settings, 0))
    decision, execution = attempt(settings, fleet, opened["incident_id"], 1)
    assert decision["params"] == {"slots": [0]}
    settings.clock.advance(0.1)
    fleet.status[1] = "down"  # killed after the restart of 0, before its verdict
    assert detector.open_incident(settings, watched_exit(settings, 1)) is None
    assert incident(settings, opened["incident_id"])[1:3] == ("crash", [0, 1])
    # The same exit again (a probe's report of it) is already covered: nothing changes.
    assert detector.open_incident(settings, watched_exit(settings, 1)) is None
    assert [r["event_name"] for r in proof.tail(settings, 20)].count("INCIDENT_WIDENED") == 1
    assert verdict(settings, fleet, execution)["next_attempt"] == 2
    decision, execution = attempt(settings, fleet, opened["incident_id"], 2)
    assert decision["params"] == {"slots": [0, 1]}
    assert verdict(settings, fleet, execution)["result"] == "stable"


def test_the_probes_report_an_uncovered_crash_of_a_busy_app_and_only_that(settings):
    fleet = Fleet()
    fleet.status[0] = "down"
    opened = detector.open_incident(settings, watched_exit(settings, 0))
    assert opened is not None
    # Its own crash is not sent again while the incident is open...
    assert probes.probe_cycle(settings, fleet) == []
    # ...another replica's is (an exit the watcher did not see: off, or not yet watching it).
    fleet.status[1] = "down"
    settings.clock.advance(1.0)
    signals = probes.probe_cycle(settings, fleet)
    assert [(s["kind"], s["slots"]) for s in signals] == [("replica_down", [0, 1])]
    assert detector.open_incident(settings, signals[0]) is None
    assert incident(settings, opened["incident_id"])[1:3] == ("crash", [0, 1])
    assert probes.probe_cycle(settings, fleet) == []  # covered now


def test_a_blip_or_load_while_an_incident_is_open_is_still_dropped(settings):
    fleet = Fleet()
    fleet.status[0] = "down"
    opened = detector.open_incident(settings, watched_exit(settings, 0))
    fleet.status[0] = "ok"
    blip = loop.replica_signal(settings.env, APP, "replica_blip", fleet.probe([APP])[APP], settings.clock.now(),
                               slots=[1])
    assert detector.open_incident(settings, blip) is None
    assert incident(settings, opened["incident_id"])[1:3] == ("crash", [0])


def test_a_crash_during_a_rollback_does_not_end_the_rollbacks_attempt(settings):
    """A bad release's replicas die one after the other: the rollback decided on the first crash
    replaces every replica, the second one included, so that crash widens the incident but must
    not end the attempt (its next one would roll back the rollback)."""
    fleet = Fleet()
    fleet.status[0] = "down"
    opened = detector.open_incident(settings, watched_exit(settings, 0))
    decision = policy.decide(settings, opened["incident_id"], 1)
    execution = {"incident_id": opened["incident_id"], "attempt": 1, "action": "rollback_deployment",
                 "status": "done", "result": {"effect": "deploy_requested", "request_id": "rollback-1"}}
    settings.clock.advance(0.1)
    fleet.status[1] = "down"
    assert detector.open_incident(settings, watched_exit(settings, 1)) is None
    assert incident(settings, opened["incident_id"])[1:3] == ("crash", [0, 1])
    state, _ = verifier.check(settings, fleet, execution, 0, iso(settings.clock.now()))
    assert decision["incident_id"] == opened["incident_id"] and state == "wait"  # the release's verdict decides
