"""Monitor agent ({env}.monitor): beat-scheduled probes of every app; verification after an action."""
from cicd.healing import approvals, orchestrator, reconciler, verifier
from cicd.signals import probes as monitor
from cicd.core.events import iso
from cicd.core.lifecycle import Step

from .app import celery_app, runtime, settings_for


@celery_app.task(name="cicd.monitor.probe_all", bind=True)
def probe_all(self, env):
    settings = settings_for(self, env)
    signals = monitor.probe_cycle(settings, runtime())
    from .chains import healing_chain
    for signal in signals:
        healing_chain(env, signal).apply_async()
    return len(signals)


@celery_app.task(name="cicd.monitor.verify", bind=True, max_retries=None)
def verify(self, execution, env, stable_checks=0, started_at=None):
    settings = settings_for(self, env)
    started_at = started_at or iso(settings.clock.now())
    state, value = verifier.check(settings, runtime(), execution, stable_checks, started_at)
    if state == "wait":
        # Not stable yet: look again shortly, without holding the worker.
        raise self.retry(args=(execution,), kwargs={"env": env, "stable_checks": value, "started_at": started_at},
                         countdown=settings.verify_interval_s)
    return value


@celery_app.task(name="cicd.monitor.housekeeping", bind=True)
def housekeeping(self, env):
    settings = settings_for(self, env)
    from .chains import attempt_chain, decision_chain, healing_chain, verify_chain
    deferred = orchestrator.due_deferred(settings)
    for decision in deferred:
        decision_chain(env, decision).apply_async()
    stalled = reconciler.stalled(settings)
    for step in stalled:
        if step["step"] == Step.DECIDE:
            attempt_chain(env, step["incident_id"], step["incident"]["attempt"]).apply_async()
        elif step["step"] == Step.EXECUTE:
            decision_chain(env, step["decision"]).apply_async()
        else:
            verify_chain(env, step["execution"]).apply_async()
    released = reconciler.finish_stalled_releases(settings, runtime())
    for state in released:
        if state.get("signal"):
            healing_chain(env, state.pop("signal")).apply_async()
    return {"expired_approvals": approvals.expire_due(settings), "resumed_after_backoff": len(deferred),
            "resumed_stalled": len(stalled), "releases_reconciled": len(released)}
