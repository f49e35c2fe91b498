"""The root of the `cicd` command: one place turns any domain error into its message and status 1,
and one --env option, with each command's default, chooses the environment a command acts on.

In-process (click's runner) against an empty home: no stack, no broker."""
from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import cli
from cicd.cli.context import Invocation, env_option, pass_invocation
from cicd.cli.main import CicdGroup
from cicd.config import ENVIRONMENTS
from cicd.errors import CicdError
from tests.unit.test_cli import commands


def invoke(command, home, *args, **variables):
    env = {"CICD_HOME": str(home), "CICD_ENV": "stage", "CICD_BROKER_URL": None, **variables}
    return CliRunner().invoke(command, list(args), env=env, prog_name="cicd")


# -- domain errors: one message, status 1, in one place ------------------------------------------
@pytest.mark.parametrize("args, variables, message", [
    (["deny", "apr-prod-12345678", "--reason", "freeze"], {}, "Error: no approval apr-prod-12345678 in prod\n"),
    (["dlq", "show", "99"], {}, "Error: no dead letter 99 in stage\n"),
    (["incidents"], {"CICD_PROBE_INTERVAL": "soon"}, "Error: CICD_PROBE_INTERVAL='soon': must be a number\n"),
    (["deploy", "demo-api"], {}, "Error: the stack for stage is not running: start it with `cicd up --env stage`\n"),
], ids=["ApprovalError", "DeadLetterError", "ConfigError", "StackDown"])
def test_a_domain_error_from_a_command_is_its_message_and_status_1(tmp_path, args, variables, message):
    out = invoke(cli.main, tmp_path, *args, **variables)
    assert (out.exit_code, out.stdout, out.stderr) == (1, "", message)


def test_a_bad_trace_is_named_with_what_is_wrong(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("seq,ts\n1,2026-01-01T00:00:00Z\n")
    out = invoke(cli.main, tmp_path, "replay", str(trace))
    assert out.exit_code == 1 and out.stderr.startswith(f"Error: {trace}: missing columns ")


def test_the_root_group_maps_every_cicd_error_and_nothing_else():
    class Refused(CicdError, ValueError):
        pass

    @click.group(cls=CicdGroup)
    def root():
        pass

    @root.command()
    def refuses():
        raise Refused("say what to do")

    @root.command()
    def breaks():
        raise ValueError("a bug")

    out = CliRunner().invoke(root, ["refuses"])
    assert (out.exit_code, out.stderr) == (1, "Error: say what to do\n")
    out = CliRunner().invoke(root, ["breaks"])
    assert out.exit_code == 1 and isinstance(out.exception, ValueError)  # a bug keeps its traceback


def test_the_cicd_command_has_that_root():
    assert isinstance(cli.main, CicdGroup)


# -- --env, declared once ------------------------------------------------------------------------
# Each command that takes --env, with its default (None: $CICD_ENV, else stage).
ENV_DEFAULTS = {
    ("up",): None, ("down",): None, ("status",): None, ("onboard",): None, ("adopt",): None, ("deploy",): None, ("scale",): None,
    ("inject",): None, ("remove",): None, ("logs",): None, ("incidents",): None, ("dashboard",): None, ("approvals",): None, ("replay",): None,
    ("host-agent",): None,
    ("rl", "train"): "dev", ("rl", "eval"): "dev", ("rl", "show"): "dev",
    ("dlq", "list"): None, ("dlq", "show"): None, ("dlq", "retry"): None, ("dlq", "purge"): None,
    ("proof", "tail"): None, ("proof", "verify"): None, ("proof", "export"): None,
    ("config", "set"): None, ("config", "unset"): None, ("config", "list"): None,
}


def test_every_env_is_the_shared_option_with_its_default():
    shared = env_option()(lambda: None).__click_params__[0]
    found = {}
    for path, command in commands(cli.main):
        for param in command.params:
            if "--env" in param.opts:
                assert list(param.type.choices) == list(ENVIRONMENTS), path
                assert param.callback.__qualname__ == shared.callback.__qualname__, path
                assert not param.expose_value, path  # it goes to the Invocation, not to the function
                found[path] = param.default
    assert found == ENV_DEFAULTS


def test_the_command_gets_the_settings_of_its_env(tmp_path):
    @click.command()
    @env_option()
    @pass_invocation
    def configured(invocation: Invocation):
        click.echo(f"{invocation.env} {invocation.settings.env} {invocation.settings.home}")

    @click.command()
    @env_option(default="dev", show_default=True)
    @pass_invocation
    def trains(invocation: Invocation):
        click.echo(invocation.settings.env)

    assert invoke(configured, tmp_path, CICD_ENV="prod").stdout == f"None prod {tmp_path.resolve()}\n"
    assert invoke(configured, tmp_path, "--env", "dev").stdout == f"dev dev {tmp_path.resolve()}\n"
    assert invoke(trains, tmp_path, CICD_ENV="prod").stdout == "dev\n"  # its own default, not $CICD_ENV
    out = invoke(trains, tmp_path, "--env", "qa")
    assert out.exit_code == 2 and "--env" in out.stderr and "'qa' is not one of" in out.stderr


# -- start-up ------------------------------------------------------------------------------------
def test_the_command_starts_without_the_heavy_libraries():
    """`cicd --version`, `--help` and every shell completion import the whole command tree: the
    database, broker and numeric libraries wait for the commands that use them."""
    probe = "import sys, cli; print(sorted(m for m in ('sqlalchemy', 'redis', 'celery', 'kombu', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (0, "[]\n"), out.stderr
