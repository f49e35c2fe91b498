"""Footprint: resident memory of the whole stack (Redis, every worker and its pool children, beat,
the supervisor). RSS counts pages forked processes share once per process; PSS splits them fairly,
so both are reported."""
from __future__ import annotations

import threading

from .stacks import memory_kb


def measure(stack) -> dict:
    rss = pss = 0
    for pid in stack.pids():
        r, p = memory_kb(pid)
        rss, pss = rss + r, pss + p
    return {"processes": len(stack.pids()), "rss_mb": rss / 1024, "pss_mb": pss / 1024}


class Peak:
    """Samples the stack's memory in the background; keeps the highest."""

    def __init__(self, stack, every_s: float = 0.2):
        self.stack, self.every_s, self.peak = stack, every_s, {"rss_mb": 0.0, "pss_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.every_s):
            now = measure(self.stack)
            if now["rss_mb"] > self.peak["rss_mb"]:
                self.peak = now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
