"""Prometheus metrics, read from the store (and the broker's queue lengths) at scrape time.

Nothing is counted in the agents: the proof log already records every decision, execution,
refusal and recovery, append-only and in order, so counters derived from it only ever grow and
survive any restart. The collector tallies the log incrementally (each scrape reads only the
records appended since the last one) and reads the small tables (incidents, app health) whole.

Every metric is named cicd_* and labelled with env:

    cicd_incidents_total{env,kind,outcome}              incidents that ended: stable, escalated, refused
    cicd_incidents_open{env,kind}                       incidents open now
    cicd_policy_decisions_total{env,action,choice}      RL decisions (choice: greedy or explored)
    cicd_actions_executed_total{env,action,status}      actions run by the orchestrator (done, failed)
    cicd_actions_refused_total{env,gate,reason,action}  refusals: the gate, its refusal event, the action
    cicd_time_to_recover_seconds{env,kind}              histogram: incident opened -> SYSTEM_STABLE
    cicd_app_uptime_ratio{env,app}                      probes that found a healthy replica / probes
    cicd_app_probes_total, cicd_app_up_probes_total     the two counts behind that ratio
    cicd_app_replicas, cicd_app_healthy_replicas        what the last probe saw
    cicd_queue_depth{env,agent,queue}                   messages waiting in each agent's queue
    cicd_broker_up{env}                                 1 if the broker answered (no depths when 0)
    cicd_store_up{env}                                  1 if the store could be read
    cicd_proof_records_total{env}                       length of the proof chain
"""
from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from cicd.core import actions
from cicd.stack import cluster
from cicd.config import AGENTS, ConfigError, Settings
from cicd.core.events import INCIDENT_KINDS, REFUSAL_EVENTS
from cicd.core.lifecycle import INCIDENT_END_STATES, IncidentStatus
from cicd.store import reports, session_scope
from cicd.store.errors import StoreError

log = logging.getLogger(__name__)

# Seconds: a restart recovers in 1-2 s, a scale-out in about 5, a redeploy in tens.
TTR_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TALLIED_EVENTS = ("RL_DECISION", "ORCH_EXEC", "SYSTEM_STABLE") + REFUSAL_EVENTS
SCAN_BATCH = 5000
# The classic text format, which every Prometheus reads; generate_latest writes it for names like
# ours (plain ASCII), while newer clients' CONTENT_TYPE_LATEST announces a version old servers refuse.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class ProofTally:
    """Counts over one environment's proof log up to `seq` (whose record had `hash`)."""
    seq: int = 0
    hash: str = ""
    decisions: Counter = field(default_factory=Counter)   # (action, choice)
    executed: Counter = field(default_factory=Counter)    # (action, status)
    refused: Counter = field(default_factory=Counter)     # (gate, reason, action)
    ttr_buckets: dict = field(default_factory=dict)       # kind -> [count per bucket, +Inf last]
    ttr_sum: Counter = field(default_factory=Counter)     # kind -> seconds

    def add(self, event_name: str, payload: dict) -> None:
        if not isinstance(payload, dict):
            return
        if event_name == "RL_DECISION":
            explored = str(payload.get("reason", "")).startswith("explored")
            self.decisions[(_action_label(payload.get("action")), "explored" if explored else "greedy")] += 1
        elif event_name == "ORCH_EXEC":
            self.executed[(_action_label(payload.get("action")), str(payload.get("status")))] += 1
        elif event_name in REFUSAL_EVENTS:
            self.refused[(str(payload.get("gate")), event_name, _action_label(payload.get("action")))] += 1
        elif event_name == "SYSTEM_STABLE":
            seconds = payload.get("time_to_recover_s")
            if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
                kind = str(payload.get("kind"))
                counts = self.ttr_buckets.setdefault(kind, [0] * (len(TTR_BUCKETS) + 1))
                counts[next((i for i, le in enumerate(TTR_BUCKETS) if seconds <= le), len(TTR_BUCKETS))] += 1
                self.ttr_sum[kind] += seconds


def _action_label(action) -> str:
    # A refused decision's action is whatever its sender wrote: keep the label set bounded.
    return action if action in actions.CATALOGUE else "uncatalogued"


class StoreCollector:
    """A custom collector: every scrape reads the store of each environment it was given."""

    def __init__(self, settings: list[Settings]):
        self.settings = list(settings)
        self._tallies: dict[tuple[str, str], ProofTally] = {}
        self._lock = threading.Lock()  # scrapes may come from several server threads at once

    def describe(self):
        return []  # names are only known at scrape time; nothing to check at registration

    def collect(self):
        f = _families()
        for settings in self.settings:
            env = settings.env
            try:
                self._collect_store(settings, f)
                f["store_up"].add_metric([env], 1)
            except StoreError as exc:
                log.warning("metrics: the %s store could not be read: %s", env, exc)
                f["store_up"].add_metric([env], 0)
            self._collect_queues(settings, f)
        yield from f.values()

    # -- the store -----------------------------------------------------------------------------
    def _collect_store(self, settings: Settings, f: dict) -> None:
        env = settings.env
        with session_scope(settings, readonly=True) as session:
            tally = self._tally(session, settings)
            by_outcome = reports.incident_counts(session, env)
            health = reports.probe_counts(session, env)
        open_now = Counter({kind: 0 for kind in INCIDENT_KINDS})
        for kind, status, count in by_outcome:
            if status == IncidentStatus.OPEN:
                open_now[kind] += count
            elif status in INCIDENT_END_STATES:
                f["incidents"].add_metric([env, kind, status], count)
        for kind, count in sorted(open_now.items()):
            f["incidents_open"].add_metric([env, kind], count)
        for (action, choice), count in sorted(tally.decisions.items()):
            f["decisions"].add_metric([env, action, choice], count)
        for (action, status), count in sorted(tally.executed.items()):
            f["executed"].add_metric([env, action, status], count)
        for (gate, reason, action), count in sorted(tally.refused.items()):
            f["refused"].add_metric([env, gate, reason, action], count)
        for kind, counts in sorted(tally.ttr_buckets.items()):
            cumulative, buckets = 0, []
            for le, count in zip([*(_le(b) for b in TTR_BUCKETS), "+Inf"], counts):
                cumulative += count
                buckets.append((le, cumulative))
            f["ttr"].add_metric([env, kind], buckets, sum_value=round(tally.ttr_sum[kind], 6))
        for app, probes, up_probes, replicas, healthy in health:
            f["probes"].add_metric([env, app], probes)
            f["up_probes"].add_metric([env, app], up_probes)
            f["replicas"].add_metric([env, app], replicas)
            f["healthy"].add_metric([env, app], healthy)
            if probes:
                f["uptime"].add_metric([env, app], up_probes / probes)
        f["proof"].add_metric([env], tally.seq)

    def _tally(self, session, settings: Settings) -> ProofTally:
        """Bring this environment's tally up to the chain's head, reading only what is new.

        The log only grows, in seq order (a seq is taken under the head's lock and committed with
        it). If the record the tally ended at is no longer there with the same hash, the
        database was replaced (a fresh home, a restore): count again from the start."""
        env = settings.env
        key = (settings.database_url, env)
        with self._lock:
            tally = self._tallies.get(key)
            head_seq, head_hash = reports.proof_head(session, env)
            if tally is not None and tally.seq:
                kept = reports.proof_hash_at(session, env, tally.seq)
                if kept != tally.hash or head_seq < tally.seq:
                    tally = None
            if tally is None:
                tally = self._tallies[key] = ProofTally()
            while tally.seq < head_seq:
                rows = reports.proof_rows_between(session, env, tally.seq, head_seq, TALLIED_EVENTS, SCAN_BATCH)
                for row in rows:
                    try:
                        tally.add(row.event_name, json.loads(row.payload))
                    except ValueError:
                        pass  # unreadable payload: `cicd proof verify` is where that is reported
                # Progress is kept batch by batch, so a scrape that fails half-way counts nothing twice.
                tally.seq, tally.hash = ((rows[-1].seq, rows[-1].hash) if len(rows) == SCAN_BATCH
                                         else (head_seq, head_hash))
            return tally

    # -- the broker ----------------------------------------------------------------------------
    def _collect_queues(self, settings: Settings, f: dict) -> None:
        env = settings.env
        try:
            broker_url = cluster.broker_url_for(settings, cluster.read_stack(settings))
        except ConfigError as exc:  # e.g. a password file with loose permissions
            log.warning("metrics: no broker for %s: %s", env, exc)
            broker_url = ""
        queues = [settings.queue(agent) for agent in AGENTS]
        depths = cluster.queue_depths(broker_url, queues) if broker_url else {}
        up = bool(depths) and all(depth is not None for depth in depths.values())
        f["broker_up"].add_metric([env], 1 if up else 0)
        if up:
            for agent, queue in zip(AGENTS, queues):
                f["queue_depth"].add_metric([env, agent, queue], depths[queue])


def _le(bound: float) -> str:
    return f"{bound:g}" if bound != int(bound) else f"{bound:.1f}"


def _families() -> dict:
    return {
        "incidents": CounterMetricFamily("cicd_incidents", "Incidents that ended, by kind and outcome.",
                                         labels=["env", "kind", "outcome"]),
        "incidents_open": GaugeMetricFamily("cicd_incidents_open", "Incidents open now, by kind.",
                                            labels=["env", "kind"]),
        "decisions": CounterMetricFamily("cicd_policy_decisions", "Recovery actions chosen by the policy.",
                                         labels=["env", "action", "choice"]),
        "executed": CounterMetricFamily("cicd_actions_executed", "Actions the orchestrator ran, by outcome.",
                                        labels=["env", "action", "status"]),
        "refused": CounterMetricFamily("cicd_actions_refused",
                                       "Decisions refused by a gate (reason: the gate's refusal event).",
                                       labels=["env", "gate", "reason", "action"]),
        "ttr": HistogramMetricFamily("cicd_time_to_recover_seconds",
                                     "Seconds from an incident's detection to SYSTEM_STABLE.", labels=["env", "kind"]),
        "uptime": GaugeMetricFamily("cicd_app_uptime_ratio",
                                    "Share of probes that found at least one healthy replica.", labels=["env", "app"]),
        "probes": CounterMetricFamily("cicd_app_probes", "Probe cycles that probed the app.", labels=["env", "app"]),
        "up_probes": CounterMetricFamily("cicd_app_up_probes", "Probe cycles that found a healthy replica.",
                                         labels=["env", "app"]),
        "replicas": GaugeMetricFamily("cicd_app_replicas", "Replicas the last probe saw.", labels=["env", "app"]),
        "healthy": GaugeMetricFamily("cicd_app_healthy_replicas", "Healthy replicas at the last probe.",
                                     labels=["env", "app"]),
        "queue_depth": GaugeMetricFamily("cicd_queue_depth", "Messages waiting in an agent's queue.",
                                         labels=["env", "agent", "queue"]),
        "broker_up": GaugeMetricFamily("cicd_broker_up", "1 if the broker answered this scrape.", labels=["env"]),
        "store_up": GaugeMetricFamily("cicd_store_up", "1 if the store could be read this scrape.", labels=["env"]),
        "proof": CounterMetricFamily("cicd_proof_records", "Records in the proof chain.", labels=["env"]),
    }


def registry(settings: list[Settings]) -> CollectorRegistry:
    """A registry holding only the store collector (no process metrics of whoever serves it)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StoreCollector(settings))
    return reg


def render(reg: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(reg), CONTENT_TYPE
