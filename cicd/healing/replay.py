"""What-if on real history: a recorded event stream through the healing chain on the simulated fleet.

The input is what `cicd proof export` writes (CSV or JSONL, the same columns). Each recorded
incident (INCIDENT_DETECTED: kind, severity, whether its release was fresh) becomes a fault in
the simulated fleet and is healed by today's policy, in-process, through the same shield, gates
and catalogue; the report sets what happened then beside what would happen now. The fault's
hidden cause is not in the record: it is drawn from the fault model (seeded).
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cicd.healing import learning
from cicd.config import Settings
from cicd.core.events import INCIDENT_KINDS, SEVERITIES
from cicd.core.lifecycle import IncidentStatus
from cicd.store.proof import EXPORT_COLUMNS
from cicd.store.reports import seconds_between
from cicd.runtime.sim import CAUSE_MIX, Fault, _weighted
from cicd.errors import CicdError

ENDINGS = {"SYSTEM_STABLE": IncidentStatus.STABLE, "ESCALATED": IncidentStatus.ESCALATED,
           "INCIDENT_REFUSED": IncidentStatus.REFUSED}


class TraceError(CicdError, ValueError):
    pass


@dataclass
class Recorded:
    incident_id: str
    app: str
    kind: str
    severity: str
    fresh: bool
    context: dict
    actions: list
    outcome: str
    seconds: float | None


def read_trace(path: Path) -> list[dict]:
    """Rows of a proof export; every row needs the export's columns, with a JSON payload."""
    text = Path(path).read_text(encoding="utf-8")
    if path.suffix == ".csv" or text.startswith(",".join(EXPORT_COLUMNS[:3])):
        reader = csv.DictReader(text.splitlines())
        missing = set(EXPORT_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise TraceError(f"{path}: missing columns {', '.join(sorted(missing))} (expected {', '.join(EXPORT_COLUMNS)})")
        rows = []
        for n, row in enumerate(reader, 2):
            try:
                row["payload"] = json.loads(row["payload"])
            except ValueError:
                raise TraceError(f"{path}:{n}: payload is not JSON") from None
            rows.append(row)
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise TraceError(f"{path}:{n}: not a JSON line") from None
    return rows


def incidents(rows: list[dict]) -> list[Recorded]:
    by_id: dict[str, Recorded] = {}
    opened_at: dict[str, str] = {}
    for row in rows:
        incident_id, name, payload = row.get("incident_id"), row.get("event_name"), row.get("payload") or {}
        if not incident_id:
            continue
        if name == "INCIDENT_DETECTED":
            kind, severity = payload.get("kind"), payload.get("severity")
            if kind not in INCIDENT_KINDS or severity not in SEVERITIES:
                continue
            context = payload.get("context") if isinstance(payload.get("context"), dict) else {}
            by_id[incident_id] = Recorded(incident_id, row.get("app") or "", kind, severity,
                                          bool(context.get("fresh_release")), context, [], IncidentStatus.OPEN,
                                          None)
            opened_at[incident_id] = row["ts"]
        elif incident_id in by_id and name == "RL_DECISION":
            by_id[incident_id].actions.append(payload.get("action"))
        elif incident_id in by_id and name in ENDINGS:
            record = by_id[incident_id]
            record.outcome = ENDINGS[name]
            record.seconds = seconds_between(opened_at[incident_id], row["ts"])
    return list(by_id.values())


def replay(settings: Settings, table: np.ndarray, recorded: list[Recorded], seed: int) -> list[dict]:
    rng = random.Random(seed)
    simulation = learning.Simulation(settings, seed)
    choose = learning.greedy(table, settings.policy_mode)
    out = []
    for record in recorded:
        fresh = record.fresh and (record.kind, True) in CAUSE_MIX
        fault = Fault(record.kind, fresh, record.severity, _weighted(rng, CAUSE_MIX[(record.kind, fresh)]))
        # What the record says could not be done (no earlier release to roll back to, nothing to
        # scale in) cannot be done in the replay either.
        known = {k: record.context[k] for k in ("rollback_to", "can_scale_in")
                 if k in record.context and not record.context[k]}
        episode = simulation.run(fault, choose, context=known)
        out.append({"incident_id": record.incident_id, "app": record.app, "kind": record.kind,
                    "severity": record.severity, "fresh": record.fresh,
                    "recorded": {"actions": record.actions, "outcome": record.outcome, "seconds": record.seconds},
                    "replayed": {"actions": episode.actions, "outcome": IncidentStatus.STABLE if episode.success
                                 else IncidentStatus.ESCALATED,
                                 "seconds": round(episode.time_to_recover_s, 3), "cause": fault.cause}})
    return out
