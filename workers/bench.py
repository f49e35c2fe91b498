"""For `cicd bench`: the bare-Celery baseline chains end by noting when they got there."""
import time

import redis

from .app import celery_app

_client = None


def record_done(key: str, value) -> None:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(celery_app.conf.broker_url)
    _client.rpush(key, f"{value}:{time.time()!r}")
