"""`cicd logs APP`: an app's build, release and replica logs, and -f to follow them."""
from __future__ import annotations

import click

from cicd.cli.context import Invocation, env_option, pass_invocation


@click.command()
@click.argument("app")
@click.option("--replica", type=click.IntRange(0, 63), default=None, help="Only this replica's log (its slot).")
@click.option("-f", "--follow", is_flag=True, help="Keep printing what is appended (new replicas too); Ctrl-C stops.")
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(0),
              help="Lines to show from the end of each log first (0: all of it).")
@env_option()
@pass_invocation
def logs(invocation: Invocation, app, replica, follow, lines):
    """Show an app's logs: its build and release logs, then each replica's.

    \b
    With several logs, each line starts with the log's name (replica-0, build-3, ...).
    Logs live in var/ENV/apps/APP/logs/ and need no running stack. The app's own output is shown
    as it wrote it; the environment it was given is never printed.
    """
    from cicd.core.names import is_app_name
    from cicd.runtime import logs as app_logs
    from cicd.runtime.local import LocalRuntime
    from cicd.store import get_app, session_scope
    settings = invocation.settings
    if not is_app_name(app):
        raise click.BadParameter(f"{app!r} is not a valid app name (2-40 lowercase letters, digits and "
                                 f"single hyphens)", param_hint="APP")
    runtime = LocalRuntime(settings)
    logs_dir = runtime.app_dir(app) / "logs"
    with session_scope(settings, readonly=True) as session:
        known = get_app(session, settings.env, app) is not None
    # Logs without a registry row: an app whose removal stopped half-way (run `cicd remove` again).
    if not known and not logs_dir.is_dir():
        raise click.ClickException(f"app {app!r} is not onboarded in {settings.env} and has no logs there "
                                   f"(`cicd status --env {settings.env}` lists its apps)")

    def files():
        found = app_logs.log_files(logs_dir)
        return [p for p in found if app_logs.replica_slot(p) == replica] if replica is not None else found

    if replica is not None and not files():
        slots = sorted({r["slot"] for r in runtime.replicas(app)} |
                       {s for p in app_logs.log_files(logs_dir) if (s := app_logs.replica_slot(p)) is not None})
        raise click.ClickException(f"--replica {replica}: {app} in {settings.env} has no replica {replica} "
                                   f"(replicas: {', '.join(map(str, slots)) or 'none'})")
    shown = files()
    if settings.runtime == "docker" and not any(app_logs.replica_slot(p) is not None for p in shown):
        # The Docker runtime leaves a replica's output to Docker's own log driver.
        names = [r.get("name") for r in runtime.replicas(app) if r.get("name")]
        if names and (replica is None or replica in {r["slot"] for r in runtime.replicas(app)}):
            click.echo(f"{app} runs as containers: their output is in Docker's logs "
                       f"(docker logs -f {names[0]}; its replicas: {', '.join(names)})", err=True)
    if not shown and not follow:
        click.echo(f"{app} has no logs in {settings.env} yet", err=True)
        return
    labelled = replica is None

    def echo(path, line):
        click.echo(f"{path.stem} | {line}" if labelled else line)

    offsets = {}
    for path in shown:
        try:
            last, offsets[path] = app_logs.tail(path, lines)
        except OSError:
            continue
        for line in last:
            echo(path, line)
    if not follow:
        return
    click.echo(f"following the logs of {app} in {settings.env}; Ctrl-C stops", err=True)
    try:
        for path, line in app_logs.follow(files, offsets):
            echo(path, line)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a tail ends: exit 0, no traceback

