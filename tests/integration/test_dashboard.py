"""The dashboard and /metrics on the real stack, served by a real `cicd dashboard` process: a crash
injected into a real app heals, and the scrape shows that incident, its action, its time to
recover, the app's uptime and the queues; then a real browser (headless Chromium) loads the page
and shows the incident, and its screenshot is kept as an artifact."""
from __future__ import annotations

import html.parser
import os
import shutil
import signal
import struct
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from tests.ctrl_c import as_in_a_terminal
from cicd.web import api, metrics
from cicd.stack import cluster
from cicd.config import AGENTS
from cicd.store import AppHealth, session_scope

from .conftest import CICD

pytestmark = pytest.mark.integration

APP = "dash-api"
REPO_ROOT = Path(__file__).resolve().parents[2]
XSS = '<b id="xss-probe">bold?</b>'


# Where the browser's screenshot is kept after the run (CI uploads this directory).
ARTIFACTS = Path(os.environ.get("CICD_ARTIFACTS", REPO_ROOT / "artifacts"))


@dataclass
class Served:
    process: subprocess.Popen
    url: str


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory):
    """`cicd dashboard --port 0` as its own process, as a user runs it; stopped with Ctrl-C."""
    stack.onboard(APP)
    errors = (tmp_path_factory.mktemp("dashboard") / "stderr").open("w+")
    process = subprocess.Popen([str(CICD), "dashboard", "--port", "0"], stdout=subprocess.PIPE, stderr=errors,
                               text=True, env=os.environ.copy(), preexec_fn=as_in_a_terminal)
    try:
        line = process.stdout.readline()
        if not line.startswith("dashboard of stage: http://127.0.0.1:"):
            errors.seek(0)
            raise AssertionError(f"cicd dashboard did not start: {line!r}\n{errors.read()}")
        yield Served(process, line.split()[3])
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=10)
        errors.seek(0)
        assert process.returncode == 0 and "dashboard stopped" in out, errors.read()
        errors.close()


def scrape(server: Served) -> dict:
    with urllib.request.urlopen(server.url + "metrics", timeout=20) as response:
        assert response.headers["Content-Type"] == metrics.CONTENT_TYPE
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset({"env": "stage", **labels}.items())), 0.0)


@pytest.fixture(scope="module")
def healed(stack, served):
    """Scrape, crash a replica of the app for real (SIGKILL), wait for it to heal, scrape again."""
    before = scrape(served)
    out = stack.cicd("inject", "crash", APP, "--wait", timeout=120)
    [incident] = api.incidents(1, stack.settings, app=APP)
    after = scrape(served)
    return {"before": before, "after": after, "incident": incident, "out": out.stdout}


def delta(healed: dict, name: str, **labels) -> float:
    return value(healed["after"], name, **labels) - value(healed["before"], name, **labels)


def test_the_incident_heals_and_its_chain_is_in_the_api(healed):
    incident = healed["incident"]
    assert (incident["app"], incident["kind"], incident["status"], incident["action"]) == \
        (APP, "crash", "stable", "restart_service"), healed["out"]
    [attempt] = incident["chain"]
    assert attempt["decision"]["action"] == "restart_service"
    assert [(g["gate"], g["verdict"]) for g in attempt["gates"]] == [
        (g, "passed") for g in ("intake", "blocklist", "allowlist", "environment", "budget")]
    assert (attempt["execution"]["status"], attempt["outcome"]["result"]) == ("done", "stable")
    assert incident["time_to_recover_s"] == attempt["outcome"]["time_to_recover_s"] > 0


def test_metrics_count_the_incident_its_decision_and_its_action(healed):
    assert delta(healed, "cicd_incidents_total", kind="crash", outcome="stable") == 1
    assert delta(healed, "cicd_policy_decisions_total", action="restart_service", choice="greedy") == 1
    assert delta(healed, "cicd_actions_executed_total", action="restart_service", status="done") == 1
    assert delta(healed, "cicd_actions_executed_total", action="restart_service", status="failed") == 0
    assert value(healed["after"], "cicd_store_up") == 1


def test_metrics_have_the_time_to_recover_sample(healed):
    ttr = healed["incident"]["time_to_recover_s"]
    assert delta(healed, "cicd_time_to_recover_seconds_count", kind="crash") == 1
    assert delta(healed, "cicd_time_to_recover_seconds_sum", kind="crash") == pytest.approx(ttr, abs=1e-6)
    # It landed in the first bucket that holds it, and in none below.
    bounds = [b for b in metrics.TTR_BUCKETS if b >= ttr]
    first = f"{bounds[0]:.1f}" if bounds else "+Inf"
    assert delta(healed, "cicd_time_to_recover_seconds_bucket", kind="crash", le=first) == 1
    below = [b for b in metrics.TTR_BUCKETS if b < ttr]
    if below:
        assert delta(healed, "cicd_time_to_recover_seconds_bucket", kind="crash", le=f"{below[-1]:.1f}") == 0


def test_metrics_have_the_apps_uptime(stack, healed):
    after = healed["after"]
    probes = value(after, "cicd_app_probes_total", app=APP)
    up = value(after, "cicd_app_up_probes_total", app=APP)
    assert probes > 0 and value(after, "cicd_app_uptime_ratio", app=APP) == pytest.approx(up / probes)
    # The same counters the monitor keeps, read a moment later (probes run every 0.5 s meanwhile).
    with session_scope(stack.settings, readonly=True) as session:
        row = session.execute(select(AppHealth.probes, AppHealth.up_probes)
                              .where(AppHealth.env == "stage", AppHealth.app == APP)).one()
    assert probes <= row.probes <= probes + 20 and up <= row.up_probes <= up + 20
    assert value(after, "cicd_app_replicas", app=APP) == 2


def test_metrics_have_each_agents_queue_depth(healed):
    after = healed["after"]
    assert value(after, "cicd_broker_up") == 1
    for agent in AGENTS:
        depth = after.get(("cicd_queue_depth", frozenset({"env": "stage", "agent": agent, "queue": f"stage.{agent}"}.items())))
        assert depth is not None and depth >= 0, agent


def dev_queue_depths(dev) -> dict[str, float]:
    samples = [s for family in text_string_to_metric_families(metrics.render(metrics.registry([dev]))[0].decode())
               for s in family.samples if s.name == "cicd_queue_depth"]
    return {s.labels["agent"]: s.value for s in samples}


def test_queue_depth_counts_what_is_waiting(stack):
    """dev has no workers running here: what is put in a dev queue stays there to be counted."""
    dev = stack.settings.for_env("dev")
    client = redis.Redis.from_url(cluster.broker_url_for(dev, cluster.read_stack(dev)))
    try:
        before = dev_queue_depths(dev)
        client.rpush("dev.decide", *[b"not a message"] * 3)
        client.rpush("dev.monitor", b"not a message")
        after = dev_queue_depths(dev)
    finally:
        client.lrem("dev.decide", 3, b"not a message")
        client.lrem("dev.monitor", 1, b"not a message")
    assert set(after) == set(AGENTS)
    assert {agent: after[agent] - before[agent] for agent in AGENTS} == \
        {"onboard": 0, "deploy": 0, "detect": 0, "decide": 3, "orchestrate": 0, "monitor": 1}


# -- a real browser ----------------------------------------------------------------------------
def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Page(html.parser.HTMLParser):
    """The dumped DOM: elements by id, and all the text."""

    def __init__(self, markup: str):
        super().__init__()
        self.ids: dict[str, str] = {}
        self.text: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids[attrs["id"]] = tag

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="session")  # session, like the stack, so it is looked for (and skips) first
def chromium():
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium); `make test` installs it when run as root "
                    "(.ci/install-test-tools)")
    return path


def browse(chromium: str, profile: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    # --virtual-time-budget lets the page's fetches and timers run for 5 s of page time before the
    # DOM is taken; it needs ?live=poll, as a stream that stays open stops the virtual clock.
    argv = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, url]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


def test_the_browser_shows_the_injected_incident(chromium, stack, served, healed, tmp_path, capsys):
    from workers.client import ControlPlane
    from .test_safety import decision, send_to_orchestrator, wait_for_events
    # A forged decision whose action is markup: the page must show it as text, not make an element.
    seq = stack.events()[-1]["seq"]
    send_to_orchestrator(ControlPlane(stack.settings), decision(APP, XSS, {}, b"not-the-stage-key" * 2))
    wait_for_events(stack, seq, ["ORCH_REFUSE", "INTAKE_REFUSED", "REFUSAL_EMIT_SUCCESS"])

    url = served.url + "?live=poll"
    dumped = browse(chromium, tmp_path / "profile", url, "--dump-dom")
    shot = tmp_path / "dashboard.png"
    shown = browse(chromium, tmp_path / "profile", url, f"--screenshot={shot}", "--window-size=1400,1000",
                   "--hide-scrollbars")
    if shot.exists():  # kept even when an assertion below fails: that is when it is most wanted
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, ARTIFACTS / "dashboard.png")
        with capsys.disabled():
            print(f"\nscreenshot of the dashboard: {ARTIFACTS / 'dashboard.png'}")

    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = Page(dumped.stdout)
    text = " ".join(page.text)
    incident = healed["incident"]
    assert page.ids.get(f"incident-{incident['id']}") == "article", "the incident's card is not on the page"
    for shown_text in (incident["id"], APP, "restart_service", "recovered in", "live (polling)", "environment stage"):
        assert shown_text in text, shown_text
    assert "xss-probe" not in page.ids, "markup from the proof log became an element"
    assert XSS.replace('"', '\\"') in text  # shown as the text it is, inside the payload

    assert shown.returncode == 0 and shot.exists(), shown.stderr[-2000:]
    assert png_size(shot) == (1400, 1000) and shot.stat().st_size > 20_000
