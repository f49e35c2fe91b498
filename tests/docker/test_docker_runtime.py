"""The Docker runtime passes the local runtime's healing scenarios: the whole stack (`cicd up`:
Redis, Caddy, the agents, beat, the exit watcher on the daemon's events) with CICD_RUNTIME=docker,
the sample service built into an image from its git repo by the buildpack template, its replicas
containers, and each fault real: SIGKILL to a container, `docker pause`, real load through the
stable endpoint, a broken revision, a release that dies after its gate."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest

from cicd.runtime.docker import DockerRuntime, image_of
from cicd.store import reports

APP = "box-api"
CHAIN = ["INCIDENT_DETECTED", "RL_CONSUME", "RL_DECISION", "RL_INTAKE_VALIDATED", "EXECUTION_GATE_PASSED",
         "ORCH_EXEC", "SYSTEM_STABLE", "RL_UPDATE"]


def containers(dockerd, app: str = APP) -> list[dict]:
    """The running containers of the app's replicas, as the daemon lists them."""
    out = dockerd.docker("ps", "--filter", f"label=cicd.app={app}", "--filter", "label=cicd.slot",
                         "--format", "{{json .}}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def image_id(dockerd, name: str) -> str:
    return dockerd.docker("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()


def by_slot(stack) -> dict[int, str]:
    return {r["slot"]: r["container"] for r in stack.runtime.replicas(APP)}


def run_fault(stack, kind: str, *extra: str) -> dict:
    stack.wait_steady(APP)
    out = stack.cicd("inject", kind, APP, "--wait", "--timeout", "90", *extra)
    incident_id = re.search(r"(inc-[0-9a-f]{12}) ", out.stdout).group(1)
    incident = [i for i in reports.incidents(stack.settings, 50) if i["id"] == incident_id][0]
    return {"incident": incident, "events": stack.events(incident_id=incident_id), "stdout": out.stdout}


@pytest.fixture(scope="module", autouse=True)
def onboarded(stack):
    stack.onboard(APP)


def test_the_app_is_built_into_an_image_and_runs_as_labelled_containers_behind_its_stable_url(stack, dockerd):
    assert isinstance(stack.runtime, DockerRuntime)
    live = reports.latest_release(stack.settings, APP, status="live")["release"]
    running = containers(dockerd)
    assert len(running) == 2, running
    for container in running:
        labels = dict(pair.split("=", 1) for pair in container["Labels"].split(","))
        assert labels["cicd.env"] == "stage" and labels["cicd.release"] == str(live)
        assert container["Image"] == image_of(stack.settings, APP, live)
    assert {c["ID"] for c in running} == {cid[:12] for cid in by_slot(stack).values()}
    logs = stack.cicd("logs", APP, "-n", "200")
    assert "build-1 | --> building image cicd-heal/stage-box-api:1" in logs.stdout, logs.stdout
    assert "docker logs -f cicd-stage-box-api-r1-s" in logs.stderr, logs.stderr
    url = stack.runtime.endpoint(APP)
    with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
        assert answer.status == 200 and json.loads(answer.read())["status"] == "ok"


def test_a_killed_container_is_seen_by_the_event_stream_and_replaced_by_a_restart(stack, dockerd):
    before = by_slot(stack)
    result = run_fault(stack, "crash")
    assert "stable; time to recover" in result["stdout"], result["stdout"]
    assert result["incident"]["kind"] == "crash" and result["incident"]["action"] == "restart_service"
    assert [r["event_name"] for r in result["events"]] == CHAIN
    detected = result["events"][0]["payload"]["signal"]
    # The watcher's signal (the daemon's `die` event) names the container; a probe's would not.
    assert detected["kind"] == "replica_down" and "container cicd-stage-box-api-" in detected["detail"], detected
    after = by_slot(stack)
    assert after[0] != before[0] and after[1] == before[1]
    assert len(containers(dockerd)) == 2
    assert all(s.healthy for s in stack.runtime.probe([APP])[APP])


def test_a_paused_container_is_a_hang_and_is_replaced(stack, dockerd):
    before = by_slot(stack)
    result = run_fault(stack, "hang", "--slot", "1")
    assert "stable; time to recover" in result["stdout"], result["stdout"]
    detected = result["events"][0]["payload"]
    assert detected["signal"]["kind"] == "replica_hung" and detected["context"]["cause"] == "hang"
    after = by_slot(stack)
    assert after[1] != before[1] and after[0] == before[0]
    states = {c["ID"]: c["State"] for c in containers(dockerd)}
    assert len(states) == 2 and set(states.values()) == {"running"}, states   # the paused one is gone


def test_an_overload_through_the_stable_url_is_healed_by_more_containers(stack, dockerd):
    try:
        result = run_fault(stack, "overload", "--duration", "40")
        assert "stable; time to recover" in result["stdout"], result["stdout"]
        decision = [r for r in result["events"] if r["event_name"] == "RL_DECISION"][0]["payload"]
        assert result["incident"]["kind"] == "overload" and decision["action"] == "scale_workers"
        assert len(containers(dockerd)) == decision["params"]["replicas"] > 2
    finally:
        stack.runtime.stop_load(APP)
    # Back to two, for the deploy scenarios.
    stack.cicd("scale", APP, "2")
    stack.wait_steady(APP)
    assert len(containers(dockerd)) == 2


def test_a_broken_revision_fails_its_image_build_and_is_rolled_back(stack, dockerd):
    serving = reports.latest_release(stack.settings, APP, status="live")["release"]
    running = {c["ID"] for c in containers(dockerd)}
    out = stack.cicd("inject", "failed-deploy", APP, "--wait", "--timeout", "120")
    assert "failed_deploy -> rollback_deployment: stable" in out.stdout, out.stdout
    assert reports.latest_release(stack.settings, APP, status="live")["release"] == serving
    assert {c["ID"] for c in containers(dockerd)} == running   # the live containers were never touched
    names = [r["event_name"] for r in stack.events() if r["app"] == APP]
    assert "BUILD_FAILED" in names and "ROLLBACK" in names


def test_a_release_that_dies_after_its_gate_is_rolled_back_to_the_previous_image(stack, dockerd):
    good = reports.latest_release(stack.settings, APP, status="live")
    good_image = image_id(dockerd, image_of(stack.settings, APP, good["release"]))
    out = stack.cicd("inject", "bad-release", APP, "--wait", "--timeout", "120")
    assert "crash -> rollback_deployment: stable" in out.stdout, out.stdout
    live = reports.latest_release(stack.settings, APP, status="live")
    assert live["kind"] == "rollback" and live["sha"] == good["sha"]
    stack.wait_steady(APP)
    # The rollback runs the good release's image itself (same source: taken, not built again).
    assert image_id(dockerd, image_of(stack.settings, APP, live["release"])) == good_image
    build_log = stack.runtime.app_dir(APP) / "logs" / f"build-{live['release']}.log"
    assert "taken as it is, no build" in build_log.read_text()
    assert {image_id(dockerd, c["Image"]) for c in containers(dockerd)} == {good_image}
    assert len(containers(dockerd)) == 2


def test_removing_the_app_removes_its_containers_and_images(stack, dockerd):
    stack.cicd("remove", APP, "--yes")
    assert containers(dockerd) == []
    images = dockerd.docker("images", "--format", "{{.Repository}}", f"cicd-heal/stage-{APP}").stdout.split()
    assert images == []
