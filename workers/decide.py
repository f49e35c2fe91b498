"""RL optimizer agent ({env}.decide): choose and sign an action; learn from the verified outcome."""
from celery.exceptions import Ignore

from cicd.healing import policy

from .app import celery_app, settings_for


@celery_app.task(name="cicd.decide.choose", bind=True)
def choose(self, incident, env):
    settings = settings_for(self, env)
    decision = policy.decide(settings, incident["incident_id"], incident["attempt"])
    if decision is None:
        raise Ignore()  # the incident was closed or moved on meanwhile
    return decision


@celery_app.task(name="cicd.decide.learn", bind=True)
def learn(self, outcome, env):
    if outcome is None:
        return None  # an earlier delivery already concluded this attempt, or a human holds it
    settings = settings_for(self, env)
    update = policy.learn_from_outcome(settings, outcome)
    if outcome.get("next_attempt"):
        from .chains import attempt_chain
        attempt_chain(env, outcome["incident_id"], outcome["next_attempt"]).apply_async()
    return update
