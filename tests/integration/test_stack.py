"""`cicd up`, `status` and `down` work on real processes, from another shell (another process)."""
from __future__ import annotations

import json

import pytest

from cicd import cluster
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


def test_a_dead_worker_is_replaced_by_up(stack):
    worker = [w for w in cluster.read_stack(stack.settings)["envs"]["stage"]["workers"] if w["agent"] == "detect"][0]
    import os
    import signal
    os.kill(worker["pid"], signal.SIGKILL)
    stack.cicd("up")
    now = [w for w in cluster.read_stack(stack.settings)["envs"]["stage"]["workers"] if w["agent"] == "detect"][0]
    assert now["pid"] != worker["pid"] and process.is_alive(now["pid"], now["ticks"])
    assert agents_status(stack)["detect"]["alive"] == 1
