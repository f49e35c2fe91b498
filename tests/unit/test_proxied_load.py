"""The load clients of the zero-downtime test and bench (tests/proxied.py) count what they claim:
in-flight requests at an instant, failures, and resets apart only behind the proxy. Against a real
HTTP server in this process, no mocks."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.proxied import Load


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.server.drop:  # closes without an answer, as Caddy's old listener does at a reload
            self.close_connection = True
            return
        time.sleep(0.2)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.drop = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_requests_in_flight_at_an_instant_are_those_started_before_and_ended_after(server):
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with Load(url, clients=2, proxied=False) as load:
        time.sleep(0.1)
        instant = time.monotonic()
        time.sleep(0.5)
    assert load.in_flight_at(instant) == (2, 0)
    assert load.in_flight_at(time.monotonic() + 10) == (0, 0)
    assert load.counts["warm-up"]["sent"] >= 4 and load.counts["warm-up"]["failed"] == 0


def test_a_dropped_connection_is_a_reset_behind_the_proxy_and_a_failure_on_a_replica_port(server):
    server.drop = True
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with Load(url, clients=1, proxied=True) as behind, Load(url, clients=1, proxied=False) as direct:
        with behind.during("op", settle_s=0.2), direct.during("op", settle_s=0.2):
            pass
    assert behind.counts["op"]["reset"] > 0 and behind.counts["op"]["failed"] == 0
    assert direct.counts["op"]["failed"] > 0 and direct.counts["op"]["reset"] == 0


def test_a_refused_port_fails_and_the_client_backs_off_instead_of_spinning(server):
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with Load(f"http://127.0.0.1:{port}", clients=1, proxied=True, work_ms=20) as load:
        time.sleep(0.5)
    entry = load.counts["warm-up"]
    assert entry["failed"] == entry["sent"] > 0 and entry["reset"] == 0
    assert entry["sent"] <= 0.5 / 0.02 + 2  # one try per 20 ms at most
