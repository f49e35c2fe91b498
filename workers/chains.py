"""The healing chain, built in one place: detect -> decide -> orchestrate -> verify -> learn."""
from celery import chain

from .decide import choose, learn
from .detect import classify
from .monitor import verify
from .orchestrate import execute, execute_approved


def healing_chain(env: str, signal: dict):
    return chain(classify.s(signal, env=env), choose.s(env=env), *_after_decision(env))


def attempt_chain(env: str, incident_id: str, attempt: int):
    """A further attempt on an open incident: the same chain, without detection."""
    incident = {"env": env, "incident_id": incident_id, "attempt": attempt}
    return chain(choose.s(incident, env=env), *_after_decision(env))


def decision_chain(env: str, decision: dict):
    """A signed decision sent on again (its restart backoff is over)."""
    return chain(execute.s(decision, env=env), verify.s(env=env), learn.s(env=env))


def verify_chain(env: str, execution: dict):
    """An execution whose verification was lost: verify and learn again."""
    return chain(verify.s(execution, env=env), learn.s(env=env))


def approved_chain(env: str, approval_id: str):
    """A decision a human approved: execute it, then verify and learn as usual."""
    return chain(execute_approved.s(approval_id, env=env), verify.s(env=env), learn.s(env=env))


def _after_decision(env: str):
    return execute.s(env=env), verify.s(env=env), learn.s(env=env)
