"""`cicd inject overload`'s load generator: the ramp (a pure function, driven here by a model of a
queueing server), what it requests, and the real process against real HTTP servers in this
process: one that queues (one request at a time), one that never does."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cicd.runtime import loadgen
from cicd.runtime.base import RuntimeFailure
from cicd.runtime.local import SAMPLE_WORK_PATH, load_path

LOADGEN = Path(loadgen.__file__)


def queue_load(clients: int, slots: int, service_ms: float, timeout_ms: float) -> float:
    """What a probe measures of a server with `slots` workers each taking service_ms, under a
    closed loop of `clients`: it waits its turn behind them."""
    return max(service_ms, clients * service_ms / slots) / timeout_ms


def ramp(measure, start: int = 2, threshold: float = 0.75, max_clients: int = 64) -> tuple[int, dict]:
    low, high = loadgen.band(threshold)
    tried, clients = {}, start
    while True:
        tried[clients] = measure(clients)
        clients, hold = loadgen.next_clients(tried, clients, low, high, max_clients)
        if hold:
            return clients, tried


def test_the_band_is_over_the_threshold_and_a_scale_from_two_to_three_brings_it_under():
    low, high = loadgen.band(0.75)
    assert (round(low, 3), round(high, 3)) == (0.775, 0.85)
    assert high * 2 / 3 < 0.75 and high < 1.0


@pytest.mark.parametrize("workers, service_ms", [(1, 100), (1, 50), (2, 100), (4, 50), (1, 20), (3, 200)])
def test_the_ramp_overloads_two_queueing_replicas_and_the_same_clients_on_three_are_not(workers, service_ms):
    clients, tried = ramp(lambda c: queue_load(c, 2 * workers, service_ms, 500))
    assert 0.75 < queue_load(clients, 2 * workers, service_ms, 500) < 1.0, tried
    assert queue_load(clients, 3 * workers, service_ms, 500) < 0.75, tried
    assert len(tried) <= 6, tried


def test_the_ramp_at_most_doubles_from_under_saturation():
    low, high = loadgen.band(0.75)
    assert loadgen.next_clients({4: 0.01}, 4, low, high, 64) == (8, False)
    assert loadgen.next_clients({4: 0.65}, 4, low, high, 64) == (5, False)  # proportional: 4 * 0.8125 / 0.65


def test_an_overshoot_comes_back_down_and_never_below_one():
    low, high = loadgen.band(0.75)
    assert loadgen.next_clients({20: 1.7}, 20, low, high, 64) == (10, False)
    assert loadgen.next_clients({1: 3.0}, 1, low, high, 64) == (1, True)


def test_between_a_count_under_the_band_and_one_over_it_holds_the_one_over():
    low, high = loadgen.band(0.75)
    assert loadgen.next_clients({8: 0.7, 9: 0.95}, 9, low, high, 64) == (9, True)
    assert loadgen.next_clients({7: 0.875, 6: 0.75}, 6, low, high, 64) == (7, True)  # the sample service's 8 slots
    # One that times out the probes is no better than one under the band: the nearest then.
    assert loadgen.next_clients({6: 0.7, 8: 1.05}, 8, low, high, 64) == (6, True)


def test_a_server_that_never_queues_ends_at_the_cap_under_the_threshold():
    clients, tried = ramp(lambda c: 0.05, max_clients=40)
    assert clients == 40 and tried[40] < 0.75
    assert sorted(tried) == [2, 4, 8, 16, 32, 40]


def test_a_sample_is_the_most_of_reported_utilization_and_latency_over_the_timeout():
    assert loadgen.sample_load(250, 0.0, 0.5) == 0.5
    assert loadgen.sample_load(5, 0.9, 0.5) == 0.9
    assert loadgen.reported_utilization(b'{"utilization": 0.4, "capacity": 4}') == 0.4
    assert loadgen.reported_utilization(b"hello from flask") == 0.0
    assert loadgen.reported_utilization(b"[1]") == 0.0


def test_the_path_is_the_option_else_work_on_an_app_with_capacity_else_its_health_path():
    assert load_path("/slow?x=1", 8, "/health") == "/slow?x=1"
    assert load_path(None, 8, "/health") == SAMPLE_WORK_PATH
    assert load_path(None, 0, "/healthz") == "/healthz"
    assert load_path(None, 0, "") == "/"
    for bad in ("slow", "/a b", "/a\nb"):
        with pytest.raises(RuntimeFailure, match=r"overload --path .*: must start with /"):
            load_path(bad, 0, "/")


# -- the real process --------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served = 0

    def do_GET(self):
        Handler.served += 1
        if self.server.one_at_a_time:  # a sync worker: every request, health too, waits its turn
            with self.server.worker:
                time.sleep(0.02)
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    servers = []

    def start(one_at_a_time: bool):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.one_at_a_time, httpd.worker = one_at_a_time, threading.Lock()
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def run_loadgen(tmp_path, url: str, *args: str) -> tuple[dict, str]:
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-I", "-S", str(LOADGEN), "--url", url, "--path", "/slow",
                          "--probe-path", "/", "--probe-timeout", "0.4", "--settle", "0.3", "--duration", "0",
                          "--report", str(report), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(report.read_text()), out.stdout


def test_it_ramps_until_a_queueing_server_is_overloaded_then_holds(tmp_path, server):
    report, log = run_loadgen(tmp_path, server(one_at_a_time=True))
    assert report["overloaded"] is True and report["load"] > 0.75, log
    assert report["clients"] > 2 and report["steps"] >= 2, log
    assert "ramp: 2 clients" in log and f"holding: {report['clients']} clients" in log


def test_it_says_when_it_cannot_overload_a_server_that_never_queues(tmp_path, server):
    report, log = run_loadgen(tmp_path, server(one_at_a_time=False), "--max-clients", "4")
    assert report["overloaded"] is False and report["clients"] == 4, log
    assert report["why"].startswith("could not overload it with 4 clients: p50 "), report
    assert "holding anyway" in log


def test_a_scale_during_the_ramp_ends_it_holding_the_count_that_overloaded(tmp_path, server):
    """No proxy: the replicas' ports from the state file. A second replica appears there while
    the first step settles (30 s: it cannot end first), as a scale-out by the healing chain would."""
    first, second = server(one_at_a_time=True), server(one_at_a_time=True)
    state = tmp_path / "state.json"

    def write_state(*urls):
        replicas = {str(i): {"slot": i, "port": int(u.rsplit(":", 1)[1])} for i, u in enumerate(urls)}
        state.write_text(json.dumps({"replicas": replicas}))

    write_state(first)
    Handler.served = 0
    report = tmp_path / "report.json"
    loader = subprocess.Popen([sys.executable, "-I", "-S", str(LOADGEN), "--state", str(state), "--path", "/slow",
                               "--start-clients", "3", "--settle", "30", "--duration", "0", "--report", str(report)],
                              stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not Handler.served and time.monotonic() < deadline:
            time.sleep(0.05)
        write_state(first, second)
        log, _ = loader.communicate(timeout=60)
    finally:
        loader.kill()
    outcome = json.loads(report.read_text())
    assert outcome["scaled_during_ramp"] is True and outcome["overloaded"] is True, log
    assert outcome["clients"] == 3 and outcome["steps"] == 1, log
    assert "ramp: scaled from 1 replicas at 3 clients" in log
