"""Host agent ({env}.host.{name}): the runtime actions for the apps placed on this machine.

Started by `cicd host-agent` on each host, beside the deploy agent's tasks (celeryconfig imports
workers.deploy here too: a placed app's release is built where it runs). The orchestrator on the
control plane runs the gates and claims the execution; this agent runs the claimed action by its
key, records it, and the chain goes on (verify, learn) on the control plane."""
from celery.exceptions import Ignore

from cicd.healing import orchestrator

from .app import celery_app, runtime, settings_for
from .chains import deploy_requester


@celery_app.task(name="cicd.host.act", bind=True)
def act(self, incident_id, attempt, env, host):
    settings = settings_for(self, env)
    execution = orchestrator.act_dispatched(settings, runtime(), incident_id, attempt, deploy_requester(env))
    if execution is None:
        raise Ignore()  # no such claim: nothing to do, nothing follows
    return execution


@celery_app.task(name="cicd.host.inject", bind=True, ignore_result=False)
def inject(self, app, kind, options, env, host):
    """`cicd inject` on a placed app: the fault is made where the app runs."""
    from cicd.runtime import RuntimeFailure
    settings_for(self, env)
    try:
        return {"ok": True, **runtime().inject(app, kind, **options)}
    except RuntimeFailure as exc:
        return {"ok": False, "error": str(exc)}
