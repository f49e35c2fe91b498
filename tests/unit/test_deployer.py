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


def serve_revision(tmp_path, name: str, server_py: str) -> dict:
    """A git repository of one app whose server.py is the given text, served over loopback HTTP."""
    work, root = tmp_path / f"{name}-work", tmp_path / "git"
    work.mkdir()
    (work / "server.py").write_text(server_py)
    examples._git(work, "init", "--quiet", "--initial-branch=main")
    examples._git(work, "add", "-A")
    examples._git(work, "commit", "--quiet", "-m", "an app that does not start")
    root.mkdir(exist_ok=True)
    examples._git(root, "clone", "--quiet", "--bare", str(work), str(root / f"{name}.git"))
    examples._git(root / f"{name}.git", "update-server-info")
    return examples.start_server(root, tmp_path / f"{name}-git.log")


def deploy_until_done(settings, runtime, app, timeout=25.0):
    first = deployer.start(settings, runtime, app, f"deploy/{app}", ref="main")
    started, state = time.monotonic(), first
    while state["status"] == "starting":
        assert time.monotonic() - started < timeout, "the gate is still waiting"
        time.sleep(0.1)
        state = deployer.gate(settings, runtime, app, first["release"], first["started_at"])[0] or state
    return state, time.monotonic() - started


@pytest.mark.parametrize("delay", [0.0, 0.8], ids=["at-once", "after-a-moment"])
def test_a_release_whose_replicas_all_exit_fails_at_once_saying_why(tmp_path, delay):
    """Its deploy does not wait out the 30 s health deadline, and its failure names each replica's
    exit code and the last lines of its log, in the deploy's state and in the proof log."""
    server = serve_revision(tmp_path, "dies-api", (
        "import sys, time\n"
        f"time.sleep({delay})\n"
        "print('starting dies-api', flush=True)\n"
        "print('config error: DATABASE_URL is not set', file=sys.stderr)\n"
        "sys.exit(3)\n"))
    settings = Settings(env="stage", home=tmp_path / "home")
    runtime = LocalRuntime(settings)
    try:
        assert onboarding.register(settings, "dies-api", f"{server['url']}/dies-api.git", "backend")["ok"]
        state, seconds = deploy_until_done(settings, runtime, "dies-api")
        assert state["status"] == "failed" and seconds < 10
        detail = state["detail"]
        assert "exited with code 3" in detail and "DATABASE_URL is not set" in detail, detail
        if "every replica exited" in detail:  # caught by the gate, not by the start itself
            assert detail.count("exited with code 3") == 2 and "replica 0" in detail and "replica 1" in detail
        failed = [r for r in proof.records_since(settings, 0) if r["event_name"] == "DEPLOY_FAILED"]
        assert failed and "DATABASE_URL is not set" in failed[-1]["payload"]["detail"]
        assert "CICD_ENV" not in detail and "PATH=" not in detail  # the app's environment is not shown
    finally:
        for app in runtime.apps():
            runtime.stop_app(app)
        process.stop(server["pid"], server["ticks"])


def go_live(settings, runtime, app="once-api", request="deploy/live"):
    first = deployer.start(settings, runtime, app, request, ref="main")
    deadline = time.monotonic() + 20
    while (state := deployer.gate(settings, runtime, app, first["release"], first["started_at"])[0]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert state["status"] == "live"
    return state


def test_remove_stops_the_app_and_forgets_it_but_keeps_its_history(setup):
    from cicd.delivery import removal
    from cicd.store import get_app, session_scope
    settings, runtime = setup
    go_live(settings, runtime)
    pids = [(r["pid"], r["ticks"]) for r in runtime.replicas("once-api")]
    assert len(pids) == 2 and all(process.is_alive(*p) for p in pids)
    result = removal.remove(settings, runtime, "once-api", who="tester")
    assert (result["stopped"], result["live_release"]) == (2, 1)
    assert not any(process.is_alive(*p) for p in pids)
    assert "once-api" not in runtime.apps() and not runtime.app_dir("once-api").exists()
    assert not (settings.registry_dir / "once-api.json").exists()
    assert not deployer.mirror_path(settings, "once-api").exists()
    with session_scope(settings) as session:
        assert get_app(session, "stage", "once-api") is None
    records = proof.records_since(settings, 0)
    assert records[-1]["event_name"] == "APP_REMOVED" and records[-1]["payload"]["by"] == "tester"
    assert any(r["event_name"] == "DEPLOY_SUCCEEDED" for r in records)  # the history stays
    assert proof.verify(settings).ok
    with pytest.raises(removal.RemoveRefused, match="not onboarded in stage"):
        removal.remove(settings, runtime, "once-api", who="tester")
    # The name is free again, and its releases number on from the old ones.
    repo = records[0]["payload"]["repo"]
    assert onboarding.register(settings, "once-api", repo, "backend")["ok"]
    assert go_live(settings, runtime, request="deploy/again")["release"] == 2


def test_remove_is_refused_while_a_deploy_is_under_way_and_in_prod(setup, tmp_path):
    from cicd.delivery import removal
    from cicd.store import App, get_app, session_scope
    settings, runtime = setup
    starting = deployer.start(settings, runtime, "once-api", "deploy/slow", ref="main")
    assert starting["status"] == "starting"
    with pytest.raises(removal.RemoveRefused, match="deploy of once-api is under way in stage .release 1 is starting"):
        removal.remove(settings, runtime, "once-api", who="tester")
    assert runtime.exits("once-api", 1) == [] and len(runtime.probe_release("once-api", 1)) == 2  # untouched

    prod = Settings(env="prod", home=tmp_path / "prod-home")
    spec = onboarding.generate_spec("prod-api", "https://git.example.com/prod-api.git", "backend", "prod")
    with session_scope(prod) as session:  # as a granted promotion would have registered it
        session.add(App(env="prod", name="prod-api", runtime="backend", repo=spec["repo"], spec=spec))
    with pytest.raises(removal.RemoveRefused, match="from prod needs an approval.*Remove it from stage or dev"):
        removal.remove(prod, LocalRuntime(prod), "prod-api", who="tester")
    with session_scope(prod) as session:
        assert get_app(session, "prod", "prod-api") is not None
    assert proof.records_since(prod, 0)[-1]["event_name"] == "APP_REMOVE_REFUSED"
