"""The compose stack, really up: docker-compose.yml with docker/compose.host.yml on the tier's own
dockerd (host networking: it has no bridge), the project image built from the base made here.
Three deploy workers answer; an app onboarded from a git server on loopback runs on the Docker
runtime (its replicas containers of their own, through the daemon's socket) and is crashed and
healed by agents in five separate containers; a worker container's main process is SIGKILLed,
compose's restart policy brings it back while the app's containers run on, and a second crash is
healed after it. `down -v` always.

The passwords are made per run and reach compose in its environment only, never on a command line.
Every wait polls with a deadline and says what it saw last."""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cicd.delivery import examples
from cicd.runtime import process
from tests import conftest as suite
from tests import dockerd as dockerd_support

ROOT = Path(__file__).resolve().parents[2]
OVERRIDE = "docker/compose.host.yml"
APP = "compose-demo"
AGENTS = ("onboard", "deploy", "detect", "decide", "orchestrate", "monitor")
BUILD_S, UP_S, STEP_S = 600, 240, 120


def free_ports(count: int) -> list[int]:
    """Ports below the kernel's ephemeral range (32768-60999, where the rest of the suite's servers
    get theirs), free on 127.0.0.1 now."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def poll(what: str, probe, deadline_s: float, every_s: float = 0.5):
    """probe() until it returns True; fail with what it returned last (what it saw, when not True)."""
    deadline, last = time.monotonic() + deadline_s, None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except subprocess.SubprocessError as exc:  # a docker command that failed: keep its output
            last = exc
        if last is True:
            return
        time.sleep(every_s)
    pytest.fail(f"{what}: not within {deadline_s:.0f} s; last seen: {last!r}"[:4000])


class Stack:
    def __init__(self, dockerd):
        self.dockerd = dockerd
        self.project = f"cicdtest{secrets.token_hex(3)}"
        redis_port, pg_port, flower_port, dash_port = free_ports(4)
        self.secrets = {"REDIS_PASSWORD": secrets.token_hex(16), "POSTGRES_PASSWORD": secrets.token_hex(16),
                        "FLOWER_PASSWORD": secrets.token_hex(16)}
        self.env = {**os.environ, **dockerd.env, **self.secrets, "CICD_ENV": "stage", "DOCKER_BUILDKIT": "0",
                    "CICD_BASE_IMAGE": dockerd_support.BASE_IMAGE, "CICD_REDIS_PORT": str(redis_port),
                    "CICD_POSTGRES_PORT": str(pg_port), "CICD_FLOWER_PORT": str(flower_port),
                    "CICD_DASHBOARD_PORT": str(dash_port),
                    # The apps on the Docker runtime, as containers of the tier's own daemon.
                    "CICD_RUNTIME": "docker", "CICD_DOCKER_SOCKET": str(dockerd.socket),
                    "CICD_DOCKER_GID": str(os.stat(dockerd.socket).st_gid),
                    "CICD_DOCKER_BASE_IMAGE": dockerd_support.BASE_IMAGE}
        self.times: dict[str, float] = {}

    def run(self, argv: list[str], timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        for secret in self.secrets.values():  # a secret must never reach any output
            assert secret not in done.stdout + done.stderr, f"a password in the output of {argv[:4]}"
        if check and done.returncode != 0:
            raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def compose(self, *args: str, timeout: float = STEP_S, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["docker-compose", "-p", self.project, "-f", "docker-compose.yml", "-f", OVERRIDE, *args],
                        timeout, check)

    def cicd(self, service: str, *args: str, timeout: float = STEP_S, check: bool = True):
        """`cicd ...` inside a running container of service (its environment: the broker, the database)."""
        return self.compose("exec", "-T", service, "cicd", *args, timeout=timeout, check=check)

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def inspect(self, container: str, template: str) -> str:
        return self.dockerd.docker("inspect", "--format", template, container).stdout.strip()

    def answering(self) -> set[str]:
        """The workers that answer a ping, by node name (asked from the onboard worker's container)."""
        done = self.compose("exec", "-T", "worker-onboard", "python", "-m", "celery", "-A", "workers.app:celery_app",
                            "inspect", "ping", "--timeout", "3", check=False)
        return set(re.findall(r"->\s+(\S+@\S+): OK", done.stdout))

    def app_containers(self) -> list[str]:
        """The running containers of the app's replicas (the Docker runtime's, labelled by it)."""
        return sorted(self.dockerd.docker("ps", "-q", "--no-trunc", "--filter", f"label=cicd.app={APP}",
                                          "--filter", "label=cicd.slot").stdout.split())

    def apps(self) -> dict:
        done = self.cicd("worker-monitor", "status", "--json")
        return {row["app"]: row for row in json.loads(done.stdout)["apps"]}


def test_the_compose_stack_scales_heals_a_crash_and_survives_a_killed_worker(dockerd, tmp_path):
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed: apt-get install docker-compose (as root)")
    stack = Stack(dockerd)
    timing = stack.times

    # The two images, side by side (the project's is the long one: its dependencies from PyPI).
    started = time.monotonic()
    builds = [subprocess.Popen(argv, cwd=ROOT, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
              for argv in (["docker", "build", "--network", "host", "--build-arg", f"BASE={dockerd_support.BASE_IMAGE}",
                            "-f", "docker/Dockerfile", "-t", "cicd-heal:latest", "."],
                           ["docker", "build", "--network", "host", "--build-arg", f"BASE={dockerd_support.BASE_IMAGE}",
                            "-f", "docker/postgres.Dockerfile", "-t", "cicd-postgres:15", "docker"])]
    for build in builds:
        out, _ = build.communicate(timeout=BUILD_S)
        assert build.returncode == 0, out[-3000:]
    timing["image build (both, in parallel)"] = time.monotonic() - started

    # The example repository of the sample service, served over loopback http from this process:
    # the deploy agent's container shares the host's network, so it fetches from 127.0.0.1.
    examples.make_repo(tmp_path / "git", APP)
    git = examples.start_server(tmp_path / "git", tmp_path / "git-server.log")
    try:
        _run_the_stack(stack, f"{git['url']}/{APP}.git")
    except BaseException:
        # What the containers said, for the failure's report (before `down` deletes them).
        logs = stack.compose("logs", "--no-color", "--tail", "60", timeout=60, check=False)
        print(logs.stdout[-20000:])
        raise
    finally:
        down = stack.compose("down", "-v", "--timeout", "10", timeout=180, check=False)
        # The app's containers are the daemon's, not compose's: removed as `cicd remove` would.
        if leftover := stack.app_containers():
            dockerd.docker("rm", "-f", *leftover)
        process.stop(git["pid"], git["ticks"], grace_s=1)
        report = ", ".join(f"{what} {seconds:.1f} s" for what, seconds in timing.items())
        suite.REPORTS.append(f"compose stack (tests/docker/test_compose_stack.py): {report}")
        print("\n" + suite.REPORTS[-1])
    assert down.returncode == 0, down.stderr[-2000:]
    assert not dockerd.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}").stdout.strip()


def _run_the_stack(stack: Stack, repo: str) -> None:
    timing = stack.times

    started = up_at = time.monotonic()
    stack.compose("up", "-d", "--no-build", timeout=UP_S)
    expected = {f"stage-{agent}" for agent in AGENTS}
    def every_agent():
        nodes = stack.answering()
        return expected <= {node.rsplit("-", 1)[0] for node in nodes} or sorted(nodes)
    poll("every agent answering a ping", every_agent, UP_S)
    timing["up to every agent answering"] = time.monotonic() - started

    # Scale the deploy agent out: three containers, three deploy workers answering, each by its name.
    stack.compose("up", "-d", "--no-build", "--no-recreate", "--scale", "worker-deploy=3", timeout=UP_S)
    assert len(stack.containers("worker-deploy")) == 3
    def three_deployers():
        nodes = sorted(n for n in stack.answering() if n.startswith("stage-deploy-"))
        return len(nodes) == 3 or nodes
    poll("three deploy workers answering", three_deployers, UP_S)

    started = time.monotonic()
    onboard = stack.cicd("worker-onboard", "onboard", APP, "--repo", repo, "--runtime", "backend", timeout=300,
                         check=False)
    assert onboard.returncode == 0, onboard.stdout + onboard.stderr
    assert re.search(r"release 1 live in [\d.]+ s", onboard.stdout), onboard.stdout
    timing["onboard to release live"] = time.monotonic() - started
    assert len(stack.app_containers()) == 2, stack.app_containers()

    first = _crash_and_heal(stack)
    timing["first crash healed"] = first

    # Docker's own health checks (every 30 s, after a 30 s start period) agree by now or soon.
    def every_container_healthy():
        states = {c: stack.inspect(c, "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}"
                                      "{{end}}") for c in stack.compose("ps", "-q").stdout.split()}
        bad = [s for s in states.values() if s.split()[1:] not in (["running", "healthy"], ["exited"])]
        return not bad or bad
    poll("Docker reporting every container healthy", every_container_healthy, UP_S, every_s=2)

    timing["up to Docker reporting every container healthy"] = time.monotonic() - up_at

    # SIGKILL of the orchestrator's main process, from the host: a crash, which the restart policy
    # answers (`docker kill` would not do: Docker takes it for a manual stop and leaves the container
    # exited; tests/docker/test_dockerd.py shows both on this daemon).
    [orchestrator] = stack.containers("worker-orchestrate")
    # The app's replicas are containers of their own: an agent's death is not theirs.
    apps_before = stack.app_containers()
    old_pid = int(stack.inspect(orchestrator, "{{.State.Pid}}"))
    restarts = int(stack.inspect(orchestrator, "{{.RestartCount}}"))
    started = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)

    def restarted():
        state = stack.inspect(orchestrator, "{{.State.Status}} {{.State.Pid}} {{.RestartCount}}").split()
        return (state[0] == "running" and int(state[1]) not in (0, old_pid) and int(state[2]) > restarts) or state
    poll("compose's restart policy bringing the orchestrator back", restarted, STEP_S)

    def orchestrator_answers():
        nodes = stack.answering()
        return any(n.startswith("stage-orchestrate-") for n in nodes) or sorted(nodes)
    poll("the restarted orchestrator answering", orchestrator_answers, STEP_S)
    timing["killed orchestrator answering again"] = time.monotonic() - started
    assert stack.app_containers() == apps_before   # the app's containers never noticed
    def whole():
        row = stack.apps().get(APP) or {}
        return (row.get("healthy") == row.get("replicas") and row.get("replicas") and not row.get("open_incident")) \
            or row
    poll(f"{APP} whole again after the orchestrator's restart", whole, STEP_S)
    timing["app still whole after the kill"] = time.monotonic() - started
    timing["second crash healed"] = _crash_and_heal(stack)

    # It all went through the PostgreSQL container: the two injected crashes are its incidents, both
    # stable; the killed worker made none (the app's containers never noticed it). psql gets the password in its environment, from the container's.
    query = stack.compose("exec", "-T", "postgres", "sh", "-c",
                          'PGPASSWORD="$POSTGRES_PASSWORD" psql -h 127.0.0.1 -U cicd -d cicd_stage -Atc '
                          f"\"select status, count(*) from incidents where app = '{APP}' group by status\"")
    counts = dict(line.split("|") for line in query.stdout.split())
    assert counts == {"stable": "2"}, query.stdout


def _crash_and_heal(stack: Stack) -> float:
    """`cicd inject crash --wait` from the monitor's container: a real SIGKILL of a replica, which
    the agents in the other containers detect, restart and verify. Returns its time to recover."""
    done = stack.cicd("worker-monitor", "inject", "crash", APP, "--wait", "--timeout", "90", timeout=150, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    killed = re.search(r"FAILURE_INJECTED crash .* container=(\S+), signal=SIGKILL", done.stdout).group(1)
    recovered = re.search(r"crash -> restart_service: stable; time to recover ([\d.]+) s", done.stdout)
    assert recovered, done.stdout
    print(done.stdout)
    # The killed replica's container is gone (the restart replaced it), the new ones run.
    names = stack.dockerd.docker("ps", "-a", "--filter", f"label=cicd.app={APP}", "--format", "{{.Names}}").stdout
    assert killed not in names.split(), names
    row = stack.apps()[APP]
    assert row["healthy"] == row["replicas"] == len(stack.app_containers()) >= 1, row
    return float(recovered.group(1))
