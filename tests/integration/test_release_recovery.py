"""A deploy worker SIGKILLed mid-deploy: its release does not stay under way for ever.

The worker is one process (a thread pool), so SIGKILL takes the health gate's message with it,
and Redis gives that back only after the deploy agent's visibility timeout (over ten minutes).
Housekeeping's release reconciler is what must finish it, while the app keeps serving.

Each kill waits for the release row to say where it is, in a state that lasts seconds whatever
the machine's speed: "starting" with the slow revision (it takes seconds to listen), "switching"
away from the stubborn one (its replicas ignore SIGTERM, so stopping them takes the whole grace).
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


def release_row(stack, number: int, app: str = APP) -> dict | None:
    with session_scope(stack.settings, readonly=True) as s:
        r = s.scalar(select(Release).where(Release.env == "stage", Release.app == app, Release.number == number))
        return {"status": r.status, "request_id": r.request_id, "detail": r.detail} if r else None


def deploy_workers(stack) -> list[dict]:
    workers = cluster.read_stack(stack.settings)["envs"]["stage"]["workers"]
    return [w for w in workers if w["agent"] == "deploy" and process.is_alive(w["pid"], w["ticks"])]


def kill_deploy_workers_once(stack, app: str, number: int, status: str) -> None:
    """SIGKILL every deploy worker once release `number` says `status`, then run the dead
    worker's lease out: by itself it would lapse LOCK_TTL_S (a minute) after its last renewal."""
    killed = deploy_workers(stack)
    assert killed
    wait_for(lambda: (release_row(stack, number, app) or {}).get("status") == status, 60, f"release {status}")
    for worker in killed:
        os.kill(worker["pid"], signal.SIGKILL)
    wait_for(lambda: not any(process.is_alive(w["pid"], w["ticks"]) for w in killed), 10, "the kill")
    with session_scope(stack.settings) as s:
        lock = s.get(DeployLock, ("stage", app))
        if lock is not None and lock.holder == release_row(stack, number, app)["request_id"]:
            lock.expires_at = utcnow()


def concluded(stack, app: str, number: int) -> dict:
    return wait_for(lambda: (release_row(stack, number, app) or {}).get("status") in ("live", "failed")
                    and release_row(stack, number, app), 90, "the reconciler to conclude the release")


def proof_of(stack, app: str, number: int, seq: int) -> list[dict]:
    records = [r for r in stack.events() if r["seq"] > seq and r["app"] == app]
    return [r for r in records if r["payload"].get("release") == number
            or r["payload"].get("failed_release") == number]


def deploy_killed_at(stack, app: str, ref: str, number: int, status: str) -> dict:
    """Deploy ref, SIGKILL the deploy workers once the release row says `status`, and return the
    release once it is concluded: by the reconciler, with the live release serving throughout."""
    with ServingWatch(stack.runtime, app, interval_s=0.1) as watch:
        stack.cicd("deploy", app, "--ref", ref, "--no-wait")
        kill_deploy_workers_once(stack, app, number, status)
        final = concluded(stack, app, number)
    assert final["status"] == "live" and final["detail"].startswith("reconciled: "), final
    assert watch.dark == 0 and watch.probes > 0  # the live release served throughout
    return final


def resumed_once(stack, app: str, number: int, seq: int, found: str) -> None:
    """The release's proof after seq: one RELEASE_RESUMED (found -> live), then one DEPLOY_SUCCEEDED."""
    records = proof_of(stack, app, number, seq)
    names = [r["event_name"] for r in records]
    resumed = [r["payload"] for r in records if r["event_name"] == "RELEASE_RESUMED"]
    assert [(p["found"], p["becomes"]) for p in resumed] == [(found, "live")], names
    assert names.index("RELEASE_RESUMED") < names.index("DEPLOY_SUCCEEDED") and names.count("DEPLOY_SUCCEEDED") == 1


def back_and_serving(stack, app: str) -> None:
    wait_for(lambda: deploy_workers(stack), 30, "the supervisor to restart the deploy worker")
    stack.wait_steady(app)
    statuses = stack.runtime.probe([app])[app]
    assert statuses and all(s.healthy for s in statuses)
    assert stack.cicd("proof", "verify").returncode == 0


def test_a_deploy_worker_killed_while_its_release_starts_leaves_it_finished_not_stuck(stack):
    stack.onboard(APP)
    before = reports.latest_release(stack.settings, APP, status="live")["release"]
    number = before + 1
    seq = stack.events()[-1]["seq"]
    # Its replicas come up healthy in the end, so the reconciler finishes it as the gate would have.
    deploy_killed_at(stack, APP, "cicd-inject/slow", number, "starting")
    assert stack.runtime.live_release(APP) == number
    resumed_once(stack, APP, number, seq, "starting")
    assert release_row(stack, before)["status"] == "superseded"
    back_and_serving(stack, APP)


def test_a_deploy_worker_killed_in_the_middle_of_the_switch_leaves_the_release_live_and_the_old_stopped(stack):
    app = "stubborn-api"
    stack.onboard(app)
    out = stack.cicd("deploy", app, "--ref", "cicd-inject/stubborn")
    assert " live in " in out.stdout, out.stdout
    stack.wait_steady(app)
    before = reports.latest_release(stack.settings, app, status="live")["release"]
    number = before + 1
    old = [(r["pid"], r["ticks"]) for r in stack.runtime.replicas(app)]
    seq = stack.events()[-1]["seq"]
    deploy_killed_at(stack, app, "main", number, "switching")
    resumed_once(stack, app, number, seq, "switching")
    assert release_row(stack, before, app)["status"] == "superseded"
    # The replicas the killed switch was stopping are not left running, unowned.
    wait_for(lambda: not any(process.is_alive(pid, ticks) for pid, ticks in old), 15, "the old replicas to stop")
    back_and_serving(stack, app)
