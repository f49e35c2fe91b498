"""What every component of the embedded stack shares: the record of what `cicd up` started
(var/stack.json: pids with their start times, so `cicd status` and `cicd down` from another shell
find exactly those processes and nothing else), its lock, and how a component's process is spawned."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass, replace
from typing import Callable

from cicd.config import Settings
from cicd.errors import CicdError
from cicd.runtime import process

Ping = Callable[[list[str], float], set[str]]  # (node names, timeout) -> the nodes that answered
Say = Callable[[str], None]


class StackError(CicdError, RuntimeError):
    pass


class StackDown(StackError):
    """A command needs an environment's stack, and it is not there to answer."""

    def __init__(self, env: str, why: str = ""):
        super().__init__(f"the stack for {env} is not running{f' ({why})' if why else ''}: "
                         f"start it with `cicd up --env {env}`")


@contextlib.contextmanager
def stack_lock(settings: Settings):
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.var_dir / "stack.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_stack(settings: Settings) -> dict:
    try:
        return json.loads(settings.stack_file.read_text())
    except (OSError, ValueError):
        return {}


def write_stack(settings: Settings, stack: dict) -> None:
    tmp = settings.stack_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(stack, indent=2, sort_keys=True))
    tmp.replace(settings.stack_file)


def alive(entry: dict | None) -> bool:
    return bool(entry) and process.is_alive(entry.get("pid"), entry.get("ticks"))


def child_env(settings: Settings) -> dict:
    """The agents find the broker as any command does: CICD_BROKER_URL if it was given, else
    var/stack.json and the password file, so no password sits in their environment."""
    env = dict(os.environ)
    env.update({"CICD_ENV": settings.env, "CICD_HOME": str(settings.home), "PYTHONUNBUFFERED": "1"})
    return env


def spawn(settings: Settings, argv: list[str], log_name: str, agent: str = "") -> dict:
    """One detached process of the stack, logging to logs/<env>/<log_name>; its record entry."""
    log = settings.logs_dir / log_name
    env = {**child_env(settings), "CICD_AGENT": agent}
    pid, ticks = process.spawn_detached(argv, str(settings.home), env, str(log), record_exit=False)
    return {"pid": pid, "ticks": ticks, "log": str(log)}


@dataclass
class Context:
    """What a component acts on: the settings of one environment, the stack's record (read and
    written under the stack lock by the walk), where to say what happened, and how to ping workers."""
    settings: Settings
    stack: dict
    say: Say
    ping: Ping | None = None

    def for_env(self, env: str) -> "Context":
        return replace(self, settings=self.settings.for_env(env))

    @property
    def envs(self) -> dict:
        return self.stack.setdefault("envs", {})

    @property
    def section(self) -> dict | None:
        """This environment's part of the record: its workers, beat and watcher."""
        return self.envs.get(self.settings.env)

    @property
    def restarts(self) -> dict:
        return self.stack.setdefault("restarts", {"redis": 0, "workers": 0, "beat": 0})
