"""A store filled the way the healing chain fills it, for the read side's tests (cicd.api,
cicd.metrics): apps with their probe counters, incidents in every end state, and each
incident's proof records with the payloads the agents write."""
from __future__ import annotations

from datetime import timedelta

from cicd.store import proof
from cicd.config import Settings
from cicd.core.events import iso, utcnow
from cicd.healing.orchestrator import GATE_NAMES
from cicd.store import App, AppHealth, Incident, session_scope

# Set by fill(): ages are relative to when the store is filled, not to when this module was
# imported (a test run long after the import would otherwise find every probe stale).
NOW = utcnow()

# app -> (probes, up_probes, replicas, healthy, seconds since the last probe, attention)
APPS = {
    "web": (10, 9, 2, 2, 0.2, None),
    "api": (10, 5, 2, 1, 0.2, None),
    "old": (4, 4, 2, 2, 3600.0, None),
    "down": (8, 2, 2, 0, 0.2, None),
    "called": (6, 6, 1, 1, 0.2, "not recovered after 3 attempts"),
}
HOSTILE = '<img src=x onerror="alert(1)">'


def _incident(session, env, incident_id, app, kind, severity, status, opened_s_ago, closed_s_ago=None, attempt=1,
              action=None):
    session.add(Incident(
        id=incident_id, env=env, app=app, kind=kind, severity=severity, status=status, attempt=attempt, slot=0,
        signal={"app": app}, opened_at=NOW - timedelta(seconds=opened_s_ago),
        closed_at=None if closed_s_ago is None else NOW - timedelta(seconds=closed_s_ago),
        resolution="" if status == "open" else f"ended {status}", context={},
        decision={"action": action, "attempt": attempt} if action else None,
        open_key=f"{env}/{app}" if status == "open" else None))


def _decision(action, attempt, explored=False):
    reason = (f"explored (epsilon 0.1): random pick; greedy would be {action}" if explored
              else f"greedy: highest Q +0.900, ahead of noop (-0.600)")
    return {"attempt": attempt, "action": action, "params": {"slots": [0]}, "mode": "greedy",
            "state": {"kind": "crash"}, "q_values": {action: 0.9, "noop": -0.6}, "reason": reason,
            "issued_at": iso(NOW), "nonce": "n" * 32}


def executed(session, env, incident_id, app, kind, action, attempt, status="done"):
    """RL_CONSUME, RL_DECISION, RL_INTAKE_VALIDATED, EXECUTION_GATE_PASSED, ORCH_EXEC."""
    proof.append(session, env, "RL_CONSUME", incident_id=incident_id, app=app,
                 payload={"attempt": attempt, "kind": kind, "severity": "high", "context": {}})
    proof.append(session, env, "RL_DECISION", incident_id=incident_id, app=app, payload=_decision(action, attempt))
    proof.append(session, env, "RL_INTAKE_VALIDATED", incident_id=incident_id, app=app,
                 payload={"attempt": attempt, "nonce": "n" * 32})
    proof.append(session, env, "EXECUTION_GATE_PASSED", incident_id=incident_id, app=app,
                 payload={"attempt": attempt, "action": action, "params": {"slots": [0]}, "gates": list(GATE_NAMES)})
    proof.append(session, env, "ORCH_EXEC", incident_id=incident_id, app=app,
                 payload={"attempt": attempt, "action": action, "params": {"slots": [0]}, "status": status,
                          "result": {"restarted": [0]} if status == "done" else {"error": "no such process"}})


def stable(session, env, incident_id, app, kind, action, attempt, seconds):
    proof.append(session, env, "SYSTEM_STABLE", incident_id=incident_id, app=app,
                 payload={"attempt": attempt, "action": action, "kind": kind, "time_to_recover_s": seconds})
    proof.append(session, env, "RL_UPDATE", incident_id=incident_id, app=app,
                 payload={"state": {"kind": kind, "attempt": attempt}, "action": action, "result": "stable",
                          "reward": 0.85, "mode": "greedy", "applied": False, "why": "stage policy is frozen"})


def fill(settings: Settings) -> None:
    global NOW
    NOW = utcnow()
    env = settings.env
    with session_scope(settings) as session:
        for name, (probes, up, replicas, healthy, age, attention) in APPS.items():
            session.add(App(env=env, name=name, runtime="backend", repo=f"https://git.example/{name}.git",
                            spec={"replicas": replicas}, attention=attention))
            session.add(AppHealth(env=env, app=name, probes=probes, up_probes=up, replicas=replicas,
                                  healthy_replicas=healthy, utilization=0.3,
                                  last_probe_at=NOW - timedelta(seconds=age)))
        session.add(App(env=env, name="new", runtime="backend", repo="https://git.example/new.git",
                        spec={"replicas": 2}))
        # inc-a: a crash, restarted, stable in 1.5 s.
        _incident(session, env, "inc-a", "web", "crash", "high", "stable", 400, 398.5, action="restart_service")
        proof.append(session, env, "INCIDENT_DETECTED", incident_id="inc-a", app="web",
                     payload={"kind": "crash", "severity": "high", "signal": {"app": "web"}, "context": {}})
        executed(session, env, "inc-a", "web", "crash", "restart_service", 1)
        stable(session, env, "inc-a", "web", "crash", "restart_service", 1, 1.5)
        # inc-b: an overload whose decision the allowlist gate refused (DEMO_MODE).
        _incident(session, env, "inc-b", "api", "overload", "medium", "refused", 300, 299, action="retry_deployment")
        proof.append(session, env, "INCIDENT_DETECTED", incident_id="inc-b", app="api",
                     payload={"kind": "overload", "severity": "medium", "signal": {}, "context": {}})
        proof.append(session, env, "RL_DECISION", incident_id="inc-b", app="api",
                     payload=_decision("retry_deployment", 1))
        refusal = {"gate": "allowlist", "reason": "retry_deployment is not allowed in DEMO_MODE",
                   "action": "retry_deployment", "attempt": 1}
        proof.append(session, env, "ORCH_REFUSE", incident_id="inc-b", app="api", payload=refusal)
        proof.append(session, env, "DEMO_MODE_BLOCK", incident_id="inc-b", app="api", payload=refusal)
        proof.append(session, env, "REFUSAL_EMIT_SUCCESS", incident_id="inc-b", app="api",
                     payload={"gate": "allowlist"})
        proof.append(session, env, "INCIDENT_REFUSED", incident_id="inc-b", app="api",
                     payload={"attempt": 1, "action": "retry_deployment", "kind": "overload",
                              "reason": "retry_deployment refused by the allowlist gate"})
        # inc-c: a critical crash; the restart failed, scaling out recovered it on attempt 2.
        _incident(session, env, "inc-c", "web", "crash", "critical", "stable", 200, 192.8, attempt=2,
                  action="scale_workers")
        proof.append(session, env, "INCIDENT_DETECTED", incident_id="inc-c", app="web",
                     payload={"kind": "crash", "severity": "critical", "signal": {}, "context": {}})
        executed(session, env, "inc-c", "web", "crash", "restart_service", 1, status="failed")
        proof.append(session, env, "ATTEMPT_FAILED", incident_id="inc-c", app="web",
                     payload={"attempt": 1, "action": "restart_service", "kind": "crash",
                              "detail": "not stable within 6 s (0:down)", "next_attempt": 2})
        executed(session, env, "inc-c", "web", "crash", "scale_workers", 2)
        stable(session, env, "inc-c", "web", "crash", "scale_workers", 2, 7.2)
        # inc-d: a false alarm still open, its decision explored.
        _incident(session, env, "inc-d", "api", "false_alarm", "low", "open", 5, action="noop")
        proof.append(session, env, "INCIDENT_DETECTED", incident_id="inc-d", app="api",
                     payload={"kind": "false_alarm", "severity": "low", "signal": {}, "context": {}})
        proof.append(session, env, "RL_DECISION", incident_id="inc-d", app="api",
                     payload=_decision("noop", 1, explored=True))
        # A forged decision for no incident, with markup for an action: refused at intake.
        forged = {"gate": "intake", "reason": "signature does not verify", "action": HOSTILE, "attempt": 1}
        proof.append(session, env, "ORCH_REFUSE", payload=forged)
        proof.append(session, env, "INTAKE_REFUSED", payload=forged)
        proof.append(session, env, "REFUSAL_EMIT_SUCCESS", payload={"gate": "intake"})
