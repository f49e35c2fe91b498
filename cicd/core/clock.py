"""Time as a port: the domain steps ask a Clock, so tests (and the simulator) can set it.

The system clock is the default everywhere; a ManualClock moves only when told to, so a test of
a backoff, an expiry or a stall says how much time passes instead of sleeping and hoping the
machine keeps up.
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """An aware UTC datetime."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going back (for measuring intervals)."""


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """Starts at `start` (default: the system's now, so timestamps stay plausible beside the ones
    the store writes) and moves only by advance()."""

    def __init__(self, start: datetime | None = None):
        self._now = (start or datetime.now(timezone.utc)).astimezone(timezone.utc)
        self._elapsed = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._elapsed

    def advance(self, seconds: float) -> datetime:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += timedelta(seconds=seconds)
        self._elapsed += seconds
        return self._now

    def __repr__(self) -> str:
        return f"ManualClock({self._now.isoformat()})"


SYSTEM_CLOCK = SystemClock()
