"""Zero downtime, measured: clients on an app's stable URL (a real Caddy in front of the sample
service, as tests/integration/test_stable_endpoint.py sets it up) while the runtime deploys,
scales out, scales in, restarts, and heals an injected crash; requests sent and failed for each.

The crash is a SIGKILL of one replica, healed by a runtime restart of its slot as soon as it is
dead (what the healing chain does with exits watched, minus the chain's own delay). Two figures
say what the proxy saved:
- in flight on the killed replica: Caddy's own count of requests it had open to that upstream,
  read from its admin API (GET /reverse_proxy/upstreams) just before the kill;
- the baseline, from the same kill: as many clients again calling that replica's port directly
  (following the slot to its new port once restarted). There every request in flight at the
  kill fails, and every one sent before the slot is back is refused.

Resets at Caddy's own listener during a config reload (see tests/proxied.py) are their own column.
Nothing is asserted here: these are figures, printed beside their baseline.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from cicd.delivery import onboarding
from cicd.runtime import process
from tests.proxied import APP, Load, deploy, proxied_runtime, upstream_requests, wait_for

CLIENTS = 3
WORK_MS = 20
OPERATIONS = ("deploy", "scale out", "scale in", "restart", "crash")


def _crash(runtime, ctx, slot: int, op_key: str) -> dict:
    replica = next(r for r in runtime.replicas(APP) if int(r["slot"]) == slot)
    upstream = f"127.0.0.1:{replica['port']}"
    in_flight = upstream_requests(ctx).get(upstream, 0)
    killed_at = time.monotonic()
    process.kill(replica["pid"], replica.get("ticks"))
    wait_for(lambda: not process.is_alive(replica["pid"], replica.get("ticks")), timeout=5, poll=0.002)
    runtime.restart(APP, [slot], op_key=op_key)
    return {"killed_at": killed_at, "in_flight_on_killed": in_flight, "healed_s": time.monotonic() - killed_at}


def run(home: Path, rounds: int) -> dict:
    """rounds: how many times the five operations run, one after the other (counts are summed)."""
    with proxied_runtime(home) as (settings, ctx, _caddy, runtime, _said):
        spec = onboarding.generate_spec(APP, "https://git.example.com/shop-api.git", "backend", "stage")
        deploy(runtime, settings.home, spec, 1)
        url = runtime.endpoint(APP)
        crashes = []
        with Load(url, CLIENTS, work_ms=WORK_MS) as load:
            time.sleep(0.5)
            for n in range(rounds):
                with load.during("deploy"):
                    deploy(runtime, settings.home, spec, n + 2)
                with load.during("scale out"):
                    runtime.scale(APP, 4, op_key=f"scale-out-{n}")
                with load.during("scale in"):
                    runtime.scale(APP, 2, op_key=f"scale-in-{n}")
                with load.during("restart"):
                    runtime.restart(APP, [0, 1], op_key=f"restart-{n}")
                slot = n % 2

                def slot_port(slot=slot):
                    replica = next((r for r in runtime.replicas(APP) if int(r["slot"]) == slot), None)
                    return f"http://127.0.0.1:{replica['port']}" if replica else None

                with Load(slot_port, CLIENTS, proxied=False, work_ms=WORK_MS) as direct:
                    time.sleep(0.3)  # the direct clients under way before the kill
                    with load.during("crash"), direct.during("crash"):
                        crash = _crash(runtime, ctx, slot, f"heal-{n}")
                    crash["direct_in_flight"], crash["direct_in_flight_failed"] = direct.in_flight_at(crash["killed_at"])
                    crash["proxied_in_flight_all"], _ = load.in_flight_at(crash["killed_at"])
                    crash["direct"] = direct.counts["crash"]
                crashes.append(crash)

    operations = {}
    for name in OPERATIONS:
        entry = load.counts.get(name, {"sent": 0, "failed": 0, "reset": 0, "errors": []})
        operations[name] = {"sent": entry["sent"], "failed_requests": entry["failed"],
                            "reset_at_reload": entry["reset"], "seconds": entry.get("seconds"),
                            "errors": entry["errors"]}
    operations["crash"]["in_flight_on_killed"] = sum(c["in_flight_on_killed"] for c in crashes)
    operations["crash"]["in_flight_all_replicas"] = sum(c["proxied_in_flight_all"] for c in crashes)
    operations["crash"]["kill_to_restarted_s"] = [round(c["healed_s"], 3) for c in crashes]
    direct = {"sent": sum(c["direct"]["sent"] for c in crashes),
              "failed_requests": sum(c["direct"]["failed"] for c in crashes),
              "in_flight_at_kill": sum(c["direct_in_flight"] for c in crashes),
              "in_flight_failed": sum(c["direct_in_flight_failed"] for c in crashes),
              "errors": crashes[-1]["direct"]["errors"] if crashes else []}
    return {"clients": CLIENTS, "work_ms": WORK_MS, "rounds": rounds, "kills": len(crashes),
            "operations": operations, "direct_crash": direct}


ROW_NAMES = {"deploy": "deploy (blue/green)", "scale out": "scale out 2 -> 4", "scale in": "scale in 4 -> 2",
             "restart": "restart of both replicas", "crash": "crash (SIGKILL), healed by a restart"}
COLUMNS = ("operation", "sent", "failed", "reset at reload", "in flight on killed")


def rows(result: dict) -> list[dict]:
    ops, direct = result["operations"], result["direct_crash"]
    out = [dict(zip(COLUMNS, (ROW_NAMES[name], ops[name]["sent"], ops[name]["failed_requests"],
                              ops[name]["reset_at_reload"],
                              ops[name].get("in_flight_on_killed", "")))) for name in OPERATIONS]
    out.append(dict(zip(COLUMNS, ("baseline: crash on the replica's port", direct["sent"], direct["failed_requests"],
                                  "", direct["in_flight_at_kill"]))))
    return out


def print_report(result: dict) -> None:
    from cicd.cli import terminal
    crash, direct = result["operations"]["crash"], result["direct_crash"]
    terminal.print_table(rows(result), [(key, key) for key in COLUMNS],
                         title=f"zero downtime through Caddy: {result['clients']} clients, {result['work_ms']} ms "
                               f"requests, {result['rounds']} round(s)")
    print(f"crash: {result['kills']} kill(s); Caddy had {crash['in_flight_on_killed']} request(s) open to the killed "
          f"replica ({crash['in_flight_all_replicas']} in flight on all); kill to restarted "
          f"{', '.join(f'{s:g}' for s in crash['kill_to_restarted_s'])} s. Baseline: {direct['in_flight_failed']} of "
          f"{direct['in_flight_at_kill']} in flight at the kill failed, the rest refused until the slot was back.")


def main() -> None:
    """python -m tests.bench.zero_downtime [ROUNDS]: this figure alone."""
    import sys
    result = run(Path(tempfile.mkdtemp(prefix="cicd-bench-zd-")), int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    print_report(result)


if __name__ == "__main__":
    main()
