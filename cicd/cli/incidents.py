"""`cicd incidents`: the latest incidents, or a live tail of what happens to them."""
from __future__ import annotations

import json

import click

from cicd.cli import terminal
from cicd.cli.context import JSON_OPTION, Invocation, echo_json, env_option, pass_invocation
from cicd.config import Settings

INCIDENT_COLUMNS = [("id", "id"), ("app", "app"), ("kind", "kind"), ("severity", "severity"), ("status", "status"),
                    ("attempt", "attempt"), ("action", "action"), ("opened_at", "opened"), ("resolution", "resolution")]


@click.command()
@env_option()
@click.option("--limit", default=20, show_default=True, help="How many of the latest incidents to list.")
@click.option("--app", default=None, help="Only this app's incidents (and, with --follow, its events).")
@click.option("--follow", "-f", is_flag=True,
              help="Then print each event of an incident as it happens, until Ctrl-C. With --json: one JSON "
                   "object per line.")
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(min=0.05),
              help="With --follow: seconds between looks at the proof log.")
@JSON_OPTION
@pass_invocation
def incidents(invocation: Invocation, limit, app, follow, interval, as_json):
    """Recent incidents, newest first; with --follow, a live tail of what happens to them.

    \b
    --follow lists the current incidents (oldest first), then prints each proof-log event
    of an incident as it lands: opened, decided, gated, executed, failed, stable or
    escalated, learned. Ctrl-C stops it (exit 0). With --json, each line is one object:
      {"type": "incident", "id": ..., "status": ..., ...}    the incidents listed first
      {"type": "event", "phase": "executed", "seq": ..., "event_name": ..., ...}
    """
    from cicd.store import reports
    settings = invocation.settings
    if follow:
        follow_incidents(settings, limit, app, interval, as_json)
        return
    rows = reports.incidents(settings, limit, app)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no incidents in {settings.env}")
        return
    terminal.print_table(rows, INCIDENT_COLUMNS)


def follow_incidents(settings: Settings, limit: int, app: str | None, interval: float, as_json: bool) -> None:
    from cicd.store import proof, reports
    # The chain head before the listing: an event that lands in between is then printed once,
    # as an event, and none is lost.
    after = proof.head_seq(settings)
    rows = list(reversed(reports.incidents(settings, limit, app)))
    try:
        if as_json:
            for row in rows:
                click.echo(json.dumps({"type": "incident", **row}, sort_keys=True))
        elif rows:
            terminal.print_table(rows, INCIDENT_COLUMNS)
        else:
            click.echo(f"no incidents in {settings.env} yet")
        if not as_json:
            click.echo(f"following the incidents of {app or 'every app'} in {settings.env}; Ctrl-C stops", err=True)
        for record in reports.incident_events(settings, after, app, poll_s=interval):
            phase = reports.phase_of(record["event_name"])
            if as_json:
                click.echo(json.dumps({"type": "event", "phase": phase, **record}, sort_keys=True))
                continue
            terminal.echo(record["ts"][11:23], "  ", (f"{phase:<9}", terminal.STATUS_STYLES.get(phase)), " ",
                          f"{record['incident_id']}  {record['app'] or '-':<12} ",
                          (f"{record['event_name']:<24}", terminal.EVENT_STYLES.get(record["event_name"])),
                          " ", reports.payload_text(record, 70))
    except KeyboardInterrupt:
        return  # Ctrl-C is how a tail ends: exit 0, no traceback
