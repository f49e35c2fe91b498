"""A tiny HTTP service for the demo and the tests: the thing cicd-heal keeps alive.

  GET  /health           {"status": "ok"|"degraded", "utilization": 0..1, "capacity": N, ...}
  GET  /work?ms=100      does 100 ms of (simulated I/O-bound) work in one of N worker slots
  POST /admin/blip?seconds=1.5   report "degraded" for a while, then recover by itself
  POST /admin/leak?mb_per_s=20&max_mb=768   grow resident memory at that rate, up to max_mb
  GET  /                 a greeting

Utilization is measured, not set: the share of slot-time spent on /work requests over the last
two seconds. Standard library only, so any Python can run it.

Two optional files next to this one make a revision misbehave on purpose (the example repo's
cicd-inject/* branches carry them): `startup_delay_s` (seconds to wait before listening: a
slow deploy) and `crash_after_s` (seconds after which the process dies: a bad release).
"""
import argparse
import json
import os
import signal
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

WINDOW_S = 2.0


class Meter:
    """Busy slot-time over a sliding window: completed intervals plus the ones still running."""

    def __init__(self, slots):
        self.slots = slots
        self.lock = threading.Lock()
        self.done = deque()
        self.running = {}

    def start(self, token):
        with self.lock:
            self.running[token] = time.monotonic()

    def finish(self, token):
        with self.lock:
            self.done.append((self.running.pop(token), time.monotonic()))

    def utilization(self):
        now = time.monotonic()
        since = now - WINDOW_S
        with self.lock:
            while self.done and self.done[0][1] < since:
                self.done.popleft()
            busy = sum(end - max(start, since) for start, end in self.done)
            busy += sum(now - max(start, since) for start in self.running.values())
        return min(1.0, busy / (WINDOW_S * self.slots))


class Service:
    def __init__(self, role, slots):
        self.role = role
        self.started = time.time()
        self.meter = Meter(slots)
        self.slots = threading.BoundedSemaphore(slots)
        self.degraded_until = 0.0
        self.leaked = []           # what a leak holds on to: never freed (until the process ends)
        self.leak_lock = threading.Lock()

    def leak(self, mb_per_s, max_mb):
        """Grow resident memory like a leak does: a little, often, never given back. Filled with
        bytes (not zeros) so the pages are really resident, not just reserved."""
        step_s = 0.1
        chunk = max(1, int(mb_per_s * step_s * 2**20))
        while True:
            with self.leak_lock:
                if sum(len(b) for b in self.leaked) + chunk > max_mb * 2**20:
                    return
                self.leaked.append(b"\x01" * chunk)
            time.sleep(step_s)


def make_handler(service):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path == "/health":
                degraded = time.monotonic() < service.degraded_until
                self._send(503 if degraded else 200, {
                    "status": "degraded" if degraded else "ok",
                    "utilization": round(service.meter.utilization(), 4),
                    "capacity": service.meter.slots,
                    "role": service.role,
                    "release": os.environ.get("CICD_RELEASE", ""),
                    "replica": os.environ.get("CICD_REPLICA", ""),
                    "pid": os.getpid(),
                    "uptime_s": round(time.time() - service.started, 3),
                })
            elif url.path == "/work":
                try:
                    ms = min(5000.0, max(0.0, float(parse_qs(url.query).get("ms", ["100"])[0])))
                except ValueError:
                    self._send(400, {"error": "ms: must be a number"})
                    return
                token = object()
                with service.slots:
                    service.meter.start(token)
                    try:
                        time.sleep(ms / 1000.0)
                    finally:
                        service.meter.finish(token)
                self._send(200, {"worked_ms": ms})
            elif url.path == "/":
                self._send(200, {"hello": f"from {service.role} replica {os.environ.get('CICD_REPLICA', '?')}"})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self):
            url = urlsplit(self.path)
            if url.path == "/admin/blip":
                try:
                    seconds = min(60.0, max(0.05, float(parse_qs(url.query).get("seconds", ["1.5"])[0])))
                except ValueError:
                    self._send(400, {"error": "seconds: must be a number"})
                    return
                service.degraded_until = time.monotonic() + seconds
                print(f"blip: degraded for {seconds} s", flush=True)
                self._send(200, {"degraded_for_s": seconds})
            elif url.path == "/admin/leak":
                query = parse_qs(url.query)
                try:
                    mb_per_s = min(1000.0, max(0.1, float(query.get("mb_per_s", ["20"])[0])))
                    max_mb = min(65536.0, max(1.0, float(query.get("max_mb", ["768"])[0])))
                except ValueError:
                    self._send(400, {"error": "mb_per_s, max_mb: must be numbers"})
                    return
                threading.Thread(target=service.leak, args=(mb_per_s, max_mb), daemon=True).start()
                print(f"leak: growing {mb_per_s} MB/s up to {max_mb} MB", flush=True)
                self._send(200, {"leaking_mb_per_s": mb_per_s, "max_mb": max_mb})
            else:
                self._send(404, {"error": "not found"})

        def log_message(self, fmt, *args):
            pass  # probes every second would drown the log

    return Handler


def seconds_from_file(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    try:
        with open(path) as fh:
            return float(fh.read().strip())
    except (OSError, ValueError):
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--role", default="backend")
    parser.add_argument("--slots", type=int, default=4, help="concurrent /work requests per replica")
    args = parser.parse_args()
    delay = seconds_from_file("startup_delay_s")
    if delay:
        print(f"slow start: listening in {delay} s", flush=True)
        time.sleep(delay)
    crash_after = seconds_from_file("crash_after_s")
    if crash_after:
        threading.Timer(crash_after, lambda: os._exit(70)).start()
    service = Service(args.role, args.slots)
    # HOST as the platform sets it: loopback, or the machine's address under a host agent.
    host = os.environ.get("HOST") or "127.0.0.1"
    server = ThreadingHTTPServer((host, args.port), make_handler(service))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{args.role} listening on {host}:{args.port} pid {os.getpid()}", flush=True)
    server.serve_forever(poll_interval=0.2)


if __name__ == "__main__":
    main()
