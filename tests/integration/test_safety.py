"""Through the real orchestrate and detect queues: forged, unsafe, replayed and misrouted messages
never take effect, and every refusal is written down."""
from __future__ import annotations

import secrets
import time

import pytest
from sqlalchemy import select

from cicd.store import deadletters
from cicd.core import signing
from cicd.config import signing_key
from cicd.core.events import Decision, iso, utcnow
from cicd.store import Execution, Incident, session_scope

pytestmark = pytest.mark.integration

APP = "vault-api"


@pytest.fixture(scope="module")
def app(stack):
    stack.onboard(APP)
    return APP


@pytest.fixture(scope="module")
def plane(stack):
    from workers.client import ControlPlane
    return ControlPlane(stack.settings)


def decision(app: str, action: str, params: dict, key: bytes, incident_id: str = "inc-000000000000",
             env: str = "stage", **changes) -> dict:
    d = Decision(env=env, incident_id=incident_id, attempt=1, app=app, action=action, params=params,
                 issued_at=iso(utcnow()), nonce=secrets.token_hex(16), mode="greedy")
    body = {**d.to_dict(), **changes}
    body["signature"] = signing.sign(Decision.from_dict(body).signed_body(), key)
    return body


def wait_for_events(stack, after_seq: int, names: list[str], timeout: float = 20) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [r for r in stack.events() if r["seq"] > after_seq]
        if [r["event_name"] for r in new][:len(names)] == names:
            return new
        time.sleep(0.1)
    raise AssertionError(f"expected {names}, got {[r['event_name'] for r in new]}")


def send_to_orchestrator(plane, body):
    plane.app.send_task("cicd.orchestrate.execute", args=[body], kwargs={"env": "stage"})


def pids(stack):
    return {s.pid for s in stack.runtime.probe([APP])[APP]}


def test_forged_decision_is_refused_and_logged(stack, app, plane):
    before, seq = pids(stack), stack.events()[-1]["seq"]
    forged = decision(APP, "restart_service", {"slots": [0]}, b"not-the-stage-key" * 2)
    send_to_orchestrator(plane, forged)
    events = wait_for_events(stack, seq, ["ORCH_REFUSE", "INTAKE_REFUSED", "REFUSAL_EMIT_SUCCESS"])
    assert "signature does not verify" in events[0]["payload"]["reason"]
    assert pids(stack) == before


def test_a_decision_signed_with_dev_key_is_refused_by_stage(stack, app, plane):
    dev_key = signing_key(stack.settings.for_env("dev"), create=True)
    assert dev_key != signing_key(stack.settings)
    seq = stack.events()[-1]["seq"]
    send_to_orchestrator(plane, decision(APP, "restart_service", {"slots": [0]}, dev_key))
    events = wait_for_events(stack, seq, ["ORCH_REFUSE", "INTAKE_REFUSED", "REFUSAL_EMIT_SUCCESS"])
    assert events[0]["payload"]["gate"] == "intake"


@pytest.mark.parametrize("action", ["drop_database", "Execute-Shell-Commands", "ｄｅｌｅｔｅ＿ｂａｃｋｕｐｓ"])
def test_blocklisted_actions_are_refused_even_when_properly_signed(stack, app, plane, action):
    seq = stack.events()[-1]["seq"]
    send_to_orchestrator(plane, decision(APP, action, {}, signing_key(stack.settings)))
    events = wait_for_events(stack, seq, ["ORCH_REFUSE", "UNSAFE_ACTION_REFUSED", "REFUSAL_EMIT_SUCCESS"])
    assert events[0]["payload"]["gate"] == "blocklist"


def test_a_replayed_decision_takes_effect_once(stack, app, plane):
    stack.wait_steady(APP)
    out = stack.cicd("inject", "crash", APP, "--wait", "--timeout", "60")
    assert "stable" in out.stdout
    with session_scope(stack.settings) as s:
        incident = s.scalars(select(Incident).where(Incident.app == APP).order_by(Incident.opened_at.desc())).first()
        original = incident.decision
    before, seq = pids(stack), stack.events()[-1]["seq"]
    send_to_orchestrator(plane, original)
    events = wait_for_events(stack, seq, ["EXECUTION_DEDUPLICATED"])
    assert events[0]["incident_id"] == incident.id
    time.sleep(1.0)  # nothing else may follow: no second restart
    assert not [r for r in stack.events() if r["seq"] > seq and r["event_name"] == "ORCH_EXEC"]
    assert pids(stack) == before
    with session_scope(stack.settings) as s:
        assert len(s.scalars(select(Execution).where(Execution.incident_id == incident.id)).all()) == 1


def test_a_message_for_another_environment_is_never_acted_on(stack, app, plane):
    signal = {"env": "dev", "app": APP, "kind": "replica_down", "slots": [0], "observed_at": iso(utcnow()),
              "replicas_total": 2}
    # Force it onto stage's queue, as a misconfigured producer would.
    plane.app.send_task("cicd.detect.classify", args=[signal], kwargs={"env": "dev"}, queue="stage.detect")
    deadline = time.monotonic() + 15
    letters = []
    while not letters and time.monotonic() < deadline:
        letters = [x for x in deadletters.listing(stack.settings) if "environment 'dev'" in x["reason"]]
        time.sleep(0.1)
    assert letters and letters[0]["task"] == "cicd.detect.classify" and letters[0]["args"] == [signal]
    with session_scope(stack.settings) as s:
        assert not s.scalars(select(Incident).where(Incident.app == APP, Incident.status == "open")).all()
