"""`cicd up`, `status` and `down` work on real processes, from another shell (another process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cicd.stack import cluster
from cicd.config import AGENTS
from cicd.runtime import process

pytestmark = pytest.mark.integration


def agents_status(stack) -> dict:
    state = json.loads(stack.cicd("status", "--json").stdout)
    return {a["agent"]: a for a in state["stack"]["envs"]["stage"]["agents"]}


def test_every_agent_has_a_live_worker_on_its_own_queue(stack):
    agents = agents_status(stack)
    assert set(agents) == set(AGENTS)
    for agent, row in agents.items():
        assert row["queue"] == f"stage.{agent}"
        assert (row["replicas"], row["alive"]) == (1, 1), row
        assert row["depth"] is not None


def test_scaling_an_agent_adds_and_removes_worker_processes(stack):
    stack.cicd("up", "--scale", "decide=2")
    assert (agents_status(stack)["decide"]["replicas"], agents_status(stack)["decide"]["alive"]) == (2, 2)
    extra = [w for w in cluster.read_stack(stack.settings)["envs"]["stage"]["workers"]
             if w["agent"] == "decide" and w["index"] == 2][0]
    stack.cicd("up")  # back to the default shape: the second decide replica is stopped
    assert agents_status(stack)["decide"]["replicas"] == 1
    assert not process.is_alive(extra["pid"], extra["ticks"])


def test_the_compose_beat_healthcheck_tells_a_running_beat_from_none(stack):
    """docker-compose.yml's beat service is healthy when `python -m workers.beat check` exits 0: a live
    beat of this host holds the environment's lock. Stage has one; dev has none."""
    def check(env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workers.beat", "check"], env={**os.environ, "CICD_ENV": env},
                              capture_output=True, text=True, timeout=60)
    assert check("stage").returncode == 0
    out = check("dev")
    assert out.returncode == 1 and "no live beat of this host holds cicd:dev:beat-lock" in out.stderr


def test_the_supervisor_restarts_a_killed_worker_and_beat(stack):
    import os
    import signal
    import time

    def current(kind):
        section = cluster.read_stack(stack.settings)["envs"]["stage"]
        return section["beat"] if kind == "beat" else [w for w in section["workers"] if w["agent"] == kind][0]

    for kind in ("detect", "beat"):
        dead = current(kind)
        os.kill(dead["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 20
        while current(kind)["pid"] == dead["pid"]:
            assert time.monotonic() < deadline, f"{kind} was not restarted"
            time.sleep(0.2)
        assert process.is_alive(current(kind)["pid"], current(kind)["ticks"])
    deadline = time.monotonic() + 60
    while agents_status(stack)["detect"]["alive"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    state = json.loads(stack.cicd("status", "--json").stdout)["stack"]
    assert state["supervisor_alive"] and state["restarts"]["workers"] >= 1 and state["restarts"]["beat"] >= 1
