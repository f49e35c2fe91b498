"""`cicd demo`: the end-to-end story in stage, on real apps, with a summary."""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import click

from cicd.cli import terminal
from cicd.cli.context import Invocation, control_plane, pass_invocation
from cicd.runtime import make_runtime


@click.command()
@click.option("--scenario", type=click.Choice(["classic", "slow-deploy", "failed-deploy", "overloaded-env"]),
              default="classic", show_default=True, help="Which story to run (see below).")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds each incident may take.")
@pass_invocation
def demo(invocation: Invocation, scenario, timeout):
    """The end-to-end demo in stage, with real apps deployed from a loopback git server.

    \b
    classic         demo-api: crash -> restart, overload -> scale out, false alarm -> noop
    slow-deploy     a revision that starts slowly: detected while its gate runs, handled
    failed-deploy   a revision that does not build: recovered by retry or rollback while
                    the live release serves throughout
    overloaded-env  three apps hot at once: scaled out, then back in when the load falls

    Starts the stack if it is not up, in DEMO_MODE (only noop, restart and scaling execute;
    set CICD_DEMO_MODE=false to let the healer retry and roll back deploys), and leaves it running.
    """
    from cicd.stack import cluster
    from cicd.stack import demo as demo_module
    os.environ.setdefault("CICD_DEMO_MODE", "true")
    settings = invocation.settings_for("stage")
    plane = control_plane(settings)
    with terminal.progress(f"demo ({scenario})") as underway:
        def say(line: str) -> None:
            underway.echo(line)
            underway.update(note=line.strip()[:60])
        if not cluster.is_up(settings):
            say("starting the stage stack ...")
            cluster.up(settings, {}, plane.ping, say=say)
        if cluster.running_demo_mode(settings) != settings.demo_mode:
            # The workers decide what DEMO_MODE is; say which one this run really has.
            settings = replace(settings, demo_mode=cluster.running_demo_mode(settings))
        code = demo_module.run(settings, make_runtime(settings), plane, say=say, scenario=scenario,
                               scenario_timeout_s=timeout)
    sys.exit(code)
