"""Orchestrator agent ({env}.orchestrate): gates, then the action exactly once, or a logged refusal."""
from cicd import orchestrator

from .app import celery_app, runtime, settings_for


@celery_app.task(name="cicd.orchestrate.execute")
def execute(decision, env):
    settings = settings_for(env, "orchestrate.execute", decision)
    return orchestrator.execute(settings, runtime(), decision)
