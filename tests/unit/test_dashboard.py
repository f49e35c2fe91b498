"""The dashboard's server on a filled store, over real HTTP: the page and its headers, the JSON
API with clear 400s for bad parameters, /metrics, the event stream, and `cicd dashboard`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.ctrl_c import as_in_a_terminal
from cicd.web import dashboard
from cicd.store import proof
from cicd.config import Settings
from cicd.store import session_scope

from .filled_store import fill

CICD = Path(sys.executable).with_name("cicd")


@pytest.fixture
def settings(tmp_path):
    settings = Settings(env="stage", home=tmp_path, broker_url_override="redis://127.0.0.1:1/0")
    fill(settings)
    return settings


@pytest.fixture
def server(settings):
    server = dashboard.make_server(settings, "127.0.0.1", 0, stream_seconds=4.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def get(server, path: str, method: str = "GET", headers: dict | None = None):
    """(status, headers, body); an HTTP error status is an answer here, not an exception."""
    request = urllib.request.Request(server.url.rstrip("/") + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def get_json(server, path: str):
    status, headers, body = get(server, path)
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    return status, json.loads(body)


def test_the_page_and_its_files_are_served_with_a_strict_policy(server):
    status, headers, body = get(server, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<script src="/static/dashboard.js" defer></script>' in body
    policy = headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "unsafe-inline" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, headers, script = get(server, "/static/dashboard.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    # The page puts data in as text, never as markup (the browser test checks the outcome).
    assert b"innerHTML" not in script and b"insertAdjacentHTML" not in script and b"document.write" not in script
    assert get(server, "/static/dashboard.css")[0] == 200
    assert get(server, "/static/../setup.cfg")[0] == 404


def test_events_health_and_incidents_as_json(server):
    status, body = get_json(server, "/api/events?limit=2")
    assert status == 200 and [r["seq"] for r in body["events"]] == [32, 33] and body["env"] == "stage"
    assert [r["seq"] for r in get_json(server, "/api/events?after=30")[1]["events"]] == [31, 32, 33]
    assert len(get_json(server, "/api/events")[1]["events"]) == 33  # default 50: all of them
    apps = {a["app"]: a for a in get_json(server, "/api/health")[1]["apps"]}
    assert apps["web"]["uptime"] == 0.9 and apps["api"]["open_incident"] == "inc-d"
    status, body = get_json(server, "/api/incidents?app=web&limit=5")
    assert [i["id"] for i in body["incidents"]] == ["inc-c", "inc-a"]
    assert [g["verdict"] for g in body["incidents"][1]["chain"][0]["gates"]] == ["passed"] * 5
    status, body = get_json(server, "/api/policy")
    assert status == 200 and body["mode"] == "greedy" and len(body["states"]) == 36


@pytest.mark.parametrize("query, field, rule", [
    ("/api/events?limit=0", "limit", "must be a whole number from 1 to 1000, not 0"),
    ("/api/events?limit=1001", "limit", "must be a whole number from 1 to 1000, not 1001"),
    ("/api/events?limit=abc", "limit", "must be a whole number from 1 to 1000, not 'abc'"),
    ("/api/events?limit=-5", "limit", "must be a whole number from 1 to 1000, not '-5'"),
    ("/api/events?limit=", "limit", "must be a whole number from 1 to 1000, not ''"),
    ("/api/events?limit=%EF%BC%95", "limit", "must be a whole number from 1 to 1000, not '５'"),
    ("/api/events?limit=1&limit=2", "limit", "give it once"),
    ("/api/events?after=x", "after", "must be a proof sequence number (0 or more), not 'x'"),
    ("/api/events?count=5", "count", "unknown parameter (this takes limit, after)"),
    ("/api/incidents?limit=501", "limit", "must be a whole number from 1 to 500, not 501"),
    ("/api/incidents?app=" + "x" * 41, "app", f"must be an app name of 1 to 40 characters, not {'x' * 41!r}"),
    ("/api/health?verbose=1", "verbose", "unknown parameter (this takes no parameters)"),
])
def test_bad_parameters_get_a_400_naming_the_parameter_and_the_rule(server, query, field, rule):
    status, body = get_json(server, query)
    assert status == 400
    assert (body["field"], body["rule"], body["error"]) == (field, rule, f"{field}: {rule}")


def test_unknown_pages_and_other_methods(server):
    status, body = get_json(server, "/api/nope")
    assert status == 404 and "/api/health" in body["error"]
    status, headers, _ = get(server, "/api/events", method="POST")
    assert status == 405 and headers["Allow"] == "GET"


def test_metrics_in_prometheus_text_format(server):
    status, headers, body = get(server, "/metrics")
    assert status == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert 'cicd_incidents_total{env="stage",kind="crash",outcome="stable"} 2.0' in text
    assert 'cicd_broker_up{env="stage"} 0.0' in text


def read_stream(server, path: str, want: int, headers: dict | None = None) -> list[dict]:
    """The first `want` events of an SSE response, parsed (id, event, data)."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n{extra}\r\n".encode())
        reader = sock.makefile("rb")
        status = reader.readline().decode()
        assert status.split()[1] == "200", status
        head = {}
        for line in iter(reader.readline, b"\r\n"):
            name, _, value = line.decode().partition(":")
            head[name.strip().lower()] = value.strip()
        assert head["content-type"] == "text/event-stream; charset=utf-8"
        events, current = [], {}
        for raw in reader:
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in current:
                    events.append({**current, "data": json.loads(current["data"])})
                    if len(events) == want:
                        return events
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = value
    raise AssertionError(f"the stream ended after {len(events)} of {want} events")


def test_the_stream_sends_records_as_they_land_and_resumes_by_id(server, settings):
    first = read_stream(server, "/api/stream?after=31", 2)
    assert [(e["id"], e["event"], e["data"]["event_name"]) for e in first] == [
        ("32", "proof", "INTAKE_REFUSED"), ("33", "proof", "REFUSAL_EMIT_SUCCESS")]

    def append_later():
        time.sleep(0.6)
        with session_scope(settings) as session:
            proof.append(session, "stage", "DLQ_RETRIED", payload={"dead_letter": 7, "by": "test"})
    writer = threading.Thread(target=append_later)
    writer.start()
    # No `after`: from the head on, so only what lands while connected.
    [live] = read_stream(server, "/api/stream", 1)
    writer.join()
    assert (live["id"], live["data"]["event_name"], live["data"]["payload"]["dead_letter"]) == ("34", "DLQ_RETRIED", 7)
    # A browser reconnecting sends the last id it saw; that wins over the URL's `after`.
    [resumed] = read_stream(server, "/api/stream?after=0", 1, headers={"Last-Event-ID": "33"})
    assert resumed["id"] == "34"


def test_a_bad_last_event_id_is_a_400(server):
    status, headers, body = get(server, "/api/stream", headers={"Last-Event-ID": "abc"})
    assert status == 400 and json.loads(body)["field"] == "Last-Event-ID"


def test_no_environment_here_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(dashboard.DashboardError, match=r"no stage environment under .*: start it with `cicd up --env stage`"):
        dashboard.make_server(Settings(env="stage", home=tmp_path), "127.0.0.1", 0)
    assert not (tmp_path / "var").exists()  # and nothing was created while refusing


def test_a_port_in_use_is_a_clear_error(settings, server):
    port = server.server_address[1]
    with pytest.raises(dashboard.DashboardError, match=rf"cannot listen on 127.0.0.1:{port}: .*--port 0"):
        dashboard.make_server(settings, "127.0.0.1", port)


def run_cli(home, *args, timeout=30):
    env = {**os.environ, "CICD_HOME": str(home), "CICD_ENV": "stage"}
    return subprocess.run([str(CICD), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_help_lists_the_urls(tmp_path):
    out = run_cli(tmp_path, "dashboard", "--help")
    assert out.returncode == 0
    for text in ("--host", "127.0.0.1", "--port", "8088", "/api/health", "/api/events?limit=N", "/api/incidents",
                 "/metrics", "no login", "health and uptime", "severity against time", "gates", "heatmap", "live",
                 "cicd.api", "--port 0"):
        assert text in out.stdout, text


def test_cli_refuses_bad_options_and_a_missing_environment(tmp_path):
    out = run_cli(tmp_path, "dashboard", "--port", "70000")
    assert out.returncode == 2 and "70000 is not in the range 0<=x<=65535" in out.stderr
    out = run_cli(tmp_path, "dashboard", "--port", "0")
    assert out.returncode == 1 and "no stage environment under" in out.stderr and "cicd up --env stage" in out.stderr


@pytest.mark.parametrize("sigint", [True, False], ids=["ctrl-c", "sigterm"])
def test_cli_serves_until_interrupted(settings, sigint):
    env = {**os.environ, "CICD_HOME": str(settings.home), "CICD_ENV": "stage", "CICD_BROKER_URL": "redis://127.0.0.1:1/0"}
    process = subprocess.Popen([str(CICD), "dashboard", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, preexec_fn=as_in_a_terminal)
    try:
        line = process.stdout.readline()
        assert line.startswith("dashboard of stage: http://127.0.0.1:"), line
        url = line.split()[3]
        with urllib.request.urlopen(url + "api/events?limit=1", timeout=10) as response:
            assert json.loads(response.read())["events"][0]["seq"] == 33
    finally:
        process.send_signal(2 if sigint else 15)  # Ctrl-C, or a service manager
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0 and "dashboard stopped" in out, err
