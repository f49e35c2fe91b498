"""Approvals without a broker: requests, answers with who and why, expiry, and what a denial or an
expiry does to an incident that was waiting."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from cicd.healing import approvals
from cicd.store import proof
from cicd.config import Settings
from cicd.core.clock import ManualClock
from cicd.core.events import OPEN
from cicd.stack.cluster import StackDown
from cicd.store import App, Execution, Incident, Release, session_scope

SPEC = {"name": "shop-api", "env": "stage", "runtime": "backend", "repo": "https://git.example.com/shop.git",
        "replicas": 2, "min_replicas": 1, "max_replicas": 6, "health_deadline_s": 30}


@pytest.fixture
def stage(tmp_path):
    settings = Settings(env="stage", home=tmp_path)
    with session_scope(settings) as s:
        s.add(App(env="stage", name="shop-api", runtime="backend", repo=SPEC["repo"], spec=SPEC))
        s.add(Release(env="stage", app="shop-api", number=4, status="live", kind="deploy", ref="main", sha="a" * 40,
                      replicas=2, request_id="r4"))
    return settings


@pytest.fixture
def prod(tmp_path):
    return Settings(env="prod", home=tmp_path)


def events(settings, name):
    return [r for r in proof.records_since(settings, 0) if r["event_name"] == name]


def test_a_promotion_request_names_the_release_and_waits(stage, prod):
    request = approvals.request_promotion(prod, stage, "shop-api", "ops-bot")
    assert request["id"].startswith("apr-prod-") and request["status"] == "pending"
    assert request["payload"]["sha"] == "a" * 40 and request["payload"]["spec"]["env"] == "prod"
    assert [a["id"] for a in approvals.pending(prod)] == [request["id"]]
    logged = events(prod, "APPROVAL_REQUESTED")[0]["payload"]
    assert (logged["approval"], logged["requested_by"]) == (request["id"], "ops-bot")
    assert approvals.env_of(request["id"]) == "prod"


@pytest.mark.parametrize("app, source_env, target_env, message", [
    ("shop-api", "prod", "stage", "promotion goes forward"),
    ("shop-api", "stage", "stage", "promotion goes forward"),
    ("ghost-api", "stage", "prod", "not onboarded"),
])
def test_promotions_that_make_no_sense_are_refused(tmp_path, stage, app, source_env, target_env, message):
    with pytest.raises(approvals.ApprovalError, match=message):
        approvals.request_promotion(Settings(env=target_env, home=tmp_path), Settings(env=source_env, home=tmp_path),
                                    app, "me")


def test_an_app_without_a_live_release_cannot_be_promoted(stage, prod):
    with session_scope(stage) as s:
        s.scalar(select(Release)).status = "failed"
    with pytest.raises(approvals.ApprovalError, match="no live release"):
        approvals.request_promotion(prod, stage, "shop-api", "me")


def test_grant_records_who_and_why_once(stage, prod):
    request = approvals.request_promotion(prod, stage, "shop-api", "me")
    granted = approvals.grant(prod, request["id"], "alice", "soaked")
    assert (granted["status"], granted["decided_by"], granted["reason"]) == ("granted", "alice", "soaked")
    assert events(prod, "APPROVAL_GRANTED")[0]["payload"]["by"] == "alice"
    with pytest.raises(approvals.ApprovalError, match="already granted by alice"):
        approvals.deny(prod, request["id"], "bob", "too late")
    assert approvals.pending(prod) == []


def test_a_denial_must_say_why(stage, prod):
    request = approvals.request_promotion(prod, stage, "shop-api", "me")
    with pytest.raises(approvals.ApprovalError, match="--reason"):
        approvals.deny(prod, request["id"], "bob", "  ")
    assert approvals.deny(prod, request["id"], "bob", "freeze")["status"] == "denied"


def test_requests_expire_and_cannot_be_answered_after(stage, tmp_path):
    prod = Settings(env="prod", home=tmp_path, approval_ttl_s=60, clock=ManualClock())
    request = approvals.request_promotion(prod, stage, "shop-api", "me")
    prod.clock.advance(59.9)
    assert approvals.pending(prod)[0]["status"] == "pending" and approvals.expire_due(prod) == []
    prod.clock.advance(0.1)
    assert approvals.pending(prod)[0]["status"] == "expired"  # shown as expired before the sweep
    with pytest.raises(approvals.ApprovalError, match="expired"):
        approvals.grant(prod, request["id"], "alice", "")
    assert approvals.expire_due(prod) == [request["id"]]
    assert approvals.expire_due(prod) == []
    assert len(events(prod, "APPROVAL_EXPIRED")) == 1


@pytest.mark.parametrize("bad", ["apr-1234", "apr-qa-12345678", "inc-prod-1", "", None])
def test_approval_ids_name_their_environment(bad):
    with pytest.raises(approvals.ApprovalError):
        approvals.env_of(bad)


def held_action(settings):
    """An open prod incident whose rollback waits for a human, as the orchestrator leaves it."""
    decision = {"incident_id": "inc-aaaaaaaaaaaa", "attempt": 1, "app": "shop-api", "action": "rollback_deployment",
                "params": {"to_release": 3}}
    with session_scope(settings) as s:
        s.add(App(env="prod", name="shop-api", runtime="backend", repo=SPEC["repo"], spec=SPEC))
        s.add(Incident(id="inc-aaaaaaaaaaaa", env="prod", app="shop-api", kind="crash", severity="high", status=OPEN,
                       attempt=1, slot=0, signal={}, context={}, open_key="prod/shop-api"))
        s.flush()
        approval = approvals.request_action(s, settings, decision, "rollback in prod needs approval")
        s.add(Execution(env="prod", app="shop-api", incident_id="inc-aaaaaaaaaaaa", attempt=1,
                        action="rollback_deployment", params={"to_release": 3}, status="awaiting_approval"))
        return approval["id"]


def incident_and_app(settings):
    with session_scope(settings) as s:
        incident = s.get(Incident, "inc-aaaaaaaaaaaa")
        return incident.status, incident.open_key, s.scalar(select(App)).attention


def test_denying_a_held_action_refuses_its_incident(prod):
    approval_id = held_action(prod)
    approvals.deny(prod, approval_id, "erin", "I will look myself")
    status, open_key, attention = incident_and_app(prod)
    assert (status, open_key) == ("refused", None) and "erin" in attention
    assert events(prod, "INCIDENT_REFUSED")[0]["payload"]["approval"] == approval_id


def test_an_unanswered_held_action_escalates_its_incident(tmp_path):
    prod = Settings(env="prod", home=tmp_path, approval_ttl_s=60, clock=ManualClock())
    approval_id = held_action(prod)
    prod.clock.advance(59.9)
    assert approvals.expire_due(prod) == []
    prod.clock.advance(0.1)
    assert approvals.expire_due(prod) == [approval_id]
    status, open_key, attention = incident_and_app(prod)
    assert (status, open_key) == ("escalated", None) and "nobody answered" in attention
    assert proof.verify(prod).ok


class FakePlane:
    """The control plane as a grant uses it: what was sent, in order, and a broker that may be down."""

    def __init__(self, broker_up: bool = True):
        self.broker_up, self.sent = broker_up, []

    def require_broker(self):
        if not self.broker_up:
            raise StackDown("prod", "its broker does not answer")

    def run_approved(self, approval_id):
        self.sent.append(("run_approved", approval_id))

    def deploy(self, app, ref, reason, kind, sha, request_id):
        self.sent.append(("deploy", app, ref, kind, sha, request_id))


def test_approving_with_the_broker_down_records_nothing(prod):
    approval_id = held_action(prod)
    with pytest.raises(StackDown, match="does not answer"):
        approvals.approve(prod, approval_id, "dave", "go", FakePlane(broker_up=False))
    assert [a["status"] for a in approvals.pending(prod)] == ["pending"]
    assert events(prod, "APPROVAL_GRANTED") == []


def test_approving_a_held_action_sends_its_chain_after_the_grant_is_recorded(prod):
    approval_id = held_action(prod)
    plane, heard = FakePlane(), []
    granted = approvals.approve(prod, approval_id, "dave", "try once more", plane,
                                on_granted=lambda g: heard.append((g["status"], list(plane.sent))))
    assert heard == [("granted", [])]  # told of the grant before anything was sent
    assert plane.sent == [("run_approved", approval_id)]
    assert (granted["kind"], granted["decided_by"]) == ("action", "dave")
    assert events(prod, "APPROVAL_GRANTED")[0]["payload"]["reason"] == "try once more"


def test_approving_a_promotion_registers_the_app_and_deploys_the_same_revision(stage, prod):
    request = approvals.request_promotion(prod, stage, "shop-api", "me")
    plane = FakePlane()
    granted = approvals.approve(prod, request["id"], "alice", "soaked", plane)
    assert granted["sha"] == "a" * 40
    assert plane.sent == [("deploy", "shop-api", "main", "promotion", "a" * 40, f"promotion/{request['id']}")]
    assert events(prod, "PROMOTED")[0]["payload"]["approved_by"] == "alice"
    with session_scope(prod) as s:
        assert s.scalar(select(App).where(App.env == "prod")).name == "shop-api"
