"""Host agents, without a broker: the routing rule, placement in the registry, the control plane's
network view of a placed app, and the orchestrator handing a placed app's action to its host
(claimed and gated here, run there once). The two-machine run is tests/integration/test_hosts.py."""
from __future__ import annotations

import http.server
import json
import threading
import time
from datetime import timedelta

import pytest

import celeryconfig
from cicd.config import ConfigError, Settings, signing_key
from cicd.core.clock import ManualClock
from cicd.delivery import onboarding
from cicd.healing import detector, learning, orchestrator, policy
from cicd.runtime import RuntimeFailure, make_runtime, process
from cicd.runtime.hosts import HostRuntime, PlacedRuntime, published_view
from cicd.runtime.sim import SimRuntime
from cicd.store import Release, placements, proof, session_scope

from .test_celeryconfig import registered_tasks
from .test_removal import crash_signal

APP = learning.APP
REPO = "https://sim.invalid/sim-app.git"


def test_a_task_sent_with_a_host_goes_to_that_hosts_queue(tmp_path):
    (route,) = celeryconfig.celery_config(Settings(env="stage", home=tmp_path), "")["task_routes"]
    assert route("cicd.host.act", (), {"env": "prod", "host": "web-2"}, {}) == {"queue": "prod.host.web-2"}
    assert route("cicd.deploy.release", (), {"env": "stage", "host": "b"}, {}) == {"queue": "stage.host.b"}
    # Without one, a task goes to its agent's queue, as before.
    assert route("cicd.deploy.release", (), {"env": "stage"}, {}) == {"queue": "stage.deploy"}
    assert route("cicd.deploy.release", (), {"env": "stage", "host": None}, {}) == {"queue": "stage.deploy"}


def test_a_host_agent_loads_its_tasks_and_the_deploy_agents_and_keeps_its_own_unacked_keys(tmp_path):
    config = celeryconfig.celery_config(Settings(env="stage", home=tmp_path, host_name="b"), "host")
    assert config["imports"] == ("workers.host", "workers.deploy")
    assert config["broker_transport_options"]["unacked_key"] == "unacked:host.b"
    assert config["task_time_limit"] == 600  # it builds releases
    tasks = registered_tasks(tmp_path, CICD_AGENT="host", CICD_HOST_NAME="b")
    assert {"cicd.host.act", "cicd.host.inject", "cicd.deploy.release", "cicd.deploy.health_gate"} <= set(tasks)
    assert all(name.startswith(("cicd.host.", "cicd.deploy.")) for name in tasks), tasks


def test_host_names_and_addresses_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("CICD_HOME", str(tmp_path))
    monkeypatch.setenv("CICD_HOST_NAME", "Web_2")
    with pytest.raises(ConfigError, match="CICD_HOST_NAME 'Web_2'"):
        Settings.load()
    monkeypatch.setenv("CICD_HOST_NAME", "web-2")
    monkeypatch.setenv("CICD_HOST_ADDRESS", "web-2.local")
    with pytest.raises(ConfigError, match="must be an IP address"):
        Settings.load()
    monkeypatch.setenv("CICD_HOST_ADDRESS", "10.0.0.2")
    settings = Settings.load()
    assert (settings.host_name, settings.host_address, settings.host_queue("web-2")) == \
        ("web-2", "10.0.0.2", "stage.host.web-2")
    assert isinstance(make_runtime(settings), HostRuntime)
    assert isinstance(make_runtime(Settings(env="stage", home=tmp_path)), PlacedRuntime)


def test_placement_is_in_the_spec_the_registry_exports(tmp_path):
    settings = Settings(env="stage", home=tmp_path)
    assert onboarding.register(settings, "placed-api", REPO, "backend", host="web-2")["ok"]
    exported = json.loads((settings.registry_dir / "placed-api.json").read_text())
    assert exported["host"] == "web-2"
    assert placements.host_of(settings, "placed-api") == "web-2"
    assert placements.elsewhere(settings, "placed-api") == "web-2"
    assert placements.elsewhere(Settings(env="stage", home=tmp_path, host_name="web-2"), "placed-api") == ""
    assert "host" not in onboarding.register(settings, "local-api", REPO, "backend")["spec"]
    refused = onboarding.register(settings, "bad-api", REPO, "backend", host="Web 2")
    assert not refused["ok"] and refused["refusals"][0]["field"] == "host"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok", "utilization": 0.25, "capacity": 4}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def answering_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_the_control_plane_probes_a_placed_app_over_the_network_and_does_not_act_on_it(tmp_path, answering_port):
    host = Settings(env="stage", home=tmp_path / "b", host_name="b", host_address="127.0.0.1",
                    database_url_override=f"sqlite:///{tmp_path / 'shared.db'}")
    plane = Settings(env="stage", home=tmp_path / "a", database_url_override=f"sqlite:///{tmp_path / 'shared.db'}")
    closed = process.free_port()
    long_ago = time.time() - 3600
    state = {"app": APP, "live": 3, "replicas": {
        "0": {"slot": 0, "pid": 11, "ticks": 1, "port": answering_port, "release": 3, "started_at": long_ago,
              "health_path": "/health", "memory_limit_mb": 256, "log": "not published"},
        "1": {"slot": 1, "pid": 12, "ticks": 1, "port": closed, "release": 3, "started_at": long_ago,
              "health_path": "/health", "memory_limit_mb": 256}}}
    # The host publishes what it writes (its state file is no one else's to read).
    on_host = HostRuntime(host)
    on_host.app_dir(APP).mkdir(parents=True)
    on_host._write(APP, state)
    assert published_view(state)[1][0].get("log") is None
    where = placements.placed(plane, [APP])[APP]
    assert (where["host"], where["address"], where["live"], len(where["replicas"])) == ("b", "127.0.0.1", 3, 2)

    runtime = PlacedRuntime(plane)
    statuses = runtime.probe([APP])[APP]
    assert [(s.slot, s.status, s.utilization, s.capacity) for s in statuses] == [(0, "ok", 0.25, 4),
                                                                                (1, "refused", 0.0, 0)]
    assert (runtime.replica_count(APP), runtime.live_release(APP)) == (2, 3)
    # A replica that is young is starting, not gone: the same grace as on its own machine.
    state["replicas"]["1"]["started_at"] = time.time()
    on_host._write(APP, state)
    assert [s.status for s in runtime.probe([APP])[APP]] == ["ok", "starting"]
    with pytest.raises(RuntimeFailure, match=r"runs on host b: its restart is that host agent's \(queue stage.host.b\)"):
        runtime.restart(APP, [1], op_key="x/1")
    assert not (plane.apps_dir / APP).exists()
    # An app nobody placed is probed as before: nothing of it here, nothing found.
    assert runtime.probe(["other-app"]) == {"other-app": []}


@pytest.fixture
def placed_app(tmp_path):
    settings = Settings(env="stage", home=tmp_path, clock=ManualClock(learning.SIM_START))
    signing_key(settings, create=True)
    assert onboarding.register(settings, APP, REPO, "backend", host="b")["ok"]
    long_ago = settings.clock.now() - timedelta(days=30)
    with session_scope(settings) as session:
        session.add(Release(env=settings.env, app=APP, number=1, status="live", ref="main", sha="1" * 40,
                            replicas=2, request_id="seed-1", started_at=long_ago, finished_at=long_ago))
    fleet = SimRuntime(settings, seed=3)
    fleet.add_app(onboarding.generate_spec(APP, REPO, "backend", settings.env, host="b"))
    return settings, fleet


def events(settings, name):
    return [r for r in proof.records_since(settings, 0) if r["event_name"] == name]


def test_a_placed_apps_restart_is_claimed_here_and_run_once_by_its_hosts_agent(placed_app):
    settings, fleet = placed_app
    incident_id = detector.open_incident(settings, crash_signal(settings, fleet))["incident_id"]
    decision = policy.decide(settings, incident_id, 1)
    assert decision["action"] == "restart_service"
    restarts = []
    real_restart = fleet.restart
    fleet.restart = lambda app, slots, op_key: restarts.append(op_key) or real_restart(app, slots, op_key)

    execution = orchestrator.execute(settings, fleet, decision, fleet.request_deploy)
    assert (execution["status"], execution["host"]) == ("started", "b")
    assert restarts == [] and events(settings, "ORCH_EXEC") == []
    [dispatched] = events(settings, "HOST_DISPATCHED")
    assert dispatched["payload"] == {"attempt": 1, "action": "restart_service", "host": "b", "queue": "stage.host.b"}

    on_host = Settings(env="stage", home=settings.home, host_name="b", clock=settings.clock)
    done = orchestrator.act_dispatched(on_host, fleet, incident_id, 1, fleet.request_deploy)
    assert done["status"] == "done" and restarts == [f"{incident_id}/1"]
    [executed] = events(settings, "ORCH_EXEC")
    assert executed["payload"]["host"] == "b"
    # Delivered again (at least once): reported as it is, nothing done twice.
    again = orchestrator.act_dispatched(on_host, fleet, incident_id, 1, fleet.request_deploy)
    assert again["deduplicated"] and restarts == [f"{incident_id}/1"] and len(events(settings, "ORCH_EXEC")) == 1
    assert orchestrator.act_dispatched(on_host, fleet, "inc-000000000000", 1, fleet.request_deploy) is None
    # On the host itself, the app is its own: the orchestrator there would act, not dispatch.
    assert orchestrator.execute(on_host, fleet, decision, fleet.request_deploy)["deduplicated"]
    assert proof.verify(settings).ok
