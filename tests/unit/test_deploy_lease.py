"""A long build keeps its deploy's lease: the reconciler gives up only releases nobody works on,
and a cold dependency install may take longer than the lease (LOCK_TTL_S)."""
from __future__ import annotations

import time

from cicd.core.events import parse_iso
from cicd.delivery import deployer
from cicd.store import releases, session_scope
from tests.unit.test_deployer import setup  # noqa: F401  (the fixture: a real git server and runtime)

BUILD_S = 1.2


class SlowBuild:
    """The real runtime, with a build that takes BUILD_S; notes whether the lease had lapsed by its end."""

    def __init__(self, runtime, settings):
        self.runtime, self.settings, self.lapsed = runtime, settings, None

    def __getattr__(self, name):
        return getattr(self.runtime, name)

    def stage_release(self, spec, number, source_dir, progress=None):
        time.sleep(BUILD_S)
        with session_scope(self.settings, readonly=True) as session:
            release = releases.get(session, self.settings.env, spec["name"], number)
            self.lapsed = releases.lease_lapsed(session, release, self.settings.clock.now())
        return self.runtime.stage_release(spec, number, source_dir, progress=progress)


def test_the_lease_is_renewed_while_the_release_builds(setup, monkeypatch):
    settings, runtime = setup
    monkeypatch.setattr(deployer, "LOCK_TTL_S", 0.3)  # the build lasts four leases
    slow = SlowBuild(runtime, settings)
    state = deployer.start(settings, slow, "once-api", "deploy/slow-build", ref="main")
    assert state["status"] == "starting"
    assert slow.lapsed is False
    assert deployer.unattended(settings) == []
    # The gate counts from the replicas' start, not the release's: the build is not health-gate time.
    built = (parse_iso(state["replicas_started_at"]) - parse_iso(state["started_at"])).total_seconds()
    assert built >= BUILD_S
