"""Nothing lost, nothing run twice: dead letters through the real agents and `cicd dlq`, and a
beat that refuses to run twice."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cicd.stack import cluster
from cicd.store import deadletters, proof
from cicd.core.events import iso, parse_iso, utcnow
from cicd.runtime import process

pytestmark = pytest.mark.integration


def wait_for(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


def test_unprocessable_input_becomes_a_dead_letter_that_can_be_retried_and_purged(stack):
    from workers.client import ControlPlane
    plane = ControlPlane(stack.settings)
    ghost = {"env": "stage", "app": "ghost-api", "kind": "replica_down", "slots": [0], "observed_at": iso(utcnow()),
             "replicas_total": 2}
    plane.app.send_task("cicd.detect.classify", args=[ghost], kwargs={"env": "stage"})
    letter = wait_for(lambda: [x for x in deadletters.listing(stack.settings) if "ghost-api" in x["reason"]])[0]
    assert letter["task"] == "cicd.detect.classify" and "unknown app 'ghost-api'" in letter["reason"]
    listed = json.loads(stack.cicd("dlq", "list", "--json").stdout)
    assert letter["id"] in [x["id"] for x in listed]
    shown = json.loads(stack.cicd("dlq", "show", str(letter["id"])).stdout)
    assert shown["args"] == [ghost]
    # Retrying sends it to the agent again: still an unknown app, so it comes back as a new letter.
    stack.cicd("dlq", "retry", str(letter["id"]))
    again = wait_for(lambda: [x for x in deadletters.listing(stack.settings)
                              if "ghost-api" in x["reason"] and x["id"] != letter["id"]])[0]
    assert again["args"] == [ghost]
    retried = [x for x in deadletters.listing(stack.settings, include_retried=True) if x["id"] == letter["id"]][0]
    assert (retried["status"], retried["retries"]) == ("retried", 1)
    out = stack.cicd("dlq", "purge", str(letter["id"]), str(again["id"]))
    assert "purged 2" in out.stdout
    assert proof.tail(stack.settings, 1)[0]["event_name"] == "DLQ_PURGED"
    assert stack.cicd("dlq", "purge", check=False).returncode == 2  # IDs or --all: never a silent purge-all


def test_a_second_beat_refuses_to_run(stack):
    beat = cluster.read_stack(stack.settings)["envs"]["stage"]["beat"]
    assert process.is_alive(beat["pid"], beat["ticks"])
    second = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app:celery_app", "beat", "--loglevel",
                             "INFO", "-s", str(stack.home / "second-beat-schedule")],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert "another beat for stage is running" in second.stdout + second.stderr
    assert process.is_alive(beat["pid"], beat["ticks"])  # the first one carries on, still sending
    log = open(beat["log"]).read().count("Sending due task")
    wait_for(lambda: open(beat["log"]).read().count("Sending due task") > log, timeout=10)


def test_restarts_of_a_flapping_app_never_run_before_their_backoff_is_over(stack):
    """Backoff here is 1 s doubling to 4 s (the suite's settings; 10 s to 300 s by default).
    Whether a crash comes soon enough to owe a wait depends on how fast the machine healed the
    one before, so this checks what holds either way: each crash was healed by one restart, and a
    restart held back ran no sooner than its due time. That a streak of restarts does back off,
    doubling, is tests/unit/test_clock.py's, on a manual clock."""
    app = "flappy-api"
    stack.onboard(app)
    seq = proof.head_seq(stack.settings)
    for _ in range(3):
        stack.wait_steady(app)
        out = stack.cicd("inject", "crash", app, "--wait", "--timeout", "60")
        assert "restart_service: stable" in out.stdout
    records = [r for r in proof.records_since(stack.settings, seq) if r["app"] == app]
    restarts = {(r["incident_id"], r["payload"]["attempt"]): r for r in records
                if r["event_name"] == "ORCH_EXEC" and r["payload"]["action"] == "restart_service"}
    assert len(restarts) == 3
    for held in (r for r in records if r["event_name"] == "RESTART_BACKOFF"):
        ran = restarts[(held["incident_id"], held["payload"]["attempt"])]
        assert parse_iso(ran["ts"]) >= parse_iso(held["payload"]["due_at"]), (held, ran)


def test_no_secret_is_printed_or_logged(stack):
    """The signing key and the broker password appear in no log, no output, no stack record."""
    secrets_ = [(stack.settings.env_dir / "secret.key").read_text().strip(),
                (stack.home / "var" / "redis" / "password").read_text().strip()]
    outputs = [stack.cicd("status").stdout, stack.cicd("status", "--json").stdout,
               stack.cicd("proof", "tail", "-n", "500").stdout]
    files = list((stack.home / "logs").rglob("*")) + [stack.home / "var" / "stack.json"]
    texts = outputs + [f.read_text(errors="replace") for f in files if f.is_file()]
    for secret in secrets_:
        assert len(secret) >= 24
        assert not any(secret in text for text in texts)
