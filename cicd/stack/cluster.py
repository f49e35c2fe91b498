"""Start, supervise and stop the embedded stack: a Redis on loopback, a Caddy per environment (the
apps' stable endpoints), one Celery worker process per agent replica, beat, the exit watcher, the example git server, a supervisor, and Flower if asked
for, all detached so they outlive the command that started them.

Each is a component (cicd/stack/component.py) with one protocol; `up`, `down`, `supervise` and
`prepare` are walks over them in dependency order (stopping in reverse). What was started is
recorded in var/stack.json (cicd/stack/record.py). Talking to the workers (ping) needs the Celery
app, which lives outside this package: callers pass it in.
"""
from __future__ import annotations

import sys
import time

from cicd.config import AGENTS, ConfigError, Settings, redact_url
from cicd.stack.agents import Beat, Watcher, Workers, beat_args, worker_args
from cicd.stack.broker import Redis, broker_url_for, queue_depths, require_broker
from cicd.stack.component import Component, await_all, start_all, stop_all, supervise_all
from cicd.stack.flower import Flower, flower_args
from cicd.stack.gitserver import GitServer, example_git_server
from cicd.stack.proxy import Caddy
from cicd.stack.record import Context, Ping, Say, StackDown, StackError, alive, read_stack, stack_lock, write_stack
from cicd.stack.supervisor import Supervisor

# What other code uses of the stack; the components' own modules hold the rest.
__all__ = ["StackDown", "StackError", "beat_args", "broker_url_for", "components", "down", "example_git_server",
           "flower_args", "is_up", "prepare", "queue_depths", "read_stack", "require_broker", "running_demo_mode",
           "status", "supervise", "supervise_once", "up", "worker_args", "host_agents", "host_node"]

def components(scale: dict[str, int] | None = None, flower: bool | None = None,
               flower_port: int | None = None) -> list[Component]:
    """Every component of the stack, in the order to start them where requirements leave a choice."""
    return [Redis(), Caddy(), GitServer(), Workers(scale), Beat(), Watcher(), Supervisor(), Flower(flower, flower_port)]


def prepare(settings: Settings) -> None:
    """What an environment needs before its agents start, made by `cicd up` and by the bootstrap
    service of docker-compose.yml: its signing key (var/<env>/secret.key, 0600, unless
    CICD_SECRET_KEY_<ENV> is set), its log directory, and the directory of Flower's state."""
    for component in components():
        component.prepare(settings)


def up(settings: Settings, scale: dict[str, int], ping: Ping, say: Say = print,
       flower: bool | None = None, flower_port: int | None = None) -> dict:
    """Bring the environment's stack to the wanted shape; start only what is missing.

    flower: True starts Flower (on flower_port, else the port it had, else 5555), False stops it,
    None keeps it as it was (and brings it back if it died)."""
    parts = components(scale, flower, flower_port)
    with stack_lock(settings):
        ctx = Context(settings, read_stack(settings), say, ping)
        prepare(settings)
        failed = start_all(parts, ctx, [settings.env], record=lambda: write_stack(settings, ctx.stack))
    # Outside the lock: the supervisor goes on looking after the rest while workers come up.
    await_all(parts, ctx, [settings.env], skip=failed)
    if failed:
        raise next(iter(failed.values()))
    return ctx.stack


def is_up(settings: Settings) -> bool:
    section = read_stack(settings).get("envs", {}).get(settings.env)
    return bool(section) and any(alive(w) for w in section["workers"])


def running_demo_mode(settings: Settings) -> bool:
    """DEMO_MODE as the running workers of the environment have it (set when they started)."""
    return bool(read_stack(settings).get("envs", {}).get(settings.env, {}).get("demo_mode", False))


def down(settings: Settings, env: str | None = None, say: Say = print) -> int:
    """Stop what `up` recorded: one environment's workers and beat, or everything and Redis."""
    with stack_lock(settings):
        ctx = Context(settings, read_stack(settings), say)
        envs = [name for name in ([env] if env else list(ctx.envs)) if name in ctx.envs]
        # The whole stack goes once no environment is left to serve.
        whole_stack = not env or set(ctx.envs) <= {env}
        stopped = stop_all(components(), ctx, envs, whole_stack)
        for name in envs:
            del ctx.envs[name]
        write_stack(settings, ctx.stack)
    return stopped


def supervise_once(settings: Settings, say: Say) -> bool:
    """Restart whatever `up` started that has died: Redis (same port, same data), workers (same
    node names), beat, the watcher, Flower. False once there is nothing left to look after
    (`cicd down` ran)."""
    with stack_lock(settings):
        ctx = Context(settings, read_stack(settings), say)
        if not ctx.envs:
            return False
        ctx.restarts  # recorded from the first round on: `cicd status` shows the counts
        supervise_all(components(), ctx, list(ctx.envs))
        write_stack(settings, ctx.stack)
    return True


def supervise(settings: Settings, say: Say, poll_s: float = 1.0) -> None:
    while supervise_once(settings, say):
        time.sleep(poll_s)
    say("nothing left to supervise: stopping")


def status(settings: Settings, ping: Ping) -> dict:
    """Each agent of each environment: replicas, alive (answered a ping), queue depth."""
    stack = read_stack(settings)
    broker_url = broker_url_for(settings, stack)
    envs = stack.get("envs", {})
    nodes = [w["node"] for section in envs.values() for w in section["workers"] if alive(w)]
    broker_alive = None  # not asked: no worker to ping
    try:
        answered = ping(nodes, 1.5) if nodes else set()
        broker_alive = True if nodes else None
    except StackDown:
        answered, broker_alive = set(), False
    out = {"broker_url": redact_url(broker_url), "broker_alive": broker_alive,
           "redis_alive": alive(stack.get("redis")) if stack.get("redis") else None,
           "supervisor_alive": alive(stack.get("supervisor")), "restarts": stack.get("restarts") or {}, "envs": {}}
    flower = stack.get("flower") or {}
    # Where to find it and who logs in; the password stays in its file.
    out["flower"] = ({"url": flower["url"], "alive": alive(flower), "pid": flower["pid"], "user": flower["user"],
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
        proxy = (stack.get("proxies") or {}).get(name) or {}
        out["envs"][name] = {"agents": agents, "beat_alive": alive(section.get("beat")),
                             "started_at": section.get("started_at"),
                             "proxy": ({"admin": f"127.0.0.1:{proxy['admin_port']}", "alive": alive(proxy),
                                        "pid": proxy["pid"]} if proxy.get("pid") else None)}
    return out


def host_node(env: str, host: str) -> str:
    """A host agent's Celery node name: its host's name, not its machine's, so that the control
    plane can ask for it by name."""
    return f"{env}-host-{host}@{host}"


def host_agents(settings: Settings, hosts: dict[str, list[str]], ping: Ping) -> list[dict]:
    """Each host that apps are placed on: its agent's queue, whether the agent answers, how many
    messages wait for it (while it is down, its apps' actions wait there), and its apps."""
    if not hosts:
        return []
    broker_url = broker_url_for(settings, read_stack(settings))
    queues = {host: settings.host_queue(host) for host in hosts}
    depths = queue_depths(broker_url, list(queues.values())) if broker_url else {}
    try:
        answered = ping([host_node(settings.env, h) for h in hosts], 1.5)
    except StackDown:
        answered = set()
    return [{"host": host, "queue": queues[host], "alive": host_node(settings.env, host) in answered,
             "depth": depths.get(queues[host]), "apps": ", ".join(apps)} for host, apps in hosts.items()]


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
