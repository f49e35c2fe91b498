"""`cicd dashboard`: serve the dashboard, its JSON API and /metrics until Ctrl-C."""
from __future__ import annotations

import sys

import click

from cicd.cli.context import Invocation, env_option, pass_invocation


@click.command()
@env_option()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. It has no login: keep it on loopback unless a proxy guards it.")
@click.option("--port", default=8088, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the URL is printed).")
@pass_invocation
def dashboard(invocation: Invocation, host, port):
    """Serve the dashboard: apps, incidents over time, decisions and gates, the policy, live events.

    \b
    The page at http://HOST:PORT/ (default http://127.0.0.1:8088/, this machine only) shows
      - each app's state, replicas, health and uptime
      - incidents as severity against time (shape: kind, colour: outcome)
      - each incident's chain: decision, gates passed or refused, execution, outcome
      - the policy's Q-table as a heatmap
      - the proof log, updated live as events land

    \b
    Beside it, for scripts and other systems (JSON; Python: cicd.api):
      /api/health             each app: replicas, health, uptime, open incident
      /api/events?limit=N     the last N proof records (1-1000); &after=SEQ for newer ones only
      /api/incidents?limit=N  recent incidents with their decisions and gates; &app=NAME
      /api/policy             the Q-table, as `cicd rl show`
      /api/stream             the proof log as it grows (Server-Sent Events)
      /metrics                Prometheus metrics (cicd_*)

    It reads the environment's store and broker; the stack need not be up to look at history.
    Ctrl-C stops it.

    \b
    Examples:
      cicd dashboard                    http://127.0.0.1:8088/
      cicd dashboard --port 0           any free port; the URL is printed
      curl -s 'http://127.0.0.1:8088/api/events?limit=5'
    """
    import logging
    import signal

    from cicd.web import dashboard as dashboard_module
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", stream=sys.stderr)
    settings = invocation.settings
    server = dashboard_module.make_server(settings, host, port)
    if not dashboard_module.is_loopback(host):
        click.echo(f"warning: serving on {host}, beyond this machine; the dashboard has no login, so anyone who "
                   f"can reach it reads the {settings.env} proof log", err=True)
    click.echo(f"dashboard of {settings.env}: {server.url}  (JSON under {server.url}api/, "
               f"Prometheus at {server.url}metrics; Ctrl-C stops it)")

    def stop(signum, frame):
        raise KeyboardInterrupt  # a service manager's SIGTERM stops it as cleanly as Ctrl-C
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever(poll_interval=0.25)
    except KeyboardInterrupt:
        click.echo("dashboard stopped")
    finally:
        server.stopping.set()
        server.server_close()
