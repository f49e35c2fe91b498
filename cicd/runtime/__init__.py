"""Runtimes: where apps run. `make_runtime` picks the one the settings ask for."""
from __future__ import annotations

from ..config import Settings
from .base import ReplicaStatus, Runtime, RuntimeFailure

__all__ = ["ReplicaStatus", "Runtime", "RuntimeFailure", "make_runtime"]


def make_runtime(settings: Settings) -> Runtime:
    from .local import LocalRuntime
    return LocalRuntime(settings)
