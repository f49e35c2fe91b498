"""Chaos: a burst of incidents on the simulated fleet while the agents' workers are SIGKILLed again
and again, then another burst while Redis is killed and restarted. Afterwards every incident must
be in an end state (stable, escalated or refused), no effect may have happened twice, and the
proof chain must verify.

  python -m tests.chaos.harness [--apps N] [--faults N] [--kill-every S] [--redis-kills N]

Everything is real but the apps: Redis, the six agents' worker processes, beat and the
supervisor are started by `cicd up` (CICD_RUNTIME=sim), and the kills are real SIGKILLs.
Prints a table, and last a JSON line with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

CICD = Path(sys.executable).with_name("cicd")
AGENTS_TO_KILL = ("detect", "decide", "orchestrate", "monitor")
END_STATES = ("stable", "escalated", "refused")


@dataclass
class Report:
    apps: int
    sent: int = 0
    ended: int = 0
    lost: int = 0
    duplicate_effects: int = 0
    absorbed_duplicates: int = 0
    worker_kills: int = 0
    child_kills: int = 0
    main_kills: int = 0
    broker_restarts: int = 0
    outcomes: Counter = field(default_factory=Counter)
    supervisor_restarts: dict = field(default_factory=dict)
    proof: str = ""
    proof_ok: bool = False
    seconds: float = 0.0

    def summary(self) -> dict:
        return {"sent": self.sent, "ended": self.ended, "lost": self.lost, "duplicate_effects": self.duplicate_effects,
                "worker_kills": self.worker_kills, "broker_restarts": self.broker_restarts}

    def table(self) -> str:
        rows = [
            ("incidents sent", self.sent, ""),
            ("incidents ended", self.ended, ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))),
            ("lost", self.lost, "incidents that did not reach an end state"),
            ("duplicate effects", self.duplicate_effects, f"duplicate deliveries absorbed: {self.absorbed_duplicates}"),
            ("worker kills survived", self.worker_kills,
             f"SIGKILL: {self.child_kills} pool children, {self.main_kills} worker main processes"),
            ("broker restarts survived", self.broker_restarts, "redis-server SIGKILLed, restarted from its AOF"),
            ("supervisor restarts", sum(self.supervisor_restarts.values()),
             ", ".join(f"{k} {v}" for k, v in self.supervisor_restarts.items())),
            ("proof chain", "OK" if self.proof_ok else "BROKEN", self.proof),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"chaos: {self.apps} simulated apps, {self.seconds:.0f} s"]
        lines += [f"  {name:<{width}}  {str(value):>6}  {note}" for name, value, note in rows]
        lines.append(json.dumps(self.summary()))
        return "\n".join(lines)


class Chaos:
    def __init__(self, home: Path, apps: int, seed: int):
        self.home, self.apps, self.rng = home, [f"chaos-{i:03d}" for i in range(apps)], random.Random(seed)
        self.env = {**os.environ, "CICD_HOME": str(home), "CICD_ENV": "stage", "CICD_RUNTIME": "sim",
                    "CICD_SIM_SEED": str(seed), "CICD_PROBE_INTERVAL": "0.5", "CICD_VERIFY_TIMEOUT": "5",
                    "CICD_BACKOFF_BASE": "1", "CICD_BACKOFF_MAX": "4", "CICD_BACKOFF_RESET": "20",
                    "CICD_STALL_AFTER": "20", "CICD_RESTART_BUDGET": "20"}
        self.env.pop("CICD_BROKER_URL", None)
        self.report = Report(apps)
        self.injected: list[tuple[str, str]] = []   # (app, observed after seq)

    # -- the stack -------------------------------------------------------------------------------
    def cicd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(CICD), *args], capture_output=True, text=True, env=self.env, timeout=300)
        if check and out.returncode != 0:
            raise RuntimeError(f"cicd {' '.join(args)}: {out.stdout}\n{out.stderr}")
        return out

    def settings(self):
        from cicd.config import Settings
        saved = dict(os.environ)
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("CICD_")})
        try:
            return Settings.load("stage")
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def start(self) -> None:
        self.cicd("up")
        from cicd.delivery import onboarding
        from cicd.runtime.sim import SharedSimRuntime
        settings = self.settings()
        self.sim = SharedSimRuntime(settings, 0)
        for app in self.apps:
            assert onboarding.register(settings, app, f"https://sim.invalid/{app}.git", "backend")["ok"]
            self.sim.add_app(onboarding.generate_spec(app, f"https://sim.invalid/{app}.git", "backend", "stage"))

    def stop(self) -> None:
        self.cicd("down", check=False)

    def stack(self) -> dict:
        return json.loads((self.home / "var" / "stack.json").read_text())

    # -- faults and kills --------------------------------------------------------------------------
    def burst(self, count: int, wait_s: float = 180.0) -> None:
        """Fault `count` quiet apps at once, waiting for enough of them to be quiet: on a busy
        machine the incidents of the last burst may not all have ended yet."""
        from cicd.runtime.sim import Fault
        if count > len(self.apps):
            raise ValueError(f"a burst of {count} needs at least {count} apps (there are {len(self.apps)})")
        deadline = time.monotonic() + wait_s
        while len(quiet := [a for a in self.apps if self.sim.fault(a) is None and not self.open_incident(a)]) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(quiet)} of {len(self.apps)} apps were quiet after {wait_s:.0f} s; "
                                   f"a burst of {count} needs that many")
            time.sleep(0.5)
        for app in self.rng.sample(quiet, count):
            kind = self.rng.choice(["crash", "crash", "overload"])
            cause = self.rng.choice(["process", "process", "leak"]) if kind == "crash" else "traffic"
            self.sim.set_fault(app, Fault(kind, False, "high", cause))
            self.injected.append(app)
            self.report.sent += 1

    def open_incident(self, app: str) -> bool:
        from sqlalchemy import select

        from cicd.store import Incident, session_scope
        with session_scope(self.settings()) as s:
            return s.scalar(select(Incident.id).where(Incident.app == app, Incident.status == "open")) is not None

    def kill_a_worker(self) -> None:
        agent = self.rng.choice(AGENTS_TO_KILL)
        workers = [w for w in self.stack()["envs"]["stage"]["workers"] if w["agent"] == agent]
        main = self.rng.choice(workers)["pid"]
        children = _children(main)
        # Mostly the pool child (the process running the task: its message is requeued at once);
        # sometimes the main process (its messages come back after the visibility timeout).
        if children and self.rng.random() < 0.7:
            target, kind = self.rng.choice(children), "child"
        else:
            target, kind = main, "main"
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.report.worker_kills += 1
        setattr(self.report, f"{kind}_kills", getattr(self.report, f"{kind}_kills") + 1)

    def kill_redis(self) -> None:
        os.kill(self.stack()["redis"]["pid"], signal.SIGKILL)
        self.report.broker_restarts += 1
        deadline = time.monotonic() + 30
        while True:  # the supervisor brings it back on the same port, from its AOF
            redis_entry = self.stack().get("redis") or {}
            if redis_entry.get("pid") and _alive(redis_entry["pid"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("redis was not restarted by the supervisor")
            time.sleep(0.2)

    def chaos_for(self, seconds: float, kill_every: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(kill_every * (0.5 + self.rng.random()))
            self.kill_a_worker()

    # -- the verdict -------------------------------------------------------------------------------
    def settle(self, timeout: float) -> None:
        """Wait until every injected fault has had an incident that ended, and none is open."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count()[0] == 0:
                return
            time.sleep(1.0)

    def count(self) -> tuple[int, Counter, int]:
        from sqlalchemy import select

        from cicd.store import Incident, session_scope
        with session_scope(self.settings()) as s:
            incidents = s.scalars(select(Incident)).all()
        open_now = sum(1 for i in incidents if i.status == "open")
        per_app = Counter(i.app for i in incidents if i.status in END_STATES)
        missing = sum(max(0, n - per_app[app]) for app, n in Counter(self.injected).items())
        return open_now + missing, Counter(i.status for i in incidents if i.status in END_STATES), len(incidents)

    def verdict(self) -> Report:
        from cicd.store import proof
        settings = self.settings()
        unfinished, outcomes, _ = self.count()
        self.report.outcomes = outcomes
        self.report.ended = sum(outcomes.values())
        self.report.lost = unfinished
        records = proof.records_since(settings, 0)
        executed = Counter((r["incident_id"], r["payload"].get("attempt")) for r in records
                           if r["event_name"] == "ORCH_EXEC")
        runtime_twice = sum(1 for app in self.apps for n in self.sim._app(app).applied.values() if n > 1)
        self.report.duplicate_effects = runtime_twice + sum(1 for n in executed.values() if n > 1)
        announced = sum(self.sim._app(app).calls for app in self.apps)
        dedup_events = sum(1 for r in records if r["event_name"] == "EXECUTION_DEDUPLICATED")
        self.report.absorbed_duplicates = dedup_events + max(0, announced - sum(executed.values()))
        result = proof.verify(settings)
        self.report.proof_ok, self.report.proof = result.ok, result.describe()
        self.report.supervisor_restarts = self.stack().get("restarts") or {}
        return self.report


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def run(apps: int = 12, faults: int = 20, kill_every: float = 2.0, chaos_s: float = 15.0, redis_kills: int = 1,
        seed: int = 7, home: Path | None = None, settle_s: float = 240.0) -> Report:
    home = home or Path(tempfile.mkdtemp(prefix="cicd-chaos-"))
    chaos = Chaos(home, apps, seed)
    started = time.monotonic()
    try:
        chaos.start()
        first = faults // 2
        chaos.burst(first)                       # phase 1: incidents while workers are killed
        chaos.chaos_for(chaos_s, kill_every)
        chaos.burst(faults - first)              # phase 2: incidents while the broker dies
        for _ in range(redis_kills):
            time.sleep(1.0)
            chaos.kill_redis()
        chaos.chaos_for(chaos_s / 2, kill_every)
        chaos.settle(settle_s)
        report = chaos.verdict()
    finally:
        chaos.stop()
    report.seconds = time.monotonic() - started
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", type=int, default=40)
    parser.add_argument("--faults", type=int, default=80)
    parser.add_argument("--kill-every", type=float, default=1.5, help="seconds between SIGKILLs (on average)")
    parser.add_argument("--chaos-seconds", type=float, default=40.0)
    parser.add_argument("--redis-kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    report = run(args.apps, args.faults, args.kill_every, args.chaos_seconds, args.redis_kills, args.seed)
    print(report.table())
    sys.exit(0 if report.lost == 0 and report.duplicate_effects == 0 and report.proof_ok else 1)


if __name__ == "__main__":
    main()
