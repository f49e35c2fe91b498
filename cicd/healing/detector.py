"""Signal -> incident: classify what a probe saw (kind, severity), or drop it.

One open incident per app: a second signal while the first is being healed is dropped, and the
database's unique key on the open incident settles a race between two detector replicas. A
replica down that the open incident does not cover (another replica, or an app it was healing for
a blip or for load) widens that incident instead (loop.widening): its next decision acts on the
crash too, and its current attempt, decided without it, ends at its next verification.
"""
from __future__ import annotations

import logging
import secrets
from datetime import timedelta

from cicd.store import apps as app_rows
from cicd.store import incidents, proof
from cicd.store import releases as release_rows
from cicd.config import Settings
from cicd.core.events import MalformedEvent, Signal, Unprocessable, as_utc, parse_iso
from cicd.healing.loop import classify, release_context, widening
from cicd.core.lifecycle import IncidentStatus
from cicd.store import app_row, incident_row, transaction

SIGNAL_MAX_AGE_S = 30.0
log = logging.getLogger(__name__)


def context_of(conn, settings: Settings, kind: str, signal: Signal, spec: dict) -> dict:
    """What the policy needs to know beyond the signal, read from the releases."""
    releases = release_rows.newest_first(conn, settings.env, signal.app)
    return release_context(settings, kind, signal, spec, releases)


def open_incident(settings: Settings, raw: dict) -> dict | None:
    """Open an incident for the signal; None if there is nothing to heal (a duplicate, a stale
    signal, an app a human was called for, an app removed since the probe). Raises Unprocessable
    for input no one can act on (malformed, an app never onboarded here): the agent keeps that as
    a dead letter."""
    env = settings.env
    try:
        signal = Signal.from_dict(raw)
    except MalformedEvent as exc:
        raise Unprocessable(f"malformed signal: {exc}") from None
    if signal.env != env:
        raise Unprocessable(f"malformed signal: env: signal is for {signal.env!r}, this detector serves {env!r}")
    # Judge the signal without the write lock; only opening the incident needs it.
    with transaction(settings, readonly=True) as conn:
        app = app_row(conn, env, signal.app)
        if app is None:
            if app_rows.removed(conn, env, signal.app):
                # A probe's last look at an app `cicd remove` took away: nothing to heal, no dead letter.
                log.info("%s signal for %s dropped: the app was removed from %s", signal.kind, signal.app, env)
                return None
            raise Unprocessable(f"unknown app {signal.app!r} in {env}")
        observed = parse_iso(signal.observed_at)
        if settings.clock.now() - observed > timedelta(seconds=SIGNAL_MAX_AGE_S):
            return None  # stale: the next probe reports what is true now
        last_closed = incidents.last_closed_at(conn, env, signal.app)
        if last_closed is not None and as_utc(last_closed) >= observed:
            return None  # seen before the last incident of this app was resolved: it is about the past
        if app.attention:
            return None  # a human was called for this app; do not loop on it until it is healthy
        current = incidents.open_row(conn, env, signal.app)
        if current is not None:
            if widening(current.kind, current.severity, _slots_of(current), signal) is None:
                return None  # already being healed
        else:
            kind, severity = classify(signal)
            context = context_of(conn, settings, kind, signal, app.spec)
    if current is not None:
        _widen(settings, current.id, signal)
        return None  # the open incident's chain heals it, from its next decision on
    incident_id = f"inc-{secrets.token_hex(6)}"
    try:
        with transaction(settings) as conn:
            incidents.insert_open(conn, incident_id, env, signal, kind, severity, context, settings.clock.now())
            proof.append(conn, env, "INCIDENT_DETECTED", incident_id=incident_id, app=signal.app,
                         payload={"kind": kind, "severity": severity, "signal": signal.to_dict(), "context": context})
    except incidents.AlreadyOpen:
        return None  # an incident is already open for this app (the open key is unique)
    return {"env": env, "incident_id": incident_id, "attempt": 1}


def _slots_of(incident) -> list[int]:
    return list((incident.signal or {}).get("slots") or [incident.slot])


def _widen(settings: Settings, incident_id: str, signal: Signal) -> None:
    """Fold the signal into the open incident (see the module's docstring), under the write lock."""
    env = settings.env
    with transaction(settings) as conn:
        incident = incident_row(conn, incident_id, lock=True)
        if incident is None or incident.status != IncidentStatus.OPEN:
            # Concluded meanwhile: the app is no longer busy, so the next probe reports the crash.
            log.info("%s signal for %s dropped: its incident %s closed meanwhile", signal.kind, signal.app, incident_id)
            return
        widened = widening(incident.kind, incident.severity, _slots_of(incident), signal)
        if widened is None:
            return  # another delivery of the same crash widened it first
        kind, severity, slots = widened
        # The attempts decided before now did not know of the crash: the verifier ends the current
        # one early (if its decision is made), so the next decision acts on it.
        after = incident.attempt if incident.decision is not None else incident.attempt - 1
        context = {**(incident.context or {}),
                   "widened": {"after_attempt": after, "by": signal.to_dict(), "was": incident.kind}}
        incidents.widen(conn, incident, kind, severity, {**signal.to_dict(), "slots": slots}, context)
        proof.append(conn, env, "INCIDENT_WIDENED", incident_id=incident.id, app=incident.app,
                     payload={"attempt": incident.attempt, "after_attempt": after, "was": incident.kind, "kind": kind,
                              "severity": severity, "slots": slots, "signal": signal.to_dict()})
    log.info("%s signal for %s widened its open incident %s to %s on slots %s",
             signal.kind, signal.app, incident_id, kind, slots)
