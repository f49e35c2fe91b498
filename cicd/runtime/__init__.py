"""Runtimes: where apps run. `make_runtime` picks the one the settings ask for."""
from __future__ import annotations

from cicd.config import Settings
from cicd.runtime.base import ReplicaStatus, Runtime, RuntimeFailure

__all__ = ["ReplicaStatus", "Runtime", "RuntimeFailure", "make_runtime"]


def make_runtime(settings: Settings) -> Runtime:
    """Real processes (the default), containers (CICD_RUNTIME=docker), or the simulated fleet shared
    by all agents (CICD_RUNTIME=sim).

    Real processes on a host agent's machine (CICD_HOST_NAME) are published for the control plane
    (HostRuntime); on the control plane's, apps placed on hosts are seen over the network
    (PlacedRuntime). Both are the local runtime for the apps of their own machine."""
    if settings.runtime == "sim":
        from cicd.runtime.sim import SharedSimRuntime
        return SharedSimRuntime(settings, settings.sim_seed)
    if settings.runtime == "docker":
        from cicd.runtime.docker import DockerRuntime
        return DockerRuntime(settings)
    from cicd.runtime.hosts import HostRuntime, PlacedRuntime
    return HostRuntime(settings) if settings.host_name else PlacedRuntime(settings)
