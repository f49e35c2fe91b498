"""What every command shares: the --env option, --json, and the Settings they resolve to.

click's "complex applications" pattern: the root group puts one Invocation in ctx.obj; a
command's --env records its choice there, and the command (with @pass_invocation) takes its
Settings from it, so the environment is chosen and loaded in one place.
"""
from __future__ import annotations

import getpass
import json
import os

import click

from cicd.config import ENVIRONMENTS, Settings

ENV_HELP = "Environment to act on (default: $CICD_ENV, else stage)."


class Invocation:
    """One run of `cicd`: the environment its command was given, and each environment's Settings."""

    def __init__(self) -> None:
        self.env: str | None = None  # --env as given; None: the configured one ($CICD_ENV, else stage)
        self._settings: dict[str | None, Settings] = {}

    @property
    def settings(self) -> Settings:
        """The Settings of the environment the command was given (ConfigError if they are unusable)."""
        return self.settings_for(self.env)

    def settings_for(self, env: str | None) -> Settings:
        if env not in self._settings:
            self._settings[env] = Settings.load(env)
        return self._settings[env]


pass_invocation = click.make_pass_decorator(Invocation, ensure=True)


def env_option(default: str | None = None, help: str | None = ENV_HELP, show_default: bool = False):
    """The --env of a command. Its value goes to the Invocation (`invocation.env`, and
    `invocation.settings` loads it), not to the command's function."""
    def remember(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        # ensure_object: shell completion parses a command without running the root group.
        ctx.ensure_object(Invocation).env = value
        return value
    return click.option("--env", "env", type=click.Choice(ENVIRONMENTS), default=default, show_default=show_default,
                        help=help, callback=remember, expose_value=False)


# Every listing takes --json: one JSON document on stdout, and nothing else there.
JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="One JSON document on stdout instead of tables (anything else goes to stderr).")


def echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def control_plane(settings: Settings):
    from workers.client import ControlPlane  # Celery, only for the commands that send work
    return ControlPlane(settings)


def stack_is_up(settings: Settings) -> bool:
    """Is the environment's stack running: one `cicd up` recorded here (var/stack.json), or, with
    CICD_BROKER_URL set, one this machine did not start (docker-compose, agents on other hosts),
    which is in no record here: then a worker of the environment that answers a ping is enough."""
    from cicd.stack import cluster
    if cluster.is_up(settings):
        return True
    if not settings.broker_url_override:
        return False
    try:
        nodes = control_plane(settings).answering(timeout=1.0)
    except cluster.StackError:
        return False  # its broker does not answer
    return any(node.startswith(f"{settings.env}-") for node in nodes)


def require_stack(settings: Settings) -> None:
    from cicd.stack import cluster
    if not stack_is_up(settings):
        raise cluster.StackDown(settings.env)


def whoami() -> str:
    return os.environ.get("CICD_USER") or os.environ.get("USER") or getpass.getuser()
