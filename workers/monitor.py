"""Monitor agent ({env}.monitor): beat-scheduled probes of every app; verification after an action."""
from cicd import approvals, monitor, verifier
from cicd.events import iso, utcnow

from .app import celery_app, runtime, settings_for


@celery_app.task(name="cicd.monitor.probe_all")
def probe_all(env):
    settings = settings_for(env, "monitor.probe_all", {})
    signals = monitor.probe_cycle(settings, runtime())
    from .chains import healing_chain
    for signal in signals:
        healing_chain(env, signal).apply_async()
    return len(signals)


@celery_app.task(name="cicd.monitor.verify", bind=True, max_retries=None)
def verify(self, execution, env, stable_checks=0, started_at=None):
    settings = settings_for(env, "monitor.verify", execution)
    started_at = started_at or iso(utcnow())
    state, value = verifier.check(settings, runtime(), execution, stable_checks, started_at)
    if state == "wait":
        # Not stable yet: look again shortly, without holding the worker.
        raise self.retry(args=(execution,), kwargs={"env": env, "stable_checks": value, "started_at": started_at},
                         countdown=settings.verify_interval_s)
    return value


@celery_app.task(name="cicd.monitor.housekeeping")
def housekeeping(env):
    settings = settings_for(env, "monitor.housekeeping", {})
    return {"expired_approvals": approvals.expire_due(settings)}
