"""Releases nobody moves any more: the reconciler finishes them or rolls them back.

The releases are written in the state a dead deploy worker leaves them in (under way, lease
lapsed, started long enough ago); the runtime is a double that says what it serves and how the
staged replicas answer, so every branch is reached without processes or waiting. The last test
uses the real local runtime and git server, for a deploy that outlives its lease.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from cicd.config import Settings
from cicd.core.events import utcnow
from cicd.delivery import deployer, examples, onboarding
from cicd.healing import reconciler
from cicd.runtime import process
from cicd.runtime.base import ReplicaStatus
from cicd.runtime.local import LocalRuntime
from cicd.store import DeployLock, Release, proof, session_scope

APP = "stuck-api"
DEADLINE_S = 30  # the backend template's health_deadline_s


class RuntimeDouble:
    """What the reconciler asks of a runtime, answered as the test says."""

    def __init__(self):
        self.serving: int | None = 1
        self.healthy: set[int] = set()
        self.staged: set[int] = set()
        self.calls: list[tuple[str, int]] = []

    def live_release(self, app):
        return self.serving

    def probe_release(self, app, number):
        if number not in self.staged:
            return []
        return [ReplicaStatus(slot, 100 + slot, 9000 + slot, True, "ok" if number in self.healthy else "starting")
                for slot in range(2)]

    def activate_release(self, app, number):
        self.calls.append(("activate", number))
        already, self.serving = self.serving == number, number
        self.staged.discard(number)
        return {"release": number, "already": already}

    def discard_release(self, app, number):
        self.calls.append(("discard", number))
        self.staged.discard(number)
        return {"release": number, "stopped": 2}


@pytest.fixture
def settings(tmp_path):
    settings = Settings(env="stage", home=tmp_path)
    assert onboarding.register(settings, APP, f"https://git.invalid/{APP}.git", "backend")["ok"]
    with session_scope(settings) as s:
        s.add(Release(env="stage", app=APP, number=1, status="live", kind="deploy", ref="main", sha="1" * 40,
                      replicas=2, request_id="deploy/one", started_at=utcnow() - timedelta(hours=1),
                      finished_at=utcnow() - timedelta(hours=1)))
    return settings


def stuck(settings, number: int, status: str, age_s: float, lease: str = "expired", detail: str = "",
          kind: str = "deploy") -> None:
    """Release `number` left `status` by a dead worker, started age_s ago; lease: expired, gone or held."""
    now = utcnow()
    with session_scope(settings) as s:
        s.add(Release(env="stage", app=APP, number=number, status=status, kind=kind, ref="main", sha="2" * 40,
                      replicas=2, request_id=f"deploy/{number}", started_at=now - timedelta(seconds=age_s),
                      detail=detail))
        if lease != "gone":
            expires = now + timedelta(seconds=30) if lease == "held" else now - timedelta(seconds=1)
            s.merge(DeployLock(env="stage", app=APP, holder=f"deploy/{number}", expires_at=expires))


def status_of(settings, number: int) -> str:
    with session_scope(settings, readonly=True) as s:
        return s.scalar(select(Release.status).where(Release.app == APP, Release.number == number))


def events_after(settings, seq: int) -> list[tuple[str, dict]]:
    return [(r["event_name"], r["payload"]) for r in proof.records_since(settings, seq)]


def lock_of(settings):
    with session_scope(settings, readonly=True) as s:
        return s.get(DeployLock, ("stage", APP))


def test_a_switch_the_runtime_made_but_nobody_recorded_is_made_live(settings):
    runtime = RuntimeDouble()
    stuck(settings, 2, "switching", age_s=20)
    runtime.serving = 2
    seq = proof.head_seq(settings)
    [state] = reconciler.finish_stalled_releases(settings, runtime)
    assert state["status"] == "live" and "signal" not in state
    assert (status_of(settings, 1), status_of(settings, 2)) == ("superseded", "live")
    names = [name for name, _ in events_after(settings, seq)]
    assert names == ["RELEASE_RESUMED", "HEALTH_GATE_PASSED", "DEPLOY_SUCCEEDED"]
    resumed = events_after(settings, seq)[0][1]
    assert (resumed["found"], resumed["becomes"]) == ("switching", "live")
    assert lock_of(settings) is None  # the app may deploy again
    assert reconciler.finish_stalled_releases(settings, runtime) == []  # done once, not again


def test_healthy_replicas_whose_gate_died_go_live_as_the_gate_would_have(settings):
    runtime = RuntimeDouble()
    stuck(settings, 2, "starting", age_s=5, lease="gone")
    runtime.staged, runtime.healthy = {2}, {2}
    [state] = reconciler.finish_stalled_releases(settings, runtime)
    assert state["status"] == "live" and runtime.calls == [("activate", 2)] and runtime.serving == 2
    assert status_of(settings, 1) == "superseded"


def test_a_release_whose_deploy_holds_its_lease_is_left_alone(settings):
    runtime = RuntimeDouble()
    stuck(settings, 2, "switching", age_s=600, lease="held")
    runtime.staged = {2}
    assert deployer.unattended(settings) == []
    assert reconciler.finish_stalled_releases(settings, runtime) == [] and runtime.calls == []
    assert status_of(settings, 2) == "switching"


def test_an_unhealthy_release_waits_for_its_deadline_then_is_rolled_back(settings):
    runtime = RuntimeDouble()
    stuck(settings, 2, "starting", age_s=DEADLINE_S)  # not healthy, but still within deadline + allowance
    runtime.staged = {2}
    assert reconciler.finish_stalled_releases(settings, runtime) == []
    assert status_of(settings, 2) == "starting" and runtime.calls == []

    with session_scope(settings) as s:  # the same release, later: past deadline + allowance
        release = s.scalar(select(Release).where(Release.app == APP, Release.number == 2))
        release.started_at = utcnow() - timedelta(seconds=DEADLINE_S + deployer.DEPLOY_ALLOWANCE_S + 1)
    seq = proof.head_seq(settings)
    [state] = reconciler.finish_stalled_releases(settings, runtime)
    assert state["status"] == "failed" and runtime.calls == [("discard", 2)] and runtime.serving == 1
    assert (status_of(settings, 1), status_of(settings, 2)) == ("live", "failed")
    records = dict(events_after(settings, seq))
    assert list(records) == ["RELEASE_RESUMED", "DEPLOY_FAILED", "ROLLBACK"]
    assert records["DEPLOY_FAILED"]["stage"] == "stalled"
    assert "not healthy within 30 s (0:starting, 1:starting)" in records["DEPLOY_FAILED"]["detail"]
    assert (records["ROLLBACK"]["failed_release"], records["ROLLBACK"]["serving_release"]) == (2, 1)
    # A human's deploy that failed raises an incident, as the deploy agent's own failure would.
    assert state["signal"]["kind"] == "deploy_failed" and state["signal"]["release"] == 2


def test_a_release_being_given_up_when_its_worker_died_is_rolled_back_even_if_healthy(settings):
    runtime = RuntimeDouble()
    stuck(settings, 2, "switching", age_s=10, detail="cancelled by rollback inc-1/2", kind="retry")
    runtime.staged, runtime.healthy = {2}, {2}
    [state] = reconciler.finish_stalled_releases(settings, runtime)
    assert state["status"] == "failed" and runtime.calls == [("discard", 2)]
    assert "signal" not in state  # the healer's own deploys are watched by its verifier instead
    assert "cancelled by rollback inc-1/2" in state["detail"]


def test_a_stale_release_is_never_made_live_over_a_newer_one(settings):
    runtime = RuntimeDouble()
    stuck(settings, 2, "starting", age_s=5, lease="gone")
    stuck(settings, 3, "starting", age_s=1, lease="held")  # the next deploy took the lock meanwhile
    runtime.staged, runtime.healthy = {2, 3}, {2, 3}
    [state] = reconciler.finish_stalled_releases(settings, runtime)
    assert (state["release"], state["status"]) == (2, "failed") and "release 3 was started since" in state["detail"]
    assert status_of(settings, 3) == "starting" and runtime.calls == [("discard", 2)]


def test_a_fetch_that_never_finished_is_rolled_back_once_overdue(settings):
    runtime = RuntimeDouble()
    stuck(settings, 2, "fetching", age_s=DEADLINE_S + deployer.DEPLOY_ALLOWANCE_S + 1)
    [state] = reconciler.finish_stalled_releases(settings, runtime)
    assert state["status"] == "failed" and "no replicas" in state["detail"]
    assert status_of(settings, 1) == "live"


def test_a_worker_that_comes_back_after_the_reconciler_finished_changes_nothing(settings):
    runtime = RuntimeDouble()
    stuck(settings, 2, "switching", age_s=20)
    runtime.serving = 2
    reconciler.finish_stalled_releases(settings, runtime)
    seq = proof.head_seq(settings)
    # The deploy's own conclusion, late: the release is concluded already, so it records nothing.
    state = deployer.finish(settings, runtime, APP, 2, ok=False, detail="late")
    assert state["status"] == "live" and events_after(settings, seq) == []


class ReconciledWhileBuilding(LocalRuntime):
    """A real local runtime whose build outlasts the deploy's lease: the reconciler gives the
    release up while the build runs (as it would for a worker it thought dead)."""

    def stage_release(self, spec, number, source_dir, progress=None):
        with session_scope(self.settings) as s:
            release = s.scalar(select(Release).where(Release.app == spec["name"], Release.number == number))
            overdue_s = spec["health_deadline_s"] + deployer.DEPLOY_ALLOWANCE_S + 1
            release.started_at = utcnow() - timedelta(seconds=overdue_s)
            s.get(DeployLock, ("stage", spec["name"])).expires_at = utcnow()
        self.given_up = reconciler.finish_stalled_releases(self.settings, self)
        return super().stage_release(spec, number, source_dir, progress)


@pytest.fixture
def served_repo(tmp_path):
    root = tmp_path / "git"
    examples.make_repo(root, "late-api")
    server = examples.start_server(root, tmp_path / "git.log")
    yield f"{server['url']}/late-api.git"
    process.stop(server["pid"], server["ticks"])


def test_a_deploy_that_finds_its_release_given_up_after_its_build_stops_what_it_started(tmp_path, served_repo):
    settings = Settings(env="stage", home=tmp_path)
    assert onboarding.register(settings, "late-api", served_repo, "backend")["ok"]
    runtime = ReconciledWhileBuilding(settings)
    try:
        state = deployer.start(settings, runtime, "late-api", "deploy/late", ref="main")
        assert [s["status"] for s in runtime.given_up] == ["failed"]
        assert state["status"] == "failed" and state["release"] == 1  # not moved back to starting
        assert runtime.probe_release("late-api", 1) == []  # the replicas its build started are stopped
        names = [r["event_name"] for r in proof.records_since(settings, 0) if r["app"] == "late-api"]
        assert "REPLICAS_STARTED" not in names and names[-2:] == ["RELEASE_RESUMED", "DEPLOY_FAILED"]
    finally:
        for app in runtime.apps():
            runtime.stop_app(app)
