"""Promotion and approval: `cicd promote`, `approvals`, `approve`, `deny`."""
from __future__ import annotations

import click

from cicd.cli import terminal
from cicd.cli.context import JSON_OPTION, Invocation, control_plane, echo_json, env_option, pass_invocation, whoami
from cicd.config import ENVIRONMENTS, Settings


@click.command()
@click.argument("app")
@click.option("--from", "source", type=click.Choice(ENVIRONMENTS), default="stage", show_default=True)
@click.option("--to", "target", type=click.Choice(ENVIRONMENTS), default="prod", show_default=True)
@pass_invocation
def promote(invocation: Invocation, app, source, target):
    """Ask to promote an app's live release to the next environment; a human must approve it.

    The request waits in the target environment (`cicd approvals`) until someone runs
    `cicd approve ID` or `cicd deny ID`, or it expires ($CICD_APPROVAL_TTL, default 1 h).
    """
    from cicd.healing import approvals
    source_settings, target_settings = invocation.settings_for(source), invocation.settings_for(target)
    request = approvals.request_promotion(target_settings, source_settings, app, whoami())
    click.echo(f"APPROVAL_REQUESTED {request['id']}: {request['summary']} (expires {request['expires_at']})")
    click.echo(f"answer with `cicd approve {request['id']} --reason ...` or `cicd deny {request['id']} --reason ...`")


@click.command(name="approvals")
@env_option(help="Only this environment.")
@click.option("--all", "include_decided", is_flag=True, help="Answered and expired requests too.")
@JSON_OPTION
@pass_invocation
def approvals_list(invocation: Invocation, include_decided, as_json):
    """Requests waiting for a human: promotions, and actions held back in prod."""
    from cicd.healing import approvals
    env = invocation.env
    rows = []
    for name in [env] if env else ENVIRONMENTS:
        settings = invocation.settings_for(name)
        if settings.env_dir.exists():
            rows.extend(approvals.pending(settings, include_decided))
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("nothing is waiting for approval")
        return
    terminal.print_table(rows, [("id", "id"), ("status", "status"), ("summary", "what"), ("requested_by", "asked by"),
                                ("expires_at", "expires"), ("decided_by", "answered by"), ("reason", "why")])


def answer_settings(invocation: Invocation, approval_id: str) -> Settings:
    """The Settings of the environment an approval id names (apr-ENV-...): a bad id is a bad argument."""
    from cicd.healing import approvals
    try:
        env = approvals.env_of(approval_id)
    except approvals.ApprovalError as exc:
        raise click.BadParameter(str(exc), param_hint="ID") from None
    return invocation.settings_for(env)


@click.command()
@click.argument("approval_id", metavar="ID")
@click.option("--reason", default="", help="Why (goes to the proof log with your name).")
@click.option("--as", "who", default=None, help="Who approves (default: $CICD_USER, else your login).")
@pass_invocation
def approve(invocation: Invocation, approval_id, reason, who):
    """Grant a request: a promotion is onboarded and deployed; a held-back action runs; an app
    is removed (here, as `cicd remove` does elsewhere)."""
    from cicd.healing import approvals
    from cicd.stack import cluster
    settings = answer_settings(invocation, approval_id)

    def say_granted(granted: dict) -> None:  # as soon as it is recorded, before its work is sent
        click.echo(f"APPROVAL_GRANTED {approval_id} by {granted['decided_by']}: {granted['summary']}")
    granted = approvals.approve(settings, approval_id, who or whoami(), reason, control_plane(settings),
                                on_granted=say_granted)
    if "removal" in granted:
        from cicd.cli.apps import echo_removed
        echo_removed(granted["removal"])
        return
    if granted["kind"] == "action":
        click.echo(f"{granted['incident_id']}: the action runs now; `cicd incidents --env {settings.env}` follows it")
        return
    click.echo(f"{granted['app']} deploys to {settings.env} at {granted['sha'][:12]}"
               + ("" if cluster.is_up(settings) else f" once the {settings.env} stack is up (`cicd up --env {settings.env}`)"))


@click.command()
@click.argument("approval_id", metavar="ID")
@click.option("--reason", required=True, help="Why not (goes to the proof log with your name).")
@click.option("--as", "who", default=None, help="Who denies (default: $CICD_USER, else your login).")
@pass_invocation
def deny(invocation: Invocation, approval_id, reason, who):
    """Deny a request; an action held back for it is refused and its incident closes."""
    from cicd.healing import approvals
    settings = answer_settings(invocation, approval_id)
    denied = approvals.deny(settings, approval_id, who or whoami(), reason)
    click.echo(f"APPROVAL_DENIED {approval_id} by {denied['decided_by']}: {denied['summary']}")
