"""The Celery app, and what every agent's tasks share: this process's settings and runtime, retry
on passing trouble, and a dead letter for every task that cannot be done."""
from __future__ import annotations

import os
from functools import lru_cache

import redis
from celery import Celery, Task
from celery.exceptions import Ignore
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError as BrokerError

import celeryconfig
from cicd import store
from cicd.store import deadletters
from cicd.store.errors import DatabaseError
from cicd.config import Settings
from cicd.core.events import Unprocessable
from cicd.runtime import Runtime, make_runtime


class AgentTask(Task):
    """Passing trouble (a locked or restarting database, a broker reconnecting) is retried with
    backoff; anything else, or retries run out: the task goes to the dead-letter store whole,
    with the rest of its chain, so `cicd dlq retry` can send it again."""
    autoretry_for = (DatabaseError, BrokerError, redis.exceptions.ConnectionError)
    retry_backoff = 0.5
    retry_backoff_max = 30
    retry_jitter = True
    max_retries = 8

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        dead_letter(self, f"{type(exc).__name__}: {exc}")


def process_celery_config() -> dict:
    """This process's Celery configuration: its environment's settings, the agent it serves
    (CICD_AGENT, set by `cicd up` and the compose file), and the benchmark's no-op tasks only
    where `cicd bench` started the worker (CICD_BENCH_TASKS)."""
    return celeryconfig.celery_config(Settings.load(), os.environ.get("CICD_AGENT", ""),
                                      bench_tasks=os.environ.get("CICD_BENCH_TASKS", "") == "1")


celery_app = Celery("cicd-heal", task_cls=AgentTask)
# A promise: read when Celery first needs its configuration, not when this module is imported (a
# command may start the broker, or choose its environment, after importing it).
celery_app.add_defaults(process_celery_config)


@lru_cache(maxsize=1)
def process_settings() -> Settings:
    return Settings.load()


def dead_letter(task: Task, reason: str) -> None:
    request = task.request
    deadletters.keep(process_settings(), task.name, request.args or [], request.kwargs or {}, reason,
                     chain=request.chain)


def settings_for(task: Task, env: str) -> Settings:
    """This worker's settings, if the message belongs to its environment.

    A message for another environment is never acted on: it becomes a dead letter and the task
    ends (Ignore also stops any chain it is part of).
    """
    settings = process_settings()
    if env != settings.env:
        dead_letter(task, f"message for environment {env!r} reached a {settings.env!r} worker")
        raise Ignore()
    return settings


def unprocessable(task: Task, exc: Unprocessable):
    """Keep the task as a dead letter and stop its chain."""
    dead_letter(task, str(exc))
    return Ignore()


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    return make_runtime(process_settings())


@worker_process_init.connect
def _fresh_connections(**_):
    # A pool child must not reuse database connections inherited from its parent.
    store.dispose_engines()
