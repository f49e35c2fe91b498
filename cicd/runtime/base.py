"""Where apps actually run. The local runtime runs real processes; a simulated one comes later.

Every mutating call takes an op_key: the runtime remembers the keys it has applied, so an
action delivered twice (at-least-once) has its effect once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

from cicd.errors import CicdError


class RuntimeFailure(CicdError, RuntimeError):
    """A runtime operation could not be done; the message says what and why."""


@dataclass(frozen=True)
class ReplicaStatus:
    slot: int
    pid: int | None
    port: int | None
    alive: bool             # the process exists (and is not a zombie)
    status: str             # ok, degraded, starting, refused, timeout, down
    utilization: float = 0.0
    capacity: int = 0
    latency_ms: float = 0.0
    # What the platform measures of the process itself, for any app (the sample service's
    # utilization above is only what it says of itself): CPU in cores over the last probe
    # interval, resident memory of the replica and everything it started, the spec's memory
    # limit (0: none), and whether it is stopped (SIGSTOP: alive, but it will never answer).
    cpu: float = 0.0
    rss_mb: float = 0.0
    memory_limit_mb: int = 0
    stopped: bool = False
    # The mean latency of the app's requests through its stable address over the last interval,
    # from the proxy's own figures (Caddy's are per app, so every replica of the app carries the
    # same); 0 when none passed or there is no proxy.
    proxy_latency_ms: float = 0.0

    @property
    def healthy(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


class Runtime(ABC):
    @abstractmethod
    def stage_release(self, spec: dict, number: int, source_dir, progress=None) -> dict:
        """Take the code in source_dir as release `number`, build it, start its replicas beside
        the live ones. progress, if given, is called with a short line as each build step
        begins ("installing dependencies (requirements.txt)"), for whoever waits on the deploy."""

    @abstractmethod
    def probe_release(self, app: str, number: int) -> list[ReplicaStatus]:
        """Probe the replicas of a staged release (for the deploy's health gate)."""

    @abstractmethod
    def activate_release(self, app: str, number: int) -> dict:
        """Switch traffic to a staged release and stop the previous one's replicas."""

    @abstractmethod
    def discard_release(self, app: str, number: int) -> dict:
        """Stop a staged release that failed its gate; the live release is untouched."""

    @abstractmethod
    def probe(self, apps: list[str]) -> dict[str, list[ReplicaStatus]]:
        """Probe every replica of every live app, in one batch."""

    @abstractmethod
    def replica_count(self, app: str) -> int:
        ...

    @abstractmethod
    def restart(self, app: str, slots: list[int], op_key: str) -> dict:
        ...

    @abstractmethod
    def scale(self, app: str, replicas: int, op_key: str) -> dict:
        ...

    @abstractmethod
    def inject(self, app: str, kind: str, **options) -> dict:
        """Break something on purpose: crash, hang, leak, overload, false-alarm."""

    @abstractmethod
    def stop_load(self, app: str) -> bool:
        ...

    @abstractmethod
    def stop_app(self, app: str) -> int:
        ...

    @abstractmethod
    def remove_app(self, app: str) -> int:
        """Stop every process of the app (live, staged, retiring, load) and drop all the runtime
        holds of it; returns how many replicas were running. Removing an app already gone is a
        no-op (0), so a removal that stopped half-way can simply be run again."""

    @abstractmethod
    def apps(self) -> list[str]:
        ...

    def exits(self, app: str, number: int) -> list[dict]:
        """How the replicas of release `number` that are no longer running ended, for a failure's
        detail: [{"slot", "exit" ("exited with code 3", "was killed by SIGKILL", or "exited" when
        that cannot be known), "code" (or None), "log_tail" (its last few log lines, bounded)}].
        A runtime with nothing to tell returns []."""
        return []

    def endpoint(self, app: str) -> str | None:
        """The app's stable URL (through the environment's proxy), or None if it has none."""
        return None

    def proxy_figures(self, app: str) -> dict | None:
        """The app's traffic through its stable URL over the last interval, as the proxy counts it:
        {"requests", "failed" (5xx), "latency_ms" (mean), "interval_s", "at"}; None without one."""
        return None

    def live_release(self, app: str) -> int | None:
        """The release whose replicas serve the app, as the runtime knows it; None if it does not
        say (the reconciler then judges a stuck release by probing its replicas)."""
        return None

    def note_action(self, app: str, action: str, params: dict, op_key: str) -> None:
        """A healing action is about to run. Real runtimes have nothing to do here; the simulated
        fleet draws the action's outcome from its fault model (once per op key)."""
