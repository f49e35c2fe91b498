"""Deploy agent ({env}.deploy): build and start a release, health-gate it, switch; scale on request."""
from cicd import deployer

from .app import celery_app, runtime, settings_for

GATE_POLL_S = 0.25


@celery_app.task(name="cicd.deploy.release")
def release(app, env, request_id, reason=""):
    settings = settings_for(env, "deploy.release", {"app": app, "request_id": request_id})
    state = deployer.start(settings, runtime(), app, request_id, reason)
    if state["status"] == "starting":
        health_gate.apply_async(kwargs={"app": app, "env": env, "release": state["release"],
                                        "started_at": state["started_at"]}, countdown=GATE_POLL_S)
    return state


@celery_app.task(name="cicd.deploy.health_gate", bind=True, max_retries=None)
def health_gate(self, app, env, release, started_at):
    # Waiting for replicas to come up is a retry with countdown: the worker is free meanwhile.
    settings = settings_for(env, "deploy.health_gate", {"app": app, "release": release})
    result = deployer.gate(settings, runtime(), app, release, started_at)
    if result is None:
        raise self.retry(countdown=GATE_POLL_S)
    return result


@celery_app.task(name="cicd.deploy.scale", ignore_result=False)
def scale(app, env, replicas, request_id):
    settings = settings_for(env, "deploy.scale", {"app": app, "replicas": replicas})
    try:
        return {"ok": True, **deployer.scale(settings, runtime(), app, replicas, request_id)}
    except deployer.DeployError as exc:
        return {"ok": False, "error": str(exc)}
