"""Detector agent ({env}.detect): a probe's signal becomes an incident, or is dropped."""
from celery.exceptions import Ignore

from cicd.healing import detector
from cicd.core.events import Unprocessable

from .app import celery_app, settings_for, unprocessable


@celery_app.task(name="cicd.detect.classify", bind=True)
def classify(self, signal, env):
    settings = settings_for(self, env)
    try:
        incident = detector.open_incident(settings, signal)
    except Unprocessable as exc:
        raise unprocessable(self, exc) from None
    if incident is None:
        raise Ignore()  # nothing to heal (duplicate, stale, a human was called): the chain stops here
    return incident
