"""Many machines: the local runtime as a host agent runs it, and as the control plane sees it.

On a host agent's machine (CICD_HOST_NAME set), HostRuntime is the local runtime that also
publishes, after every change it makes to an app, the app's live replicas to the store
(cicd.store.placements): their address, port and pid, for the machines that cannot read its state
file. Its replicas listen on CICD_HOST_ADDRESS, where the others reach them.

On the control plane's machine, PlacedRuntime is the local runtime for the apps that run there,
and a network view of the apps placed on hosts: it probes their replicas over HTTP at the address
their host published (no pid checks, no /proc: those are another machine's), counts them from the
published rows, and refuses to act on them itself. Acting is the host agent's: the orchestrator
and the deploy agent send those actions to {env}.host.{name} (workers/host.py, workers/deploy.py).
"""
from __future__ import annotations

import http.client
import time

from cicd.runtime import loadgen
from cicd.runtime.base import ReplicaStatus, RuntimeFailure
from cicd.runtime.local import LocalRuntime, _judge

# What of a replica's record the host publishes: enough to probe it and to tell one from another.
PUBLISHED = ("slot", "pid", "ticks", "port", "release", "started_at", "health_path", "memory_limit_mb")


def published_view(state: dict) -> tuple[int | None, list[dict]]:
    """The live release and replicas of an app's runtime state, as a host publishes them."""
    replicas = sorted(state.get("replicas", {}).values(), key=lambda r: int(r["slot"]))
    return state.get("live"), [{k: r.get(k) for k in PUBLISHED} for r in replicas]


class HostRuntime(LocalRuntime):
    """The local runtime of a host agent: every change to an app is published for the others."""

    def __init__(self, settings):
        super().__init__(settings)
        self._published: dict[str, tuple] = {}

    def _write(self, app: str, state: dict) -> None:
        super()._write(app, state)
        # Under the app's lock, after each change: the control plane sees the changes in order,
        # a restarted replica's new port before its old one stops.
        view = published_view(state)
        if self._published.get(app) != view:
            from cicd.store import placements
            placements.publish(self.settings, app, *view)
            self._published[app] = view

    def remove_app(self, app: str) -> int:
        stopped = super().remove_app(app)
        from cicd.store import placements
        placements.forget(self.settings, app)
        self._published.pop(app, None)
        return stopped


class PlacedRuntime(LocalRuntime):
    """The control plane's runtime: local apps as LocalRuntime has them, placed apps over the network.

    ask_host(host, app, kind, options) -> dict, if a command sets it, makes a fault on a placed app
    through its host's agent (`cicd inject`); without it, that is refused here."""
    ask_host = None

    def _placed(self, apps: list[str]) -> dict[str, dict]:
        from cicd.store import placements
        return placements.placed(self.settings, apps)

    def probe(self, apps: list[str]) -> dict[str, list[ReplicaStatus]]:
        placed = self._placed(list(apps))
        results = super().probe([a for a in apps if a not in placed])
        jobs = [(app, where["address"], replica) for app, where in placed.items() for replica in where["replicas"]]
        statuses = self._executor().map(lambda job: self._probe_remote(job[1], job[2]), jobs)
        for app in placed:
            results[app] = []
        for (app, _, _), status in zip(jobs, statuses):
            results[app].append(status)
        return results

    def _probe_remote(self, address: str, replica: dict) -> ReplicaStatus:
        """One replica on another machine, by HTTP alone: answered (ok or degraded), refused (gone,
        or still starting within its grace), or timed out (alive as far as anyone here can tell)."""
        slot, pid, port = int(replica["slot"]), replica.get("pid"), replica.get("port")
        measured = {"memory_limit_mb": replica.get("memory_limit_mb") or 0}
        path = replica.get("health_path") or "/health"
        started = time.monotonic()
        try:
            status_code, body = loadgen.request((address, port), path, self.settings.probe_timeout_s)
        except ConnectionRefusedError:
            young = time.time() - (replica.get("started_at") or 0) < self.settings.start_grace_s
            return ReplicaStatus(slot, pid, port, alive=True, status="starting" if young else "refused", **measured)
        except (OSError, http.client.HTTPException):
            return ReplicaStatus(slot, pid, port, alive=True, status="timeout",
                                 latency_ms=round((time.monotonic() - started) * 1000, 2), **measured)
        ok, utilization, capacity = _judge(status_code, body)
        return ReplicaStatus(slot, pid, port, alive=True, status="ok" if ok else "degraded", utilization=utilization,
                             capacity=capacity, latency_ms=round((time.monotonic() - started) * 1000, 2), **measured)

    def replica_count(self, app: str) -> int:
        placed = self._placed([app]).get(app)
        return len(placed["replicas"]) if placed else super().replica_count(app)

    def replicas(self, app: str) -> list[dict]:
        placed = self._placed([app]).get(app)
        return [{**r, "slot": int(r["slot"])} for r in placed["replicas"]] if placed else super().replicas(app)

    def live_release(self, app: str) -> int | None:
        placed = self._placed([app]).get(app)
        return placed["live"] if placed else super().live_release(app)

    # Acting on a placed app is its host agent's; reaching here is a routing mistake, said loudly.
    def _refuse_placed(self, app: str, what: str) -> None:
        placed = self._placed([app]).get(app)
        if placed:
            raise RuntimeFailure(f"{app} runs on host {placed['host']}: its {what} is that host agent's "
                                 f"(queue {self.settings.host_queue(placed['host'])})")

    def restart(self, app: str, slots: list[int], op_key: str) -> dict:
        self._refuse_placed(app, "restart")
        return super().restart(app, slots, op_key)

    def scale(self, app: str, replicas: int, op_key: str) -> dict:
        self._refuse_placed(app, "scale")
        return super().scale(app, replicas, op_key)

    def inject(self, app: str, kind: str, **options) -> dict:
        placed = self._placed([app]).get(app)
        if placed and self.ask_host is not None:
            answer = dict(self.ask_host(placed["host"], app, kind, options))
            if not answer.pop("ok", False):
                raise RuntimeFailure(answer.get("error") or f"host {placed['host']} did not make the fault")
            return {**answer, "host": placed["host"]}
        self._refuse_placed(app, "fault injection")
        return super().inject(app, kind, **options)

    def stage_release(self, spec: dict, number: int, source_dir, progress=None) -> dict:
        if spec.get("host") and spec["host"] != self.settings.host_name:
            raise RuntimeFailure(f"{spec['name']} is placed on host {spec['host']}: its releases are built there")
        return super().stage_release(spec, number, source_dir, progress)

    def activate_release(self, app: str, number: int) -> dict:
        self._refuse_placed(app, "release switch")
        return super().activate_release(app, number)

    def discard_release(self, app: str, number: int) -> dict:
        self._refuse_placed(app, "release discard")
        return super().discard_release(app, number)
