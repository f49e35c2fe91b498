"""Apps: `cicd onboard`, `deploy`, `scale`, `inject` (break one on purpose) and `remove`."""
from __future__ import annotations

import sys

import click

from cicd.cli import terminal
from cicd.cli.context import Invocation, control_plane, env_option, pass_invocation, require_stack, stack_is_up, whoami
from cicd.config import Settings
from cicd.core.lifecycle import IncidentStatus, ReleaseStatus
from cicd.delivery import faults, gitsource, onboarding
from cicd.runtime import make_runtime


@click.command()
@click.argument("name")
@click.option("--repo", required=True, help="http(s) URL of the app's git repository (no credentials).")
@click.option("--runtime", "runtime_kind", required=True, metavar="backend|frontend|fullstack",
              help="Which template generates the spec (port, build and start commands, health path).")
@env_option()
@click.option("--host", "host", default=None, metavar="NAME",
              help="Place the app on this host agent's machine (`cicd host-agent` there): it is built, run and "
                   "acted on there, and probed over the network. Default: this machine.")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the first deploy to finish.")
@pass_invocation
def onboard(invocation: Invocation, name, repo, runtime_kind, host, wait):
    """Onboard an app: validate, generate its spec from the runtime's template, deploy it.

    NAME is 2-40 lowercase letters, digits and single hyphens, unique in the environment.
    Onboarding straight into prod is refused: onboard into stage, then promote.
    """
    settings = invocation.settings
    if settings.env == "prod":
        # Prod refuses every onboarding, so no agent is needed to say so (and the prod stack may be
        # down): the same domain call logs the refusal in prod's proof chain.
        result = onboarding.register(settings, name, repo, runtime_kind, host=host)
    else:
        require_stack(settings)
        result = control_plane(settings).onboard(name, repo, runtime_kind, host=host)
    if not result["ok"]:
        for refusal in result["refusals"]:
            click.echo(f"refused: {refusal['field']} ({refusal['rule']}): {refusal['message']}", err=True)
        sys.exit(2)
    click.echo(f"onboarded {name} in {settings.env}; spec: {settings.registry_dir / (name + '.json')}")
    if not wait:
        click.echo("deploy triggered; `cicd status` shows when it is live")
        return
    report_release(settings, name, after=0)


# As long as a deploy task may run (the deploy agent's time limit, celeryconfig) plus its health
# gate: a cold dependency install from the package index can take minutes.
DEPLOY_WAIT_S = 660


def report_release(settings: Settings, app: str, after: int, timeout_s: float = DEPLOY_WAIT_S) -> None:
    from cicd.store import reports
    on_screen = terminal.is_terminal(sys.stderr)
    with terminal.progress(f"deploying {app} in {settings.env}: fetch, build, health gate") as underway:
        def show(release):
            # Each build step as it begins: beside the spinner on a terminal, else one line each on
            # stderr (a CI log shows what a slow install was doing; stdout keeps only the result).
            step = f"release {release['release']} {release['status']}" + \
                (f": {release['detail']}" if release["detail"] else "")
            if on_screen:
                underway.update(note=step)
            else:
                click.echo(f"  {step}", err=True)
        release = reports.wait_for_release(settings, app, after, timeout_s, on_progress=show)
    if release is None:
        raise click.ClickException(f"the deploy did not finish within {timeout_s:.0f} s; "
                                   f"see `cicd status` and {settings.logs_dir}")
    seconds = reports.seconds_between(release["started_at"], release["finished_at"])
    click.echo(f"release {release['release']} {release['status']} in {seconds:.2f} s: {release['detail']}")
    sys.exit(0 if release["status"] == ReleaseStatus.LIVE else 1)


@click.command()
@click.argument("app")
@click.option("--ref", default="HEAD", show_default=True,
              help="Branch, tag or commit of the app's repository to deploy (HEAD: its default branch).")
@env_option()
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait for the release to finish.")
@pass_invocation
def deploy(invocation: Invocation, app, ref, wait):
    """Deploy a revision: fetch it over git, build, start new replicas, health-gate, switch.

    The live release keeps serving until the new one passes its health gate; a release that
    fails (fetch, build or gate) is discarded and the live one keeps serving (ROLLBACK). One
    deploy per app at a time: a second one waits for the first.
    """
    from cicd.store import reports
    settings = invocation.settings
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


@click.command()
@click.argument("app")
@click.argument("replicas", type=click.IntRange(0, 64))
@env_option()
@pass_invocation
def scale(invocation: Invocation, app, replicas):
    """Set an app's number of replicas (within its spec's limits), through the deploy agent."""
    settings = invocation.settings
    require_stack(settings)
    result = control_plane(settings).scale(app, replicas)
    if not result["ok"]:
        raise click.ClickException(result["error"])
    click.echo(f"{app}: {result['from']} -> {result['to']} replicas")


@click.command()
@click.argument("kind", type=click.Choice(faults.FAULT_KINDS))
@click.argument("app")
@env_option()
@click.option("--wait", is_flag=True, help="Follow the incident to its end; print its timeline and time to "
                                           "recover. Exit status 0 only if it ended stable.")
@click.option("--timeout", default=90.0, show_default=True, help="Seconds --wait follows before giving up.")
@click.option("--duration", default=30.0, show_default=True, help="overload: seconds the extra load lasts.")
@click.option("--slot", type=int, default=None,
              help="crash/hang/leak/false-alarm: which replica (default: the first).")
@click.option("--mb-per-s", type=click.FloatRange(min=0.1, max=1000), default=None,
              help="leak: how fast memory grows (default: the limit in 20 s).")
@click.option("--path", default=None,
              help="overload: what the load requests through the stable URL (default: the app's health "
                   "path; /work on the sample service). Pick one that waits, as a database query does: "
                   "a path answered in a millisecond may not overload from one machine (it says so).")
@pass_invocation
def inject(invocation: Invocation, kind, app, wait, timeout, duration, slot, mb_per_s, path):
    """Break an app on purpose, for real.

    \b
    crash          SIGKILL one replica process
    hang           SIGSTOP one replica: alive, answering nothing (healed by a restart)
    leak           one replica grows its memory toward the spec's memory_limit_mb
                   (the sample service does on request: POST /admin/leak)
    overload       real traffic through the stable URL: clients ramp up until the
                   measured load crosses the threshold, then hold (--duration)
    false-alarm    one replica's probes fail for a moment (a 503 from the proxy, any
                   app), then pass: only the monitor's view blips
    slow-deploy    deploy the repo's cicd-inject/slow branch (starts slowly)
    failed-deploy  deploy the repo's cicd-inject/broken branch (does not build)
    bad-release    deploy the repo's cicd-inject/crashy branch (passes its gate, then dies)
    """
    from cicd.store import reports
    settings = invocation.settings
    runtime = make_runtime(settings)
    plane = control_plane(settings)
    if hasattr(runtime, "ask_host"):
        runtime.ask_host = plane.host_inject  # a placed app's fault is made by its host's agent
    if wait:
        require_stack(settings)  # before breaking anything: with --wait we promise to follow the healing
    elif not stack_is_up(settings):
        click.echo(f"warning: the {settings.env} stack is not running, so nothing will heal this "
                   f"until `cicd up --env {settings.env}`", err=True)
    injected = faults.inject(settings, runtime, app, kind, duration=duration, slot=slot, mb_per_s=mb_per_s,
                             path=path, request_deploy=lambda name, ref, reason: plane.deploy(name, ref, reason))
    details = ", ".join(f"{k}={v}" for k, v in injected.items()
                        if k not in ("injected_at", "seq", "watch_after_seq", "warning"))
    click.echo(f"FAILURE_INJECTED {kind} on {app} in {settings.env}: {details}")
    if injected.get("warning"):
        click.echo(f"warning: {injected['warning']}", err=True)
    if not wait:
        return
    start = injected["injected_at"]

    def show(record):
        click.echo(f"  +{reports.seconds_between(start, record['ts']):7.3f} s  {record['event_name']:<24} "
                   f"{reports.payload_text(record, 70)}")

    incident = reports.follow(settings, app, injected["watch_after_seq"], timeout, on_record=show)
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


@click.command()
@click.argument("app")
@env_option()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed when stdin is not a terminal).")
@pass_invocation
def remove(invocation: Invocation, app, yes):
    """Remove an app: stop its replicas, drop its runtime state, spec and registry entry.

    Its history stays: releases, incidents and the proof log (which records APP_REMOVED). Its
    open incident closes (no healing runs on a removed app). Refused while a deploy of the app
    is under way. In prod it files a request instead, which `cicd approve ID` carries out.
    """
    from cicd.delivery import removal
    settings = invocation.settings
    if settings.env == "prod":
        # Filing a request changes nothing yet, so there is nothing to confirm.
        from cicd.healing import approvals
        request = approvals.request_removal(settings, app, whoami())
        click.echo(f"APPROVAL_REQUESTED {request['id']}: {request['summary']} (expires {request['expires_at']})")
        click.echo(f"answer with `cicd approve {request['id']} --reason ...` or `cicd deny {request['id']} --reason ...`")
        return
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(f"removing {app} stops it and forgets it in {settings.env}: "
                                   f"pass --yes to confirm when not on a terminal")
        click.confirm(f"Remove {app} from {settings.env}: stop its replicas and drop its spec?", abort=True)
    result = removal.remove(settings, make_runtime(settings), app, who=whoami())
    echo_removed(result)


def echo_removed(result: dict) -> None:
    closed = result["closed_incidents"]
    click.echo(f"removed {result['app']} from {result['env']}: {result['stopped']} replicas stopped; "
               f"its proof log and release history are kept"
               + (f"; closed {', '.join(closed)}" if closed else ""))


@click.command()
@click.argument("containers", nargs=-1)
@click.option("--app", "app", metavar="NAME", help="The app's name in cicd-heal (default: the first container's "
              "name). 2-40 lowercase letters, digits and single hyphens.")
@click.option("--port", type=int, help="A port the containers serve HTTP on, on this host: probed with GET "
              "--health-path. Without it, the containers' own HEALTHCHECK is the probe (or, without one, "
              "whether they run).")
@click.option("--health-path", metavar="PATH", help="What the probes GET on --port (default /).")
@click.option("--labelled", is_flag=True, help="Adopt every running container labelled cicd.heal=true instead, "
              "grouped into apps by the label cicd.heal.app (else its name); cicd.heal.port and cicd.heal.path "
              "give the HTTP check.")
@env_option()
@pass_invocation
def adopt(invocation: Invocation, containers, app, port, health_path, labelled):
    """Heal containers cicd-heal did not start: watch them, restart them in place when they fail.

    Docker restarts a container that exits (by its restart policy) but not one its own health
    check calls unhealthy, nor one that hangs. An adopted container is probed, its exit is seen
    the moment it happens, and a failure opens an incident that ends in `docker restart`, through
    the same gates, budgets, approvals and proof log as everything else. cicd-heal never stops,
    removes, scales or redeploys an adopted container; `cicd remove APP` lets go of it.

    \b
    Examples:
      cicd adopt legacy-api                          its HEALTHCHECK decides
      cicd adopt web-1 web-2 --app web --port 8080 --health-path /healthz
      cicd adopt --labelled                          docker run -l cicd.heal=true -l cicd.heal.app=web ...
    Needs the environment's stack on the Docker runtime (CICD_RUNTIME=docker cicd up).
    """
    from cicd.delivery import adoption
    settings = invocation.settings
    require_stack(settings)
    runtime = make_runtime(settings)
    if labelled:
        if containers or app or port or health_path:
            raise click.UsageError("--labelled takes its containers, names, ports and paths from the labels: "
                                   "give no CONTAINERS, --app, --port or --health-path with it")
        if settings.runtime != "docker":
            raise click.ClickException(f"{settings.env} runs apps on the {settings.runtime} runtime: adopting "
                                       f"containers needs CICD_RUNTIME=docker (`CICD_RUNTIME=docker cicd up`)")
        groups = adoption.labelled(runtime)
        if not groups:
            click.echo(f"no running container is labelled {adoption.ADOPT_LABEL}=true")
            return
    elif not containers:
        raise click.UsageError("name the containers to adopt, or pass --labelled")
    else:
        groups = {app or containers[0]: {"containers": list(containers), "port": port, "health_path": health_path}}
    refused = False
    for name, group in groups.items():
        result = adoption.adopt(settings, runtime, name, group["containers"], group["port"], group["health_path"])
        if not result["ok"]:
            refused = True
            for refusal in result["refusals"]:
                click.echo(f"refused {name}: {refusal['field']} ({refusal['rule']}): {refusal['message']}", err=True)
            continue
        spec = result["spec"]
        click.echo(f"adopted {', '.join(spec['adopted'])} as {name} in {settings.env} (probe: {spec['probe']}"
                   + (f" on port {spec['port']} {spec['health_path']}" if spec["port"] else "") + ")")
    if refused:
        sys.exit(2)
