"""Stacks the benchmarks run against: started with `cicd up` in a private home, stopped after."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CICD = Path(sys.executable).with_name("cicd")


class Stack:
    def __init__(self, home: Path, **variables: str):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        # CICD_BENCH_TASKS: its workers load the no-op tasks of the bare-Celery baseline (workers/bench.py).
        self.env = {**os.environ, "CICD_HOME": str(home), "CICD_ENV": "stage", "CICD_BENCH_TASKS": "1", **variables}
        for name in ("CICD_BROKER_URL", "CICD_DEMO_MODE"):
            self.env.pop(name, None)

    def cicd(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run([str(CICD), *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"cicd {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def __enter__(self):
        self.cicd("up")
        return self

    def __exit__(self, *exc):
        subprocess.run([str(CICD), "down", "--apps"], capture_output=True, env=self.env, timeout=120)

    def settings(self):
        """Settings as the stack's processes see them (its variables, this process's env untouched)."""
        from cicd.config import Settings
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)
        try:
            return Settings.load("stage")
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def stack_record(self) -> dict:
        return json.loads((self.home / "var" / "stack.json").read_text())

    def pids(self) -> list[int]:
        """Every process of the stack: Redis, workers (and their pool children), beat, supervisor."""
        record = self.stack_record()
        roots = [record["redis"]["pid"]] if record.get("redis") else []
        for section in record["envs"].values():
            roots += [w["pid"] for w in section["workers"]] + [section["beat"]["pid"]]
        if record.get("supervisor"):
            roots.append(record["supervisor"]["pid"])
        out = []
        for pid in roots:
            out.append(pid)
            out += children(pid)
        return out

    def control_plane(self):
        from workers.client import ControlPlane
        plane = ControlPlane(self.settings())
        plane.app  # configure it now, with this stack's broker
        return plane


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB; PSS shares the pages forked children have in common fairly."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def wait_for(check, timeout: float, poll: float = 0.02, what: str = "", state=None):
    """check() until it is true; past timeout, TimeoutError naming what was awaited and, from
    state() if given, how things stood then (a timed-out step must say what it waited for)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            seen = f"; {state()}" if state else ""
            raise TimeoutError(f"benchmark step timed out: {what or 'its check'} not true within {timeout:g} s{seen}")
        time.sleep(poll)
    return value
