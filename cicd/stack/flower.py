"""Flower on loopback, watching every environment on this broker, read-only, with basic auth and
its state kept in var/flower/."""
from __future__ import annotations

import base64
import os
import re
import secrets
import socket
import sys
import time
import urllib.request
from pathlib import Path

from cicd.config import ConfigError, Settings, read_secret_file, write_secret_file
from cicd.runtime import process
from cicd.stack.agents import CELERY_APP
from cicd.stack.component import Component
from cicd.stack.record import Context, Say, StackError, alive, child_env

FLOWER_PORT = 5555
FLOWER_USER = "admin"
# Tasks Flower keeps (in memory and in its db): with a probe every second, a few hours of history,
# small enough that its periodic save takes well under a second.
FLOWER_MAX_TASKS = 10_000
# Flower saves its state on a clean stop; every minute too, so a killed Flower loses at most that.
FLOWER_SAVE_INTERVAL_MS = 60_000
FLOWER_READY_TIMEOUT_S = 30.0
# Flower takes its credentials as "user:password[,user:password...]".
_FLOWER_USER = re.compile(r"[A-Za-z0-9._-]{1,64}")
# After a failed restart, the supervisor tries again this much later.
RETRY_AFTER_S = 30


def flower_args(address: str, port: int, db: str) -> list[str]:
    """Flower's Python arguments, after the interpreter: `cicd up --flower` and the flower service of
    docker-compose.yml run the same. Read-only, because shutting workers down, restarting pools,
    revoking or sending tasks from a browser would go round the orchestrator's gates and the proof
    log. No credentials: every user can read a command line (`ps`); they go in Flower's environment."""
    return ["-m", "celery", "-A", CELERY_APP, "flower", f"--address={address}", f"--port={port}",
            "--persistent=True", f"--db={db}", f"--max_tasks={FLOWER_MAX_TASKS}",
            f"--state_save_interval={FLOWER_SAVE_INTERVAL_MS}", "--read_only=True"]


def flower_credentials(settings: Settings, user: str | None = None,
                       password_file: str | Path | None = None) -> tuple[str, str, Path]:
    """Flower's basic-auth user (CICD_FLOWER_USER, default admin) and password. The password comes
    from a 0600 file, as the broker's does: CICD_FLOWER_PASSWORD_FILE, else var/flower/password,
    made on the first start. Returns (user, password, the password's file)."""
    user = user or os.environ.get("CICD_FLOWER_USER") or FLOWER_USER
    if not _FLOWER_USER.fullmatch(user):
        raise ConfigError(f"CICD_FLOWER_USER={user!r}: must be 1-64 letters, digits, '.', '_' or '-'")
    path = Path(password_file or os.environ.get("CICD_FLOWER_PASSWORD_FILE") or settings.var_dir / "flower" / "password")
    if not path.exists():
        write_secret_file(path, secrets.token_urlsafe(24))
    password = read_secret_file(path, "flower password")
    if len(password) < 12 or "," in password or any(c.isspace() for c in password):
        raise ConfigError(f"flower password file {path} (CICD_FLOWER_PASSWORD_FILE): the password must be at least "
                          "12 characters, with no comma and no whitespace (Flower splits its credentials on commas)")
    return user, password, path


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Flower binds: TIME_WAIT is no obstacle
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def start_flower(settings: Settings, say: Say, port: int, user: str | None = None,
                 password_file: str | None = None) -> dict:
    """Start Flower; ready when it answers an authenticated request with our credentials."""
    if not 1 <= port <= 65535:
        raise StackError(f"--flower-port {port}: must be 1-65535")
    try:
        user, password, path = flower_credentials(settings, user, password_file)
    except ConfigError as exc:
        raise StackError(str(exc)) from None
    if _port_taken(port):
        raise StackError(f"flower: port {port} on 127.0.0.1 is in use; choose another with "
                         f"`cicd up --flower --flower-port N`")
    data_dir = settings.var_dir / "flower"
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Flower reads FLOWER_* variables as options: none of the caller's may change ours (address,
    # auth, prefix); the credentials go in the one we set, never on the command line.
    env = {k: v for k, v in child_env(settings).items() if not k.startswith("FLOWER_")}
    env.update(CICD_AGENT="", FLOWER_BASIC_AUTH=f"{user}:{password}")
    log = settings.home / "logs" / "flower.log"
    argv = [sys.executable, *flower_args("127.0.0.1", port, str(data_dir / "flower.db"))]
    pid, ticks = process.spawn_detached(argv, str(settings.home), env, str(log), record_exit=False)
    entry = {"pid": pid, "ticks": ticks, "port": port, "url": f"http://127.0.0.1:{port}/", "user": user,
             "password_file": str(path), "log": str(log)}
    _wait_flower(entry, password)
    say(f"flower     {entry['url']} (pid {pid}; user {user}, password in {path})")
    return entry


def _answers(entry: dict, password: str) -> bool:
    token = base64.b64encode(f"{entry['user']}:{password}".encode()).decode()
    request = urllib.request.Request(entry["url"] + "api/task/types", headers={"Authorization": f"Basic {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(request, timeout=2) as response:
            return response.status == 200  # with our password: our Flower, not another on the port
    except OSError:
        return False


def _wait_flower(entry: dict, password: str) -> None:
    deadline = time.monotonic() + FLOWER_READY_TIMEOUT_S
    while not _answers(entry, password):
        if not alive(entry) or time.monotonic() > deadline:
            process.stop(entry["pid"], entry["ticks"], grace_s=2)
            log = Path(entry["log"])
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise StackError(f"flower did not start on port {entry['port']}; its log ({log}) ends:\n{tail}")
        time.sleep(0.1)


def _forget(stack: dict) -> bool:
    """Stop the recorded Flower; keep its port (the next `--flower` uses it), forget its process."""
    entry = stack.get("flower") or {}
    stopped = process.stop(entry.get("pid"), entry.get("ticks"), grace_s=10)  # it saves its state on SIGTERM
    stack["flower"] = {"port": entry["port"]} if entry.get("port") else None
    return stopped


class Flower(Component):
    """Started only when asked for (`cicd up --flower`), and kept as it was otherwise. Inessential:
    a Flower that cannot start must not keep the agents from starting."""
    name = "flower"
    requires = ("redis", "workers")  # it watches the workers, and asks them for their task events
    essential = False

    def __init__(self, wanted: bool | None = None, port: int | None = None):
        # wanted: True starts it (on port, else the port it had, else 5555), False stops it, None
        # keeps it as it was (and brings it back if it died).
        self.wanted, self.port = wanted, port

    def prepare(self, settings: Settings) -> None:
        (settings.var_dir / "flower").mkdir(mode=0o700, parents=True, exist_ok=True)

    def start(self, ctx: Context) -> None:
        stack = ctx.stack
        entry = stack.get("flower") or {}
        if self.wanted is False:
            if _forget(stack):
                ctx.say(f"stopped flower (pid {entry['pid']})")
            return
        if not (self.wanted or entry.get("pid")):
            return  # never asked for, or stopped on purpose
        port = self.port or entry.get("port") or FLOWER_PORT
        if alive(entry) and entry["port"] == port:
            return
        _forget(stack)  # dead, or on another port
        # Asked for now: the credentials of this shell's settings; brought back: the ones it had.
        user, password_file = (None, None) if self.wanted else (entry.get("user"), entry.get("password_file"))
        stack["flower"] = start_flower(ctx.settings, ctx.say, port, user, password_file)

    def ready(self, ctx: Context) -> bool:
        entry = ctx.stack.get("flower") or {}
        if not entry.get("pid"):
            return True  # not wanted
        try:
            password = read_secret_file(Path(entry["password_file"]), "flower password")
        except ConfigError:
            return False
        return _answers(entry, password)

    def stop(self, ctx: Context) -> int:
        if not _forget(ctx.stack):
            return 0
        ctx.say("stopped flower")
        return 1

    def supervise(self, ctx: Context) -> None:
        entry = ctx.stack.get("flower") or {}
        if not entry.get("pid") or alive(entry) or time.time() < entry.get("retry_at", 0):
            return
        try:
            ctx.stack["flower"] = start_flower(ctx.settings, ctx.say, entry["port"], entry["user"],
                                               entry["password_file"])
            ctx.restarts["flower"] = ctx.restarts.get("flower", 0) + 1
            ctx.say(f"restarted flower (pid {entry['pid']} had died)")
        except StackError as exc:
            # Its port taken meanwhile, say: keep the rest of the stack looked after, try again later.
            entry["retry_at"] = time.time() + RETRY_AFTER_S
            ctx.say(f"could not restart flower, trying again in {RETRY_AFTER_S} s: {exc}")
