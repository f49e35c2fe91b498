"""Signal -> incident: classify what a probe saw (kind, severity), or drop it.

One open incident per app: a second signal while the first is being healed is dropped, and the
database's unique key on the open incident settles a race between two detector replicas.
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
from cicd.healing.loop import classify, release_context
from cicd.store import app_row, transaction

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
        if incidents.has_open(conn, env, signal.app):
            return None  # already being healed
        kind, severity = classify(signal)
        context = context_of(conn, settings, kind, signal, app.spec)
    incident_id = f"inc-{secrets.token_hex(6)}"
    try:
        with transaction(settings) as conn:
            incidents.insert_open(conn, incident_id, env, signal, kind, severity, context, settings.clock.now())
            proof.append(conn, env, "INCIDENT_DETECTED", incident_id=incident_id, app=signal.app,
                         payload={"kind": kind, "severity": severity, "signal": signal.to_dict(), "context": context})
    except incidents.AlreadyOpen:
        return None  # an incident is already open for this app (the open key is unique)
    return {"env": env, "incident_id": incident_id, "attempt": 1}
