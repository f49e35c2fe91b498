"""The healing chain, built in one place: detect -> decide -> orchestrate -> verify -> learn.

Steps are named, not imported: a worker loads only its own agent's module (and its domain code),
and can still send work on to every other agent.
"""
from celery import chain

from .app import celery_app


def _step(name: str, *args, env: str):
    return celery_app.signature(name, args=args, kwargs={"env": env})


def healing_chain(env: str, signal: dict):
    return chain(_step("cicd.detect.classify", signal, env=env), _step("cicd.decide.choose", env=env),
                 *_after_decision(env))


def attempt_chain(env: str, incident_id: str, attempt: int):
    """A further attempt on an open incident: the same chain, without detection."""
    incident = {"env": env, "incident_id": incident_id, "attempt": attempt}
    return chain(_step("cicd.decide.choose", incident, env=env), *_after_decision(env))


def decision_chain(env: str, decision: dict):
    """A signed decision sent on again (its restart backoff is over)."""
    return chain(_step("cicd.orchestrate.execute", decision, env=env), *_verify_and_learn(env))


def verify_chain(env: str, execution: dict):
    """An execution whose verification was lost: verify and learn again."""
    return chain(_step("cicd.monitor.verify", execution, env=env), _step("cicd.decide.learn", env=env))


def approved_chain(env: str, approval_id: str):
    """A decision a human approved: execute it, then verify and learn as usual."""
    return chain(_step("cicd.orchestrate.execute_approved", approval_id, env=env), *_verify_and_learn(env))


def host_act(env: str, execution: dict):
    """The claimed action of an execution, for the agent of the host its app runs on."""
    return celery_app.signature("cicd.host.act", kwargs={
        "incident_id": execution["incident_id"], "attempt": execution["attempt"], "env": env,
        "host": execution["host"]})


def deploy(env: str, **kwargs):
    """A deploy, for the agents that ask the deploy agent for one."""
    return celery_app.signature("cicd.deploy.release", kwargs={**kwargs, "env": env})


def deploy_requester(env: str):
    """Deploy actions hand the deploy to the deploy agent, under the execution's key."""
    def request_deploy(app, request_id, kind, ref, sha, reason):
        deploy(env, app=app, request_id=request_id, kind=kind, ref=ref, sha=sha, reason=reason).apply_async()
    return request_deploy


def _after_decision(env: str):
    return (_step("cicd.orchestrate.execute", env=env), *_verify_and_learn(env))


def _verify_and_learn(env: str):
    return _step("cicd.monitor.verify", env=env), _step("cicd.decide.learn", env=env)
