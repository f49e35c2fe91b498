"""The root of the `cicd` command: its help, its version, and every command group, registered here.

Every `cicd --version`, `--help` and shell completion imports this whole tree, so the command
modules import the store, the stack, Celery and numpy inside the commands that use them.
"""
from __future__ import annotations

import click

from cicd.cli import apps, approvals, bench, config, dashboard, demo, dlq, hosts, incidents, logs, proof, rl, stack
from cicd.cli.context import Invocation
from cicd.errors import CicdError


class CicdGroup(click.Group):
    def invoke(self, ctx):
        # A domain error from any command (a stack that is down, an agent that does not answer, a
        # setting it cannot use, a request already answered): its message on stderr and status 1,
        # never a traceback. The one place such errors become what a person reads.
        try:
            return super().invoke(ctx)
        except CicdError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=CicdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cicd-heal")
@click.pass_context
def main(ctx):
    """cicd-heal: a self-healing CI/CD control plane on Celery agents.

    \b
    Start here:
      cicd up                      start Redis, one worker per agent, and beat (stage)
      cicd onboard my-api --repo https://git.example.com/my-api.git --runtime backend
      cicd inject crash my-api --wait     break it, watch it heal, see the timeline
      cicd proof verify            check the tamper-evident proof log
      cicd dashboard               see it all in a browser (http://127.0.0.1:8088/), and /metrics
      cicd demo                    all of the above, end to end, with a summary

    Everything lives under $CICD_HOME (default: the current directory): var/ for state,
    logs/ for logs and the proof mirror, apps/registry/ for exported specs.

    \b
    Listings print tables; each takes --json for scripts (stdout is then only JSON).
    Shell completion: put this line in ~/.bashrc (zsh: zsh_source in ~/.zshrc;
    fish: `_CICD_COMPLETE=fish_source cicd | source`):
      eval "$(_CICD_COMPLETE=bash_source cicd)"
    """
    ctx.ensure_object(Invocation)


for command in (
    stack.up, stack.down, stack.watch, stack.status, hosts.host_agent,
    apps.onboard, apps.adopt, apps.deploy, apps.scale, apps.inject, apps.remove,
    logs.logs,
    config.config_group,
    incidents.incidents,
    dashboard.dashboard,
    approvals.promote, approvals.approvals_list, approvals.approve, approvals.deny,
    rl.rl_group, rl.replay,
    bench.bench,
    dlq.dlq_group,
    proof.proof_group,
    demo.demo,
):
    main.add_command(command)
