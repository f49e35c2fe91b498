"""Signal -> incident: classify what a probe saw (kind, severity), or drop it.

One open incident per app: a second signal while the first is being healed is dropped, and the
database's unique key on the open incident settles a race between two detector replicas.
"""
from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy.exc import IntegrityError

from . import proof
from .config import Settings
from .events import OPEN, MalformedEvent, Signal, parse_iso, utcnow
from .store import Incident, get_app, keep_dead_letter, session_scope

KIND_OF_SIGNAL = {
    "replica_down": "crash",         # process gone or connection refused
    "replica_unhealthy": "crash",    # alive but failing its health check for K probes in a row
    "replica_hot": "overload",       # utilization over the threshold for K probes in a row
    "replica_blip": "false_alarm",   # failed a probe or two, then recovered by itself
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
    return kind, "low"


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
        incident = Incident(id=f"inc-{secrets.token_hex(6)}", env=env, app=signal.app, kind=kind,
                            severity=severity, status=OPEN, attempt=1, slot=signal.slots[0],
                            signal=signal.to_dict(), open_key=f"{env}/{signal.app}")
        session.add(incident)
        try:
            session.flush()
        except IntegrityError:
            session.rollback()
            return None  # an incident is already open for this app
        proof.append(session, env, "INCIDENT_DETECTED", incident_id=incident.id, app=signal.app,
                     payload={"kind": kind, "severity": severity, "signal": signal.to_dict()})
        return {"env": env, "incident_id": incident.id, "attempt": 1}
