"""The `cicd` command: run the self-healing control plane, onboard apps, break them, read the proof."""
from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from cicd.healing import approvals
from cicd.stack import cluster
from cicd.store import deadletters, proof, reports
from cicd.delivery import faults, gitsource, onboarding
from cicd.cli import terminal
from cicd.config import AGENTS, ENVIRONMENTS, ConfigError, Settings
from cicd.core.lifecycle import IncidentStatus, ReleaseStatus
from cicd.runtime import RuntimeFailure, make_runtime

ENV_OPTION = click.option("--env", "env", type=click.Choice(ENVIRONMENTS), default=None,
                          help="Environment to act on (default: $CICD_ENV, else stage).")


def load_settings(env: str | None) -> Settings:
    try:
        return Settings.load(env)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def control_plane(settings: Settings):
    from workers.client import ControlPlane
    return ControlPlane(settings)


def require_stack(settings: Settings) -> None:
    if not cluster.is_up(settings):
        raise cluster.StackDown(settings.env)


def echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


# Every listing takes --json: one JSON document on stdout, and nothing else there.
JSON_OPTION = click.option("--json", "as_json", is_flag=True,
                           help="One JSON document on stdout instead of tables (anything else goes to stderr).")


class CicdGroup(click.Group):
    def invoke(self, ctx):
        # A stack that is down or an agent that does not answer, from any command: one line
        # that says what to do, and status 1, never a traceback.
        try:
            return super().invoke(ctx)
        except cluster.StackError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=CicdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cicd-heal")
def main():
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


# -- the stack ---------------------------------------------------------------------------------
def parse_scale(values: tuple[str, ...]) -> dict[str, int]:
    scale = {}
    for value in values:
        agent, _, count = value.partition("=")
        if agent not in AGENTS or not count.isdigit():
            raise click.BadParameter(f"{value!r}: expected AGENT=N with AGENT one of {', '.join(AGENTS)}",
                                     param_hint="--scale")
        scale[agent] = int(count)
    return scale


@main.command()
@ENV_OPTION
@click.option("--scale", "scale", multiple=True, metavar="AGENT=N",
              help="Worker replicas for an agent (repeatable), e.g. --scale deploy=3. Default 1 each.")
@click.option("--flower/--no-flower", "flower", default=None,
              help="Also start Flower on 127.0.0.1 (basic auth: user $CICD_FLOWER_USER, default admin; password "
                   "from $CICD_FLOWER_PASSWORD_FILE, else var/flower/password, made on first start), or stop it. "
                   "Default: leave it as it is.")
@click.option("--flower-port", type=click.IntRange(1, 65535), default=None,
              help="Flower's port (implies --flower). Default: the port it had, else 5555.")
def up(env, scale, flower, flower_port):
    """Start the embedded stack for an environment, or bring it to the wanted scale.

    Starts Redis on loopback (unless CICD_BROKER_URL points at one) with AOF on and its data in
    var/redis, one Celery worker process per agent replica on the {env}.{agent} queues, and beat.
    With --flower, also Flower, watching every environment on the broker. Returns when every
    worker answers a ping. Running it again starts only what is missing.
    """
    if flower is False and flower_port is not None:
        raise click.BadParameter("--flower-port starts Flower; --no-flower stops it: give one of them",
                                 param_hint="--flower-port")
    settings = load_settings(env)
    started = time.monotonic()
    plane = control_plane(settings)
    try:
        stack = cluster.up(settings, parse_scale(scale), plane.ping, say=click.echo,
                           flower=True if flower_port is not None else flower, flower_port=flower_port)
    except cluster.StackError as exc:
        raise click.ClickException(str(exc)) from None
    # Workers send task events only when asked. Flower asks every 5 s, its first time 5 s after it
    # starts: ask now, so that the tasks of a command run right after `up` show in Flower too. Once
    # Flower is stopped, nobody reads them: stop paying for them.
    if (stack.get("flower") or {}).get("pid"):
        plane.app.control.enable_events()
    elif flower is False:
        plane.app.control.disable_events()
    click.echo(f"{settings.env} stack is up ({time.monotonic() - started:.1f} s). "
               f"`cicd status` shows it; `cicd down` stops it.")


@main.command()
@click.option("--env", "env", type=click.Choice(ENVIRONMENTS), default=None,
              help="Stop only this environment's workers and beat (default: everything, Redis and Flower too).")
@click.option("--apps", "stop_apps", is_flag=True, help="Also stop the apps' replica processes.")
def down(env, stop_apps):
    """Stop exactly the processes `cicd up` started (recorded in var/stack.json).

    Apps keep running unless --apps is given: stopping the control plane never takes your apps down.
    """
    settings = load_settings(env)
    if stop_apps:
        for name in [env] if env else list(ENVIRONMENTS):
            runtime = make_runtime(settings.for_env(name))
            for app in runtime.apps():
                count = runtime.stop_app(app)
                click.echo(f"stopped {app} in {name} ({count} processes)")
    if cluster.down(settings, env, say=click.echo) == 0 and not stop_apps:
        click.echo("nothing was running")


@main.command(hidden=True)
def watch():
    """(Started by `cicd up`.) Send a replica_down signal the moment a replica process exits."""
    from cicd.signals import watcher
    settings = load_settings(None)
    if not watcher.available():
        click.echo("pidfds are not available here: crashes are found by the probes alone")
        return
    plane = control_plane(settings)
    plane.app  # configure the broker before the chains are built
    from workers.chains import healing_chain

    def send(signal):
        click.echo(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {signal['app']} replica {signal['slots'][0]} exited")
        healing_chain(settings.env, signal).apply_async()
    watcher.watch(settings, send)


@main.command()
@ENV_OPTION
@JSON_OPTION
def status(env, as_json):
    """Each agent (replicas, alive, queue depth), and each app (replicas, health, uptime)."""
    settings = load_settings(env)
    state = cluster.status(settings, control_plane(settings).ping)
    apps = reports.apps(settings, make_runtime(settings))
    if as_json:
        echo_json({"stack": state, "apps": apps, "env": settings.env})
        return
    terminal.echo("broker: ", state["broker_url"] or "(none)",
                  *([("  (not answering)", "bold red")] if state["broker_alive"] is False else []),
                  *([] if state["redis_alive"] is None else ["  redis: ", terminal.alive_word(state["redis_alive"])]),
                  *(["  supervisor: ", terminal.alive_word(state["supervisor_alive"])] if state["envs"] else []),
                  *(["  restarts: " + ", ".join(f"{k} {v}" for k, v in state["restarts"].items())]
                    if any(state["restarts"].values()) else []))
    if state["flower"]:
        flower = state["flower"]
        terminal.echo("flower: ", flower["url"], " ", terminal.alive_word(flower["alive"]),
                      f" (user {flower['user']}, password in {flower['password_file']})")
    if not state["envs"]:
        click.echo("no environment is up: `cicd up` starts one")
    for name, section in state["envs"].items():
        click.echo()
        terminal.echo(f"{name}: beat ", terminal.alive_word(section["beat_alive"]),
                      f", up since {section['started_at']}")
        terminal.print_table(section["agents"], [("agent", "agent"), ("queue", "queue"), ("replicas", "replicas"),
                                                 ("alive", "alive"), ("depth", "queue depth")])
    click.echo(f"\napps in {settings.env}:")
    if not apps:
        click.echo("  none onboarded: `cicd onboard NAME --repo URL --runtime backend`")
        return
    for row in apps:
        row["uptime_pct"] = f"{row['uptime'] * 100:.2f}%" if row["uptime"] is not None else None
    terminal.print_table(apps, [("app", "app"), ("release", "release"), ("replicas", "replicas"),
                                ("healthy", "healthy"), ("utilization", "util"), ("uptime_pct", "uptime"),
                                ("open_incident", "open incident"), ("attention", "attention")])


# -- apps --------------------------------------------------------------------------------------
@main.command()
@click.argument("name")
@click.option("--repo", required=True, help="http(s) URL of the app's git repository (no credentials).")
@click.option("--runtime", "runtime_kind", required=True, metavar="backend|frontend|fullstack",
              help="Which template generates the spec (port, build and start commands, health path).")
@ENV_OPTION
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the first deploy to finish.")
def onboard(name, repo, runtime_kind, env, wait):
    """Onboard an app: validate, generate its spec from the runtime's template, deploy it.

    NAME is 2-40 lowercase letters, digits and single hyphens, unique in the environment.
    Onboarding straight into prod is refused: onboard into stage, then promote.
    """
    settings = load_settings(env)
    if settings.env == "prod":
        # Prod refuses every onboarding, so no agent is needed to say so (and the prod stack may be
        # down): the same domain call logs the refusal in prod's proof chain.
        result = onboarding.register(settings, name, repo, runtime_kind)
    else:
        require_stack(settings)
        result = control_plane(settings).onboard(name, repo, runtime_kind)
    if not result["ok"]:
        for refusal in result["refusals"]:
            click.echo(f"refused: {refusal['field']} ({refusal['rule']}): {refusal['message']}", err=True)
        sys.exit(2)
    click.echo(f"onboarded {name} in {settings.env}; spec: {settings.registry_dir / (name + '.json')}")
    if not wait:
        click.echo("deploy triggered; `cicd status` shows when it is live")
        return
    report_release(settings, name, after=0)


def report_release(settings: Settings, app: str, after: int, timeout_s: float = 120) -> None:
    with terminal.progress(f"deploying {app} in {settings.env}: fetch, build, health gate"):
        release = reports.wait_for_release(settings, app, after, timeout_s)
    if release is None:
        raise click.ClickException(f"the deploy did not finish within {timeout_s:.0f} s; "
                                   f"see `cicd status` and {settings.logs_dir}")
    seconds = reports.seconds_between(release["started_at"], release["finished_at"])
    click.echo(f"release {release['release']} {release['status']} in {seconds:.2f} s: {release['detail']}")
    sys.exit(0 if release["status"] == ReleaseStatus.LIVE else 1)


@main.command()
@click.argument("app")
@click.option("--ref", default="HEAD", show_default=True,
              help="Branch, tag or commit of the app's repository to deploy (HEAD: its default branch).")
@ENV_OPTION
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the release to finish.")
def deploy(app, ref, env, wait):
    """Deploy a revision: fetch it over git, build, start new replicas, health-gate, switch.

    The live release keeps serving until the new one passes its health gate; a release that
    fails (fetch, build or gate) is discarded and the live one keeps serving (ROLLBACK). One
    deploy per app at a time: a second one waits for the first.
    """
    settings = load_settings(env)
    require_stack(settings)
    try:
        gitsource.check_ref(ref)
    except gitsource.SourceError as exc:
        raise click.BadParameter(str(exc), param_hint="--ref") from None
    if not any(row["app"] == app for row in reports.apps(settings, make_runtime(settings))):
        raise click.ClickException(f"{app} is not onboarded in {settings.env}: `cicd onboard` it first")
    before = (reports.latest_release(settings, app) or {}).get("release", 0)
    control_plane(settings).deploy(app, ref, "requested by `cicd deploy`")
    click.echo(f"deploy of {app} at {ref} triggered in {settings.env}")
    if wait:
        report_release(settings, app, after=before)


@main.command()
@click.argument("app")
@click.argument("replicas", type=click.IntRange(0, 64))
@ENV_OPTION
def scale(app, replicas, env):
    """Set an app's number of replicas (within its spec's limits), through the deploy agent."""
    settings = load_settings(env)
    require_stack(settings)
    result = control_plane(settings).scale(app, replicas)
    if not result["ok"]:
        raise click.ClickException(result["error"])
    click.echo(f"{app}: {result['from']} -> {result['to']} replicas")


@main.command()
@click.argument("kind", type=click.Choice(faults.FAULT_KINDS))
@click.argument("app")
@ENV_OPTION
@click.option("--wait", is_flag=True, help="Follow the incident to its end; print its timeline and time to "
                                           "recover. Exit status 0 only if it ended stable.")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds --wait follows before giving up.")
@click.option("--duration", default=30.0, show_default=True, help="overload: seconds the extra load lasts.")
@click.option("--slot", type=int, default=None, help="crash/false-alarm: which replica (default: the first).")
def inject(kind, app, env, wait, timeout, duration, slot):
    """Break an app on purpose, for real.

    \b
    crash          SIGKILL one replica process
    overload       real traffic until measured utilization crosses the threshold
    false-alarm    a short health blip that clears by itself
    slow-deploy    deploy the repo's cicd-inject/slow branch (starts slowly)
    failed-deploy  deploy the repo's cicd-inject/broken branch (does not build)
    bad-release    deploy the repo's cicd-inject/crashy branch (passes its gate, then dies)
    """
    settings = load_settings(env)
    runtime = make_runtime(settings)
    plane = control_plane(settings)
    if wait:
        require_stack(settings)  # before breaking anything: with --wait we promise to follow the healing
    elif not cluster.is_up(settings):
        click.echo(f"warning: the {settings.env} stack is not running, so nothing will heal this "
                   f"until `cicd up --env {settings.env}`", err=True)
    try:
        injected = faults.inject(settings, runtime, app, kind, duration=duration, slot=slot,
                                 request_deploy=lambda name, ref, reason: plane.deploy(name, ref, reason))
    except RuntimeFailure as exc:
        raise click.ClickException(str(exc)) from None
    details = ", ".join(f"{k}={v}" for k, v in injected.items() if k not in ("injected_at", "seq"))
    click.echo(f"FAILURE_INJECTED {kind} on {app} in {settings.env}: {details}")
    if not wait:
        return
    start = injected["injected_at"]

    def show(record):
        click.echo(f"  +{reports.seconds_between(start, record['ts']):7.3f} s  {record['event_name']:<24} "
                   f"{reports.payload_text(record, 70)}")

    incident = reports.follow(settings, app, injected["seq"], timeout, on_record=show)
    if incident is None:
        click.echo(f"no incident for {app} ended within {timeout:.0f} s", err=True)
        sys.exit(1)
    stable = [r for r in reports.timeline(settings, incident["id"]) if r["event_name"] == "SYSTEM_STABLE"]
    if incident["status"] == IncidentStatus.STABLE and stable:
        click.echo(f"{incident['id']} {incident['kind']} -> {incident['action']}: stable; "
                   f"time to recover {reports.seconds_between(start, stable[-1]['ts']):.3f} s")
        return
    click.echo(f"{incident['id']} ended {incident['status']}: {incident['resolution']}", err=True)
    sys.exit(1)


INCIDENT_COLUMNS = [("id", "id"), ("app", "app"), ("kind", "kind"), ("severity", "severity"), ("status", "status"),
                    ("attempt", "attempt"), ("action", "action"), ("opened_at", "opened"), ("resolution", "resolution")]


@main.command()
@ENV_OPTION
@click.option("--limit", default=20, show_default=True, help="How many of the latest incidents to list.")
@click.option("--app", default=None, help="Only this app's incidents (and, with --follow, its events).")
@click.option("--follow", "-f", is_flag=True,
              help="Then print each event of an incident as it happens, until Ctrl-C. With --json: one JSON "
                   "object per line.")
@click.option("--interval", default=0.5, show_default=True, type=click.FloatRange(min=0.05),
              help="With --follow: seconds between looks at the proof log.")
@JSON_OPTION
def incidents(env, limit, app, follow, interval, as_json):
    """Recent incidents, newest first; with --follow, a live tail of what happens to them.

    \b
    --follow lists the current incidents (oldest first), then prints each proof-log event
    of an incident as it lands: opened, decided, gated, executed, failed, stable or
    escalated, learned. Ctrl-C stops it (exit 0). With --json, each line is one object:
      {"type": "incident", "id": ..., "status": ..., ...}    the incidents listed first
      {"type": "event", "phase": "executed", "seq": ..., "event_name": ..., ...}
    """
    settings = load_settings(env)
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


@main.command()
@ENV_OPTION
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. It has no login: keep it on loopback unless a proxy guards it.")
@click.option("--port", default=8088, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port; the URL is printed).")
def dashboard(env, host, port):
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
    settings = load_settings(env)
    try:
        server = dashboard_module.make_server(settings, host, port)
    except dashboard_module.DashboardError as exc:
        raise click.ClickException(str(exc)) from None
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


# -- promotion and approval --------------------------------------------------------------------
def whoami() -> str:
    return os.environ.get("CICD_USER") or os.environ.get("USER") or getpass.getuser()


@main.command()
@click.argument("app")
@click.option("--from", "source", type=click.Choice(ENVIRONMENTS), default="stage", show_default=True)
@click.option("--to", "target", type=click.Choice(ENVIRONMENTS), default="prod", show_default=True)
def promote(app, source, target):
    """Ask to promote an app's live release to the next environment; a human must approve it.

    The request waits in the target environment (`cicd approvals`) until someone runs
    `cicd approve ID` or `cicd deny ID`, or it expires ($CICD_APPROVAL_TTL, default 1 h).
    """
    source_settings, target_settings = load_settings(source), load_settings(target)
    try:
        request = approvals.request_promotion(target_settings, source_settings, app, whoami())
    except approvals.ApprovalError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"APPROVAL_REQUESTED {request['id']}: {request['summary']} (expires {request['expires_at']})")
    click.echo(f"answer with `cicd approve {request['id']} --reason ...` or `cicd deny {request['id']} --reason ...`")


@main.command(name="approvals")
@click.option("--env", "env", type=click.Choice(ENVIRONMENTS), default=None, help="Only this environment.")
@click.option("--all", "include_decided", is_flag=True, help="Answered and expired requests too.")
@JSON_OPTION
def approvals_list(env, include_decided, as_json):
    """Requests waiting for a human: promotions, and actions held back in prod."""
    rows = []
    for name in [env] if env else ENVIRONMENTS:
        settings = load_settings(name)
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


def answer_settings(approval_id: str) -> Settings:
    try:
        return load_settings(approvals.env_of(approval_id))
    except approvals.ApprovalError as exc:
        raise click.BadParameter(str(exc), param_hint="ID") from None


@main.command()
@click.argument("approval_id", metavar="ID")
@click.option("--reason", default="", help="Why (goes to the proof log with your name).")
@click.option("--as", "who", default=None, help="Who approves (default: $CICD_USER, else your login).")
def approve(approval_id, reason, who):
    """Grant a request: a promotion is onboarded and deployed; a held-back action runs."""
    settings = answer_settings(approval_id)
    # What is granted must then be sent (the held action, or the promotion's deploy): with the
    # broker down the grant would be recorded and its work never sent, so the request stays pending.
    cluster.require_broker(settings)
    try:
        granted = approvals.grant(settings, approval_id, who or whoami(), reason)
    except approvals.ApprovalError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"APPROVAL_GRANTED {approval_id} by {granted['decided_by']}: {granted['summary']}")
    plane = control_plane(settings)
    if granted["kind"] == "action":
        plane.run_approved(approval_id)
        click.echo(f"{granted['incident_id']}: the action runs now; `cicd incidents --env {settings.env}` follows it")
        return
    promoted = onboarding.register_promoted(settings, granted)
    if not promoted["ok"]:
        raise click.ClickException("; ".join(f"{r['field']}: {r['message']}" for r in promoted["refusals"]))
    plane.deploy(granted["app"], promoted["ref"], f"promotion {approval_id}", kind="promotion", sha=promoted["sha"],
                 request_id=f"promotion/{approval_id}")
    click.echo(f"{granted['app']} deploys to {settings.env} at {promoted['sha'][:12]}"
               + ("" if cluster.is_up(settings) else f" once the {settings.env} stack is up (`cicd up --env {settings.env}`)"))


@main.command()
@click.argument("approval_id", metavar="ID")
@click.option("--reason", required=True, help="Why not (goes to the proof log with your name).")
@click.option("--as", "who", default=None, help="Who denies (default: $CICD_USER, else your login).")
def deny(approval_id, reason, who):
    """Deny a request; an action held back for it is refused and its incident closes."""
    settings = answer_settings(approval_id)
    try:
        denied = approvals.deny(settings, approval_id, who or whoami(), reason)
    except approvals.ApprovalError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"APPROVAL_DENIED {approval_id} by {denied['decided_by']}: {denied['summary']}")


# -- the policy --------------------------------------------------------------------------------
@main.group(name="rl")
def rl_group():
    """The recovery policy: train it on the simulated fleet, evaluate it, look at it."""


def learned_table(settings: Settings):
    from cicd.healing import policy
    from cicd.store import session_scope
    with session_scope(settings) as session:
        return policy.load_table(session, settings.env)


@rl_group.command(name="train")
@click.option("--episodes", default=10_000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--env", "env", type=click.Choice(ENVIRONMENTS), default="dev", show_default=True,
              help="Whose Q-table to train (stage and prod use what is trained here when it is theirs).")
@click.option("--continue", "keep", is_flag=True, help="Start from the environment's current table, not the priors.")
def rl_train(episodes, seed, env, keep):
    """Q-learning on the simulated fleet's mixed fault model; stores the table in the environment.

    Each episode is one incident healed through the same shield, gates and catalogue as the
    agents use. Deterministic for a given seed (from the priors). Saves the learning curve for
    `cicd rl eval`'s plot.
    """
    from cicd.healing import learning, policy
    from cicd.store import session_scope
    settings = load_settings(env)
    started = time.monotonic()
    with terminal.progress(f"training {episodes} episodes", total=episodes) as underway:
        training = learning.train(settings, episodes, seed, learned_table(settings) if keep else None,
                                  progress=lambda done, total: underway.update(done))
    with session_scope(settings) as session:
        written = policy.store_table(session, env, training.table, training.visits, replace=not keep)
        proof.append(session, env, "RL_TRAINED", payload={
            "episodes": episodes, "seed": seed, "from": "current table" if keep else "priors",
            "states_written": written, "converged_at": training.converged_at,
            "final": {k: v for k, v in training.curve[-1].items() if k != "greedy"}})
    path = learning.save_training(settings, training, episodes, seed)
    final = training.curve[-1]
    click.echo(f"trained {episodes} episodes (seed {seed}) in {time.monotonic() - started:.1f} s; "
               f"{written} state-actions written to {env}")
    click.echo(f"validation: downtime per incident {final['downtime_per_incident']:.2f} s "
               f"(playbook {training.playbook_downtime:.2f} s), success rate {final['success_rate']:.4f}")
    click.echo(f"greedy policy unchanged since episode {training.converged_at}" if training.converged_at
               else "greedy policy still changing at the last validation: train longer")
    click.echo(f"learning curve: {path}")


@rl_group.command(name="eval")
@click.option("--episodes", default=2000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--seed", default=2, show_default=True, type=int, help="Use one the training did not (held out).")
@click.option("--env", "env", type=click.Choice(ENVIRONMENTS), default="dev", show_default=True)
@JSON_OPTION
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the PNG (default: var/ENV/rl/eval.png).")
def rl_eval(episodes, seed, env, as_json, plot_path):
    """The learned policy beside the playbook, random and an oracle, on the same faults.

    Success rate, mean actions per incident, mean time to recover, total downtime, and each
    as a ratio to the playbook; writes the learning curve and the comparison as a PNG.
    """
    from cicd.healing import learning
    settings = load_settings(env)
    result = learning.evaluate(settings, learned_table(settings), episodes, seed)
    path = learning.plot(settings, result, plot_path or learning.rl_dir(settings) / "eval.png")
    result["plot"] = str(path)
    if as_json:
        echo_json(result)
        return
    rows = [{"policy": name, **{k: v for k, v in row.items() if k != "ratio_to_playbook"},
             "downtime_vs_playbook": row["ratio_to_playbook"]["downtime_s"]}
            for name, row in result["policies"].items()]
    click.echo(f"{episodes} incidents from the mixed fault model, seed {seed}, policy of {env}:")
    terminal.print_table(rows, [("policy", "policy"), ("success_rate", "success"), ("mean_actions", "actions/incident"),
                                ("mean_time_to_recover_s", "mean ttr s"), ("downtime_s", "downtime s"),
                                ("downtime_vs_playbook", "vs playbook")])
    click.echo(f"learned mean actions / oracle's: {result['policies']['learned']['actions_vs_oracle']}")
    click.echo(f"plot: {path}")


@rl_group.command(name="show")
@click.option("--env", "env", type=click.Choice(ENVIRONMENTS), default="dev", show_default=True)
@JSON_OPTION
def rl_show(env, as_json):
    """The Q-table: every state the detector produces, its Q-values and its greedy action.

    Values marked * were learned; the others are the priors.
    """
    from cicd.web import api
    settings = load_settings(env)
    policy_table = api.policy_table(settings)
    rows = [{"state": s["state"], "greedy": s["greedy"],
             **{a: f"{q:+.3f}{'*' if a in s['learned'] else ''}" for a, q in s["q"].items()}}
            for s in policy_table["states"]]
    if as_json:
        echo_json({"env": env, "mode": settings.policy_mode, "states": rows})
        return
    click.echo(f"policy of {env} (mode {settings.policy_mode}); * = learned")
    terminal.print_table(rows, [("state", "state"), ("greedy", "greedy")] + [(a, a) for a in policy_table["actions"]])


@main.command()
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@ENV_OPTION
@click.option("--seed", default=0, show_default=True, type=int, help="For the hidden causes the record does not hold.")
@JSON_OPTION
def replay(trace, env, seed, as_json):
    """What-if on real history: heal a recorded trace's incidents again, on the simulated fleet.

    TRACE is what `cicd proof export --format csv|jsonl` writes. Each recorded incident is healed
    by today's policy of ENV through the same shield, gates and catalogue, and shown beside what
    happened then. (A sample: examples/traces/stage-demo.csv.)
    """
    from cicd.healing import replay as replay_module
    settings = load_settings(env)
    try:
        recorded = replay_module.incidents(replay_module.read_trace(Path(trace)))
    except replay_module.TraceError as exc:
        raise click.ClickException(str(exc)) from None
    if not recorded:
        raise click.ClickException(f"{trace} holds no INCIDENT_DETECTED records to replay")
    results = replay_module.replay(settings, learned_table(settings), recorded, seed)
    if as_json:
        echo_json(results)
        return
    rows = [{"incident": r["incident_id"], "kind": r["kind"] + (" (fresh)" if r["fresh"] else ""),
             "then": " -> ".join(r["recorded"]["actions"]) + f" = {r['recorded']['outcome']}",
             "then_s": r["recorded"]["seconds"],
             "now": " -> ".join(r["replayed"]["actions"]) + f" = {r['replayed']['outcome']}",
             "now_s": r["replayed"]["seconds"]} for r in results]
    terminal.print_table(rows, [("incident", "incident"), ("kind", "kind"), ("then", "recorded"), ("then_s", "seconds"),
                                ("now", f"replayed ({settings.env} policy, simulated)"), ("now_s", "sim seconds")])
    same = sum(1 for r in results if r["recorded"]["actions"][:1] == r["replayed"]["actions"][:1])
    click.echo(f"{len(results)} incidents; the first action is the same in {same}; "
               f"replayed outcomes: {sum(r['replayed']['outcome'] == 'stable' for r in results)} stable")


# -- benchmarks --------------------------------------------------------------------------------
@main.command()
@JSON_OPTION
@click.option("--quick", is_flag=True, help="Fewer incidents and kills: a smoke run, not figures to quote.")
def bench(as_json, quick):
    """Benchmarks, each figure beside its baseline measured in the same run (takes minutes).

    \b
    chain         the healing chain on the simulated fleet vs bare Celery chains of the same hops
    recover_real  SIGKILL a real replica: time until healthy (probes alone, and exits watched)
    fanout        one probe cycle over 1,000 and 10,000 simulated apps
    footprint     resident memory of the whole stack, idle and under load
    policy        one policy decision, in-process

    It starts its own stacks in a temporary directory; a stack you run is not touched.
    """
    root = Path(__file__).resolve().parent
    if not (root / "tests" / "bench" / "__main__.py").exists():
        raise click.ClickException(f"the benchmarks live in the source tree (tests/bench), not found under {root}")
    argv = [sys.executable, "-m", "tests.bench"] + (["--json"] if as_json else []) + (["--quick"] if quick else [])
    sys.exit(subprocess.run(argv, cwd=root).returncode)


# -- dead letters ------------------------------------------------------------------------------
@main.group(name="dlq")
def dlq_group():
    """Dead letters: what could not be processed, kept with the reason until you act on it.

    Malformed or hostile input, an unknown app, a message for another environment, a task that
    failed or ran out of retries. `retry` sends one again (with the rest of its chain); `purge`
    deletes, and the proof log records what went.
    """


@dlq_group.command(name="list")
@ENV_OPTION
@click.option("--all", "include_retried", is_flag=True, help="Letters already retried too.")
@JSON_OPTION
def dlq_list(env, include_retried, as_json):
    """The dead letters of an environment, oldest first."""
    settings = load_settings(env)
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
@ENV_OPTION
def dlq_show(letter_id, env):
    """One dead letter, whole: task, arguments, the chain it was part of, and why."""
    try:
        echo_json(deadletters.get(load_settings(env), letter_id))
    except deadletters.DeadLetterError as exc:
        raise click.ClickException(str(exc)) from None


@dlq_group.command(name="retry")
@click.argument("letter_ids", type=int, nargs=-1, required=True, metavar="ID...")
@ENV_OPTION
def dlq_retry(letter_ids, env):
    """Send dead letters to their task again (a fixed bug, a broker that is back)."""
    settings = load_settings(env)
    require_stack(settings)
    plane = control_plane(settings)
    for letter_id in letter_ids:
        try:
            letter = deadletters.get(settings, letter_id)
        except deadletters.DeadLetterError as exc:
            raise click.ClickException(str(exc)) from None
        plane.resend(letter["task"], letter["args"], letter["kwargs"], letter["chain"])
        deadletters.mark_retried(settings, letter_id, whoami())
        click.echo(f"dead letter {letter_id}: {letter['task']} sent again")


@dlq_group.command(name="purge")
@click.argument("letter_ids", type=int, nargs=-1, metavar="[ID...]")
@ENV_OPTION
@click.option("--all", "purge_all", is_flag=True, help="Every dead letter of the environment.")
def dlq_purge(letter_ids, env, purge_all):
    """Delete dead letters you have dealt with (the proof log records what was deleted, by whom)."""
    if bool(letter_ids) == purge_all:
        raise click.UsageError("give the IDs to purge, or --all")
    settings = load_settings(env)
    try:
        count = deadletters.purge(settings, None if purge_all else list(letter_ids), whoami())
    except deadletters.DeadLetterError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"purged {count} dead letters from {settings.env}")


# -- proof -------------------------------------------------------------------------------------
@main.group(name="proof")
def proof_group():
    """The tamper-evident proof log (a hash chain per environment)."""


@proof_group.command(name="tail")
@ENV_OPTION
@click.option("-n", "count", default=20, show_default=True, help="How many records.")
@click.option("--incident", default=None, help="Only this incident's records.")
@JSON_OPTION
def proof_tail(env, count, incident, as_json):
    """The last records of the chain, oldest first (`proof export` writes them all as JSONL)."""
    settings = load_settings(env)
    records = proof.tail(settings, count, incident)
    if as_json:
        echo_json(records)
        return
    for record in records:
        record["what"] = reports.payload_text(record, 80)
    terminal.print_table(records, [("seq", "seq"), ("ts", "ts"), ("event_name", "event"),
                                   ("incident_id", "incident"), ("app", "app"), ("what", "payload")])


@proof_group.command(name="verify")
@ENV_OPTION
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Verify an exported JSONL file instead of the database (e.g. logs/stage/proof.jsonl).")
def proof_verify(env, path):
    """Check every record's hash and link; name the first bad record. Exit 1 if broken."""
    settings = load_settings(env)
    result = proof.verify_file(path) if path else proof.verify(settings)
    click.echo(f"{path or settings.env}: {result.describe()}")
    sys.exit(0 if result.ok else 1)


@proof_group.command(name="export")
@ENV_OPTION
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--output", "-o", type=click.File("w"), default="-", help="File to write (default: stdout).")
def proof_export(env, fmt, output):
    """Write the whole chain as JSONL or CSV (the columns `cicd replay` reads)."""
    settings = load_settings(env)
    count = proof.export(settings, fmt, output)
    if output is not sys.stdout:
        click.echo(f"{count} records written to {output.name}", err=True)


# -- demo --------------------------------------------------------------------------------------
@main.command()
@click.option("--scenario", type=click.Choice(["classic", "slow-deploy", "failed-deploy", "overloaded-env"]),
              default="classic", show_default=True, help="Which story to run (see below).")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds each incident may take.")
def demo(scenario, timeout):
    """The end-to-end demo in stage, with real apps deployed from a loopback git server.

    \b
    classic         demo-api: crash -> restart, overload -> scale out, false alarm -> noop
    slow-deploy     a revision that starts slowly: detected while its gate runs, handled
    failed-deploy   a revision that does not build: recovered by retry or rollback while
                    the live release serves throughout
    overloaded-env  three apps hot at once: scaled out, then back in when the load falls

    Starts the stack if it is not up, in DEMO_MODE (only noop, restart and scaling execute;
    set CICD_DEMO_MODE=false to let the healer retry and roll back deploys), and leaves it running.
    """
    from cicd.stack import demo as demo_module
    os.environ.setdefault("CICD_DEMO_MODE", "true")
    settings = load_settings("stage")
    plane = control_plane(settings)
    with terminal.progress(f"demo ({scenario})") as underway:
        def say(line: str) -> None:
            underway.echo(line)
            underway.update(note=line.strip()[:60])
        if not cluster.is_up(settings):
            say("starting the stage stack ...")
            try:
                cluster.up(settings, {}, plane.ping, say=say)
            except cluster.StackError as exc:
                raise click.ClickException(str(exc)) from None
        if cluster.running_demo_mode(settings) != settings.demo_mode:
            # The workers decide what DEMO_MODE is; say which one this run really has.
            settings = replace(settings, demo_mode=cluster.running_demo_mode(settings))
        code = demo_module.run(settings, make_runtime(settings), plane, say=say, scenario=scenario,
                               scenario_timeout_s=timeout)
    sys.exit(code)


if __name__ == "__main__":
    main()
