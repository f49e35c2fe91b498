"""Orchestrator agent ({env}.orchestrate): gates, then the action exactly once, or a logged refusal."""
from celery.exceptions import Ignore

from cicd.healing import orchestrator

from .app import celery_app, runtime, settings_for
from .chains import deploy_requester


def _to_host(task, execution: dict, env: str):
    """A claimed action for an app placed on a host: this task is replaced by the host agent's, and
    the rest of the chain (verify, learn) follows that one. The message waits in the host's queue
    while its agent is down (acks late): the incident waits with it, then resumes."""
    from .chains import host_act
    raise task.replace(host_act(env, execution))


@celery_app.task(name="cicd.orchestrate.execute", bind=True)
def execute(self, decision, env):
    settings = settings_for(self, env)
    execution = orchestrator.execute(settings, runtime(), decision, deploy_requester(env))
    if execution.get("host"):
        _to_host(self, execution, env)
    return execution


@celery_app.task(name="cicd.orchestrate.execute_approved", bind=True)
def execute_approved(self, approval_id, env):
    settings = settings_for(self, env)
    execution = orchestrator.execute_approved(settings, runtime(), approval_id, deploy_requester(env))
    if execution is None:
        raise Ignore()  # not a granted action approval (or already carried out): nothing follows
    if execution.get("host"):
        _to_host(self, execution, env)
    return execution
