"""Every incident reaches an end state, and every release a final one: what stopped moving is
sent on again (an incident's step) or finished here (a release).

At-least-once delivery keeps messages across worker deaths, but a message can still be lost
(a broker restarted between two AOF writes; a dead letter in the middle of a chain). So the
housekeeping task looks for open incidents with no proof record for stall_after_s and re-sends
the step they are on. Every step is idempotent (decisions are stored, executions keyed, verdicts
checked against the attempt), so sending one twice does no harm; the INCIDENT_RESUMED record it
writes also keeps the same incident from being resumed again before another stall_after_s.
"""
from __future__ import annotations

from datetime import timedelta

from cicd.store import executions, incidents, proof
from cicd.config import Settings
from cicd.core.events import parse_iso
from cicd.core.lifecycle import Step, next_step
from cicd.delivery import deployer
from cicd.healing.orchestrator import summary
from cicd.runtime.base import Runtime
from cicd.store import session_scope


def stalled(settings: Settings) -> list[dict]:
    """[{"step": "decide"|"execute"|"verify", "incident_id", ...what the step needs}]"""
    cutoff = settings.clock.now() - timedelta(seconds=settings.stall_after_s)
    out = []
    with session_scope(settings) as session:
        for incident in incidents.open_incidents(session, settings.env):
            last = proof.last_ts(session, settings.env, incident.id)
            if last is not None and parse_iso(last) > cutoff:
                continue
            attempt = incident.attempt
            execution = executions.get_claim(session, incident.id, attempt)
            due = next_step(incident.status, attempt, incident.decision, execution.status if execution else None)
            if due == Step.DECIDE:
                step = {"step": due, "incident": {"env": settings.env, "incident_id": incident.id,
                                                  "attempt": attempt}}
            elif due == Step.EXECUTE:
                step = {"step": due, "decision": incident.decision}
            elif due == Step.VERIFY:
                step = {"step": due, "execution": summary(execution)}
            else:
                continue  # waiting on purpose (a human, a backoff's due time): housekeeping resumes it
            proof.append(session, settings.env, "INCIDENT_RESUMED", incident_id=incident.id, app=incident.app,
                         payload={"attempt": attempt, "step": step["step"], "idle_since": last})
            out.append({"incident_id": incident.id, **step})
    return out


def finish_stalled_releases(settings: Settings, runtime: Runtime) -> list[dict]:
    """Releases under way whose deploy's lease lapsed (its worker died mid-deploy), finished or
    rolled back by deployer.resume; their states (with the incident signal a failed deploy
    raises, as the deploy agent's own would)."""
    from cicd.store import placements
    out = []
    for app, number in deployer.unattended(settings):
        if placements.elsewhere(settings, app):
            continue  # its replicas are on its host: only that host's runtime can finish the release
        state = deployer.resume(settings, runtime, app, number)
        if state is not None:
            out.append(state)
    return out
