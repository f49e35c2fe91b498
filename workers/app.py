"""The Celery app, and what every agent's tasks share: this process's settings and runtime."""
from __future__ import annotations

from functools import lru_cache

from celery import Celery
from celery.exceptions import Ignore
from celery.signals import worker_process_init

from cicd import store
from cicd.config import Settings
from cicd.runtime import Runtime, make_runtime

celery_app = Celery("cicd-heal")
celery_app.config_from_object("celeryconfig")


@lru_cache(maxsize=1)
def process_settings() -> Settings:
    return Settings.load()


def settings_for(env: str, source: str, payload) -> Settings:
    """This worker's settings, if the message belongs to its environment.

    A message for another environment is never acted on: it is kept as a dead letter and the
    task ends (Ignore also stops any chain it is part of).
    """
    settings = process_settings()
    if env != settings.env:
        keep_dead_letter(settings, source, payload, f"message for environment {env!r} reached a {settings.env!r} worker")
        raise Ignore()
    return settings


def keep_dead_letter(settings: Settings, source: str, payload, reason: str) -> None:
    with store.session_scope(settings) as session:
        store.keep_dead_letter(session, settings.env, source, payload, reason)


@lru_cache(maxsize=1)
def runtime() -> Runtime:
    return make_runtime(process_settings())


@worker_process_init.connect
def _fresh_connections(**_):
    # A pool child must not reuse database connections inherited from its parent.
    store.dispose_engines()
