"""`cicd remove` and healing: a removed app's open incident closes, whatever waited on it is
refused, and a step of the chain still on its way ends as a logged noop. In prod a removal is a
request that `cicd approve` carries out, under the rules of every other approval.

The chain's own steps run against a real SQLite store and the simulated fleet, on a manual clock.
"""
from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from sqlalchemy import select

from cicd import store
from cicd.config import Settings, signing_key
from cicd.core.clock import ManualClock
from cicd.core.events import Unprocessable
from cicd.delivery import onboarding, removal
from cicd.healing import approvals, detector, learning, loop, orchestrator, policy, verifier
from cicd.runtime.sim import Fault, SimRuntime
from cicd.stack.cluster import StackDown
from cicd.store import App, Approval, Execution, Incident, Release, proof, releases, session_scope

from .test_cli import run

APP = learning.APP
REPO = "https://sim.invalid/sim-app.git"


def fleet_with_app(settings: Settings) -> SimRuntime:
    """The app registered, live at release 1, on the simulated fleet."""
    signing_key(settings, create=True)
    assert onboarding.register(settings, APP, REPO, "backend")["ok"]
    long_ago = settings.clock.now() - timedelta(days=30)
    with session_scope(settings) as session:
        session.add(Release(env=settings.env, app=APP, number=1, status="live", ref="main", sha="1" * 40,
                            replicas=2, request_id="seed-1", started_at=long_ago, finished_at=long_ago))
    fleet = SimRuntime(settings, seed=3)
    fleet.add_app(onboarding.generate_spec(APP, REPO, "backend", settings.env))
    return fleet


def crash_signal(settings: Settings, fleet: SimRuntime):
    fleet.set_fault(APP, Fault("crash", False, "high", "transient"))
    return loop.replica_signal(settings.env, APP, learning.SIGNAL_OF_FAULT["crash"], fleet.probe([APP])[APP],
                               settings.clock.now())


def events(settings: Settings, name: str) -> list[dict]:
    return [r for r in proof.records_since(settings, 0) if r["event_name"] == name]


@pytest.fixture
def stage(tmp_path):
    return Settings(env="stage", home=tmp_path, clock=ManualClock(learning.SIM_START))


@pytest.fixture
def prod(tmp_path):
    return Settings(env="prod", home=tmp_path, approval_ttl_s=60, clock=ManualClock(learning.SIM_START))


def test_removal_closes_the_open_incident_and_the_rest_of_its_chain_is_a_logged_noop(stage, caplog):
    fleet = fleet_with_app(stage)
    signal = crash_signal(stage, fleet)
    incident_id = detector.open_incident(stage, signal)["incident_id"]
    decision = policy.decide(stage, incident_id, 1)
    assert decision["app"] == APP

    result = removal.remove(stage, fleet, APP, who="erin")
    assert result["closed_incidents"] == [incident_id] and result["stopped"] == 2
    with session_scope(stage) as session:
        incident = session.get(Incident, incident_id)
        assert (incident.status, incident.open_key) == ("refused", None)
        assert "removed by erin" in incident.resolution and incident.closed_at is not None
    [closed] = events(stage, "INCIDENT_REFUSED")
    assert closed["incident_id"] == incident_id and closed["payload"]["removed_by"] == "erin"
    assert "sim-app removed by erin" in closed["payload"]["reason"]
    assert events(stage, "APP_REMOVED")[0]["payload"]["closed_incidents"] == [incident_id]

    # The decision, delivered after the removal: refused at intake, nothing run, nothing claimed.
    execution = orchestrator.execute(stage, fleet, decision, fleet.request_deploy)
    assert (execution["status"], execution["gate"]) == ("refused", "intake")
    assert events(stage, "ORCH_EXEC") == [] and events(stage, "INTAKE_REFUSED")
    with session_scope(stage) as session:
        assert session.scalars(select(Execution)).all() == []
    assert policy.decide(stage, incident_id, 1) is None  # a redelivered decide: the incident is closed
    assert verifier.check(stage, fleet, {**decision, "status": "done", "result": {}}, 0,
                          stage.clock.now().isoformat()) == ("done", None)

    # A probe's last signal for it is dropped and logged, not kept as a dead letter ...
    with caplog.at_level(logging.INFO, logger="cicd.healing.detector"):
        assert detector.open_incident(stage, signal) is None
    assert "dropped: the app was removed from stage" in caplog.text
    # ... while a signal for an app never onboarded here still is one.
    with pytest.raises(Unprocessable, match="unknown app 'ghost-api'"):
        detector.open_incident(stage, {**signal, "app": "ghost-api"})
    assert proof.verify(stage).ok


def test_a_restart_waiting_for_its_backoff_is_refused_and_never_resent(stage):
    fleet = fleet_with_app(stage)
    incident_id = detector.open_incident(stage, crash_signal(stage, fleet))["incident_id"]
    decision = policy.decide(stage, incident_id, 1)
    with session_scope(stage) as session:  # as orchestrator._defer leaves a restart in its backoff
        session.add(Execution(env="stage", app=APP, incident_id=incident_id, attempt=1, action=decision["action"],
                              params=decision["params"], status="deferred",
                              result={"due_at": (stage.clock.now() + timedelta(seconds=5)).isoformat()}))
    removal.remove(stage, fleet, APP, who="erin")
    stage.clock.advance(10)
    assert orchestrator.due_deferred(stage) == []
    with session_scope(stage) as session:
        claim = session.scalar(select(Execution))
        assert claim.status == "refused" and "removed by erin" in claim.reason


def held_rollback(settings: Settings) -> str:
    """An open prod incident whose rollback waits for a human, as the orchestrator leaves it."""
    decision = {"incident_id": "inc-aaaaaaaaaaaa", "attempt": 1, "app": APP, "action": "rollback_deployment",
                "params": {"to_release": 1}}
    with session_scope(settings) as s:
        s.add(Incident(id="inc-aaaaaaaaaaaa", env="prod", app=APP, kind="crash", severity="high", status="open",
                       attempt=1, slot=0, signal={}, context={}, open_key=f"prod/{APP}"))
        s.flush()
        approval = approvals.request_action(s, settings, decision, "rollback in prod needs approval")
        s.add(Execution(env="prod", app=APP, incident_id="inc-aaaaaaaaaaaa", attempt=1,
                        action="rollback_deployment", params={"to_release": 1}, status="awaiting_approval"))
    return approval["id"]


def prod_app(settings: Settings) -> SimRuntime:
    """The app in prod, as a granted promotion registers it, live on the simulated fleet."""
    spec = onboarding.generate_spec(APP, REPO, "backend", "prod")
    with session_scope(settings) as session:
        session.add(App(env="prod", name=APP, runtime="backend", repo=REPO, spec=spec))
        session.add(Release(env="prod", app=APP, number=1, status="live", ref="main", sha="1" * 40, replicas=2,
                            request_id="promotion/x"))
    fleet = SimRuntime(settings, seed=3)
    fleet.add_app(spec)
    return fleet


class NoBroker:
    """A control plane whose broker is down: a removal must not need it."""

    def require_broker(self):
        raise StackDown("prod", "its broker does not answer")


def test_in_prod_a_removal_is_a_request_and_approve_carries_it_out_with_who_approved(prod):
    fleet = prod_app(prod)
    held = held_rollback(prod)
    with pytest.raises(removal.RemoveRefused, match="needs an approval; nothing was changed"):
        removal.remove(prod, fleet, APP, who="bob")  # straight, without a grant: refused, as before

    request = approvals.request_removal(prod, APP, "bob")
    assert (request["kind"], request["app"], request["status"]) == ("removal", APP, "pending")
    assert request["id"] in [a["id"] for a in approvals.pending(prod)]  # listed, as the dashboard and API list it
    with pytest.raises(approvals.ApprovalError, match=f"already waits for approval as {request['id']}"):
        approvals.request_removal(prod, APP, "carol")
    assert fleet.replica_count(APP) == 2  # a request changes nothing

    heard = []
    granted = approvals.approve(prod, request["id"], "alice", "retired", NoBroker(), runtime=fleet,
                                on_granted=lambda g: heard.append((g["decided_by"], fleet.replica_count(APP))))
    assert heard == [("alice", 2)]  # told of the grant before any replica stopped
    assert (granted["status"], granted["decided_by"], granted["removal"]["stopped"]) == ("granted", "alice", 2)
    assert APP not in fleet.apps()
    with session_scope(prod) as session:
        assert store.get_app(session, "prod", APP) is None
        assert session.get(Incident, "inc-aaaaaaaaaaaa").status == "refused"
        rollback = session.get(Approval, held)
        assert (rollback.status, rollback.decided_by) == ("denied", "alice")
        assert session.scalar(select(Execution)).status == "refused"
    removed = events(prod, "APP_REMOVED")[0]["payload"]
    assert (removed["approval"], removed["requested_by"], removed["approved_by"]) == (request["id"], "bob", "alice")
    assert removed["closed_incidents"] == ["inc-aaaaaaaaaaaa"]
    assert events(prod, "APPROVAL_GRANTED")[0]["payload"]["by"] == "alice"
    with pytest.raises(approvals.ApprovalError, match="already granted by alice"):
        approvals.approve(prod, request["id"], "dave", "", NoBroker(), runtime=fleet)
    assert proof.verify(prod).ok


def test_a_prod_removal_is_refused_by_the_rules_of_every_approval(prod, stage):
    fleet = prod_app(prod)
    expired = approvals.request_removal(prod, APP, "bob")
    prod.clock.advance(60)
    with pytest.raises(approvals.ApprovalError, match="expired"):
        approvals.approve(prod, expired["id"], "alice", "", NoBroker(), runtime=fleet)
    assert approvals.expire_due(prod) == [expired["id"]]

    denied = approvals.request_removal(prod, APP, "bob")  # the expired one no longer blocks a new one
    approvals.deny(prod, denied["id"], "alice", "still serving")
    with pytest.raises(approvals.ApprovalError, match="already denied by alice"):
        approvals.approve(prod, denied["id"], "alice", "", NoBroker(), runtime=fleet)
    with pytest.raises(approvals.ApprovalError, match="no approval"):
        approvals.approve(prod, "apr-prod-00000000", "alice", "", NoBroker(), runtime=fleet)

    # A deploy under way: neither the grant nor the removal happens; the request stays pending.
    waiting = approvals.request_removal(prod, APP, "bob")
    with session_scope(prod) as session:
        assert releases.take_lock(session, "prod", APP, "deploy/x", prod.clock.now(), 120)
    with pytest.raises(removal.RemoveRefused, match=f"under way in prod .*approve {waiting['id']} again"):
        approvals.approve(prod, waiting["id"], "alice", "", NoBroker(), runtime=fleet)
    assert [a["id"] for a in approvals.pending(prod)] == [waiting["id"]]
    assert events(prod, "APPROVAL_GRANTED") == [] and events(prod, "APP_REMOVED") == []
    assert fleet.replica_count(APP) == 2
    with pytest.raises(approvals.ApprovalError, match="needs no approval"):
        approvals.request_removal(stage, APP, "bob")
    assert proof.verify(prod).ok


def test_cicd_remove_in_prod_files_a_request_and_cicd_approve_removes_it(tmp_path):
    settings = Settings(env="prod", home=tmp_path)
    with session_scope(settings) as session:
        session.add(App(env="prod", name="shop-api", runtime="backend", repo="https://git.example.com/shop.git",
                        spec=onboarding.generate_spec("shop-api", "https://git.example.com/shop.git", "backend",
                                                      "prod")))
    asked = run(tmp_path, "remove", "shop-api", "--env", "prod", CICD_USER="bob")
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.startswith("APPROVAL_REQUESTED apr-prod-") and "remove shop-api from prod" in asked.stdout
    approval_id = asked.stdout.split()[1].rstrip(":")
    listed = run(tmp_path, "approvals", "--env", "prod")
    assert approval_id in listed.stdout and "bob" in listed.stdout
    again = run(tmp_path, "remove", "shop-api", "--env", "prod")
    assert again.returncode == 1 and f"already waits for approval as {approval_id}" in again.stderr
    approved = run(tmp_path, "approve", approval_id, "--as", "alice", "--reason", "retired")
    assert approved.returncode == 0, approved.stderr
    assert f"APPROVAL_GRANTED {approval_id} by alice" in approved.stdout
    assert "removed shop-api from prod: 0 replicas stopped" in approved.stdout
    gone = run(tmp_path, "remove", "shop-api", "--env", "prod")
    assert gone.returncode == 1 and "shop-api is not onboarded in prod" in gone.stderr
    for out in (asked, listed, again, approved, gone):
        assert "Traceback" not in out.stderr
