"""Onboarding agent ({env}.onboard): validate, register, export the spec, trigger the first deploy."""
from cicd import onboarding

from .app import celery_app, settings_for


@celery_app.task(name="cicd.onboard.register", ignore_result=False)
def register(name, repo, runtime, env):
    settings = settings_for(env, "onboard.register", {"name": name, "repo": repo, "runtime": runtime})
    result = onboarding.register(settings, name, repo, runtime)
    if result["ok"]:
        from .deploy import release
        release.apply_async(kwargs={"app": name, "env": env, "request_id": f"onboard/{env}/{name}",
                                    "reason": "onboarded"})
    return result
