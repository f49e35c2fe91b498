"""Stable endpoints: the JSON Caddy is given for an app, and the record that keeps each app's port."""
from __future__ import annotations

import json

from cicd.config import Settings
from cicd.runtime import endpoints
from cicd.runtime.endpoints import Endpoints, app_server, caddy_config, upstreams_of


def test_an_app_with_replicas_is_a_round_robin_proxy_with_retries_and_passive_health():
    server = app_server(8123, ["127.0.0.1:4001", "127.0.0.1:4002"])
    assert server["listen"] == ["127.0.0.1:8123"]  # loopback only
    assert server["automatic_https"] == {"disable": True}
    (route,) = server["routes"]
    (proxy,) = route["handle"]
    assert proxy["handler"] == "reverse_proxy"
    assert proxy["upstreams"] == [{"dial": "127.0.0.1:4001"}, {"dial": "127.0.0.1:4002"}]
    balancing = proxy["load_balancing"]
    assert balancing["selection_policy"] == {"policy": "round_robin"}
    assert balancing["try_duration"] == endpoints.TRY_DURATION and balancing["try_interval"]
    assert proxy["health_checks"]["passive"]["fail_duration"] == endpoints.FAIL_DURATION


def test_an_app_without_replicas_answers_503_instead_of_proxying_to_nothing():
    (handler,) = app_server(8123, [])["routes"][0]["handle"]
    assert handler["handler"] == "static_response" and handler["status_code"] == 503


def test_the_whole_config_keeps_the_admin_api_on_loopback_unpersisted_and_a_server_per_app():
    config = caddy_config("127.0.0.1:2999", {"b-app": {"port": 9002, "upstreams": ["127.0.0.1:1"]},
                                             "a-app": {"port": 9001, "upstreams": []}})
    assert config["admin"] == {"listen": "127.0.0.1:2999", "config": {"persist": False}}
    servers = config["apps"]["http"]["servers"]
    assert list(servers) == ["app-a-app", "app-b-app"]
    assert servers["app-b-app"]["listen"] == ["127.0.0.1:9002"]
    json.dumps(config)  # what goes over the admin API


def test_the_fault_listener_is_a_503_server_of_its_own_and_metrics_are_on():
    config = caddy_config("127.0.0.1:2999", {"shop": {"port": 9001, "upstreams": ["127.0.0.1:1"]}}, fault_port=9009)
    http = config["apps"]["http"]
    assert http["metrics"] == {}  # Caddy's figures on the admin API's /metrics
    fault = http["servers"][endpoints.FAULT_SERVER]
    assert fault["listen"] == ["127.0.0.1:9009"]
    assert fault["routes"][0]["handle"][0] | {"body": ""} == {"handler": "static_response", "status_code": 503,
                                                              "body": ""}
    assert endpoints.FAULT_SERVER not in caddy_config("127.0.0.1:2999", {})["apps"]["http"]["servers"]


def test_upstreams_follow_slot_order_and_skip_replicas_without_a_port():
    replicas = [{"slot": "2", "port": 7002}, {"slot": "0", "port": 7000}, {"slot": 1, "port": None}]
    assert upstreams_of(replicas) == ["127.0.0.1:7000", "127.0.0.1:7002"]


def test_an_app_keeps_its_port_across_publishes_and_frees_it_when_forgotten(tmp_path):
    record = Endpoints(Settings(env="stage", home=tmp_path))
    assert record.url("shop") is None and not record.proxied()
    assert record.publish("shop", ["127.0.0.1:7000"]) is None  # no Caddy: recorded only
    url = record.url("shop")
    assert url.startswith("http://127.0.0.1:")
    record.publish("shop", ["127.0.0.1:7001", "127.0.0.1:7002"])
    record.publish("cart", [])
    assert record.url("shop") == url  # stable
    assert record.url("cart") != url
    # A new reader (another worker, a restarted stack) sees the same.
    again = Endpoints(Settings(env="stage", home=tmp_path)).read()
    assert again["apps"]["shop"]["upstreams"] == ["127.0.0.1:7001", "127.0.0.1:7002"]
    record.forget("shop")
    assert record.url("shop") is None and record.url("cart")


def test_a_proxy_that_does_not_answer_is_reported_not_raised(tmp_path):
    record = Endpoints(Settings(env="stage", home=tmp_path))
    from cicd.runtime import process
    dead = f"127.0.0.1:{process.free_port()}"
    problem = record.attach(dead)
    assert problem and "refused" in problem.lower()
    assert record.publish("shop", ["127.0.0.1:7000"])  # still recorded, for the next push
    assert record.read()["apps"]["shop"]["upstreams"] == ["127.0.0.1:7000"]


def test_only_a_replica_still_running_is_drained_before_it_stops(tmp_path, monkeypatch):
    # Draining gives a replica's open requests time to finish behind the proxy; a crashed one has
    # none, so a crash restart must not wait for it.
    import os
    import sys
    import time
    from types import SimpleNamespace

    from cicd.runtime import local, process
    runtime = local.LocalRuntime(Settings(env="stage", home=tmp_path))
    monkeypatch.setattr(runtime.endpoints, "proxied", lambda: True)
    slept = []
    # Only the local runtime's own view of time: the real sleep stays for everything else.
    monkeypatch.setattr(local, "time", SimpleNamespace(sleep=slept.append, monotonic=time.monotonic, time=time.time))
    pid, ticks = process.spawn_detached([sys.executable, "-c", "import time; time.sleep(30)"], str(tmp_path),
                                        process.clean_env({}), str(tmp_path / "sleeper.log"), record_exit=False)
    try:
        running = {"slot": 0, "pid": pid, "ticks": ticks}
        gone = {"slot": 1, "pid": os.getpid(), "ticks": process.start_ticks(os.getpid()) + 1}  # not ours
        runtime._drain([gone])
        assert slept == []
        runtime._drain([gone, running])
        assert slept == [local.DRAIN_S]
    finally:
        process.kill(pid, ticks)
