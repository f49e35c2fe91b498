"""Faults on purpose (`cicd inject`): break a running app for real, and write down that we did."""
from __future__ import annotations

from . import proof
from .config import Settings
from .events import iso, utcnow
from .runtime.base import Runtime, RuntimeFailure
from .store import get_app, session_scope

FAULT_KINDS = ("crash", "overload", "false-alarm")


def inject(settings: Settings, runtime: Runtime, app: str, kind: str, **options) -> dict:
    """Returns what was done, with `injected_at` and the proof record's seq."""
    if kind not in FAULT_KINDS:
        raise RuntimeFailure(f"fault kind {kind!r}: must be one of {', '.join(FAULT_KINDS)}")
    with session_scope(settings) as session:
        if get_app(session, settings.env, app) is None:
            raise RuntimeFailure(f"app {app!r} is not onboarded in {settings.env}")
    injected_at = utcnow()
    detail = runtime.inject(app, kind, **options)
    with session_scope(settings) as session:
        record = proof.append(session, settings.env, "FAILURE_INJECTED", app=app,
                              payload={"kind": kind, "at": iso(injected_at), **detail})
        seq = record.seq
    return {**detail, "injected_at": iso(injected_at), "seq": seq}
