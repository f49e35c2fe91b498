"""The stack: `cicd up`, `down`, `status`, and the exit watcher `up` starts (`watch`)."""
from __future__ import annotations

import time

import click

from cicd.cli import terminal
from cicd.cli.context import JSON_OPTION, Invocation, control_plane, echo_json, env_option, pass_invocation
from cicd.config import AGENTS, ENVIRONMENTS
from cicd.runtime import make_runtime


def parse_scale(values: tuple[str, ...]) -> dict[str, int]:
    scale = {}
    for value in values:
        agent, _, count = value.partition("=")
        if agent not in AGENTS or not count.isdigit():
            raise click.BadParameter(f"{value!r}: expected AGENT=N with AGENT one of {', '.join(AGENTS)}",
                                     param_hint="--scale")
        scale[agent] = int(count)
    return scale


@click.command()
@env_option()
@click.option("--scale", "scale", multiple=True, metavar="AGENT=N",
              help="Worker replicas for an agent (repeatable), e.g. --scale deploy=3. Default 1 each.")
@click.option("--flower/--no-flower", "flower", default=None,
              help="Also start Flower on 127.0.0.1 (basic auth: user $CICD_FLOWER_USER, default admin; password "
                   "from $CICD_FLOWER_PASSWORD_FILE, else var/flower/password, made on first start), or stop it. "
                   "Default: leave it as it is.")
@click.option("--flower-port", type=click.IntRange(1, 65535), default=None,
              help="Flower's port (implies --flower). Default: the port it had, else 5555.")
@pass_invocation
def up(invocation: Invocation, scale, flower, flower_port):
    """Start the embedded stack for an environment, or bring it to the wanted scale.

    Starts Redis on loopback (unless CICD_BROKER_URL points at one) with AOF on and its data in
    var/redis, one Celery worker process per agent replica on the {env}.{agent} queues, and beat.
    With --flower, also Flower, watching every environment on the broker. Returns when every
    worker answers a ping. Running it again starts only what is missing.
    """
    from cicd.stack import cluster
    if flower is False and flower_port is not None:
        raise click.BadParameter("--flower-port starts Flower; --no-flower stops it: give one of them",
                                 param_hint="--flower-port")
    settings = invocation.settings
    started = time.monotonic()
    plane = control_plane(settings)
    stack = cluster.up(settings, parse_scale(scale), plane.ping, say=click.echo,
                       flower=True if flower_port is not None else flower, flower_port=flower_port)
    # Workers send task events only when asked. Flower asks every 5 s, its first time 5 s after it
    # starts: ask now, so that the tasks of a command run right after `up` show in Flower too. Once
    # Flower is stopped, nobody reads them: stop paying for them.
    if (stack.get("flower") or {}).get("pid"):
        plane.app.control.enable_events()
    elif flower is False:
        plane.app.control.disable_events()
    click.echo(f"{settings.env} stack is up ({time.monotonic() - started:.1f} s). "
               f"`cicd status` shows it; `cicd down` stops it.")


@click.command()
@env_option(help="Stop only this environment's workers and beat (default: everything, Redis and Flower too).")
@click.option("--apps", "stop_apps", is_flag=True, help="Also stop the apps' replica processes.")
@pass_invocation
def down(invocation: Invocation, stop_apps):
    """Stop exactly the processes `cicd up` started (recorded in var/stack.json).

    Apps keep running unless --apps is given: stopping the control plane never takes your apps down.
    """
    from cicd.stack import cluster
    env = invocation.env
    settings = invocation.settings
    if stop_apps:
        for name in [env] if env else list(ENVIRONMENTS):
            runtime = make_runtime(settings.for_env(name))
            for app in runtime.apps():
                count = runtime.stop_app(app)
                click.echo(f"stopped {app} in {name} ({count} processes)")
    if cluster.down(settings, env, say=click.echo) == 0 and not stop_apps:
        click.echo("nothing was running")


@click.command(hidden=True)
@pass_invocation
def watch(invocation: Invocation):
    """(Started by `cicd up`.) Send a replica_down signal the moment a replica process exits
    (pidfds; on the Docker runtime, the daemon's `die` events)."""
    from cicd.signals import watcher
    settings = invocation.settings
    if settings.runtime == "local" and not watcher.available():
        click.echo("pidfds are not available here: crashes are found by the probes alone")
        return
    plane = control_plane(settings)
    plane.app  # configure the broker before the chains are built
    from workers.chains import healing_chain

    def send(signal):
        click.echo(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {signal['app']} replica {signal['slots'][0]} exited")
        healing_chain(settings.env, signal).apply_async()
    if settings.runtime == "docker":
        from cicd.runtime import docker
        docker.watch(settings, send)
    else:
        watcher.watch(settings, send)


@click.command()
@env_option()
@JSON_OPTION
@pass_invocation
def status(invocation: Invocation, as_json):
    """Each agent (replicas, alive, queue depth), and each app (replicas, health, uptime)."""
    from cicd.stack import cluster
    from cicd.store import reports
    settings = invocation.settings
    from cicd.store import placements
    state = cluster.status(settings, control_plane(settings).ping)
    state["hosts"] = cluster.host_agents(settings, placements.hosts(settings), control_plane(settings).ping)
    apps = reports.apps(settings, make_runtime(settings))
    if as_json:
        echo_json({"stack": state, "apps": apps, "env": settings.env})
        return
    terminal.echo("broker: ", state["broker_url"] or "(none)",
                  *([("  (not answering)", "bold red")] if state["broker_alive"] is False else []),
                  *([] if state["redis_alive"] is None else ["  redis: ", terminal.alive_word(state["redis_alive"])]),
                  *(["  supervisor: ", terminal.alive_word(state["supervisor_alive"])] if state["envs"] else []),
                  *(["  restarts: " + ", ".join(f"{k} {v}" for k, v in state["restarts"].items())]
                    if any(state["restarts"].values()) else []))
    if state["flower"]:
        flower = state["flower"]
        terminal.echo("flower: ", flower["url"], " ", terminal.alive_word(flower["alive"]),
                      f" (user {flower['user']}, password in {flower['password_file']})")
    if not state["envs"]:
        click.echo("no environment is up: `cicd up` starts one")
    for name, section in state["envs"].items():
        click.echo()
        terminal.echo(f"{name}: beat ", terminal.alive_word(section["beat_alive"]),
                      *([", caddy ", terminal.alive_word(section["proxy"]["alive"]),
                         f" (admin {section['proxy']['admin']})"] if section.get("proxy") else []),
                      f", up since {section['started_at']}")
        terminal.print_table(section["agents"], [("agent", "agent"), ("queue", "queue"), ("replicas", "replicas"),
                                                 ("alive", "alive"), ("depth", "queue depth")])
    if state["hosts"]:
        click.echo(f"\nhost agents of {settings.env}:")
        terminal.print_table([{**h, "alive": "yes" if h["alive"] else "DOWN"} for h in state["hosts"]], [("host", "host"), ("queue", "queue"), ("alive", "alive"),
                                              ("depth", "queue depth"), ("apps", "apps")])
    click.echo(f"\napps in {settings.env}:")
    if not apps:
        click.echo("  none onboarded: `cicd onboard NAME --repo URL --runtime backend`")
        return
    for row in apps:
        row["uptime_pct"] = f"{row['uptime'] * 100:.2f}%" if row["uptime"] is not None else None
        proxy = row.get("proxy")
        row["traffic"] = (f"{proxy['requests']} req, {proxy['failed']} 5xx, {proxy['latency_ms']:.0f} ms"
                          if proxy else None)
    terminal.print_table(apps, [("app", "app"), ("url", "url"), ("release", "release"), ("replicas", "replicas"),
                                ("healthy", "healthy"), ("utilization", "util"), ("uptime_pct", "uptime"),
                                ("traffic", "proxy (last interval)"),
                                ("open_incident", "open incident"), ("attention", "attention")])
