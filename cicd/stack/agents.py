"""The processes of one environment: a Celery worker per agent replica, beat, and the exit watcher."""
from __future__ import annotations

import os
import sys
import time
from abc import ABC, abstractmethod
from pathlib import Path

from cicd.config import AGENTS, signing_key
from cicd.core.events import iso, utcnow
from cicd.runtime import process
from cicd.stack.component import Component
from cicd.stack.record import Context, StackError, alive, spawn

CELERY_APP = "workers.app:celery_app"
# Each agent replica is one process with a thread pool: a forked pool child per worker would
# double the stack's memory, and every task here either returns in milliseconds or waits on
# another process (git, a build). Two threads where two things must not wait for each other: the
# monitor's probes and its verifications, a long build and another app's health gate.
POOL = "threads"
DEFAULT_CONCURRENCY = {"monitor": 2, "deploy": 2}
READY_TIMEOUT_S = 90.0
MAX_REPLICAS = 16


def node_name(env: str, agent: str, index: int) -> str:
    return f"{env}-{agent}-{index}@{os.uname().nodename}"


def worker_args(env: str, agent: str, node: str) -> list[str]:
    """The Python arguments of one agent replica, after the interpreter. The one definition of a
    worker's command line: `cicd up` runs it, and each worker service of docker-compose.yml must run
    the same (tests/unit/test_compose.py holds the file to it). No -E: task events cost a message
    per task state, so they are off until a Flower asks the workers for them (enable_events)."""
    return ["-m", "celery", "-A", CELERY_APP, "worker", "-Q", f"{env}.{agent}", "-n", node, "--pool", POOL,
            "--concurrency", str(DEFAULT_CONCURRENCY.get(agent, 1)), "--loglevel", "INFO",
            "--without-mingle", "--without-gossip"]


def worker_argv(settings, agent: str, index: int) -> list[str]:
    """The command of one agent replica of `cicd up`."""
    settings.queue(agent)  # a clear error for an unknown agent
    return [sys.executable, *worker_args(settings.env, agent, node_name(settings.env, agent, index))]


def beat_args(schedule: str) -> list[str]:
    """Beat's Python arguments, after the interpreter: `cicd up` and the beat service of
    docker-compose.yml run the same, each with its own schedule file."""
    return ["-m", "celery", "-A", CELERY_APP, "beat", "--loglevel", "INFO", "-s", schedule]


def beat_argv(settings) -> list[str]:
    return [sys.executable, *beat_args(str(settings.env_dir / "celerybeat-schedule"))]


def watcher_argv() -> list[str]:
    return [sys.executable, "-m", "cli", "watch"]


def check_scale(scale: dict[str, int]) -> None:
    for agent, n in scale.items():
        if agent not in AGENTS:
            raise StackError(f"--scale {agent}={n}: agent must be one of {', '.join(AGENTS)}")
        if not 1 <= n <= MAX_REPLICAS:
            raise StackError(f"--scale {agent}={n}: replicas must be 1-{MAX_REPLICAS}")


def spawn_worker(ctx: Context, agent: str, index: int) -> dict:
    entry = spawn(ctx.settings, worker_argv(ctx.settings, agent, index), f"worker-{agent}-{index}.log", agent)
    entry.update(agent=agent, index=index, node=node_name(ctx.settings.env, agent, index))
    return entry


class Workers(Component):
    """One Celery worker process per agent replica, on the environment's {env}.{agent} queues.
    Ready when each answers a ping by its node name."""
    name = "workers"
    requires = ("redis",)
    per_env = True

    def __init__(self, scale: dict[str, int] | None = None):
        check_scale(scale or {})
        self.scale = scale or {}
        self._started: dict[str, list[dict]] = {}   # by environment: replicas this walk started
        self._stopping: dict[str, list[dict]] = {}  # ...and the ones it scaled away

    def prepare(self, settings) -> None:
        # Without the signing key decide cannot sign nor orchestrate verify (var/<env>/secret.key,
        # 0600, unless CICD_SECRET_KEY_<ENV> is set).
        signing_key(settings, create=True)
        settings.logs_dir.mkdir(parents=True, exist_ok=True)

    def start(self, ctx: Context) -> None:
        section = ctx.envs.setdefault(ctx.settings.env, {"workers": [], "beat": None})
        if not any(alive(w) for w in section["workers"]):
            section["demo_mode"] = ctx.settings.demo_mode  # what the workers about to start will enforce
        wanted = {agent: self.scale.get(agent, 1) for agent in AGENTS}
        keep, started, stopping = [], [], []
        for worker in section["workers"]:
            if alive(worker) and worker["index"] <= wanted[worker["agent"]]:
                keep.append(worker)
            elif alive(worker):
                stopping.append(worker)
        for agent in AGENTS:
            have = {w["index"] for w in keep if w["agent"] == agent}
            started += [spawn_worker(ctx, agent, index) for index in range(1, wanted[agent] + 1) if index not in have]
        section["workers"] = sorted(keep + started, key=lambda w: (AGENTS.index(w["agent"]), w["index"]))
        section["started_at"] = section.get("started_at") or iso(utcnow())
        self._started[ctx.settings.env], self._stopping[ctx.settings.env] = started, stopping

    def await_ready(self, ctx: Context) -> None:
        # Replicas scaled away stop here, outside the lock: each may take its grace to finish its task.
        process.stop_all([(w["pid"], w["ticks"]) for w in self._stopping.pop(ctx.settings.env, [])], grace_s=15)
        waiting = {w["node"]: w for w in self._started.pop(ctx.settings.env, [])}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while waiting:
            for node in ctx.ping(list(waiting), 1.0):
                worker = waiting.pop(node, None)
                if worker:
                    ctx.say(f"worker     {worker['node']:<40} pid {worker['pid']} ready")
            dead = [w for w in waiting.values() if not alive(w)]
            if dead:
                w = dead[0]
                tail = Path(w["log"]).read_text(errors="replace")[-1500:] if Path(w["log"]).exists() else ""
                raise StackError(f"worker {w['node']} exited during start-up; its log ({w['log']}) ends:\n{tail}")
            if waiting and time.monotonic() > deadline:
                raise StackError(f"workers not ready after {READY_TIMEOUT_S:.0f} s: {', '.join(sorted(waiting))}")

    def ready(self, ctx: Context) -> bool:
        """Every recorded replica answers a ping (ctx.ping) by its node name."""
        nodes = [w["node"] for w in (ctx.section or {}).get("workers", []) if alive(w)]
        return bool(nodes) and ctx.ping(nodes, 1.5) == set(nodes)

    def stop(self, ctx: Context) -> int:
        section = ctx.section
        if not section:
            return 0
        stopped = process.stop_all([(w["pid"], w["ticks"]) for w in section["workers"]], grace_s=15)
        ctx.say(f"stopped {ctx.settings.env}: {len(section['workers'])} workers and beat")
        return stopped

    def supervise(self, ctx: Context) -> None:
        workers = (ctx.section or {}).get("workers", [])
        for i, worker in enumerate(workers):
            if not alive(worker):
                workers[i] = spawn_worker(ctx, worker["agent"], worker["index"])
                ctx.restarts["workers"] += 1
                ctx.say(f"restarted {worker['node']} (pid {worker['pid']} had died)")


class EnvProcess(Component, ABC):
    """One process of an environment beside its workers, recorded in its section under `name`."""
    per_env = True
    log_name: str
    agent = ""

    @abstractmethod
    def argv(self, ctx: Context) -> list[str]:
        ...

    def wanted(self, ctx: Context) -> bool:
        return True

    @abstractmethod
    def started_message(self, entry: dict) -> str:
        ...

    def _spawn(self, ctx: Context) -> dict:
        return spawn(ctx.settings, self.argv(ctx), self.log_name, self.agent)

    def start(self, ctx: Context) -> None:
        section = ctx.section
        if self.wanted(ctx) and not alive(section.get(self.name)):
            section[self.name] = self._spawn(ctx)
            ctx.say(self.started_message(section[self.name]))

    def ready(self, ctx: Context) -> bool:
        return not self.wanted(ctx) or alive((ctx.section or {}).get(self.name))

    def stop(self, ctx: Context) -> int:
        entry = (ctx.section or {}).get(self.name) or {}
        return process.stop(entry.get("pid"), entry.get("ticks"), grace_s=5)

    def supervise(self, ctx: Context) -> None:
        section = ctx.section or {}
        if section.get(self.name) and not alive(section[self.name]):
            old = section[self.name]["pid"]
            section[self.name] = self._spawn(ctx)
            self.restarted(ctx, old)

    @abstractmethod
    def restarted(self, ctx: Context, old_pid: int) -> None:
        """Say (and count) that it was brought back."""


class Beat(EnvProcess):
    """Celery beat: the environment's probes and housekeeping. Started after the workers and
    stopped before them, so nothing new is sent while they finish what they hold."""
    name = "beat"
    requires = ("workers",)
    log_name = "beat.log"
    agent = "beat"

    def argv(self, ctx: Context) -> list[str]:
        return beat_argv(ctx.settings)

    def started_message(self, entry: dict) -> str:
        return f"beat       pid {entry['pid']}"

    def await_ready(self, ctx: Context) -> None:
        if not self.ready(ctx):
            raise StackError(f"beat exited during start-up; see {ctx.section['beat']['log']}")

    def restarted(self, ctx: Context, old_pid: int) -> None:
        ctx.restarts["beat"] += 1
        ctx.say(f"restarted beat of {ctx.settings.env} (pid {old_pid} had died)")


class Watcher(EnvProcess):
    """`cicd watch`: a signal to the detect agent the moment a replica exits (pidfds, docker events)."""
    name = "watcher"
    requires = ("workers",)
    log_name = "watcher.log"

    def argv(self, ctx: Context) -> list[str]:
        return watcher_argv()

    def wanted(self, ctx: Context) -> bool:
        return ctx.settings.runtime in ("local", "docker") and ctx.settings.watch_exits

    def started_message(self, entry: dict) -> str:
        return f"watcher    pid {entry['pid']} (replica exits, as they happen)"

    def restarted(self, ctx: Context, old_pid: int) -> None:
        ctx.say(f"restarted the watcher of {ctx.settings.env} (pid {old_pid} had died)")
