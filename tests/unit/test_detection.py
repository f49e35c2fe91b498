"""Probe cycles over real replicas turn into the right signals, and the detector into incidents."""
from __future__ import annotations

import http.client
from datetime import timedelta

import pytest
from sqlalchemy import select

from cicd.healing import detector
from cicd.signals import probes as monitor
from cicd.delivery import onboarding
from cicd.config import Settings
from cicd.core.events import Signal, Unprocessable, iso, utcnow
from cicd.runtime.local import LocalRuntime
from cicd.store import App, AppHealth, Incident, session_scope

from .test_local_runtime import sample_source, wait_for


@pytest.fixture
def settings(tmp_path):
    return Settings(env="stage", home=tmp_path, probe_interval_s=0.2, probe_timeout_s=1.0,
                    unhealthy_probes=3, overload_probes=2)


@pytest.fixture
def runtime(settings):
    rt = LocalRuntime(settings)
    yield rt
    for app in rt.apps():
        rt.stop_app(app)


@pytest.fixture
def app(settings, runtime, tmp_path):
    assert onboarding.register(settings, "shop-api", "https://git.example.com/shop-api.git", "backend")["ok"]
    spec = onboarding.generate_spec("shop-api", "https://git.example.com/shop-api.git", "backend", "stage")
    runtime.stage_release(spec, 1, sample_source(tmp_path))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release("shop-api", 1)))
    runtime.activate_release("shop-api", 1)
    return "shop-api"


def blip(runtime, app, slot, seconds):
    port = runtime.probe([app])[app][slot].port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    conn.request("POST", f"/admin/blip?seconds={seconds}")
    assert conn.getresponse().status == 200


def test_healthy_cycle_counts_uptime_and_signals_nothing(settings, runtime, app):
    assert monitor.probe_cycle(settings, runtime) == []
    assert monitor.probe_cycle(settings, runtime) == []
    with session_scope(settings) as s:
        health = s.get(AppHealth, ("stage", app))
        assert (health.probes, health.up_probes, health.healthy_replicas, health.replicas) == (2, 2, 2, 2)


def test_crash_is_signalled_at_the_first_probe(settings, runtime, app):
    runtime.inject(app, "crash", slot=1)
    signals = monitor.probe_cycle(settings, runtime)
    assert len(signals) == 1
    signal = signals[0]
    assert (signal["kind"], signal["slots"], signal["replicas_total"]) == ("replica_down", [1], 2)
    incident = detector.open_incident(settings, signal)
    assert incident["attempt"] == 1
    # While that incident is open, neither the monitor nor the detector opens another.
    assert monitor.probe_cycle(settings, runtime) == []
    assert detector.open_incident(settings, {**signal, "observed_at": iso(utcnow())}) is None


def test_a_blip_that_clears_is_a_false_alarm(settings, runtime, app):
    blip(runtime, app, 0, 0.3)
    assert monitor.probe_cycle(settings, runtime) == []  # one failed probe is not yet anything
    wait_for(lambda: runtime.probe([app])[app][0].healthy)
    signals = monitor.probe_cycle(settings, runtime)
    assert [(s["kind"], s["slots"]) for s in signals] == [("replica_blip", [0])]
    assert detector.classify(Signal.from_dict(signals[0])) == ("false_alarm", "low")


def test_a_health_failure_that_persists_is_a_crash(settings, runtime, app):
    blip(runtime, app, 0, 30)
    assert monitor.probe_cycle(settings, runtime) == []
    assert monitor.probe_cycle(settings, runtime) == []
    signals = monitor.probe_cycle(settings, runtime)
    assert [(s["kind"], s["slots"]) for s in signals] == [("replica_unhealthy", [0])]
    assert detector.classify(Signal.from_dict(signals[0]))[0] == "crash"


def test_sustained_load_is_an_overload(settings, runtime, app):
    runtime.inject(app, "overload", duration=20)
    try:
        wait_for(lambda: monitor.mean_utilization(runtime.probe([app])[app]) > settings.overload_threshold)
        first = monitor.probe_cycle(settings, runtime)
        second = monitor.probe_cycle(settings, runtime)
    finally:
        runtime.stop_load(app)
    assert first == []  # overload needs `overload_probes` hot probes in a row
    assert [s["kind"] for s in second] == ["replica_hot"]
    assert second[0]["utilization"] > settings.overload_threshold


def signal_dict(**overrides):
    base = {"env": "stage", "app": "shop-api", "kind": "replica_down", "slots": [0], "observed_at": iso(utcnow()),
            "utilization": 0.0, "replicas_total": 2, "detail": ""}
    return {**base, **overrides}


@pytest.mark.parametrize("overrides, reason", [
    ({"kind": "meteor"}, "kind"),
    ({"slots": []}, "slots"),
    ({"slots": [True]}, "slots"),
    ({"observed_at": "yesterday"}, "observed_at"),
    ({"env": "dev"}, "env"),
    ({"app": "x" * 500}, "app"),
], ids=["unknown-kind", "no-slots", "bool-slot", "bad-time", "other-env", "huge-app"])
def test_malformed_signals_are_unprocessable_and_name_the_field(settings, app, overrides, reason):
    with pytest.raises(Unprocessable, match=reason):
        detector.open_incident(settings, signal_dict(**overrides))
    with session_scope(settings) as s:
        assert s.scalars(select(Incident)).all() == []


def test_an_unknown_app_is_unprocessable(settings, app):
    with pytest.raises(Unprocessable, match="unknown app 'ghost-api'"):
        detector.open_incident(settings, signal_dict(app="ghost-api"))


def test_stale_signals_and_apps_awaiting_a_human_are_dropped(settings, app):
    stale = iso(utcnow() - timedelta(seconds=detector.SIGNAL_MAX_AGE_S + 5))
    assert detector.open_incident(settings, signal_dict(observed_at=stale)) is None
    with session_scope(settings) as s:
        s.scalar(select(App)).attention = "escalated: needs a human"
    assert detector.open_incident(settings, signal_dict()) is None
    with session_scope(settings) as s:
        assert s.scalars(select(Incident)).all() == []


def test_attention_is_cleared_once_the_app_is_healthy_again(settings, runtime, app):
    with session_scope(settings) as s:
        s.scalar(select(App)).attention = "escalated"
    monitor.probe_cycle(settings, runtime)
    with session_scope(settings) as s:
        assert s.scalar(select(App)).attention is None


@pytest.mark.parametrize("kind, slots, total, utilization, expected", [
    ("replica_down", [0], 2, 0.0, ("crash", "high")),
    ("replica_down", [0, 1], 2, 0.0, ("crash", "critical")),
    ("replica_unhealthy", [1], 3, 0.0, ("crash", "high")),
    ("replica_hot", [0, 1], 2, 0.8, ("overload", "medium")),
    ("replica_hot", [0, 1], 2, 0.97, ("overload", "high")),
    ("replica_blip", [0], 2, 0.0, ("false_alarm", "low")),
])
def test_classification(kind, slots, total, utilization, expected):
    signal = Signal.from_dict(signal_dict(kind=kind, slots=slots, replicas_total=total, utilization=utilization))
    assert detector.classify(signal) == expected

