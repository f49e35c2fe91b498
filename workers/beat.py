"""A beat that cannot run twice: it takes a lock in Redis at start and renews it on every tick.

A second beat for the same environment finds the lock held and exits with a clear message. If
the holder dies, a new beat on the same host takes the lock over at once; elsewhere, it waits
for the lock to run out (LOCK_TTL_S).
"""
from __future__ import annotations

import os
import socket
import uuid

import redis
from celery.beat import PersistentScheduler

from cicd.config import Settings

LOCK_TTL_S = 15
# Renew only if the lock is still ours: never extend a lock another beat has taken over.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
_SWAP = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SingleBeatScheduler(PersistentScheduler):
    def setup_schedule(self):
        env = Settings.load().env
        self._lock_key = f"cicd:{env}:beat-lock"
        self._token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._redis = redis.Redis.from_url(self.app.conf.broker_url, socket_timeout=5)
        if not self._redis.set(self._lock_key, self._token, nx=True, ex=LOCK_TTL_S) and not self._take_over():
            holder = self._redis.get(self._lock_key)
            raise SystemExit(f"another beat for {env} is running ({holder.decode() if holder else '?'} holds "
                             f"{self._lock_key}); beat must never run twice")
        super().setup_schedule()

    def _take_over(self) -> bool:
        """A holder on this host whose process is gone (killed, so it could not let go) need not
        be waited for: swap its token for ours, atomically, only if it is still that token."""
        holder = self._redis.get(self._lock_key)
        host, _, rest = (holder or b"").decode().partition(":")
        pid = rest.split(":")[0]
        if host != socket.gethostname() or not pid.isdigit() or _process_exists(int(pid)):
            return False
        return bool(self._redis.eval(_SWAP, 1, self._lock_key, holder, self._token, LOCK_TTL_S))

    def tick(self, *args, **kwargs):
        try:
            held = self._redis.eval(_RENEW, 1, self._lock_key, self._token, LOCK_TTL_S)
        except redis.ConnectionError:
            return 1.0  # the broker is restarting: send nothing, look again in a second
        if not held:
            raise SystemExit(f"lost the beat lock {self._lock_key}: another beat took over; stopping")
        return super().tick(*args, **kwargs)

    def close(self):
        try:
            self._redis.eval(_RELEASE, 1, self._lock_key, self._token)
        except (redis.RedisError, AttributeError):
            pass  # the lock runs out by itself
        super().close()


def holds_lock(broker_url: str, env: str) -> bool:
    """A beat of this host holds the environment's lock, and its process is alive. A beat that
    stopped ticking stops renewing the lock, which then runs out within LOCK_TTL_S."""
    client = redis.Redis.from_url(broker_url, socket_timeout=5)
    holder = client.get(f"cicd:{env}:beat-lock")
    host, _, rest = (holder or b"").decode().partition(":")
    pid = rest.split(":")[0]
    return host == socket.gethostname() and pid.isdigit() and _process_exists(int(pid))


if __name__ == "__main__":
    # `python -m workers.beat check`: the healthcheck of docker-compose.yml's beat service.
    import sys

    if sys.argv[1:] != ["check"]:
        sys.exit("usage: python -m workers.beat check")
    settings = Settings.load()
    try:
        held = holds_lock(settings.broker_url, settings.env)
    except redis.RedisError as exc:
        sys.exit(f"beat of {settings.env}: cannot read its lock: {exc}")
    sys.exit(0 if held else f"beat of {settings.env}: no live beat of this host holds cicd:{settings.env}:beat-lock")
