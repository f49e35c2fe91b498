"""Fan-out: the cost of one probe cycle (probe every replica of every app, record what was seen,
find the anomalies) over 1,000 and 10,000 simulated apps, and the largest fleet one 1 s cycle
covers. Run in-process, as the monitor agent runs it, against its own database."""
from __future__ import annotations

import time
from pathlib import Path

from cicd.signals import probes as monitor
from cicd.delivery import onboarding
from cicd.config import Settings
from cicd.runtime.sim import SharedSimRuntime
from cicd.store import App, session_scope


def fleet(home: Path, count: int):
    settings = Settings(env="stage", home=home, runtime="sim")
    sim = SharedSimRuntime(settings, 0)
    have = len(sim.apps())
    specs = [onboarding.generate_spec(f"fan-{i:05d}", f"https://sim.invalid/{i}.git", "backend", "stage")
             for i in range(have, count)]
    with session_scope(settings) as session:  # in bulk: onboarding one by one would take minutes
        session.add_all(App(env="stage", name=spec["name"], runtime="backend", repo=spec["repo"], spec=spec)
                        for spec in specs)
    from cicd.runtime.sim import SimApp
    from cicd.store import SimAppState
    with session_scope(sim.fleet_settings) as session:
        session.add_all(SimAppState(env="stage", app=spec["name"],
                                    state=SimApp(spec=spec, replicas=spec["replicas"],
                                                 releases={1: {"status": "live", "ref": "main", "sha": "1" * 40}}).to_dict())
                        for spec in specs)
    return settings, sim


def cycle(settings, sim) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    signals = monitor.probe_cycle(settings, sim)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "signals": len(signals)}


def run(home: Path, sizes=(1000, 10000)) -> dict:
    out = {}
    for size in sizes:
        settings, sim = fleet(home, size)
        cycle(settings, sim)  # the first cycle creates the per-replica rows
        figures = min((cycle(settings, sim) for _ in range(3)), key=lambda f: f["wall_s"])
        # One probe task per cycle (beat -> monitor) and one message per anomaly found.
        figures["broker_round_trips"] = 1 + figures.pop("signals")
        out[str(size)] = figures
    biggest = max(sizes)
    out["apps_per_1s_cycle"] = int(biggest / out[str(biggest)]["wall_s"])
    return out
