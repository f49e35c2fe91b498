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


def run(home: Path, kills: int, watch: bool) -> dict:
    variables = {"CICD_WATCH_EXITS": "true" if watch else "false", "CICD_BACKOFF_BASE": "0",
                 "CICD_RESTART_BUDGET": "100000", "CICD_SCALE_BUDGET": "100000"}
    with Stack(home, **variables) as stack:
        from cicd.stack import cluster
        from cicd.store import reports
        from cicd.runtime.local import LocalRuntime
        settings = stack.settings()
        url = cluster.example_git_server(settings, [APP])
        stack.cicd("onboard", APP, "--repo", f"{url}/{APP}.git", "--runtime", "backend")
        runtime = LocalRuntime(settings)

        def all_healthy():
            statuses = runtime.probe([APP])[APP]
            return len(statuses) == 2 and all(s.healthy for s in statuses)

        def settled():
            rows = {r["app"]: r for r in reports.apps(settings, runtime)}
            return all_healthy() and rows[APP]["open_incident"] is None

        times, jitter = [], random.Random(kills)
        for i in range(kills):
            wait_for(settled, timeout=120, poll=0.05)
            # Kill at a random point of the probe cycle, not always just after one.
            time.sleep(0.3 + jitter.uniform(0, settings.probe_interval_s))
            replica = runtime.replicas(APP)[i % 2]
            started = time.monotonic()
            os.kill(replica["pid"], signal.SIGKILL)
            wait_for(lambda: not all_healthy(), timeout=5, poll=0.005)
            wait_for(all_healthy, timeout=120, poll=0.01)
            times.append(time.monotonic() - started)
        return {"kills": kills, "probe_interval_s": settings.probe_interval_s, "watch_exits": watch,
                "p50_s": statistics.median(times), "p95_s": percentile(times, 0.95), "p99_s": percentile(times, 0.99),
                "max_s": max(times)}
