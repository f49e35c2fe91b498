"""Deploys from real git repositories served over loopback HTTP, and what goes wrong with them:
a broken revision, a slow one, one that dies after its release, two deploys of one app at once,
deploys of several apps in parallel."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from cicd.delivery import deployer, gitsource
from cicd.store import reports
from cicd.stack.demo import ServingWatch
from cicd.core.events import utcnow
from cicd.store import DeployLock, Release, session_scope

pytestmark = pytest.mark.integration

APP = "ship-api"


@pytest.fixture(scope="module")
def app(stack):
    stack.onboard(APP)
    return APP


def Serving(stack, app):
    """Probes the app every 0.1 s in the background; counts probes that found no healthy replica."""
    return ServingWatch(stack.runtime, app, interval_s=0.1)


def releases(stack, app):
    with session_scope(stack.settings) as s:
        return {r.number: (r.status, r.kind, r.sha) for r in
                s.scalars(select(Release).where(Release.env == "stage", Release.app == app))}


def main_sha(stack, app):
    mirror = deployer.mirror_path(stack.settings, app)
    gitsource.fetch(stack.repo_url(app), mirror)
    return gitsource.resolve(mirror, "main")


def deploy_head(stack, app):
    out = stack.cicd("deploy", app, "--ref", "main")
    assert " live in " in out.stdout, out.stdout
    stack.wait_steady(app)


def test_a_deploy_fetches_the_revision_over_git_and_switches_after_the_gate(stack, app):
    before = reports.latest_release(stack.settings, APP, status="live")
    with Serving(stack, APP) as watch:
        out = stack.cicd("deploy", APP, "--ref", "main")
    assert " live in " in out.stdout
    after = reports.latest_release(stack.settings, APP, status="live")
    assert after["release"] == before["release"] + 1 and after["sha"] == main_sha(stack, APP)
    assert releases(stack, APP)[before["release"]][0] == "superseded"
    assert watch.dark == 0 and watch.probes > 0
    release_dir = stack.runtime.app_dir(APP) / "releases" / str(after["release"])
    assert (release_dir / "server.py").exists() and not (release_dir / ".git").exists()


def test_a_broken_revision_never_takes_the_app_down_and_is_retried_then_rolled_back(stack, app):
    serving_before = reports.latest_release(stack.settings, APP, status="live")["release"]
    with Serving(stack, APP) as watch:
        out = stack.cicd("inject", "failed-deploy", APP, "--wait", "--timeout", "90")
    assert "failed_deploy -> rollback_deployment: stable" in out.stdout, out.stdout
    incident = reports.incidents(stack.settings, 1, APP)[0]
    events = stack.events(incident_id=incident["id"])
    decisions = [r["payload"]["action"] for r in events if r["event_name"] == "RL_DECISION"]
    assert decisions == ["retry_deployment", "rollback_deployment"]
    assert watch.dark == 0, f"{watch.dark} of {watch.probes} probes found no healthy replica"
    assert reports.latest_release(stack.settings, APP, status="live")["release"] == serving_before
    failed = [n for n, (status, _, _) in releases(stack, APP).items() if n > serving_before]
    assert failed and all(releases(stack, APP)[n][0] == "failed" for n in failed)
    names = [r["event_name"] for r in stack.events() if r["app"] == APP]
    assert "BUILD_FAILED" in names and "ROLLBACK" in names


def test_a_slow_deploy_is_detected_while_its_gate_runs_and_handled(stack, app):
    with Serving(stack, APP) as watch:
        out = stack.cicd("inject", "slow-deploy", APP, "--wait", "--timeout", "90")
    assert "slow_deploy -> noop: stable" in out.stdout, out.stdout
    assert watch.dark == 0
    live = reports.latest_release(stack.settings, APP, status="live")
    assert live["ref"] == "cicd-inject/slow"
    deploy_head(stack, APP)


def test_a_crash_right_after_a_release_is_rolled_back_not_restarted(stack, app):
    good = reports.latest_release(stack.settings, APP, status="live")
    out = stack.cicd("inject", "bad-release", APP, "--wait", "--timeout", "90")
    assert "crash -> rollback_deployment: stable" in out.stdout, out.stdout
    incident = reports.incidents(stack.settings, 1, APP)[0]
    detected = stack.events("INCIDENT_DETECTED", incident["id"])[0]["payload"]
    assert detected["context"]["fresh_release"] is True and detected["context"]["rollback_to"] == good["release"]
    live = reports.latest_release(stack.settings, APP, status="live")
    assert live["kind"] == "rollback" and live["sha"] == good["sha"]
    statuses = releases(stack, APP)
    bad = [n for n, (status, _, _) in statuses.items() if status == "rolled_back"]
    assert len(bad) == 1 and good["release"] < bad[0] < live["release"]
    stack.wait_steady(APP)


def test_one_deploy_per_app_at_a_time_even_if_its_holder_died(stack, app):
    # A lease left by a deploy worker that died: the next deploy waits for it to run out.
    with session_scope(stack.settings) as s:
        s.add(DeployLock(env="stage", app=APP, holder="deploy/worker-that-died",
                         expires_at=utcnow() + timedelta(seconds=3)))
    before = reports.latest_release(stack.settings, APP)["release"]
    started = time.monotonic()
    first = stack.cicd("deploy", APP, "--ref", "main", "--no-wait")
    second = stack.cicd("deploy", APP, "--ref", "main", "--no-wait")
    assert first.returncode == second.returncode == 0
    deadline = time.monotonic() + 60
    finished = ("live", "failed", "superseded")
    while len([n for n, (st, _, _) in releases(stack, APP).items() if n > before and st in finished]) < 2:
        assert time.monotonic() < deadline, releases(stack, APP)
        time.sleep(0.2)
    assert time.monotonic() - started >= 2.5  # nothing started before the dead holder's lease ran out
    events = [r for r in stack.events() if r["app"] == APP and r["event_name"] in ("DEPLOY_STARTED", "DEPLOY_SUCCEEDED")
              and r["payload"].get("release", 0) > before]
    order = [(r["event_name"], r["payload"]["release"]) for r in events]
    a, b = before + 1, before + 2
    assert order == [("DEPLOY_STARTED", a), ("DEPLOY_SUCCEEDED", a), ("DEPLOY_STARTED", b), ("DEPLOY_SUCCEEDED", b)]
    stack.wait_steady(APP)


def test_deploys_of_different_apps_run_in_parallel_on_three_deploy_workers(stack):
    apps = ["par-a", "par-b", "par-c"]
    for name in apps:
        stack.onboard(name)
    stack.cicd("up", "--scale", "deploy=3")
    try:
        from workers.client import ControlPlane
        plane = ControlPlane(stack.settings)
        seq = stack.events()[-1]["seq"]
        # The slow revision: each takes seconds to pass its gate. Sent from here, all three within
        # milliseconds (three `cicd deploy` processes take seconds each to start on a busy machine).
        for name in apps:
            plane.deploy(name, "cicd-inject/slow", "test: parallel deploys")
        deadline = time.monotonic() + 90
        while len([r for r in stack.events("DEPLOY_SUCCEEDED") if r["seq"] > seq and r["app"] in apps]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        spans = {}
        for r in stack.events():
            if r["seq"] > seq and r["app"] in apps and r["event_name"] in ("DEPLOY_STARTED", "DEPLOY_SUCCEEDED"):
                spans.setdefault(r["app"], []).append(r["ts"])
        starts = sorted(ts[0] for ts in spans.values())
        ends = sorted(ts[-1] for ts in spans.values())
        assert starts[-1] < ends[0], f"deploys did not overlap: {spans}"  # all three were running at once
    finally:
        stack.cicd("up")  # back to one deploy worker
    for name in apps:
        stack.wait_steady(name)
