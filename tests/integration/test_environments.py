"""Environments never meet: dev and stage each have their own queues, database, proof chain,
signing key and runtime directory, even for an app of the same name, and their own policy."""
from __future__ import annotations

import json
import secrets
import time

import pytest

from cicd import proof, signing
from cicd.config import signing_key
from cicd.events import Decision, iso, utcnow
from cicd.runtime.local import LocalRuntime

pytestmark = pytest.mark.integration

APP = "twin-api"


@pytest.fixture(scope="module")
def dev(stack):
    """A dev stack beside stage, on the same Redis, in DEMO_MODE."""
    with stack.other_env("dev", CICD_DEMO_MODE="true") as settings:
        stack.onboard(APP, env="stage")
        stack.onboard(APP, env="dev")
        yield settings


def pids(settings):
    return {s.slot: s.pid for s in LocalRuntime(settings).probe([APP])[APP]}


def test_a_stage_incident_never_touches_the_dev_app(stack, dev):
    dev_pids, dev_seq = pids(dev), proof.head_seq(dev)
    stack.wait_steady(APP)
    out = stack.cicd("inject", "crash", APP, "--env", "stage", "--wait", "--timeout", "60")
    assert "stable" in out.stdout
    assert pids(dev) == dev_pids
    assert [r["event_name"] for r in proof.records_since(dev, dev_seq)] == []  # dev's chain saw nothing
    stage_dir, dev_dir = stack.runtime.app_dir(APP), LocalRuntime(dev).app_dir(APP)
    assert stage_dir != dev_dir and stage_dir.parent.parent.name == "stage" and dev_dir.parent.parent.name == "dev"
    assert signing_key(stack.settings) != signing_key(dev)
    assert stack.settings.database_url != dev.database_url


def test_dev_learns_while_stage_stays_frozen(stack, dev):
    stack.wait_steady(APP, env="dev")
    out = stack.cicd("inject", "crash", APP, "--env", "dev", "--wait", "--timeout", "60", check=False)
    incident = json.loads(stack.cicd("incidents", "--env", "dev", "--app", APP, "--json").stdout)[0]
    updates = [r for r in proof.tail(dev, 50, incident["id"]) if r["event_name"] == "RL_UPDATE"]
    assert updates and all(u["payload"]["applied"] and u["payload"]["mode"] == "explore" for u in updates), out.stdout
    stage_updates = [r for r in stack.events("RL_UPDATE")]
    assert stage_updates and not any(u["payload"]["applied"] for u in stage_updates)


def test_demo_mode_blocks_deploy_actions(stack, dev):
    from workers.client import ControlPlane
    plane = ControlPlane(dev)
    decision = Decision(env="dev", incident_id="inc-000000000000", attempt=1, app=APP, action="rollback_deployment",
                        params={"to_release": 1}, issued_at=iso(utcnow()), nonce=secrets.token_hex(16), mode="explore")
    body = {**decision.to_dict(), "signature": signing.sign(decision.signed_body(), signing_key(dev))}
    seq = proof.head_seq(dev)
    plane.app.send_task("cicd.orchestrate.execute", args=[body], kwargs={"env": "dev"})
    deadline = time.monotonic() + 20
    while len(new := proof.records_since(dev, seq)) < 3:
        assert time.monotonic() < deadline, new
        time.sleep(0.1)
    assert [r["event_name"] for r in new[:3]] == ["ORCH_REFUSE", "DEMO_MODE_BLOCK", "REFUSAL_EMIT_SUCCESS"]
    assert "DEMO_MODE" in new[0]["payload"]["reason"]


def test_stopping_dev_leaves_stage_running(stack, dev):
    stack.cicd("down", "--env", "dev")
    state = json.loads(stack.cicd("status", "--json").stdout)["stack"]
    assert "dev" not in state["envs"]
    assert all(a["alive"] == 1 for a in state["envs"]["stage"]["agents"])
