"""Signal -> incident: classify what a probe saw (kind, severity), or drop it.

One open incident per app: a second signal while the first is being healed is dropped, and the
database's unique key on the open incident settles a race between two detector replicas.
"""
from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from . import proof
from .config import Settings
from .events import OPEN, MalformedEvent, Signal, as_utc, parse_iso, utcnow
from .store import Incident, Release, get_app, keep_dead_letter, session_scope

KIND_OF_SIGNAL = {
    "replica_down": "crash",          # process gone or connection refused
    "replica_unhealthy": "crash",     # alive but failing its health check for K probes in a row
    "replica_hot": "overload",        # utilization over the threshold for K probes in a row
    "replica_blip": "false_alarm",    # failed a probe or two, then recovered by itself
    "replica_cold": "underload",      # more replicas than the spec asks for, and idle for a while
    "deploy_slow": "slow_deploy",     # a release not healthy long after it started
    "deploy_failed": "failed_deploy", # fetch, build or health gate failed; the live release serves
}
SIGNAL_MAX_AGE_S = 30.0


def classify(signal: Signal) -> tuple[str, str]:
    """(incident kind, severity) of a signal."""
    kind = KIND_OF_SIGNAL[signal.kind]
    if kind == "crash":
        all_down = signal.replicas_total and len(signal.slots) >= signal.replicas_total
        return kind, "critical" if all_down else "high"
    if kind == "overload":
        return kind, "high" if signal.utilization >= 0.95 else "medium"
    if kind == "failed_deploy":
        return kind, "high"
    if kind == "slow_deploy":
        return kind, "medium"
    return kind, "low"


def context_of(session, settings: Settings, kind: str, signal: Signal, spec: dict) -> dict:
    """What the policy needs to know beyond the signal, read from the releases."""
    releases = session.scalars(select(Release).where(Release.env == settings.env, Release.app == signal.app)
                               .order_by(Release.number.desc())).all()
    live = next((r for r in releases if r.status == "live"), None)
    good_before = next((r for r in releases if r.status == "superseded" and r.sha
                        and (live is None or r.number < live.number)), None)
    # A crash or an overload soon after a release may be the release's fault.
    fresh = bool(kind in ("crash", "overload") and live and live.finished_at
                 and utcnow() - as_utc(live.finished_at) < timedelta(seconds=settings.fresh_release_s))
    context = {"live_release": live.number if live else None, "fresh_release": fresh}
    if kind in ("crash", "overload"):
        context["rollback_to"] = good_before.number if good_before else None
    elif kind in ("slow_deploy", "failed_deploy"):
        context["release"] = signal.release
        context["rollback_to"] = live.number if live else None  # keep serving what serves now
    elif kind == "underload":
        context["can_scale_in"] = signal.replicas_total > spec.get("replicas", 1)
    return context


def open_incident(settings: Settings, raw: dict) -> dict | None:
    """Open an incident for the signal; None if dropped. Malformed input goes to dead letters."""
    env = settings.env
    with session_scope(settings) as session:
        try:
            signal = Signal.from_dict(raw)
            if signal.env != env:
                raise MalformedEvent("env", f"signal is for {signal.env!r}, this detector serves {env!r}")
        except MalformedEvent as exc:
            keep_dead_letter(session, env, "detect.classify", raw, f"malformed signal: {exc}")
            return None
        app = get_app(session, env, signal.app)
        if app is None:
            keep_dead_letter(session, env, "detect.classify", raw, f"unknown app {signal.app!r} in {env}")
            return None
        if utcnow() - parse_iso(signal.observed_at) > timedelta(seconds=SIGNAL_MAX_AGE_S):
            return None  # stale: the next probe reports what is true now
        if app.attention:
            return None  # a human was called for this app; do not loop on it until it is healthy
        kind, severity = classify(signal)
        context = context_of(session, settings, kind, signal, app.spec)
        incident = Incident(id=f"inc-{secrets.token_hex(6)}", env=env, app=signal.app, kind=kind,
                            severity=severity, status=OPEN, attempt=1, slot=signal.slots[0] if signal.slots else 0,
                            signal=signal.to_dict(), context=context, open_key=f"{env}/{signal.app}")
        session.add(incident)
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            return None  # an incident is already open for this app
        proof.append(session, env, "INCIDENT_DETECTED", incident_id=incident.id, app=signal.app,
                     payload={"kind": kind, "severity": severity, "signal": signal.to_dict(), "context": context})
        return {"env": env, "incident_id": incident.id, "attempt": 1}
