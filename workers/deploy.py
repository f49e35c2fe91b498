"""Deploy agent ({env}.deploy): fetch, build and start a release, health-gate it, switch; scale."""
from cicd.delivery import deployer
from cicd.core.events import Unprocessable
from cicd.core.lifecycle import ReleaseStatus

from .app import celery_app, runtime, settings_for, unprocessable

GATE_POLL_S = 0.25
LOCK_POLL_S = 1.0
# A deploy waits for the app's previous deploy to finish, up to half an hour.
LOCK_WAIT_RETRIES = 1800


def _raise_incident(env: str, signal: dict | None) -> None:
    if signal:
        from .chains import healing_chain
        healing_chain(env, signal).apply_async()


def _placed_elsewhere(settings, app: str, host: str | None) -> str:
    """The host an app's deploy must run on, when that is not here ("" otherwise). A task already
    sent to a host (host given) runs where it was sent."""
    from cicd.store import placements
    return "" if host else placements.elsewhere(settings, app)


@celery_app.task(name="cicd.deploy.release", bind=True, max_retries=LOCK_WAIT_RETRIES)
def release(self, app, env, request_id, ref="HEAD", reason="", kind="deploy", sha=None, host=None):
    settings = settings_for(self, env)
    if placed := _placed_elsewhere(settings, app, host):
        # Built and run where it is placed: the same task, for that host's agent ({env}.host.{name}).
        release.apply_async(kwargs={"app": app, "env": env, "request_id": request_id, "ref": ref, "reason": reason,
                                    "kind": kind, "sha": sha, "host": placed})
        return {"status": "forwarded", "host": placed, "request_id": request_id}
    try:
        state = deployer.start(settings, runtime(), app, request_id, ref=ref, reason=reason, kind=kind, sha=sha)
    except (deployer.DeployError, deployer.gitsource.SourceError) as exc:
        raise unprocessable(self, Unprocessable(str(exc))) from None
    if state["status"] == "busy":
        raise self.retry(countdown=LOCK_POLL_S)  # one deploy per app: wait for the one under way
    if state["status"] == ReleaseStatus.STARTING:
        health_gate.apply_async(kwargs={"app": app, "env": env, "release": state["release"],
                                        "started_at": state.get("replicas_started_at", state["started_at"]),
                                        **({"host": host} if host else {})},
                                countdown=GATE_POLL_S)
    _raise_incident(env, state.pop("signal", None))
    return state


@celery_app.task(name="cicd.deploy.health_gate", bind=True, max_retries=None)
def health_gate(self, app, env, release, started_at, host=None):
    # Waiting for replicas to come up is a retry with countdown: the worker is free meanwhile, the
    # spec's health deadline ends it, and if the message dies with its worker, housekeeping's
    # release reconciler concludes the release once its lease lapses.
    settings = settings_for(self, env)
    result, signal = deployer.gate(settings, runtime(), app, release, started_at)
    _raise_incident(env, signal or (result or {}).pop("signal", None))
    if result is None:
        raise self.retry(countdown=GATE_POLL_S)
    return result


@celery_app.task(name="cicd.deploy.scale", bind=True, ignore_result=False)
def scale(self, app, env, replicas, request_id, host=None):
    settings = settings_for(self, env)
    if placed := _placed_elsewhere(settings, app, host):
        raise self.replace(scale.s(app=app, env=env, replicas=replicas, request_id=request_id, host=placed))
    try:
        return {"ok": True, **deployer.scale(settings, runtime(), app, replicas, request_id)}
    except deployer.DeployError as exc:
        return {"ok": False, "error": str(exc)}
