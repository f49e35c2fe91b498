"""Placement: which host runs an app, and where its replicas listen there.

An app's host is part of its spec (the registry: `cicd onboard --host NAME`, exported with the
spec to apps/registry/ENV/NAME.json). What runs there is the host agent's to say: it publishes
the app's live replicas (address, port, pid) after every change, in one row per app, and the
control plane's monitor and gates read them from here instead of from a local state file.
"""
from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from cicd.config import Settings
from cicd.core.events import utcnow
from cicd.store.db import session_scope, transaction
from cicd.store.models import App, PlacedReplicas

_TABLE = PlacedReplicas.__table__


def host_of(settings: Settings, app: str) -> str:
    """The host the app is placed on ("" for the control plane's own machine, or no such app)."""
    with transaction(settings, readonly=True) as conn:
        spec = conn.execute(select(App.spec).where(App.env == settings.env, App.name == app)).scalar()
    return str((spec or {}).get("host") or "")


def elsewhere(settings: Settings, app: str) -> str:
    """The host whose agent must act on the app, if that is not this process's machine; else ""."""
    host = host_of(settings, app)
    return host if host and host != settings.host_name else ""


def hosts(settings: Settings) -> dict[str, list[str]]:
    """Each host apps are placed on, with those apps (from the registry's specs)."""
    with transaction(settings, readonly=True) as conn:
        rows = conn.execute(select(App.name, App.spec).where(App.env == settings.env)).all()
    out: dict[str, list[str]] = {}
    for name, spec in rows:
        if (spec or {}).get("host"):
            out.setdefault(spec["host"], []).append(name)
    return {host: sorted(apps) for host, apps in sorted(out.items())}


def publish(settings: Settings, app: str, live: int | None, replicas: list[dict]) -> None:
    """This host's view of the app's live replicas, replacing the last one (an upsert)."""
    values = {"env": settings.env, "app": app, "host": settings.host_name, "address": settings.host_address,
              "replicas": replicas, "live": live, "updated_at": utcnow()}
    with transaction(settings) as conn:
        insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(_TABLE).values(**values)
        conn.execute(insert.on_conflict_do_update(index_elements=["env", "app"],
                                                  set_={k: v for k, v in values.items() if k not in ("env", "app")}))


def forget(settings: Settings, app: str) -> None:
    with transaction(settings) as conn:
        conn.execute(delete(_TABLE).where(_TABLE.c.env == settings.env, _TABLE.c.app == app))


def placed(settings: Settings, apps: list[str] | None = None) -> dict[str, dict]:
    """app -> {host, address, replicas, live} of the apps placed on hosts (of `apps`, if given)."""
    query = select(_TABLE.c.app, _TABLE.c.host, _TABLE.c.address, _TABLE.c.replicas, _TABLE.c.live).where(
        _TABLE.c.env == settings.env)
    if apps is not None:
        if not apps:
            return {}
        query = query.where(_TABLE.c.app.in_(apps))
    with session_scope(settings, readonly=True) as session:
        rows = session.execute(query).all()
    return {r.app: {"host": r.host, "address": r.address, "replicas": r.replicas or [], "live": r.live} for r in rows}
