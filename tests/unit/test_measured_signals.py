"""Signals the platform measures itself, with real processes: CPU and resident memory from /proc,
a SIGSTOPped replica that becomes a hang, a leaking one that becomes a leak, and the policy's
view of both (a crash, with its cause in the context)."""
from __future__ import annotations

import signal
import sys
import time
from datetime import datetime, timezone

import pytest

from cicd.config import Settings
from cicd.core.events import Signal, iso, utcnow
from cicd.delivery import onboarding
from cicd.healing import detector, loop
from cicd.runtime import local, process
from cicd.runtime.base import ReplicaStatus, RuntimeFailure
from cicd.signals import probes as monitor
from cicd.store import Incident, session_scope

from .test_detection import runtime  # noqa: F401  (the fixture: a local runtime, its apps stopped after)
from .test_local_runtime import sample_source, wait_for

APP = "shop-api"
REPO = "https://git.example.com/shop-api.git"


@pytest.fixture
def settings(tmp_path):
    return Settings(env="stage", home=tmp_path, probe_interval_s=0.2, probe_timeout_s=0.5, unhealthy_probes=3,
                    overload_probes=2)


def deploy(settings, runtime, tmp_path, **spec_changes):
    assert onboarding.register(settings, APP, REPO, "backend")["ok"]
    spec = {**onboarding.generate_spec(APP, REPO, "backend", "stage"), **spec_changes}
    runtime.stage_release(spec, 1, sample_source(tmp_path))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(APP, 1)))
    runtime.activate_release(APP, 1)
    return APP


@pytest.fixture
def app(settings, runtime, tmp_path):
    return deploy(settings, runtime, tmp_path)


def cycles_until_signal(settings, runtime, most: int) -> tuple[int, dict | None]:
    for n in range(1, most + 1):
        signals = monitor.probe_cycle(settings, runtime)
        if signals:
            return n, signals[0]
        time.sleep(settings.probe_interval_s)
    return most, None


def incident_of(settings, signal: dict) -> Incident:
    opened = detector.open_incident(settings, {**signal, "observed_at": iso(utcnow())})
    assert opened is not None
    with session_scope(settings) as session:
        return session.get(Incident, opened["incident_id"])


# -- what is measured ----------------------------------------------------------------------------
def test_cpu_and_resident_memory_are_read_for_real_replicas(runtime, app):
    statuses = runtime.probe([app])[app]
    assert len(statuses) == 2
    for status in statuses:
        # A Python HTTP server holds some megabytes resident, far from the default limit; idle, it
        # uses next to no CPU.
        assert 3.0 < status.rss_mb < 200.0, status
        assert 0.0 <= status.cpu < 0.5, status
        assert status.memory_limit_mb == onboarding.DEFAULT_MEMORY_LIMIT_MB and not status.stopped


def test_cpu_is_a_rate_over_the_interval_for_a_busy_process(tmp_path):
    # A busy loop for a bounded time (niced: the machine is shared), sampled twice a second apart.
    pid, ticks = process.spawn_detached(["nice", "-n", "19", sys.executable, "-c",
                                         "import time\nend = time.time() + 4\nwhile time.time() < end: pass"],
                                        str(tmp_path), process.clean_env({}), str(tmp_path / "busy.log"))
    try:
        first = process.session_usage({pid})[pid]
        local._cpu_cores(pid, first)
        time.sleep(1.0)
        second = process.session_usage({pid})[pid]
        cores = local._cpu_cores(pid, second)
        assert second.cpu_ticks > first.cpu_ticks
        assert 0.05 < cores <= 1.2  # one thread: at most one core (the rest is the clock tick's grain)
        assert second.started_ticks == ticks and second.processes == 1 and second.rss_bytes > 2**20
    finally:
        process.kill(pid, ticks)


def test_usage_counts_the_whole_session_of_a_replica(tmp_path):
    # gunicorn-style: a leader with a child; the child's memory is the replica's too.
    code = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\ntime.sleep(30)"
    pid, ticks = process.spawn_detached([sys.executable, "-c", code], str(tmp_path), process.clean_env({}),
                                        str(tmp_path / "tree.log"))
    try:
        used = wait_for(lambda: (u := process.session_usage({pid}).get(pid)) and u.processes == 2 and u)
        assert used.rss_bytes > 4 * 2**20 and not used.stopped
    finally:
        process.stop(pid, ticks, grace_s=1.0)


# -- hang ----------------------------------------------------------------------------------------
def test_a_stopped_replica_becomes_a_hang_signal_after_the_probes_and_a_crash_incident(settings, runtime, app):
    injected = runtime.inject(app, "hang", slot=0)
    assert injected["signal"] == "SIGSTOP"
    assert runtime.probe([app])[app][0].stopped  # alive to every process check
    n, signal = cycles_until_signal(settings, runtime, settings.unhealthy_probes + 2)
    assert signal is not None and n == settings.unhealthy_probes  # not before the K-th timed-out probe
    assert signal["kind"] == "replica_hung" and signal["slots"] == [0]
    assert "0:timeout" in signal["detail"] and "stopped" in signal["detail"]
    incident = incident_of(settings, signal)
    assert (incident.kind, incident.severity) == ("crash", "high")
    assert incident.context["cause"] == "hang"


def test_a_restart_heals_a_stopped_replica_without_waiting_out_the_grace(settings, runtime, app):
    runtime.inject(app, "hang", slot=0)
    started = time.monotonic()
    result = runtime.restart(app, [0], op_key="heal-hang")
    took = time.monotonic() - started
    assert result["replicas"][0]["was_running"]
    # SIGTERM alone stays pending on a stopped process for the whole 3 s grace; continued, it exits.
    assert took < 2.5, f"restart took {took:.2f} s"
    assert wait_for(lambda: all(s.healthy for s in runtime.probe([app])[app]))


def test_stop_continues_a_stopped_process_so_its_sigterm_lands(tmp_path):
    pid, ticks = process.spawn_detached([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path),
                                        process.clean_env({}), str(tmp_path / "sleep.log"))
    assert process.signal_process(pid, ticks, signal.SIGSTOP)
    wait_for(lambda: process.session_usage({pid})[pid].stopped)
    started = time.monotonic()
    assert process.stop(pid, ticks, grace_s=3.0)
    assert time.monotonic() - started < 1.5 and not process.is_alive(pid, ticks)
    ended = wait_for(lambda: process.exit_of(str(tmp_path / "sleep.log"), pid, ticks))
    assert process.describe_exit(ended) == "was killed by SIGTERM"  # the SIGTERM, not the SIGKILL


def test_a_failure_streak_with_an_error_answer_is_unhealthy_not_hung():
    settings = Settings(unhealthy_probes=3)
    now = datetime.now(timezone.utc)
    timeout = [ReplicaStatus(0, 1, 1, True, "timeout"), ReplicaStatus(1, 2, 2, True, "ok")]
    seen = monitor.observe(settings, APP, 2, timeout, {0: (2, "failing")}, None, now)
    assert seen.signal["kind"] == "replica_unhealthy" and seen.failures == {0: (3, "failing")}
    seen = monitor.observe(settings, APP, 2, timeout, {0: (2, "timeout")}, None, now)
    assert seen.signal["kind"] == "replica_hung" and seen.failures == {0: (3, "timeout")}


# -- leak ----------------------------------------------------------------------------------------
def test_a_leaking_replica_over_its_limit_becomes_a_leak_signal(settings, runtime, tmp_path):
    app = deploy(settings, runtime, tmp_path, memory_limit_mb=64)
    assert monitor.probe_cycle(settings, runtime) == []  # well under the limit before the leak
    injected = runtime.inject(app, "leak", slot=1, mb_per_s=40)
    assert injected["memory_limit_mb"] == 64
    _, signal = cycles_until_signal(settings, runtime, 40)
    assert signal is not None and signal["kind"] == "replica_leak" and signal["slots"] == [1]
    rss = runtime.probe([app])[app][1].rss_mb
    assert rss >= settings.memory_restart_at * 64, rss
    assert "/64 MB" in signal["detail"]
    incident = incident_of(settings, signal)
    assert (incident.kind, incident.severity) == ("crash", "high") and incident.context["cause"] == "leak"
    # A restart gives the memory back: the new replica starts small.
    runtime.restart(app, [1], op_key="heal-leak")
    assert wait_for(lambda: (s := runtime.probe([app])[app][1]).healthy and s.rss_mb < 40)


def test_the_repos_manifest_sets_the_memory_limit_leaks_are_judged_by(settings, runtime, tmp_path):
    assert onboarding.register(settings, APP, REPO, "backend")["ok"]
    spec = onboarding.generate_spec(APP, REPO, "backend", "stage")  # the default limit, 512
    runtime.stage_release(spec, 1, sample_source(tmp_path, {"cicd.toml": "[resources]\nmemory_limit_mb = 64\n"}))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(APP, 1)))
    runtime.activate_release(APP, 1)
    assert [s.memory_limit_mb for s in runtime.probe([APP])[APP]] == [64, 64]
    injected = runtime.inject(APP, "leak", slot=0, mb_per_s=1)
    assert injected["memory_limit_mb"] == 64


def test_a_leak_rate_out_of_range_is_refused(runtime, app):
    with pytest.raises(RuntimeFailure, match="leak rate"):
        runtime.inject(app, "leak", mb_per_s=5000)


def test_memory_limit_is_validated_naming_the_field(runtime, tmp_path):
    assert onboarding.check_memory_limit(512) == []
    assert onboarding.check_memory_limit(8)[0].rule == "range"
    assert onboarding.check_memory_limit("512")[0].rule == "type"
    assert onboarding.check_memory_limit(True)[0].rule == "type"
    assert all(t["memory_limit_mb"] == onboarding.DEFAULT_MEMORY_LIMIT_MB for t in onboarding.TEMPLATES.values())
    assert onboarding.memory_limit_mb({}) == onboarding.DEFAULT_MEMORY_LIMIT_MB  # a spec from before the field
    spec = {**onboarding.generate_spec(APP, REPO, "backend", "stage"), "memory_limit_mb": 10**9}
    with pytest.raises(RuntimeFailure, match="memory_limit_mb: must be 32-65536"):
        runtime.stage_release(spec, 1, sample_source(tmp_path))


# -- overload from what is measured --------------------------------------------------------------
def statuses_with(**values) -> list[ReplicaStatus]:
    return [ReplicaStatus(slot, slot + 1, 9000 + slot, True, "ok", **values) for slot in range(2)]


def hot_before(consecutive: int, probes: int = 5):
    """The app's health row as the last probe left it: `consecutive` hot probes so far."""
    return type("Before", (), {"probes": probes, "up_probes": probes, "consecutive_hot": consecutive,
                               "consecutive_cold": 0})()


@pytest.mark.parametrize("values, hot", [
    ({"cpu": 0.95}, True),                   # CPU saturated across the replicas, nothing self-reported
    ({"latency_ms": 450.0}, True),           # probes near their timeout
    ({"utilization": 0.9}, True),            # the sample service's own figure still counts
    ({"proxy_latency_ms": 450.0}, True),     # the app's clients wait, through the proxy, near a probe timeout
    ({"cpu": 0.3, "latency_ms": 20.0}, False),
])
def test_overload_from_measured_cpu_or_latency_needs_sustained_probes(values, hot):
    settings = Settings(overload_probes=2, probe_timeout_s=0.5)
    now = datetime.now(timezone.utc)
    first = monitor.observe(settings, APP, 2, statuses_with(**values), {}, None, now)
    assert first.signal is None  # one probe is not sustained
    before = hot_before(first.health["consecutive_hot"], probes=1)
    second = monitor.observe(settings, APP, 2, statuses_with(**values), {}, before, now)
    if hot:
        assert second.signal["kind"] == "replica_hot" and second.signal["slots"] == [0, 1]
        assert second.signal["utilization"] > settings.overload_threshold
        assert detector.classify(Signal.from_dict(second.signal))[0] == "overload"
    else:
        assert second.signal is None


def test_one_saturated_replica_beside_an_idle_one_is_not_an_overload():
    settings = Settings()
    statuses = [ReplicaStatus(0, 1, 1, True, "ok", cpu=1.0), ReplicaStatus(1, 2, 2, True, "ok", cpu=0.0)]
    assert loop.mean_load(settings, statuses) == pytest.approx(0.5)
    # ...and once scaled out, the measured load is what the verifier judges as stable.
    assert loop.is_stable(settings, "overload", statuses, 2)
    assert not loop.is_stable(settings, "overload", statuses_with(cpu=0.9), 2)


# -- a probe timeout under load is load ----------------------------------------------------------


def test_a_replica_timing_out_under_load_counts_fully_loaded_not_absent():
    settings = Settings(probe_timeout_s=0.5)
    slow = ReplicaStatus(1, 2, 2, True, "ok", latency_ms=300.0)   # 0.6 of the timeout
    timed_out = ReplicaStatus(0, 1, 1, True, "timeout")
    assert loop.mean_load(settings, [timed_out, slow]) == pytest.approx(0.8)   # over the threshold
    # Left out, as before, the app read 0.6: less loaded the more loaded it was.
    stopped = ReplicaStatus(0, 1, 1, True, "timeout", stopped=True)
    dead = ReplicaStatus(0, None, 1, False, "timeout")
    assert loop.mean_load(settings, [stopped, slow]) == loop.mean_load(settings, [dead, slow]) == pytest.approx(0.6)


def test_a_timeout_then_an_answer_on_a_loaded_app_is_load_not_a_blip():
    settings = Settings(overload_probes=3, unhealthy_probes=3, probe_timeout_s=0.5)
    now = datetime.now(timezone.utc)
    loaded = [ReplicaStatus(0, 1, 1, True, "ok", latency_ms=420.0), ReplicaStatus(1, 2, 2, True, "ok", latency_ms=400.0)]
    seen = monitor.observe(settings, APP, 2, loaded, {0: (1, "timeout")}, hot_before(1), now)
    assert seen.signal is None and seen.health["consecutive_hot"] == 2   # on its way to an overload
    seen = monitor.observe(settings, APP, 2, loaded, {}, hot_before(2), now)
    assert seen.signal["kind"] == "replica_hot"


@pytest.mark.parametrize("streak, before", [
    ("timeout", None),        # a timeout on an idle app, then an answer: a blip, as ever
    ("failing", hot_before(2)),  # an error answer (the proxy's injected 503) on a loaded app: a blip
])
def test_a_blip_is_still_a_blip_unless_it_was_a_timeout_under_load(streak, before):
    settings = Settings(overload_probes=3, unhealthy_probes=3, probe_timeout_s=0.5)
    statuses = [ReplicaStatus(0, 1, 1, True, "ok", latency_ms=5.0), ReplicaStatus(1, 2, 2, True, "ok", latency_ms=5.0)]
    seen = monitor.observe(settings, APP, 2, statuses, {0: (1, streak)}, before, datetime.now(timezone.utc))
    assert seen.signal["kind"] == "replica_blip" and seen.signal["slots"] == [0]


def test_a_running_replica_timing_out_on_a_loaded_app_is_scaled_out_not_restarted():
    # The liveness-restart-under-load trap (kubernetes/kubernetes#110083): K timeouts in a row on a
    # replica whose peers are loaded too are its queue. A restart drops that queue onto the others.
    settings = Settings(overload_probes=3, unhealthy_probes=3, probe_timeout_s=0.5)
    statuses = [ReplicaStatus(0, 1, 1, True, "timeout"), ReplicaStatus(1, 2, 2, True, "ok", latency_ms=420.0)]
    now = datetime.now(timezone.utc)
    seen = monitor.observe(settings, APP, 2, statuses, {0: (2, "timeout")}, hot_before(1), now)
    assert seen.signal is None and seen.failures[0] == (3, "timeout")   # counted, not acted on
    seen = monitor.observe(settings, APP, 2, statuses, {0: (3, "timeout")}, hot_before(2), now)
    assert seen.signal["kind"] == "replica_hot" and seen.signal["slots"] == [0, 1]


def test_a_stopped_replica_on_a_loaded_app_is_still_a_hang():
    settings = Settings(overload_probes=3, unhealthy_probes=3, probe_timeout_s=0.5)
    statuses = [ReplicaStatus(0, 1, 1, True, "timeout", stopped=True), ReplicaStatus(1, 2, 2, True, "ok", latency_ms=420.0)]
    seen = monitor.observe(settings, APP, 2, statuses, {0: (2, "timeout")}, hot_before(2), datetime.now(timezone.utc))
    assert seen.signal["kind"] == "replica_hung" and seen.signal["slots"] == [0]


def test_a_deadlocked_replica_reads_as_a_hang_once_the_app_is_not_loaded():
    # A lone deadlocked replica reads fully loaded, so it is scaled out first; beside an idle new
    # one the app is no longer loaded, and the timeouts it kept counting make it a hang at once.
    settings = Settings(overload_probes=3, unhealthy_probes=3, probe_timeout_s=0.5)
    alone = [ReplicaStatus(0, 1, 1, True, "timeout")]
    now = datetime.now(timezone.utc)
    assert monitor.observe(settings, APP, 1, alone, {0: (3, "timeout")}, hot_before(2), now).signal["kind"] == "replica_hot"
    scaled = alone + [ReplicaStatus(1, 2, 2, True, "ok", latency_ms=3.0)]
    seen = monitor.observe(settings, APP, 1, scaled, {0: (4, "timeout")}, hot_before(3), now)
    assert seen.signal["kind"] == "replica_hung" and seen.signal["slots"] == [0]


def test_an_overload_is_stable_on_the_mean_load_even_if_one_probe_timed_out():
    settings = Settings(probe_timeout_s=0.5)
    serving = [ReplicaStatus(slot, slot + 1, slot + 1, True, "ok", latency_ms=200.0) for slot in (1, 2, 3)]
    timed_out = [ReplicaStatus(slot, 9 + slot, 9 + slot, True, "timeout") for slot in (0, 1, 2)]
    assert loop.is_stable(settings, "overload", timed_out[:1] + serving, 4)         # mean 0.55
    assert not loop.is_stable(settings, "crash", timed_out[:1] + serving, 4)        # any other kind: all healthy
    assert not loop.is_stable(settings, "overload", timed_out + serving[2:], 4)     # mean 0.85: still overloaded
    stopped = ReplicaStatus(0, 9, 9, True, "timeout", stopped=True)
    assert not loop.is_stable(settings, "overload", [stopped] + serving, 4)         # a stopped one serves nothing
