"""The proof log: `cicd proof tail|verify|export`."""
from __future__ import annotations

import sys

import click

from cicd.cli import terminal
from cicd.cli.context import JSON_OPTION, Invocation, echo_json, env_option, pass_invocation


@click.group(name="proof")
def proof_group():
    """The tamper-evident proof log (a hash chain per environment)."""


@proof_group.command(name="tail")
@env_option()
@click.option("-n", "count", default=20, show_default=True, help="How many records.")
@click.option("--incident", default=None, help="Only this incident's records.")
@JSON_OPTION
@pass_invocation
def proof_tail(invocation: Invocation, count, incident, as_json):
    """The last records of the chain, oldest first (`proof export` writes them all as JSONL)."""
    from cicd.store import proof, reports
    settings = invocation.settings
    records = proof.tail(settings, count, incident)
    if as_json:
        echo_json(records)
        return
    for record in records:
        record["what"] = reports.payload_text(record, 80)
    terminal.print_table(records, [("seq", "seq"), ("ts", "ts"), ("event_name", "event"),
                                   ("incident_id", "incident"), ("app", "app"), ("what", "payload")])


@proof_group.command(name="verify")
@env_option()
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Verify an exported JSONL file instead of the database (e.g. logs/stage/proof.jsonl).")
@pass_invocation
def proof_verify(invocation: Invocation, path):
    """Check every record's hash and link; name the first bad record. Exit 1 if broken."""
    from cicd.store import proof
    settings = invocation.settings
    result = proof.verify_file(path) if path else proof.verify(settings)
    click.echo(f"{path or settings.env}: {result.describe()}")
    sys.exit(0 if result.ok else 1)


@proof_group.command(name="export")
@env_option()
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", "-o", type=click.File("w"), default="-", help="File to write (default: stdout).")
@pass_invocation
def proof_export(invocation: Invocation, fmt, output):
    """Write the whole chain as JSONL or CSV (the columns `cicd replay` reads)."""
    from cicd.store import proof
    settings = invocation.settings
    count = proof.export(settings, fmt, output)
    if output is not sys.stdout:
        click.echo(f"{count} records written to {output.name}", err=True)
