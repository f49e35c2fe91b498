"""Runtimes: where apps run. `make_runtime` picks the one the settings ask for."""
from __future__ import annotations

from cicd.config import Settings
from cicd.runtime.base import ReplicaStatus, Runtime, RuntimeFailure

__all__ = ["ReplicaStatus", "Runtime", "RuntimeFailure", "make_runtime"]


def make_runtime(settings: Settings) -> Runtime:
    """Real processes (the default), containers (CICD_RUNTIME=docker), or the simulated fleet shared
    by all agents (CICD_RUNTIME=sim)."""
    if settings.runtime == "sim":
        from cicd.runtime.sim import SharedSimRuntime
        return SharedSimRuntime(settings, settings.sim_seed)
    if settings.runtime == "docker":
        from cicd.runtime.docker import DockerRuntime
        return DockerRuntime(settings)
    from cicd.runtime.local import LocalRuntime
    return LocalRuntime(settings)
