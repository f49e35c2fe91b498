"""`cicd bench` / `make bench`: every figure beside its baseline, measured in one run.

  python -m tests.bench [--json] [--quick]

1. chain: incidents through the full healing chain on the simulated fleet vs bare no-op Celery
   chains of the same hops, same queues, broker and workers;
2. recover_real: SIGKILL a real replica, time until it is healthy again (probes alone, then with
   exits watched); recover_container: the same on the Docker runtime, beside the local process;
3. fanout: one probe cycle over 1,000 and 10,000 simulated apps;
4. footprint: resident memory of the whole stack, idle and under the chain's burst;
5. policy: one decision, in-process;
6. zero_downtime: clients on a stable URL through Caddy during a deploy, a scale out and in, a
   restart and a crash, beside the same clients on the killed replica's own port.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from cicd.cli import terminal

from . import chain, fanout, footprint, recover, zero_downtime
from .bench_policy import main as policy_bench
from .stacks import Stack

GOALS = {"chain.throughput_ratio": ">= 0.8", "chain.p99_ratio": "<= 1.3", "recover_real.p50_s": "<= 1.5",
         "recover_real.p99_s": "<= 3", "fanout.apps_per_1s_cycle": ">= 10000", "footprint.rss_mb": "< 600",
         "policy.decision_us": "< 100"}


def machine() -> str:
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {mem_gb:.0f} GiB, Python {platform.python_version()}"


def run(quick: bool) -> dict:
    home = Path(tempfile.mkdtemp(prefix="cicd-bench-"))
    try:
        out = run_in(home, quick)
    except BaseException:
        # What the failed step's stack left (logs, proof log, var/ENV state) is what explains it.
        print(f"benchmarks failed: their stacks' homes are kept in {home}", file=sys.stderr)
        raise
    shutil.rmtree(home, ignore_errors=True)
    return out


def run_in(home: Path, quick: bool) -> dict:
    incidents, kills = (60, 10) if quick else (200, 50)
    out = {"machine": machine(), "quick": quick}
    sim = {"CICD_RUNTIME": "sim", "CICD_PROBE_INTERVAL": "3600", "CICD_STABLE_CHECKS": "1"}
    with terminal.progress("benchmarks", total=7) as underway:
        underway.update(0, f"chain and footprint: {incidents} incidents on the simulated fleet")
        with Stack(home / "sim", **sim) as stack:
            time.sleep(2)
            idle = footprint.measure(stack)
            with footprint.Peak(stack) as peak:
                out["chain"] = chain.run(stack, incidents)
            out["footprint"] = {"processes": idle["processes"], "rss_mb": idle["rss_mb"], "pss_mb": idle["pss_mb"],
                                "burst_rss_mb": peak.peak["rss_mb"], "burst_pss_mb": peak.peak["pss_mb"]}
        underway.update(1, "probe fan-out over 1,000 and 10,000 apps")
        out["fanout"] = fanout.run(home / "fanout", (1000, 10000))
        underway.update(2, f"{kills} real kills, probes alone")
        probes = recover.run(home / "probes", kills, watch=False)
        underway.update(3, f"{kills} real kills, exits watched")
        watched = recover.run(home / "watched", kills, watch=True)
        out["recover_real"] = {**watched, "probes_only": probes}
        underway.update(4, f"{max(20, kills // 2)} kills of a container (the Docker runtime)")
        out["recover_container"] = recover_container(home / "container", max(20, kills // 2))
        underway.update(5, "policy decisions")
        out["policy"] = {"decision_us": policy_bench(["--json", "--decisions", "20000"], quiet=True)["decision_us"]}
        underway.update(6, "zero downtime: load on a stable URL through Caddy")
        out["zero_downtime"] = zero_downtime.run(home / "zero-downtime", rounds=1 if quick else 3)
        underway.update(7)
    return out


def recover_container(home: Path, kills: int) -> dict:
    """recover.run on the Docker runtime, against a daemon of its own (tests/dockerd.py); where
    none can start, why."""
    from tests import dockerd
    try:
        daemon = dockerd.Dockerd().start()
    except dockerd.Unavailable as why:
        return {"skipped": str(why)}
    saved = os.environ.get("DOCKER_HOST")
    try:
        base = daemon.base_image()
        os.environ["DOCKER_HOST"] = daemon.host   # this process's runtime reads the daemon too
        return recover.run(home, kills, watch=True, docker={"DOCKER_HOST": daemon.host, "CICD_DOCKER_BASE_IMAGE": base})
    except dockerd.Unavailable as why:
        return {"skipped": str(why)}
    finally:
        if saved is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = saved
        daemon.stop()


def figure(result: dict, path: str):
    value = result
    for part in path.split("."):
        value = value[part]
    return value


def rows(result: dict) -> list[dict]:
    c, r, f, m = result["chain"], result["recover_real"], result["fanout"], result["footprint"]
    cells = [
        ("chain throughput (incidents/s)", f"{c['healing']['throughput_per_s']:.1f}",
         f"{c['bare']['throughput_per_s']:.1f} bare {c['hops']}-hop chains/s", f"{c['throughput_ratio']:.2f}",
         GOALS["chain.throughput_ratio"]),
        ("chain latency p50 (s)", f"{c['healing']['p50_s']:.3f}", f"{c['bare']['p50_s']:.3f}", f"{c['p50_ratio']:.2f}", ""),
        ("chain latency p99 (s)", f"{c['healing']['p99_s']:.3f}", f"{c['bare']['p99_s']:.3f}", f"{c['p99_ratio']:.2f}",
         GOALS["chain.p99_ratio"]),
        (f"real crash to healthy p50 (s), {r['kills']} kills", f"{r['p50_s']:.3f}",
         f"{r['probes_only']['p50_s']:.3f} probes alone ({r['probe_interval_s']:g} s)",
         f"{r['p50_s'] / r['probes_only']['p50_s']:.2f}", GOALS["recover_real.p50_s"]),
        ("real crash to healthy p95 (s)", f"{r['p95_s']:.3f}", f"{r['probes_only']['p95_s']:.3f}",
         f"{r['p95_s'] / r['probes_only']['p95_s']:.2f}", ""),
        ("real crash to healthy p99 (s)", f"{r['p99_s']:.3f}", f"{r['probes_only']['p99_s']:.3f}",
         f"{r['p99_s'] / r['probes_only']['p99_s']:.2f}", GOALS["recover_real.p99_s"]),
        *container_rows(result.get("recover_container") or {}, r),
        ("probe cycle, 1,000 apps (s wall / CPU)", f"{f['1000']['wall_s']:.3f} / {f['1000']['cpu_s']:.3f}",
         f"{f['1000']['broker_round_trips']} broker round trip", "", ""),
        ("probe cycle, 10,000 apps (s wall / CPU)", f"{f['10000']['wall_s']:.3f} / {f['10000']['cpu_s']:.3f}",
         f"{f['10000']['broker_round_trips']} broker round trip", f"{1.0 / f['10000']['wall_s']:.2f} cycles/s", ""),
        ("apps covered by one 1 s cycle", f"{f['apps_per_1s_cycle']}", "10,000 (goal)",
         f"{f['apps_per_1s_cycle'] / 10000:.2f}", GOALS["fanout.apps_per_1s_cycle"]),
        (f"stack memory idle, {m['processes']} processes (MB)", f"RSS {m['rss_mb']:.0f}, PSS {m['pss_mb']:.0f}",
         "600 (goal)", f"{m['rss_mb'] / 600:.2f}", GOALS["footprint.rss_mb"]),
        ("stack memory under the burst (MB)", f"RSS {m['burst_rss_mb']:.0f}, PSS {m['burst_pss_mb']:.0f}", "600 (goal)",
         f"{m['burst_rss_mb'] / 600:.2f}", ""),
        ("one policy decision (us)", f"{result['policy']['decision_us']:.1f}", "100 (goal)",
         f"{result['policy']['decision_us'] / 100:.2f}", GOALS["policy.decision_us"]),
    ]
    return [dict(zip(COLUMNS, row)) for row in cells]


def container_rows(k: dict, local: dict) -> list[tuple]:
    if "skipped" in k or not k:
        return [("container crash to healthy", "not measured", k.get("skipped", "not run"), "", "")]
    return [(f"container crash to healthy p50 (s), {k['kills']} kills", f"{k['p50_s']:.3f}",
             f"{local['p50_s']:.3f} a local process", f"{k['p50_s'] / local['p50_s']:.2f}", ""),
            ("container crash to healthy p95 (s)", f"{k['p95_s']:.3f}", f"{local['p95_s']:.3f}",
             f"{k['p95_s'] / local['p95_s']:.2f}", "")]


COLUMNS = ("figure", "measured", "baseline", "ratio", "goal")


def print_report(result: dict) -> None:
    c, r = result["chain"], result["recover_real"]
    terminal.print_table(rows(result), [(key, key) for key in COLUMNS],
                         title=f"cicd-heal benchmarks, one run ({result['machine']})")
    print(f"chain: {c['healing']['incidents']} incidents at once, every agent one worker process, "
          f"verification of one stable check; recovery: restart backoff off, probes every "
          f"{r['probe_interval_s']:g} s")
    print()
    zero_downtime.print_report(result["zero_downtime"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object with every figure")
    parser.add_argument("--quick", action="store_true", help="fewer incidents and kills (a smoke run)")
    args = parser.parse_args()
    result = run(args.quick)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print_report(result)


if __name__ == "__main__":
    main()
