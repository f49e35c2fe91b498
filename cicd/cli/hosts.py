"""`cicd host-agent`: this machine as a host of a control plane that runs elsewhere."""
from __future__ import annotations

import os
import threading
import time

import click

from cicd.cli.context import Invocation, env_option, pass_invocation
from cicd.config import ConfigError, Settings, check_host_name, redact_url


def host_worker_args(queue: str, node: str) -> list[str]:
    """The Celery worker of a host agent: its own queue only, two threads (a long build must not
    hold a restart back), events off, as the stack's agent workers are."""
    return ["worker", "-Q", queue, "-n", node, "--pool", "threads", "--concurrency", "2", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip"]


@click.command("host-agent")
@env_option()
@click.option("--name", envvar="CICD_HOST_NAME", required=True, metavar="NAME",
              help="This host's name (also $CICD_HOST_NAME): apps onboarded with --host NAME run here.")
@click.option("--address", envvar="CICD_HOST_ADDRESS", required=True, metavar="IP",
              help="The address the control plane reaches this machine at (also $CICD_HOST_ADDRESS): the "
                   "apps' replicas listen there, and the monitor probes them there.")
@click.option("--no-watch", is_flag=True, help="Do not watch replica exits (the network probes still find them).")
@pass_invocation
def host_agent(invocation: Invocation, name, address, no_watch):
    """Run this machine's host agent, in the foreground, until stopped.

    \b
    It serves the queue {env}.host.NAME of the control plane's broker ($CICD_BROKER_URL, password
    from $CICD_BROKER_PASSWORD_FILE) with its store ($CICD_DATABASE_URL): the deploys, restarts,
    scales and injected faults of the apps placed here, with their state under this machine's
    $CICD_HOME. One process: the agent's worker and its exit watcher. Run it under the machine's
    process manager (a restart policy), as the control plane's `cicd up` supervises its own.
    While it is down, actions for its apps wait in its queue; they run when it is back.

    \b
      export CICD_BROKER_URL=redis://10.0.0.1:6379/0 CICD_BROKER_PASSWORD_FILE=/etc/cicd/redis.password
      export CICD_DATABASE_URL=postgresql+psycopg2://cicd@10.0.0.1/cicd_{env}
      cicd host-agent --name web-2 --address 10.0.0.2
    """
    check_host_name(name, "--name")
    if not os.environ.get("CICD_BROKER_URL"):
        raise ConfigError("CICD_BROKER_URL: a host agent needs the control plane's broker (redis://HOST:PORT/0)")
    # What every part of this process reads (Settings.load, the Celery configuration: CICD_AGENT).
    os.environ.update({"CICD_HOST_NAME": name, "CICD_HOST_ADDRESS": address, "CICD_AGENT": "host"})
    if invocation.env:
        os.environ["CICD_ENV"] = invocation.env
    settings = Settings.load(invocation.env)  # with the host's name and address just set
    from cicd.stack.broker import require_broker
    require_broker(settings)
    queue = settings.host_queue(name)
    click.echo(f"host agent {name} ({address}) of {settings.env}: queue {queue}, broker "
               f"{redact_url(settings.broker_url)}, apps under {settings.apps_dir}", err=True)
    from cicd.stack.cluster import host_node
    from workers.app import celery_app
    if not no_watch:
        _start_watcher(settings)
    celery_app.worker_main(host_worker_args(queue, host_node(settings.env, name)))


def _start_watcher(settings) -> None:
    """The exit watcher of this host's replicas, in this process: if the agent dies, so does it."""
    from cicd.signals import watcher
    if not watcher.available():
        click.echo("pidfds are not available here: crashes are found by the probes alone", err=True)
        return
    from workers.chains import healing_chain

    def send(signal):
        click.echo(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {signal['app']} replica {signal['slots'][0]} exited",
                   err=True)
        healing_chain(settings.env, signal).apply_async()

    def run():
        while True:
            try:
                watcher.watch(settings, send)
            except Exception as exc:  # a broker hiccup must not end the watching for good
                click.echo(f"watcher: {type(exc).__name__}: {exc}; again in 1 s", err=True)
                time.sleep(1.0)
    threading.Thread(target=run, name="exit-watcher", daemon=True).start()
