"""Detector agent ({env}.detect): a probe's signal becomes an incident, or is dropped."""
from celery.exceptions import Ignore

from cicd import detector

from .app import celery_app, settings_for


@celery_app.task(name="cicd.detect.classify")
def classify(signal, env):
    settings = settings_for(env, "detect.classify", signal)
    incident = detector.open_incident(settings, signal)
    if incident is None:
        raise Ignore()  # nothing to heal (duplicate, stale or dead-lettered): the chain stops here
    return incident
