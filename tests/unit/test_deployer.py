"""Exactly-once releases: a deploy is keyed by its request id, so a redelivered deploy task finds
its release instead of making another one."""
from __future__ import annotations

import time

import pytest

from cicd.delivery import deployer, examples, onboarding
from cicd.store import proof
from cicd.config import Settings
from cicd.runtime import process
from cicd.runtime.local import LocalRuntime


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "git"
    examples.make_repo(root, "once-api")
    server = examples.start_server(root, tmp_path / "git.log")
    settings = Settings(env="stage", home=tmp_path)
    assert onboarding.register(settings, "once-api", f"{server['url']}/once-api.git", "backend")["ok"]
    runtime = LocalRuntime(settings)
    yield settings, runtime
    for app in runtime.apps():
        runtime.stop_app(app)
    process.stop(server["pid"], server["ticks"])


def test_a_redelivered_deploy_makes_one_release(setup):
    settings, runtime = setup
    first = deployer.start(settings, runtime, "once-api", "deploy/req-1", ref="main")
    again = deployer.start(settings, runtime, "once-api", "deploy/req-1", ref="main")
    assert (first["release"], first["status"]) == (again["release"], again["status"]) == (1, "starting")
    deadline = time.monotonic() + 20
    while (state := deployer.gate(settings, runtime, "once-api", 1, first["started_at"])[0]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert state["status"] == "live"
    assert deployer.start(settings, runtime, "once-api", "deploy/req-1", ref="main")["release"] == 1
    started = [r for r in proof.records_since(settings, 0) if r["event_name"] == "DEPLOY_STARTED"]
    assert len(started) == 1 and runtime.replica_count("once-api") == 2


def test_a_second_deploy_of_the_app_waits_for_the_first(setup):
    settings, runtime = setup
    first = deployer.start(settings, runtime, "once-api", "deploy/a", ref="main")
    assert deployer.start(settings, runtime, "once-api", "deploy/b", ref="main") == {"app": "once-api", "status": "busy"}
    deadline = time.monotonic() + 20
    while deployer.gate(settings, runtime, "once-api", first["release"], first["started_at"])[0] is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert deployer.start(settings, runtime, "once-api", "deploy/b", ref="main")["release"] == 2


def test_an_unknown_ref_fails_the_deploy_cleanly(setup):
    settings, runtime = setup
    state = deployer.start(settings, runtime, "once-api", "deploy/x", ref="no-such-branch")
    assert state["status"] == "failed" and "does not exist" in state["detail"]
    assert state["signal"]["kind"] == "deploy_failed"
    assert deployer.start(settings, runtime, "once-api", "deploy/y", ref="main")["status"] == "starting"  # lock freed
