"""Time to recover on real processes: SIGKILL a replica of a real app N times and time each kill
until every replica answers its health check again, measured from outside, probing every 10 ms.
Twice: with the probes alone (one cycle a second), then with exits watched as they happen.

Restart backoff is off here (CICD_BACKOFF_BASE=0): it is the flapping guard, and it would make
every kill after the first wait on purpose. What is measured is the healing path itself."""
from __future__ import annotations

import os
import random
import signal
import statistics
import time
from pathlib import Path

from .chain import percentile
from .stacks import Stack, wait_for

APP = "recover-api"


def run(home: Path, kills: int, watch: bool, docker: dict | None = None) -> dict:
    """docker: the variables of a Docker daemon and base image (DOCKER_HOST, CICD_DOCKER_BASE_IMAGE)
    to run the app's replicas as containers there (CICD_RUNTIME=docker); a kill is then SIGKILL to
    the container's init, which ends the container, as `docker kill` does."""
    variables = {"CICD_WATCH_EXITS": "true" if watch else "false", "CICD_BACKOFF_BASE": "0",
                 "CICD_RESTART_BUDGET": "100000", "CICD_SCALE_BUDGET": "100000",
                 **({"CICD_RUNTIME": "docker", **docker} if docker else {})}
    with Stack(home, **variables) as stack:
        from cicd.stack import cluster
        from cicd.store import reports
        from cicd.runtime import make_runtime
        settings = stack.settings()
        url = cluster.example_git_server(settings, [APP])
        stack.cicd("onboard", APP, "--repo", f"{url}/{APP}.git", "--runtime", "backend")
        runtime = make_runtime(settings)

        def all_healthy():
            statuses = runtime.probe([APP])[APP]
            return len(statuses) == 2 and all(s.healthy for s in statuses)

        def settled():
            rows = {r["app"]: r for r in reports.apps(settings, runtime)}
            return all_healthy() and rows[APP]["open_incident"] is None

        def state():
            return app_state(settings, runtime, home)

        times, jitter = [], random.Random(kills)
        for i in range(kills):
            kill = f"kill {i + 1} of {kills}"
            wait_for(settled, timeout=120, poll=0.05, what=f"{APP} healthy with no open incident before {kill}",
                     state=state)
            # Kill at a random point of the probe cycle, not always just after one.
            time.sleep(0.3 + jitter.uniform(0, settings.probe_interval_s))
            replica = runtime.replicas(APP)[i % 2]
            started = time.monotonic()
            os.kill(replica["pid"], signal.SIGKILL)
            what = f"{kill} (slot {replica['slot']}, pid {replica['pid']})"
            wait_for(lambda: not all_healthy(), timeout=5, poll=0.005, what=f"{what} seen unhealthy", state=state)
            wait_for(all_healthy, timeout=120, poll=0.01, what=f"{what} healthy again", state=state)
            times.append(time.monotonic() - started)
        return {"kills": kills, "probe_interval_s": settings.probe_interval_s, "watch_exits": watch,
                "runtime": settings.runtime,
                "p50_s": statistics.median(times), "p95_s": percentile(times, 0.95), "p99_s": percentile(times, 0.99),
                "max_s": max(times)}


def app_state(settings, runtime, home: Path) -> str:
    """How the app stood: its replicas, its open incident (kind, attempt, slots), whether a human
    was called, its last proof records, and where the stack's logs are kept."""
    from cicd.store import Incident, proof, reports, session_scope
    from sqlalchemy import select
    statuses = runtime.probe([APP])[APP]
    row = {r["app"]: r for r in reports.apps(settings, runtime)}.get(APP, {})
    with session_scope(settings, readonly=True) as session:
        incident = session.scalars(select(Incident).where(Incident.env == settings.env, Incident.app == APP)
                                   .order_by(Incident.opened_at.desc()).limit(1)).first()
        last = (f"{incident.id} {incident.status} ({incident.kind}, attempt {incident.attempt}, "
                f"slots {(incident.signal or {}).get('slots')}{', ' + incident.resolution if incident.resolution else ''})"
                if incident else "none")
    events = [f"{r['ts'][11:23]} {r['event_name']}" for r in proof.tail(settings, 12) if r.get("app") == APP]
    return (f"replicas {', '.join(f'{s.slot}:{s.status}' for s in statuses) or 'none'}; "
            f"open incident {row.get('open_incident')}; last incident {last}; attention {row.get('attention')!r}; "
            f"last proof records: {', '.join(events)}; logs and state kept in {home} "
            f"(logs/{settings.env}/proof.jsonl, watcher.log, worker-*.log; var/{settings.env}/apps/{APP})")
