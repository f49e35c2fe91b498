"""`cicd config`: an app's settings (environment variables) per environment: set, unset, list.

Values never reach argv when they come from stdin (`--stdin`), and never reach output, logs or
the proof log: `list` shows names only unless --show-values, and never a secret's value.
"""
from __future__ import annotations

import sys

import click

from cicd.cli import terminal
from cicd.cli.context import JSON_OPTION, Invocation, echo_json, env_option, pass_invocation, whoami


@click.group("config")
def config_group():
    """An app's settings: environment variables for its processes, per environment.

    \b
    A change applies on the app's next release (`cicd deploy APP`); restarts and scaling of the
    running release keep the values it was staged with. Keys are environment variable names;
    PORT, HOST, PATH, VIRTUAL_ENV and CICD_* are the platform's. Stored 0600 in
    var/ENV/config/APP.json; CONFIG_CHANGED in the proof log names the keys, never a value.
    """


def _next_release_hint(app: str, env: str) -> str:
    return f"the next release gets it: `cicd deploy {app} --env {env}`"


@config_group.command("set")
@click.argument("app")
@click.argument("assignments", nargs=-1, required=True, metavar="KEY=VALUE... | KEY --stdin")
@click.option("--secret", is_flag=True, help="Never show these values, not even with `list --show-values`.")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="Read the value of the one KEY from stdin (hidden prompt on a terminal), so it is "
                   "in neither argv nor the shell history.")
@env_option()
@pass_invocation
def config_set(invocation: Invocation, app, assignments, secret, from_stdin):
    """Set settings of APP: `cicd config set my-api DEBUG=0 WORKERS=4`, or a secret from stdin:
    `cicd config set my-api DATABASE_URL --stdin --secret < db-url.txt`."""
    from cicd.delivery import appconfig
    settings = invocation.settings
    if from_stdin:
        if len(assignments) != 1 or "=" in assignments[0]:
            raise click.UsageError("--stdin takes exactly one KEY (without '='); its value is read from stdin")
        key = appconfig.check_key(assignments[0])
        if sys.stdin.isatty():
            value = click.prompt(f"value of {key}", hide_input=True, prompt_suffix=": ", err=True)
        else:
            value = sys.stdin.read()
            # What `echo value >` or a heredoc adds: one line ending, not part of the value.
            value = value[:-2] if value.endswith("\r\n") else value[:-1] if value.endswith("\n") else value
        values = {key: appconfig.check_value(key, value)}
    else:
        values = dict(appconfig.parse_assignment(text, i) for i, text in enumerate(assignments, 2))
        if secret:
            click.echo("note: a value on the command line is in the shell history and, while this runs, "
                       "in the process list; `KEY --stdin` keeps a secret out of both", err=True)
    result = appconfig.change(settings, app, values=values, secret=secret, who=whoami())
    keys = ", ".join(result["keys"])
    if not result["changed"]:
        click.echo(f"{app} in {settings.env}: {keys} unchanged (settings version {result['version']})")
        return
    click.echo(f"set {keys} for {app} in {settings.env} (settings version {result['version']}); "
               f"{_next_release_hint(app, settings.env)}")


@config_group.command("unset")
@click.argument("app")
@click.argument("keys", nargs=-1, required=True, metavar="KEY...")
@env_option()
@pass_invocation
def config_unset(invocation: Invocation, app, keys):
    """Remove settings of APP (a key that is not set is noted, not an error)."""
    from cicd.delivery import appconfig
    settings = invocation.settings
    for key in keys:
        appconfig.check_key(key)
    result = appconfig.change(settings, app, unset_keys=list(keys), who=whoami())
    for key in result["missing"]:
        click.echo(f"note: {key} was not set for {app} in {settings.env}", err=True)
    if result["changed"]:
        click.echo(f"unset {', '.join(result['keys'])} for {app} in {settings.env} (settings version "
                   f"{result['version']}); {_next_release_hint(app, settings.env)}")


@config_group.command("list")
@click.argument("app")
@click.option("--show-values", is_flag=True, help="Show the values (never those set with --secret).")
@JSON_OPTION
@env_option()
@pass_invocation
def config_list(invocation: Invocation, app, show_values, as_json):
    """List the settings of APP: names, which are secret, and which version the live release runs."""
    from cicd.delivery import appconfig
    from cicd.runtime.local import LocalRuntime
    settings = invocation.settings
    config = appconfig.listing(settings, app)
    runtime = LocalRuntime(settings)
    live = runtime.live_release(app)
    live_version = runtime.config_version(app, live) if live is not None else None

    def shown(key):
        if key in config.secret:
            return "(secret)"
        return config.values[key] if show_values else "(set)"

    rows = [{"key": k, "secret": k in config.secret, "value": shown(k)} for k in sorted(config.values)]
    if as_json:
        for row in rows:
            if row["value"] in ("(secret)", "(set)"):
                del row["value"]  # a script gets no placeholder it could take for the value
        echo_json({"app": app, "env": settings.env, "version": config.version, "live_release": live,
                   "live_release_version": live_version, "settings": rows})
        return
    if rows:
        terminal.print_table([{**r, "secret": "yes" if r["secret"] else "no"} for r in rows],
                             [("key", "key"), ("secret", "secret"), ("value", "value")])
    else:
        click.echo(f"{app} has no settings in {settings.env}")
    if live is None:
        click.echo(f"settings version {config.version}; {app} has no live release", err=True)
    elif live_version != config.version:
        click.echo(f"settings version {config.version}; live release {live} runs version "
                   f"{live_version if live_version is not None else 'unknown'}: "
                   f"{_next_release_hint(app, settings.env)}", err=True)
    else:
        click.echo(f"settings version {config.version}; live release {live} runs it", err=True)
