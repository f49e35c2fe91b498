"""When every attempt fails, the incident escalates to a human (with its history) instead of
looping, and the app is left alone until it is healthy again."""
from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from cicd.store import reports
from cicd.store import App, get_app, session_scope

pytestmark = pytest.mark.integration

APP = "fragile-api"


@pytest.fixture(scope="module")
def app(stack):
    stack.onboard(APP)
    return APP


def test_an_app_that_cannot_be_restarted_is_escalated(stack, app):
    runtime, settings = stack.runtime, stack.settings
    server = runtime.app_dir(APP) / "releases" / str(runtime.live_release(APP)) / "server.py"
    good = server.read_text()
    server.write_text("import sys\nsys.exit('this release is broken')\n")  # every restart dies at once
    try:
        out = stack.cicd("inject", "crash", APP, "--wait", "--timeout", "90", check=False)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "ended escalated" in out.stderr
        incident = reports.incidents(settings, 1, APP)[0]
        assert incident["status"] == "escalated" and incident["attempt"] == settings.max_attempts
        events = stack.events(incident_id=incident["id"])
        names = [r["event_name"] for r in events]
        assert names.count("RL_DECISION") == settings.max_attempts
        assert names.count("ATTEMPT_FAILED") == settings.max_attempts - 1
        assert names.count("RL_UPDATE") == settings.max_attempts
        escalated = [r for r in events if r["event_name"] == "ESCALATED"][0]["payload"]
        assert len(escalated["history"]) == settings.max_attempts
        with session_scope(settings) as s:
            assert get_app(s, "stage", APP).attention
        # No new incident while a human is called, though the replica is still down.
        time.sleep(3 * settings.probe_interval_s)
        assert reports.incidents(settings, 1, APP)[0]["id"] == incident["id"]
    finally:
        server.write_text(good)
    # The human fixes it; once the probes see it healthy, the detector may act on it again.
    down = [s.slot for s in runtime.probe([APP])[APP] if not s.healthy]
    assert down  # the last attempt may have scaled out with the broken release too
    runtime.restart(APP, down, op_key="human-fix")
    deadline = time.monotonic() + 30
    while True:
        with session_scope(settings) as s:
            if s.scalar(select(App).where(App.name == APP)).attention is None:
                break
        assert time.monotonic() < deadline, "attention was not cleared after the app became healthy"
        time.sleep(0.2)
