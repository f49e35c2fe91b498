"""A deploy worker SIGKILLed mid-deploy: its release does not stay under way for ever.

The worker is one process (a thread pool), so SIGKILL takes the health gate's message with it,
and Redis gives that back only after the deploy agent's visibility timeout (over ten minutes).
Housekeeping's release reconciler is what must finish it, while the live release keeps serving.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from sqlalchemy import select

from cicd.stack import cluster
from cicd.stack.demo import ServingWatch
from cicd.core.events import utcnow
from cicd.runtime import process
from cicd.store import DeployLock, Release, reports, session_scope

pytestmark = pytest.mark.integration

APP = "phoenix-api"


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def release_row(stack, number: int) -> dict | None:
    with session_scope(stack.settings, readonly=True) as s:
        r = s.scalar(select(Release).where(Release.env == "stage", Release.app == APP, Release.number == number))
        return {"status": r.status, "request_id": r.request_id, "detail": r.detail} if r else None


def deploy_workers(stack) -> list[dict]:
    workers = cluster.read_stack(stack.settings)["envs"]["stage"]["workers"]
    return [w for w in workers if w["agent"] == "deploy" and process.is_alive(w["pid"], w["ticks"])]


def test_a_deploy_worker_killed_while_its_release_starts_leaves_it_finished_not_stuck(stack):
    stack.onboard(APP)
    before = reports.latest_release(stack.settings, APP, status="live")["release"]
    number = before + 1
    seq = stack.events()[-1]["seq"]
    killed = deploy_workers(stack)
    assert killed
    with ServingWatch(stack.runtime, APP, interval_s=0.1) as watch:
        # The slow revision takes seconds to listen, so its release sits in "starting" with the
        # gate polling: the kill lands there whatever the machine's speed.
        stack.cicd("deploy", APP, "--ref", "cicd-inject/slow", "--no-wait")
        wait_for(lambda: (release_row(stack, number) or {}).get("status") == "starting", 60, "release to start")
        for worker in killed:
            os.kill(worker["pid"], signal.SIGKILL)
        wait_for(lambda: not any(process.is_alive(w["pid"], w["ticks"]) for w in killed), 10, "the kill")
        assert release_row(stack, number)["status"] in ("starting", "switching")
        # The dead worker's lease would run out by itself LOCK_TTL_S (a minute) after its gate's
        # last look; run it out now instead of waiting that long.
        with session_scope(stack.settings) as s:
            lock = s.get(DeployLock, ("stage", APP))
            if lock is not None and lock.holder == release_row(stack, number)["request_id"]:
                lock.expires_at = utcnow()
        final = wait_for(lambda: (release_row(stack, number) or {}).get("status") in ("live", "failed")
                         and release_row(stack, number), 90, "the reconciler to conclude the release")
    # The replicas come up healthy in the end, so the reconciler finishes it as the gate would have.
    assert final["status"] == "live" and final["detail"].startswith("reconciled: "), final
    assert watch.dark == 0 and watch.probes > 0  # the live release served throughout
    assert stack.runtime.live_release(APP) == number
    records = [r for r in stack.events() if r["seq"] > seq and r["app"] == APP]
    names = [r["event_name"] for r in records]
    resumed = [r for r in records if r["event_name"] == "RELEASE_RESUMED"]
    assert len(resumed) == 1 and resumed[0]["payload"]["release"] == number, names
    assert resumed[0]["payload"]["found"] in ("starting", "switching")
    assert resumed[0]["payload"]["becomes"] == "live"
    succeeded = [r for r in records if r["event_name"] == "DEPLOY_SUCCEEDED"]
    assert [r["payload"]["release"] for r in succeeded] == [number]
    assert names.index("RELEASE_RESUMED") < names.index("DEPLOY_SUCCEEDED")
    assert reports.latest_release(stack.settings, APP, status="superseded")["release"] == before
    # The supervisor brings the deploy agent back, and the app serves from the new release.
    wait_for(lambda: deploy_workers(stack), 30, "the supervisor to restart the deploy worker")
    stack.wait_steady(APP)
    statuses = stack.runtime.probe([APP])[APP]
    assert statuses and all(s.healthy for s in statuses)
    assert stack.cicd("proof", "verify").returncode == 0
