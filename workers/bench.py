"""For `cicd bench` only: one no-op task per agent, the hops of the bare-Celery baseline chains.

Production workers never load this module. The bench starts its stack with CICD_BENCH_TASKS=1, and
celeryconfig then adds it to the imports of that stack's workers (celery_config(bench_tasks=True)).
The names stay cicd.<agent>.noop, so they route to each agent's own queue like its real tasks.
"""
import time

import redis

from cicd.config import AGENTS

from .app import celery_app

_client = None


def record_done(key: str, value) -> None:
    """The last hop of a baseline chain notes when it got there."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(celery_app.conf.broker_url)
    _client.rpush(key, f"{value}:{time.time()!r}")


def noop(previous=None, env=None, done_key=None):
    """A hop that does nothing: `cicd bench` chains these as the bare-Celery baseline."""
    if done_key:
        record_done(done_key, previous)
    return previous


NOOP_TASKS = {agent: celery_app.task(name=f"cicd.{agent}.noop")(noop) for agent in AGENTS}
