"""Chain efficiency: incidents through the full healing chain on the simulated fleet, beside the
same number of bare no-op Celery chains of the same hops (detect, decide, orchestrate, monitor,
decide) over the same queues, broker and workers, in the same run."""
from __future__ import annotations

import statistics
import time
import uuid

from .stacks import wait_for

HOPS = ("detect", "decide", "orchestrate", "monitor", "decide")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def register_apps(stack, count: int) -> list[str]:
    from cicd.delivery import onboarding
    from cicd.runtime.sim import SharedSimRuntime
    settings = stack.settings()
    sim = SharedSimRuntime(settings, 0)
    names = [f"bench-{i:05d}" for i in range(count)]
    for name in names:
        repo = f"https://sim.invalid/{name}.git"
        if name not in sim.apps():
            assert onboarding.register(settings, name, repo, "backend")["ok"]
            sim.add_app(onboarding.generate_spec(name, repo, "backend", "stage"))
    return names


def healing(stack, apps: list[str]) -> dict:
    from cicd.store import proof
    from cicd.core.events import iso, parse_iso, utcnow
    from cicd.runtime.sim import Fault, SharedSimRuntime
    from workers.chains import healing_chain
    settings = stack.settings()
    sim = SharedSimRuntime(settings, 0)
    for app in apps:
        sim.set_fault(app, Fault("crash", False, "high", "glitch"))
    stack.control_plane()
    seq, sent, stable = proof.head_seq(settings), {}, {}
    started = time.time()
    for app in apps:
        signal = {"env": "stage", "app": app, "kind": "replica_down", "slots": [0], "observed_at": iso(utcnow()),
                  "replicas_total": 2}
        sent[app] = time.time()
        healing_chain("stage", signal).apply_async()

    def collect():
        nonlocal seq
        for record in proof.records_since(settings, seq):
            seq = record["seq"]
            if record["event_name"] == "SYSTEM_STABLE":
                stable[record["app"]] = parse_iso(record["ts"]).timestamp()
        return len(stable) == len(apps)
    wait_for(collect, timeout=600, poll=0.05)
    latencies = [stable[a] - sent[a] for a in apps]
    return {"incidents": len(apps), "throughput_per_s": len(apps) / (max(stable.values()) - started),
            "p50_s": statistics.median(latencies), "p99_s": percentile(latencies, 0.99)}


def bare(stack, count: int) -> dict:
    import redis
    from celery import chain
    plane = stack.control_plane()
    key = f"bench:done:{uuid.uuid4().hex}"
    client = redis.Redis.from_url(plane.settings.broker_url)
    sent = {}
    started = time.time()
    for i in range(count):
        hops = [plane.app.signature(f"cicd.{HOPS[0]}.noop", args=(i,), kwargs={"env": "stage"})]
        hops += [plane.app.signature(f"cicd.{agent}.noop", kwargs={"env": "stage"}) for agent in HOPS[1:-1]]
        hops.append(plane.app.signature(f"cicd.{HOPS[-1]}.noop", kwargs={"env": "stage", "done_key": key}))
        sent[i] = time.time()
        chain(*hops).apply_async()
    wait_for(lambda: client.llen(key) >= count, timeout=600, poll=0.02)
    done = {int(i): float(t) for i, t in (entry.decode().split(":") for entry in client.lrange(key, 0, -1))}
    client.delete(key)
    latencies = [done[i] - sent[i] for i in range(count)]
    return {"chains": count, "throughput_per_s": count / (max(done.values()) - started),
            "p50_s": statistics.median(latencies), "p99_s": percentile(latencies, 0.99)}


def run(stack, count: int) -> dict:
    warm = min(20, count)
    apps = register_apps(stack, count + warm)
    bare(stack, warm)                       # warm both paths up (imports, connections, caches)
    healing(stack, apps[count:])            # on other apps: a second restart would wait out its backoff
    base = bare(stack, count)
    ours = healing(stack, apps[:count])
    return {"hops": len(HOPS), "healing": ours, "bare": base,
            "throughput_ratio": ours["throughput_per_s"] / base["throughput_per_s"],
            "p50_ratio": ours["p50_s"] / base["p50_s"], "p99_ratio": ours["p99_s"] / base["p99_s"]}
