"""Dead letters: `cicd dlq list|show|retry|purge`."""
from __future__ import annotations

import click

from cicd.cli import terminal
from cicd.cli.context import (JSON_OPTION, Invocation, control_plane, echo_json, env_option, pass_invocation,
                              require_stack, whoami)


@click.group(name="dlq")
def dlq_group():
    """Dead letters: what could not be processed, kept with the reason until you act on it.

    Malformed or hostile input, an unknown app, a message for another environment, a task that
    failed or ran out of retries. `retry` sends one again (with the rest of its chain); `purge`
    deletes, and the proof log records what went.
    """


@dlq_group.command(name="list")
@env_option()
@click.option("--all", "include_retried", is_flag=True, help="Letters already retried too.")
@JSON_OPTION
@pass_invocation
def dlq_list(invocation: Invocation, include_retried, as_json):
    """The dead letters of an environment, oldest first."""
    from cicd.store import deadletters
    settings = invocation.settings
    rows = deadletters.listing(settings, include_retried)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no dead letters in {settings.env}")
        return
    for row in rows:
        row["why"] = row["reason"] if len(row["reason"]) <= 90 else row["reason"][:89] + "…"
    terminal.print_table(rows, [("id", "id"), ("task", "task"), ("status", "status"), ("created_at", "kept at"),
                                ("why", "why")])


@dlq_group.command(name="show")
@click.argument("letter_id", type=int, metavar="ID")
@env_option()
@pass_invocation
def dlq_show(invocation: Invocation, letter_id):
    """One dead letter, whole: task, arguments, the chain it was part of, and why."""
    from cicd.store import deadletters
    echo_json(deadletters.get(invocation.settings, letter_id))


@dlq_group.command(name="retry")
@click.argument("letter_ids", type=int, nargs=-1, required=True, metavar="ID...")
@env_option()
@pass_invocation
def dlq_retry(invocation: Invocation, letter_ids):
    """Send dead letters to their task again (a fixed bug, a broker that is back)."""
    from cicd.store import deadletters
    settings = invocation.settings
    require_stack(settings)
    plane = control_plane(settings)
    for letter_id in letter_ids:
        letter = deadletters.retry(settings, letter_id, whoami(), plane.resend)
        click.echo(f"dead letter {letter_id}: {letter['task']} sent again")


@dlq_group.command(name="purge")
@click.argument("letter_ids", type=int, nargs=-1, metavar="[ID...]")
@env_option()
@click.option("--all", "purge_all", is_flag=True, help="Every dead letter of the environment.")
@pass_invocation
def dlq_purge(invocation: Invocation, letter_ids, purge_all):
    """Delete dead letters you have dealt with (the proof log records what was deleted, by whom)."""
    from cicd.store import deadletters
    if bool(letter_ids) == purge_all:
        raise click.UsageError("give the IDs to purge, or --all")
    settings = invocation.settings
    count = deadletters.purge(settings, None if purge_all else list(letter_ids), whoami())
    click.echo(f"purged {count} dead letters from {settings.env}")
