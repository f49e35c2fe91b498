"""Containers cicd-heal did not start (`docker run` by someone else, with its own HEALTHCHECK)
are adopted and healed: one that its health check calls unhealthy, which Docker itself leaves
running as it is (moby/moby#28400), and one that is killed. Both are restarted in place, through
the whole chain; removing the app lets go of the container and never stops it."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from cicd.runtime import process
from cicd.store import reports

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample_service"
APP = "legacy-api"


def docker_json(dockerd, *args: str):
    return json.loads(dockerd.docker(*args).stdout)


@pytest.fixture(scope="module")
def legacy(dockerd, stack):
    """The sample service in a container of its owner's making: host network, its own health check."""
    port = process.free_port()
    check = (f"python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/health', "
             f"timeout=1)\"")
    dockerd.docker("run", "-d", "--name", APP, "--network", "host", "--init", "-v", f"{SAMPLE}:/srv:ro",
                   "--health-cmd", check, "--health-interval", "1s", "--health-timeout", "1s",
                   "--health-retries", "2", dockerd.base_image(), "python3", "/srv/server.py", "--port", str(port))
    yield {"name": APP, "port": port}
    dockerd.docker("rm", "-f", APP)


def wait_for(what, predicate, timeout: float = 60.0, show=lambda: None):
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout:.0f} s; last seen: {show()}")
        time.sleep(0.2)
    return found


def healed_incident(stack, before: set[str]) -> dict:
    """The app's new incident, once it is closed."""
    def closed():
        new = [i for i in reports.incidents(stack.settings, 20, APP) if i["id"] not in before]
        return new[0] if new and new[0]["status"] != "open" else None
    return wait_for("an incident of legacy-api closed", closed, 90,
                    lambda: reports.incidents(stack.settings, 3, APP))


def app_process(dockerd) -> int:
    """The host pid of the app's own process (the child of the container's init)."""
    init = docker_json(dockerd, "inspect", APP)[0]["State"]["Pid"]
    children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
    return int(children[0])


def test_adopting_a_missing_container_is_refused_with_the_reason_and_logged(stack):
    out = stack.cicd("adopt", "no-such-box", "--app", "ghost-api", check=False)
    assert out.returncode == 2 and "no such container" in out.stderr, out.stderr
    refused = [r for r in stack.events("ADOPTION_REFUSED") if r["app"] == "ghost-api"]
    assert refused and refused[-1]["payload"]["refusals"][0]["field"] == "containers"


def test_an_adopted_container_is_probed_by_its_own_health_check(stack, legacy, dockerd):
    wait_for("legacy-api healthy by Docker", lambda: docker_json(dockerd, "inspect", APP)[0]["State"]
             .get("Health", {}).get("Status") == "healthy")
    out = stack.cicd("adopt", APP)
    assert f"adopted {APP} as {APP} in stage (probe: docker health check)" in out.stdout, out.stdout
    stack.wait_steady(APP)
    adopted = [r for r in stack.events("APP_ADOPTED") if r["app"] == APP][0]["payload"]
    assert adopted["container_ids"] == [docker_json(dockerd, "inspect", APP)[0]["Id"]]


def test_an_unhealthy_container_that_docker_leaves_alone_is_restarted_in_place(stack, legacy, dockerd):
    before_state = docker_json(dockerd, "inspect", APP)[0]
    incidents_before = {i["id"] for i in reports.incidents(stack.settings, 50, APP)}
    # The app's process stops answering (SIGSTOP, from the host): the container runs on, its
    # health check fails, Docker marks it unhealthy and does nothing more.
    os.kill(app_process(dockerd), signal.SIGSTOP)
    incident = healed_incident(stack, incidents_before)
    assert incident["status"] == "stable" and incident["action"] == "restart_service", incident
    events = stack.events(incident_id=incident["id"])
    detected = events[0]["payload"]["signal"]
    assert detected["kind"] == "replica_unhealthy", detected
    executed = [r for r in events if r["event_name"] == "ORCH_EXEC"][0]["payload"]
    assert executed["result"]["in_place"] is True, executed
    after = docker_json(dockerd, "inspect", APP)[0]
    assert after["Id"] == before_state["Id"]                                # the same container,
    assert after["State"]["StartedAt"] != before_state["State"]["StartedAt"]  # started again
    wait_for("legacy-api healthy by Docker again",
             lambda: docker_json(dockerd, "inspect", APP)[0]["State"]["Health"]["Status"] == "healthy")
    stack.wait_steady(APP)


def test_a_killed_adopted_container_is_seen_at_once_and_started_again(stack, legacy, dockerd):
    before_id = docker_json(dockerd, "inspect", APP)[0]["Id"]
    incidents_before = {i["id"] for i in reports.incidents(stack.settings, 50, APP)}
    dockerd.docker("kill", APP)   # SIGKILL; it has no restart policy, so Docker leaves it exited
    incident = healed_incident(stack, incidents_before)
    assert incident["status"] == "stable" and incident["action"] == "restart_service", incident
    detected = stack.events(incident_id=incident["id"])[0]["payload"]["signal"]
    assert detected["kind"] == "replica_down" and f"container {APP}" in detected["detail"], detected
    state = docker_json(dockerd, "inspect", APP)[0]
    assert state["Id"] == before_id and state["State"]["Running"]
    stack.wait_steady(APP)


def test_the_proof_chain_verifies_and_removing_the_app_leaves_its_container_running(stack, legacy, dockerd):
    assert stack.cicd("proof", "verify").returncode == 0
    stack.cicd("remove", APP, "--yes")
    assert docker_json(dockerd, "inspect", APP)[0]["State"]["Running"]
    assert APP not in stack.runtime.apps()
