"""Environments never meet: dev and stage each have their own queues, database, proof chain,
signing key and runtime directory, even for an app of the same name, and their own policy."""
from __future__ import annotations

import json
import os
import secrets
import time

import pytest

from cicd.store import proof
from cicd.core import signing
from cicd.config import signing_key
from cicd.core.events import Decision, iso, utcnow
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


def test_three_decide_replicas_learning_at_once_lose_no_update(stack, dev):
    """Several decide workers apply Q updates concurrently: the table counts every outcome."""
    from sqlalchemy import func, select

    from cicd.store import PolicyValue, session_scope
    apps = ["learn-a", "learn-b", "learn-c"]
    for name in apps:
        stack.onboard(name, env="dev")
    os.environ["CICD_DEMO_MODE"] = "true"
    try:
        stack.cicd("up", "--env", "dev", "--scale", "decide=3")
    finally:
        del os.environ["CICD_DEMO_MODE"]

    def updates():
        with session_scope(dev) as session:
            return session.scalar(select(func.coalesce(func.sum(PolicyValue.updates), 0)))
    before, seq = updates(), proof.head_seq(dev)
    for name in apps:
        stack.cicd("inject", "crash", name, "--env", "dev")
    deadline = time.monotonic() + 90
    while True:
        new = proof.records_since(dev, seq)
        opened = {r["incident_id"] for r in new if r["event_name"] == "INCIDENT_DETECTED"}
        ended = {r["incident_id"] for r in new if r["event_name"] in ("SYSTEM_STABLE", "ESCALATED", "INCIDENT_REFUSED")}
        learned = [r for r in new if r["event_name"] == "RL_UPDATE"]
        if len(opened) == 3 and opened == ended and len(learned) >= len([r for r in new if r["event_name"] == "RL_DECISION"]):
            break
        assert time.monotonic() < deadline, [r["event_name"] for r in new]
        time.sleep(0.3)
    applied = [r for r in learned if r["payload"]["applied"]]
    assert len(applied) >= 3
    assert updates() - before == len(applied)
    assert {r["app"] for r in learned} == set(apps)
    stack.cicd("up", "--env", "dev")  # back to one decide worker


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
