"""One probe cycle: probe every replica of every live app in a batch, remember what was seen,
and turn anomalies into signals for the detector.

A dead process or a refused connection is a signal at once; a failing health check must repeat
`unhealthy_probes` times before it counts as a crash (fewer, then recovered, is a blip); high
utilization must last `overload_probes` probes, and low utilization with more replicas than the
spec asks for `underload_probes` probes. Uptime per app is counted here.
"""
from __future__ import annotations

from sqlalchemy import select

from .config import Settings
from .events import OPEN, iso, utcnow
from .runtime.base import ReplicaStatus, Runtime
from .store import App, AppHealth, Incident, ReplicaHealth, session_scope

FAILING = ("degraded", "timeout")
GONE = ("down", "refused")


def mean_utilization(statuses: list[ReplicaStatus]) -> float:
    serving = [s.utilization for s in statuses if s.healthy]
    return sum(serving) / len(serving) if serving else 0.0


def probe_cycle(settings: Settings, runtime: Runtime) -> list[dict]:
    """Probe, record, and return the signals to send to the detector (at most one per app)."""
    env, now = settings.env, utcnow()
    with session_scope(settings) as session:
        names = sorted(session.scalars(select(App.name).where(App.env == env)))
    # Probing happens outside any transaction: HTTP waits must not hold the database lock.
    results = runtime.probe(names)
    signals = []
    with session_scope(settings) as session:
        apps = {a.name: a for a in session.scalars(select(App).where(App.env == env))}
        busy = set(session.scalars(select(Incident.app).where(Incident.env == env, Incident.status == OPEN)))
        health = {(r.app, r.slot): r for r in session.scalars(select(ReplicaHealth).where(ReplicaHealth.env == env))}
        app_health = {r.app: r for r in session.scalars(select(AppHealth).where(AppHealth.env == env))}
        for name, statuses in results.items():
            if not statuses:
                continue
            app = apps.get(name)
            if app is None:
                continue  # removed while we were probing
            signal = _observe_app(settings, session, app, statuses, health, app_health, now)
            if app.attention and all(s.healthy for s in statuses):
                app.attention = None  # healthy again: the detector may act on it from now on
            if signal and name not in busy and not app.attention:
                signals.append(signal)
        live_slots = {(name, s.slot) for name, statuses in results.items() for s in statuses}
        for key, row in health.items():
            if key not in live_slots:
                session.delete(row)  # scaled away or redeployed: forget it
    return signals


def _observe_app(settings, session, app, statuses, health, app_health, now) -> dict | None:
    env, name = settings.env, app.name
    down, unhealthy, blips = [], [], []
    for status in statuses:
        row = health.get((name, status.slot))
        if row is None:
            row = ReplicaHealth(env=env, app=name, slot=status.slot, consecutive_failures=0)
            session.add(row)
            health[(name, status.slot)] = row
        if status.status in GONE:
            down.append(status.slot)
        elif status.status in FAILING:
            row.consecutive_failures += 1
            if row.consecutive_failures >= settings.unhealthy_probes:
                unhealthy.append(status.slot)
        elif status.healthy and 0 < row.consecutive_failures < settings.unhealthy_probes:
            blips.append(status.slot)
        if status.status not in FAILING:
            row.consecutive_failures = 0
        row.last_status, row.last_utilization, row.updated_at = status.status, status.utilization, now

    summary = app_health.get(name)
    if summary is None:
        summary = AppHealth(env=env, app=name, probes=0, up_probes=0, consecutive_hot=0, consecutive_cold=0)
        session.add(summary)
        app_health[name] = summary
    healthy = sum(1 for s in statuses if s.healthy)
    utilization = mean_utilization(statuses)
    summary.probes += 1
    summary.up_probes += 1 if healthy else 0
    summary.healthy_replicas, summary.replicas, summary.utilization = healthy, len(statuses), utilization
    summary.consecutive_hot = summary.consecutive_hot + 1 if utilization > settings.overload_threshold else 0
    # Idle only counts while there are more replicas than the spec asks for, all of them healthy.
    idle = (healthy == len(statuses) > app.spec.get("replicas", 1) and utilization < settings.underload_threshold)
    summary.consecutive_cold = summary.consecutive_cold + 1 if idle else 0
    summary.last_probe_at = now

    def signal(kind, slots):
        return {"env": env, "app": name, "kind": kind, "slots": sorted(slots), "observed_at": iso(now),
                "utilization": round(utilization, 4), "replicas_total": len(statuses),
                "detail": ", ".join(f"{s.slot}:{s.status}" for s in statuses)}

    if down:
        return signal("replica_down", down)
    if unhealthy:
        return signal("replica_unhealthy", unhealthy)
    if summary.consecutive_hot >= settings.overload_probes:
        return signal("replica_hot", [s.slot for s in statuses if s.healthy])
    if blips:
        return signal("replica_blip", blips)
    if summary.consecutive_cold >= settings.underload_probes:
        return signal("replica_cold", [s.slot for s in statuses])
    return None
