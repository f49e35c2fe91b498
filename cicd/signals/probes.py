"""One probe cycle: probe every replica of every live app in a batch, remember what was seen,
and turn anomalies into signals for the detector.

A dead process or a refused connection is a signal at once; a failing health check must repeat
`unhealthy_probes` times before it counts as a crash (fewer, then recovered, is a blip), and when
every one of those checks timed out on a process that is still alive it is a hang. A replica
whose resident memory reaches `memory_restart_at` of its memory_limit_mb (the release's manifest's,
else the spec's) is a leak, at once: memory does not come back by itself. High load (the most of
a replica's own utilization, its CPU, its probe latency and its app's mean latency through the
proxy: loop.replica_load; a replica whose probe timed out on a running process counts as fully
loaded) must last `overload_probes` probes, and low utilization with more replicas than the spec
asks for `underload_probes` probes. Timeouts on an app that is loaded are its queue, never a
blip. Uptime per app is counted here.

Written for fleets of thousands: the bookkeeping is a handful of bulk statements per cycle, and
a replica has a row only while its health checks are failing.
"""
from __future__ import annotations

from dataclasses import dataclass

from cicd.config import Settings
from cicd.core.events import Signal
from cicd.healing.loop import FAILING, GONE, mean_load, mean_utilization, over_memory, replica_signal  # noqa: F401
from cicd.healing.loop import saturated, serving, widening
from cicd.runtime.base import ReplicaStatus, Runtime
from cicd.store import health, session_scope


@dataclass(frozen=True)
class Observation:
    health: dict          # the app's new AppHealth values
    failures: dict        # slot -> (consecutive failed health checks, "timeout" or "failing"), failing slots only
    signal: dict | None


def probe_cycle(settings: Settings, runtime: Runtime) -> list[dict]:
    """Probe, record, and return the signals to send to the detector (at most one per app)."""
    env, now = settings.env, settings.clock.now()
    with session_scope(settings, readonly=True) as session:
        apps = health.wanted_replicas(session, env)
    # Probing happens outside any transaction: HTTP waits must not hold the database lock.
    results = runtime.probe(sorted(apps))
    signals = []
    with session_scope(settings) as session:
        busy = health.apps_with_open_incident(session, env)
        failing = health.failing_replicas(session, env)
        before = health.counters(session, env)
        updates, inserts, failures, healed = {}, {}, {}, []
        for name, statuses in results.items():
            if not statuses or name not in apps:
                continue  # nothing deployed yet, or removed while we were probing
            wanted, attention = apps[name]
            seen = observe(settings, name, wanted or 1, statuses, failing.get(name, {}), before.get(name), now)
            if name in before:
                updates[name] = seen.health
            else:
                inserts[name] = seen.health
            if seen.failures:
                failures[name] = seen.failures
            if attention and all(s.healthy for s in statuses):
                healed.append(name)  # healthy again: the detector may act on it from now on
            elif seen.signal and not attention and (name not in busy or widens(busy[name], seen.signal)):
                signals.append(seen.signal)
        if updates:
            health.update_app_health(session, env, updates)
        if inserts:
            health.insert_app_health(session, env, inserts)
        if failing or failures:
            health.replace_failing_replicas(session, env, failures, now)
        if healed:
            health.clear_attention(session, env, healed)
    return signals


def widens(open_incident: tuple[str, str, list[int]], signal: dict) -> bool:
    """Whether the signal is a crash its app's open incident does not cover: sent, the detector
    widens that incident (a watched exit does the same; this is for an exit nobody watched)."""
    kind, severity, slots = open_incident
    return widening(kind, severity, slots, Signal.from_dict(signal)) is not None


def observe(settings: Settings, name: str, wanted_replicas: int, statuses: list[ReplicaStatus], failures_before: dict,
            before, now) -> Observation:
    """One app's probe results against what earlier probes saw: new counters, and its signal."""
    down, unhealthy, hung, blips, failures = [], [], [], [], {}
    utilization = mean_load(settings, statuses)
    hot = (before.consecutive_hot if before else 0) + 1 if utilization > settings.overload_threshold else 0
    # Probes that timed out on an app that is loaded now or was at the last probe were its queue,
    # not a transient fault: a replica that answers again after them is not a blip (a false alarm
    # would be opened for it, and the overload not judged while that is open).
    loaded = hot > 0 or bool(before and before.consecutive_hot)
    for status in statuses:
        count, streak = failures_before.get(status.slot, (0, None))
        if status.status in GONE:
            down.append(status.slot)
        elif status.status in FAILING:
            # A hang: every check of the run timed out, on a process that is alive (a stopped or
            # deadlocked one answers nothing). One answered with an error makes it unhealthy.
            timed_out = status.status == "timeout" and streak in (None, "timeout")
            failures[status.slot] = (count + 1, "timeout" if timed_out else "failing")
            # On an app loaded now, a running replica's timeouts are its queue: scaled out first (a
            # restart there drops its queue and loads the others more); were it deadlocked, the
            # app reads unloaded once scaled out, and it is a hang then.
            if count + 1 >= settings.unhealthy_probes and not (timed_out and hot and saturated(status)):
                (hung if timed_out else unhealthy).append(status.slot)
        elif status.healthy and 0 < count < settings.unhealthy_probes and not (loaded and streak == "timeout"):
            blips.append(status.slot)
    leaking = [s.slot for s in statuses if s.status not in GONE and over_memory(settings, s)]
    healthy = sum(1 for s in statuses if s.healthy)
    # Idle only counts while there are more replicas than the spec asks for, all of them healthy.
    idle = healthy == len(statuses) > wanted_replicas and utilization < settings.underload_threshold
    cold = (before.consecutive_cold if before else 0) + 1 if idle else 0
    health = {"probes": (before.probes if before else 0) + 1, "up_probes": (before.up_probes if before else 0) + bool(healthy),
              "healthy_replicas": healthy, "replicas": len(statuses), "utilization": utilization,
              "consecutive_hot": hot, "consecutive_cold": cold, "last_probe_at": now}

    def signal(kind, slots):
        return replica_signal(settings.env, name, kind, statuses, now, slots, load=utilization)

    if down:
        found = signal("replica_down", down)
    elif unhealthy or hung:
        found = signal("replica_unhealthy" if unhealthy else "replica_hung", unhealthy + hung)
    elif leaking:
        found = signal("replica_leak", leaking)
    elif hot >= settings.overload_probes:
        found = signal("replica_hot", [s.slot for s in statuses if serving(s)])
    elif blips:
        found = signal("replica_blip", blips)
    elif cold >= settings.underload_probes:
        found = signal("replica_cold", [s.slot for s in statuses])
    else:
        found = None
    return Observation(health, failures, found)
