"""Event-driven crash detection: know the moment a replica process exits, without waiting for
the next probe. Linux gives a file descriptor per process (pidfd_open) that becomes readable when
the process ends, for any process, not only our children; one select() waits on all of them.

The probes still run: they see what a process exit cannot (a hung replica, a slow one), and
they are the fallback where pidfds are not available.
"""
from __future__ import annotations

import os
import select
from typing import Callable

from cicd.config import Settings
from cicd.core.events import iso
from cicd.runtime import process
from cicd.runtime.local import LocalRuntime


def available() -> bool:
    if not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except OSError:
        return False


def watch(settings: Settings, send: Callable[[dict], None], refresh_s: float = 0.5,
          keep_going: Callable[[], bool] = lambda: True) -> None:
    """Until keep_going() says stop: send a replica_down signal for each replica that exits while
    the runtime still counts it as live (a replica stopped on purpose is gone from its state first)."""
    runtime = LocalRuntime(settings)
    watched: dict[int, tuple[str, int, int, int]] = {}   # fd -> (app, slot, pid, ticks)
    while keep_going():
        live = {(app, r["slot"], r["pid"], r.get("ticks")) for app in runtime.apps() for r in runtime.replicas(app)}
        for fd, key in list(watched.items()):
            if key not in live:
                os.close(fd)
                del watched[fd]
        for key in live - set(watched.values()):
            try:
                fd = os.pidfd_open(key[2])
            except ProcessLookupError:
                fd = None
            if fd is None or not process.is_alive(key[2], key[3]):
                if fd is not None:
                    os.close(fd)
                continue  # already gone: the probes report it
            watched[fd] = key
        ready, _, _ = select.select(list(watched), [], [], refresh_s)
        for fd in ready:
            app, slot, pid, ticks = watched.pop(fd)
            os.close(fd)
            still_counted = any(r["pid"] == pid for r in runtime.replicas(app))
            if still_counted:
                send({"env": settings.env, "app": app, "kind": "replica_down", "slots": [slot],
                      "observed_at": iso(settings.clock.now()), "replicas_total": runtime.replica_count(app),
                      "detail": f"{slot}:exited (pid {pid})"})
