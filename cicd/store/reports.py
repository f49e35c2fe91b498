"""Read-side views for the CLI, the web API and the metrics (and scripts): apps, incidents,
following one incident, the counts a metrics scrape reads, and the policy's learning counts.

Functions that take `settings` open their own read-only session; those that take a `session`
read inside the caller's, for callers whose reads must see one snapshot (a metrics scrape)."""
from __future__ import annotations

import json
import time
from typing import Callable, Iterator

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cicd.store import proof
from cicd.config import Settings
from cicd.core.events import iso, parse_iso, utcnow
from cicd.core.lifecycle import OUTCOME_OF_EVENT, STEP_OF_EVENT, IncidentStatus, ReleaseStatus, Step
from cicd.runtime.base import Runtime
from cicd.store import App, AppHealth, Incident, PolicyValue, ProofHead, ProofRecord, Release, session_scope


LEARN_GRACE_S = 5.0


def incident_dict(i: Incident) -> dict:
    return {"id": i.id, "env": i.env, "app": i.app, "kind": i.kind, "severity": i.severity, "status": i.status,
            "attempt": i.attempt, "opened_at": iso(i.opened_at), "closed_at": iso(i.closed_at) if i.closed_at else None,
            "resolution": i.resolution,
            "action": (i.decision or {}).get("action")}


def incidents(settings: Settings, limit: int = 20, app: str | None = None) -> list[dict]:
    with session_scope(settings, readonly=True) as session:
        query = select(Incident).where(Incident.env == settings.env)
        if app:
            query = query.where(Incident.app == app)
        rows = session.scalars(query.order_by(Incident.opened_at.desc()).limit(limit)).all()
        return [incident_dict(i) for i in rows]


def apps(settings: Settings, runtime: Runtime) -> list[dict]:
    with session_scope(settings, readonly=True) as session:
        rows = session.scalars(select(App).where(App.env == settings.env).order_by(App.name)).all()
        health = {h.app: h for h in session.scalars(select(AppHealth).where(AppHealth.env == settings.env))}
        live = {r.app: r.number for r in session.scalars(select(Release).where(Release.env == settings.env,
                                                                               Release.status == ReleaseStatus.LIVE))}
        open_incidents = {i.app: i.id for i in session.scalars(select(Incident).where(
            Incident.env == settings.env, Incident.status == IncidentStatus.OPEN))}
        out = []
        for app in rows:
            h = health.get(app.name)
            out.append({"app": app.name, "runtime": app.runtime, "release": live.get(app.name),
                        "url": runtime.endpoint(app.name),
                        # Its traffic through that URL over the last probe interval, as the proxy counts it.
                        "proxy": runtime.proxy_figures(app.name),
                        "replicas": runtime.replica_count(app.name),
                        "healthy": h.healthy_replicas if h else None,
                        # What the last probe saw (healthy is out of these), beside what the runtime holds now.
                        "probed_replicas": h.replicas if h else None,
                        "utilization": round(h.utilization, 3) if h else None,
                        "uptime": round(h.up_probes / h.probes, 5) if h and h.probes else None,
                        "probes": h.probes if h else 0,
                        "last_probe_at": iso(h.last_probe_at) if h and h.last_probe_at else None,
                        "open_incident": open_incidents.get(app.name), "attention": app.attention})
        return out


def timeline(settings: Settings, incident_id: str, extra_seqs: tuple[int, ...] = ()) -> list[dict]:
    """The incident's proof records (and any extra ones, like the injection), in chain order."""
    with session_scope(settings, readonly=True) as session:
        query = select(ProofRecord).where(ProofRecord.env == settings.env)
        if extra_seqs:
            query = query.where((ProofRecord.incident_id == incident_id) | ProofRecord.seq.in_(extra_seqs))
        else:
            query = query.where(ProofRecord.incident_id == incident_id)
        return [proof.as_dict(r) for r in session.scalars(query.order_by(ProofRecord.seq))]


def timelines(settings: Settings, incident_ids: list[str]) -> dict[str, list[dict]]:
    """Several incidents' proof records in one query (a page of incidents, not one query each)."""
    out: dict[str, list[dict]] = {incident_id: [] for incident_id in incident_ids}
    if not incident_ids:
        return out
    with session_scope(settings, readonly=True) as session:
        query = select(ProofRecord).where(ProofRecord.env == settings.env, ProofRecord.incident_id.in_(incident_ids))
        for record in session.scalars(query.order_by(ProofRecord.seq)):
            out[record.incident_id].append(proof.as_dict(record))
    return out


def follow(settings: Settings, app: str, after_seq: int, timeout_s: float,
           on_record: Callable[[dict], None] = lambda r: None, poll_s: float = 0.1) -> dict | None:
    """Wait for the app's next incident (detected after proof seq `after_seq`) to end.

    Calls on_record for each of its proof records as they land; returns the closed incident,
    or None if nothing ended within the timeout.
    """
    deadline = time.monotonic() + timeout_s
    incident_id, seen, closed, learned = None, after_seq, None, False
    while time.monotonic() < deadline:
        with session_scope(settings, readonly=True) as session:
            query = select(ProofRecord).where(ProofRecord.env == settings.env, ProofRecord.seq > seen)
            for record in session.scalars(query.order_by(ProofRecord.seq)):
                seen = record.seq
                if incident_id is None and record.event_name == "INCIDENT_DETECTED" and record.app == app:
                    incident_id = record.incident_id
                if incident_id and record.incident_id == incident_id:
                    on_record(proof.as_dict(record))
                    learned = record.event_name == "RL_UPDATE"
            if incident_id and closed is None:
                incident = session.get(Incident, incident_id)
                if incident.status != IncidentStatus.OPEN:
                    closed = incident_dict(incident)
                    # The chain's last step (learning) lands just after the close: show it too.
                    deadline = min(deadline, time.monotonic() + LEARN_GRACE_S)
        if closed and learned:
            return closed
        time.sleep(poll_s)
    return closed


# Where each proof event of an incident stands in the healing chain, for a live tail: the
# lifecycle's step, in the words of a story (a verdict reads as itself; the execute step's
# gates and its act are told apart).
_PHASE_OF_STEP = {Step.DETECT: "opened", Step.DECIDE: "decided", Step.EXECUTE: "gated", Step.LEARN: "learned"}
_ACTED = ("ORCH_EXEC", "EXECUTION_DEDUPLICATED")
PHASES = {
    "INCIDENT_RESUMED": "resumed",
    "INCIDENT_WIDENED": "widened",  # a crash folded into the open incident (see cicd.healing.detector)
    **{name: (str(OUTCOME_OF_EVENT[name]) if step == Step.VERIFY else "executed" if name in _ACTED
              else _PHASE_OF_STEP[step]) for name, step in STEP_OF_EVENT.items()},
}


def phase_of(event_name: str) -> str:
    return PHASES.get(event_name, "other")


def incident_events(settings: Settings, after_seq: int, app: str | None = None, *, poll_s: float) -> Iterator[dict]:
    """Every proof record of an incident after `after_seq`, in chain order, as it lands; for ever.

    Followed by sequence number, never by time: appends take the chain head under a lock and
    commit in seq order, so reading `seq > last seen` again and again misses nothing and
    repeats nothing, however many agents append at once.
    """
    seen = after_seq
    while True:
        for record in proof.records_since(settings, seen):
            seen = record["seq"]
            if record["incident_id"] and (app is None or record["app"] == app):
                yield record
        time.sleep(poll_s)


def seconds_between(start_iso: str, end_iso: str) -> float:
    return round((parse_iso(end_iso) - parse_iso(start_iso)).total_seconds(), 3)


def payload_text(record: dict, width: int = 90) -> str:
    text = json.dumps(record.get("payload", {}), sort_keys=True, separators=(",", ":"))
    return text if len(text) <= width else text[:width - 1] + "…"




def latest_release(settings: Settings, app: str, status: str | None = None) -> dict | None:
    """The app's newest release (with that status, if given)."""
    with session_scope(settings, readonly=True) as session:
        query = select(Release).where(Release.env == settings.env, Release.app == app)
        if status:
            query = query.where(Release.status == status)
        release = session.scalar(query.order_by(Release.number.desc()).limit(1))
        if release is None:
            return None
        return {"release": release.number, "status": release.status, "detail": release.detail, "kind": release.kind,
                "ref": release.ref, "sha": release.sha, "started_at": iso(release.started_at),
                "finished_at": iso(release.finished_at) if release.finished_at else None}


def wait_for_release(settings: Settings, app: str, after: int, timeout_s: float,
                     on_progress=None) -> dict | None:
    """The first release numbered above `after` once it is live or failed; None on timeout.
    on_progress(release) is called each time its status or detail changes before that (the
    deploy writes each build step into the detail as it begins)."""
    deadline = time.monotonic() + timeout_s
    seen = None
    while time.monotonic() < deadline:
        release = latest_release(settings, app)
        if release and release["release"] > after and release["status"] in (ReleaseStatus.LIVE, ReleaseStatus.FAILED):
            return release
        if release and release["release"] > after and on_progress is not None:
            now = (release["release"], release["status"], release["detail"])
            if now != seen:
                seen = now
                on_progress(release)
        time.sleep(0.2)
    return None


def steady(settings: Settings, runtime: Runtime, app: str) -> bool:
    """Healthy on every replica at the last probe, no open incident, nobody called."""
    for row in apps(settings, runtime):
        if row["app"] == app:
            fresh = row["last_probe_at"] and (utcnow() - parse_iso(row["last_probe_at"])).total_seconds() < \
                max(3.0, 3 * settings.probe_interval_s)
            # An adopted app has no release of ours: its containers are all there is.
            released = row["release"] is not None or row["runtime"] == "adopted"
            return bool(fresh and released and row["replicas"] > 0
                        and row["healthy"] == row["replicas"] and row["open_incident"] is None
                        and row["attention"] is None)
    return False


# -- what a metrics scrape reads (cicd.web.metrics), in the scrape's one session --------------
def incident_counts(session: Session, env: str) -> list[tuple[str, str, int]]:
    """(kind, status, how many incidents) for every kind and status the environment has."""
    return session.execute(select(Incident.kind, Incident.status, func.count())
                           .where(Incident.env == env).group_by(Incident.kind, Incident.status)).all()


def probe_counts(session: Session, env: str) -> list[tuple[str, int, int, int, int]]:
    """(app, probes, up_probes, replicas, healthy_replicas) for every probed app, by app name."""
    return session.execute(select(AppHealth.app, AppHealth.probes, AppHealth.up_probes,
                                  AppHealth.replicas, AppHealth.healthy_replicas)
                           .where(AppHealth.env == env).order_by(AppHealth.app)).all()


def proof_head(session: Session, env: str) -> tuple[int, str]:
    """(seq, hash) of the chain's last record; (0, "") before the first."""
    head = session.get(ProofHead, env)
    return (head.seq, head.hash) if head else (0, "")


def proof_hash_at(session: Session, env: str, seq: int) -> str | None:
    """The hash of record `seq`, or None if there is no such record."""
    return session.scalar(select(ProofRecord.hash).where(ProofRecord.env == env, ProofRecord.seq == seq))


def proof_rows_between(session: Session, env: str, after_seq: int, up_to_seq: int, event_names: tuple[str, ...],
                   limit: int) -> list:
    """Records after `after_seq` up to `up_to_seq` with one of these event names, in seq order, at
    most `limit`: rows of seq, hash, event_name and payload (the JSON text, not parsed)."""
    return session.execute(
        select(ProofRecord.seq, ProofRecord.hash, ProofRecord.event_name, ProofRecord.payload)
        .where(ProofRecord.env == env, ProofRecord.seq > after_seq, ProofRecord.seq <= up_to_seq,
               ProofRecord.event_name.in_(event_names))
        .order_by(ProofRecord.seq).limit(limit)).all()


# -- the policy (cicd.web.api) ---------------------------------------------------------------
def policy_updates(session: Session, env: str) -> dict[tuple[str, str], int]:
    """(state, action) -> how many times learning updated its Q-value, for the learned pairs."""
    return {(r.state, r.action): r.updates for r in
            session.scalars(select(PolicyValue).where(PolicyValue.env == env))}
