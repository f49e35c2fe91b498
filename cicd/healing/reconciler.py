"""Every incident reaches an end state: open incidents that stopped moving are sent on again.

At-least-once delivery keeps messages across worker deaths, but a message can still be lost
(a broker restarted between two AOF writes; a dead letter in the middle of a chain). So the
housekeeping task looks for open incidents with no proof record for stall_after_s and re-sends
the step they are on. Every step is idempotent (decisions are stored, executions keyed, verdicts
checked against the attempt), so sending one twice does no harm; the INCIDENT_RESUMED record it
writes also keeps the same incident from being resumed again before another stall_after_s.
"""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from cicd.store import proof
from cicd.config import Settings
from cicd.core.events import OPEN, parse_iso
from cicd.healing.orchestrator import summary
from cicd.store import Execution, Incident, ProofRecord, session_scope

WAITING_ON_PURPOSE = ("awaiting_approval", "deferred")


def stalled(settings: Settings) -> list[dict]:
    """[{"step": "decide"|"execute"|"verify", "incident_id", ...what the step needs}]"""
    cutoff = settings.clock.now() - timedelta(seconds=settings.stall_after_s)
    out = []
    with session_scope(settings) as session:
        for incident in session.scalars(select(Incident).where(Incident.env == settings.env,
                                                               Incident.status == OPEN)):
            last = session.scalar(select(ProofRecord.ts).where(ProofRecord.env == settings.env,
                                                               ProofRecord.incident_id == incident.id)
                                  .order_by(ProofRecord.seq.desc()).limit(1))
            if last is not None and parse_iso(last) > cutoff:
                continue
            attempt = incident.attempt
            decision = incident.decision if (incident.decision or {}).get("attempt") == attempt else None
            execution = session.scalar(select(Execution).where(Execution.incident_id == incident.id,
                                                               Execution.attempt == attempt))
            if execution is not None and execution.status in WAITING_ON_PURPOSE:
                continue
            if decision is None:
                step = {"step": "decide", "incident": {"env": settings.env, "incident_id": incident.id,
                                                       "attempt": attempt}}
            elif execution is None or execution.status == "started":
                step = {"step": "execute", "decision": decision}
            else:
                step = {"step": "verify", "execution": summary(execution)}
            proof.append(session, settings.env, "INCIDENT_RESUMED", incident_id=incident.id, app=incident.app,
                         payload={"attempt": attempt, "step": step["step"], "idle_since": last})
            out.append({"incident_id": incident.id, **step})
    return out
