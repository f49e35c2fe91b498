"""Flower, started by `cicd up --flower`: it sees every agent and the healing chain's tasks through
its HTTP API, refuses anyone without the credentials, never shows the password, comes back when
killed, keeps its state across a restart, and `cicd down` stops it.

A stack of its own (started as the suite's is, plus --flower-port): the tests here stop and kill
Flower and end with `cicd down`, which must not touch the stack the other modules share.
"""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from cicd.stack import cluster
from cicd.config import AGENTS
from cicd.runtime import process

from .conftest import started_stack

pytestmark = pytest.mark.integration

APP = "flower-api"
HEALING_TASKS = ["cicd.detect.classify", "cicd.decide.choose", "cicd.orchestrate.execute", "cicd.monitor.verify",
                 "cicd.decide.learn"]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


@pytest.fixture(scope="module")
def fstack(tmp_path_factory):
    port = process.free_port()
    with started_stack(tmp_path_factory.mktemp("flower-stack"), "--flower-port", str(port)) as running:
        yield running


def flower_entry(stack) -> dict:
    return cluster.read_stack(stack.settings)["flower"]


def password(stack) -> str:
    return (stack.home / "var" / "flower" / "password").read_text().strip()


def get(stack, path: str, auth: tuple[str, str] | None = None, method: str = "GET") -> tuple[int, object]:
    """(status, parsed JSON or text) of a request to the stack's Flower."""
    request = urllib.request.Request(flower_entry(stack)["url"] + path.lstrip("/"), method=method)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with _OPENER.open(request, timeout=10) as response:
            body = response.read().decode()
            return response.status, (json.loads(body) if body[:1] in "{[" else body)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def api(stack, path: str) -> object:
    status, body = get(stack, path, ("admin", password(stack)))
    assert status == 200, (path, status, body)
    return body


def wait_for(check, timeout: float, what: str, seen=lambda: None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not within {timeout} s; seen: {seen()}"
        time.sleep(0.3)


def chains(stack) -> dict[str, dict]:
    """The healing tasks in Flower's task list, by chain (root id): each task's state by name, and the
    incidents their arguments name."""
    found: dict[str, dict] = {}
    for name in HEALING_TASKS:
        for task in api(stack, f"/api/tasks?taskname={name}").values():
            chain = found.setdefault(task["root_id"], {"states": {}, "incidents": set(), "workers": {}})
            chain["states"][name] = task["state"]
            chain["workers"][name] = task["worker"]
            chain["incidents"].update(re.findall(r"inc-[0-9a-f]{12}", task["args"] + task["kwargs"]))
    return found


def heal_a_crash(stack) -> tuple[str, str, dict]:
    """Crash the app, wait until it is stable again; then (incident, its chain's root id, the chain)
    once Flower shows all five healing tasks of that incident succeeded."""
    stack.onboard(APP)
    out = stack.cicd("inject", "crash", APP, "--wait", "--timeout", "60")
    assert "stable; time to recover" in out.stdout, out.stdout
    incident = re.search(r"(inc-[0-9a-f]{12}) ", out.stdout).group(1)
    every_task_done = {name: "SUCCESS" for name in HEALING_TASKS}

    def chain_of_incident():
        return [(root, chain) for root, chain in chains(stack).items()
                if incident in chain["incidents"] and chain["states"] == every_task_done]
    root, chain = wait_for(chain_of_incident, 20, f"the five healing tasks of {incident}, succeeded, in one chain",
                           lambda: chains(stack))[0]
    return incident, root, chain


def test_every_agent_queue_has_a_live_worker_in_flower(fstack):
    asked = {}

    def consumers_of_every_queue():
        # Asks every worker (inspect), not Flower's memory; a busy worker may answer after Flower's
        # inspect timeout, so ask again until each queue has a consumer (or the wait runs out).
        asked["workers"] = api(fstack, "/api/workers?refresh=1")
        found = {f"stage.{agent}": [node for node, info in asked["workers"].items()
                                    if f"stage.{agent}" in [q["name"] for q in info.get("active_queues") or []]]
                 for agent in AGENTS}
        return found if all(found.values()) else None
    consuming = wait_for(consumers_of_every_queue, 30, "a worker consuming each agent queue",
                         lambda: sorted(asked.get("workers") or ()))

    def live_on_every_queue():
        # Alive as Flower judges it: the worker's heartbeat events keep coming (every 2 s).
        alive = api(fstack, "/api/workers?status=1")
        return all(any(alive.get(node) is True for node in nodes) for nodes in consuming.values())
    wait_for(live_on_every_queue, 20, f"a live worker on each of {sorted(consuming)}")


def test_an_incidents_healing_tasks_appear_in_flower_by_name(fstack):
    incident, root, chain = heal_a_crash(fstack)
    assert list(chain["states"]) == HEALING_TASKS
    # Each ran on a worker of its own agent: cicd.<agent>.<verb> on stage-<agent>-N@host.
    for name, worker in chain["workers"].items():
        assert worker.startswith(f"stage-{name.split('.')[1]}-"), (name, worker)


def test_flower_refuses_requests_without_the_credentials(fstack):
    for path in ("/api/workers", "/api/tasks", "/"):
        assert get(fstack, path)[0] == 401, path
        assert get(fstack, path, ("admin", "not-the-password"))[0] == 401, path
        assert get(fstack, path, ("someone", password(fstack)))[0] == 401, path
    # Read-only: with the credentials, still no way round the orchestrator's gates.
    node = sorted(api(fstack, "/api/workers?status=1"))[0]
    assert get(fstack, f"/api/worker/shutdown/{node}", ("admin", password(fstack)), method="POST")[0] == 403
    assert get(fstack, "/api/task/send-task/cicd.orchestrate.execute", ("admin", password(fstack)),
               method="POST")[0] == 403


def test_status_shows_flower_and_no_secret_shows_anywhere(fstack):
    entry = flower_entry(fstack)
    secret = password(fstack)
    assert len(secret) >= 24
    assert oct((fstack.home / "var" / "flower" / "password").stat().st_mode & 0o777) == "0o600"
    text = fstack.cicd("status").stdout
    assert f"flower: {entry['url']} alive (user admin, password in " in text, text
    state = json.loads(fstack.cicd("status", "--json").stdout)["stack"]["flower"]
    assert (state["url"], state["alive"], state["user"]) == (entry["url"], True, "admin")
    # No command line (every user can read them), no log, no output, no stack record holds it.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert secret.encode() not in open(f"/proc/{pid}/cmdline", "rb").read(), f"pid {pid}"
        except OSError:
            pass
    files = list((fstack.home / "logs").rglob("*")) + [fstack.home / "var" / "stack.json"]
    texts = [text, fstack.cicd("status", "--json").stdout] + [f.read_text(errors="replace") for f in files if f.is_file()]
    assert not any(secret in t for t in texts)


def test_the_supervisor_brings_a_killed_flower_back_on_its_port(fstack):
    dead = flower_entry(fstack)
    os.kill(dead["pid"], signal.SIGKILL)
    wait_for(lambda: flower_entry(fstack).get("pid") not in (None, dead["pid"]), 30, "a new Flower")
    entry = flower_entry(fstack)
    assert process.is_alive(entry["pid"], entry["ticks"]) and entry["port"] == dead["port"]
    # The same credentials work (api() asserts 200), and it sees every worker alive again. Only after
    # their next heartbeats: it answers before it has heard from any, so wait instead of asking once.
    nodes = [w["node"] for w in cluster.read_stack(fstack.settings)["envs"]["stage"]["workers"]]
    wait_for(lambda: all(api(fstack, "/api/workers?status=1").get(node) is True for node in nodes), 20,
             f"the new Flower to see {nodes} alive", lambda: api(fstack, "/api/workers?status=1"))
    state = json.loads(fstack.cicd("status", "--json").stdout)["stack"]
    assert state["restarts"]["flower"] >= 1 and state["flower"]["alive"]


def test_no_flower_stops_only_flower_and_its_state_survives(fstack):
    """--persistent: what Flower saw is saved when it stops and there again when it starts."""
    incident, root, _ = heal_a_crash(fstack)
    before = cluster.read_stack(fstack.settings)
    others = [(w["pid"], w["ticks"]) for w in before["envs"]["stage"]["workers"]]
    others += [(before[k]["pid"], before[k]["ticks"]) for k in ("redis", "supervisor")]
    others.append((before["envs"]["stage"]["beat"]["pid"], before["envs"]["stage"]["beat"]["ticks"]))
    out = fstack.cicd("up", "--no-flower").stdout
    assert f"stopped flower (pid {before['flower']['pid']})" in out
    assert not process.is_alive(before["flower"]["pid"], before["flower"]["ticks"])
    assert all(process.is_alive(pid, ticks) for pid, ticks in others)  # nothing else was touched
    assert json.loads(fstack.cicd("status", "--json").stdout)["stack"]["flower"] is None
    time.sleep(1.5)  # a supervisor round: it must not bring back a Flower stopped on purpose
    assert cluster.read_stack(fstack.settings)["flower"] == {"port": before["flower"]["port"]}

    fstack.cicd("up", "--flower")  # on the port it had
    assert flower_entry(fstack)["port"] == before["flower"]["port"]
    after = chains(fstack)  # loaded from var/flower/: these tasks ended before this Flower started
    assert root in after and incident in after[root]["incidents"], after


def test_cicd_down_stops_flower(fstack):
    """Last in this module: it stops the module's stack."""
    entry = flower_entry(fstack)
    out = fstack.cicd("down", "--apps").stdout
    assert "stopped flower" in out
    assert not process.is_alive(entry["pid"], entry["ticks"])
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", entry["port"]))  # nobody listens on Flower's port any more
    assert json.loads(fstack.cicd("status", "--json").stdout)["stack"]["flower"] is None
