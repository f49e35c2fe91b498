"""App and replica health: the rows one probe cycle reads and writes.

An app's AppHealth row holds its probe counters (probes, up probes, hot and cold streaks) and
what the last probe saw; a replica has a ReplicaHealth row only while its health checks are
failing. The probe cycle (cicd.signals.probes) owns the transactions; these take its session.

Written for fleets of thousands: a handful of bulk statements per cycle, whatever the fleet's size.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from cicd.core.lifecycle import IncidentStatus
from cicd.store import App, AppHealth, Incident, ReplicaHealth

_HEALTH = AppHealth.__table__
# One prebuilt UPDATE run as executemany: the ORM's bulk update spent more time collecting
# per-row commands than SQLite spent on the rows (0.37 of 1.1 s per cycle at 10,000 apps).
_UPDATE_HEALTH = (update(_HEALTH)
                  .where(_HEALTH.c.env == bindparam("k_env"), _HEALTH.c.app == bindparam("k_app"))
                  .values({column: bindparam(column) for column in
                           ("probes", "up_probes", "healthy_replicas", "replicas", "utilization",
                            "consecutive_hot", "consecutive_cold", "last_probe_at")}))


# -- reads -------------------------------------------------------------------------------------
def wanted_replicas(session: Session, env: str) -> dict[str, tuple[int | None, str | None]]:
    """Each app: the replica count its spec asks for, and who was called about it (attention)."""
    # Only the count, taken out of the spec by the database: decoding 10,000 whole specs in
    # Python cost a fifth of a cycle.
    return {name: (wanted, attention) for name, wanted, attention in
            session.execute(select(App.name, App.spec["replicas"].as_integer(), App.attention)
                            .where(App.env == env))}


def apps_with_open_incident(session: Session, env: str) -> dict[str, tuple[str, str, list[int]]]:
    """app -> (kind, severity, slots) of its open incident: what a new signal is judged against."""
    rows = session.execute(select(Incident.app, Incident.kind, Incident.severity, Incident.slot, Incident.signal)
                           .where(Incident.env == env, Incident.status == IncidentStatus.OPEN))
    return {r.app: (r.kind, r.severity, list((r.signal or {}).get("slots") or [r.slot])) for r in rows}


def failing_replicas(session: Session, env: str) -> dict[str, dict[int, tuple[int, str]]]:
    """app -> slot -> (consecutive failed health checks, streak), for the replicas failing now.
    streak is "timeout" while every check of the run timed out (a hang), else "failing"."""
    failing: dict[str, dict[int, tuple[int, str]]] = {}
    for app, slot, count, streak in session.execute(select(ReplicaHealth.app, ReplicaHealth.slot,
                                                           ReplicaHealth.consecutive_failures,
                                                           ReplicaHealth.last_status)
                                                    .where(ReplicaHealth.env == env)):
        failing.setdefault(app, {})[slot] = (count, streak)
    return failing


def counters(session: Session, env: str) -> dict:
    """app -> its AppHealth counters so far (a row with probes, up_probes, consecutive_hot/cold)."""
    return {row.app: row for row in session.execute(
        select(AppHealth.app, AppHealth.probes, AppHealth.up_probes, AppHealth.consecutive_hot,
               AppHealth.consecutive_cold).where(AppHealth.env == env))}


# -- writes ------------------------------------------------------------------------------------
def update_app_health(session: Session, env: str, health_of: dict[str, dict]) -> None:
    """New values for apps that have a health row: app -> its AppHealth values."""
    # (an UPDATE's own columns may not name a WHERE parameter: hence k_env, k_app)
    session.connection().execute(_UPDATE_HEALTH, [{"k_env": env, "k_app": app, **health}
                                                  for app, health in health_of.items()])


def insert_app_health(session: Session, env: str, health_of: dict[str, dict]) -> None:
    """Health rows for apps probed for the first time: app -> its AppHealth values."""
    session.execute(insert(AppHealth), [{"env": env, "app": app, **health} for app, health in health_of.items()])


def replace_failing_replicas(session: Session, env: str, failures_of: dict[str, dict[int, tuple[int, str]]],
                             now: datetime) -> None:
    """The environment's failing replicas become exactly these: app -> slot -> (consecutive
    failures, streak), as failing_replicas reads them."""
    session.execute(delete(ReplicaHealth).where(ReplicaHealth.env == env))
    rows = [{"env": env, "app": app, "slot": slot, "consecutive_failures": count,
             "last_status": streak, "last_utilization": 0.0, "updated_at": now}
            for app, failures in failures_of.items() for slot, (count, streak) in failures.items()]
    if rows:
        session.execute(insert(ReplicaHealth), rows)


def clear_attention(session: Session, env: str, apps: list[str]) -> None:
    """Nobody needs calling about these apps any more (they are healthy again)."""
    session.execute(update(App).where(App.env == env, App.name.in_(apps)).values(attention=None))
