"""Onboarding agent ({env}.onboard): validate, register, export the spec, trigger the first deploy."""
from cicd.delivery import onboarding

from .app import celery_app, settings_for


@celery_app.task(name="cicd.onboard.register", bind=True, ignore_result=False)
def register(self, name, repo, runtime, env, place_on=None):
    # place_on, not host: a `host` argument would route this task to that host's agent.
    settings = settings_for(self, env)
    result = onboarding.register(settings, name, repo, runtime, host=place_on)
    if result["ok"]:
        from .chains import deploy
        deploy(env, app=name, request_id=f"onboard/{env}/{name}", reason="onboarded").apply_async()
    return result
