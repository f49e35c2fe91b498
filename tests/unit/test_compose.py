"""docker-compose.yml: every agent has a worker service running exactly what `cicd up` runs, every
service watches its health and restarts, beat never scales, scaled services cannot clash, and no
secret sits on a command line or in the image.

Each check runs on the file as PyYAML reads it (always), and again on the file as compose itself
resolves it (`docker-compose config`, which also validates it) where compose is installed. Nothing
is started: there is no Docker engine here.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cicd.stack import cluster
from cicd.config import AGENTS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Recognisable values, to find them wherever compose puts them.
SECRETS = {"REDIS_PASSWORD": "redis-pw-4f1d9c2b", "POSTGRES_PASSWORD": "postgres-pw-7a3e5b8d",
           "FLOWER_PASSWORD": "flower-pw-2c6b0e9f"}
VARIABLES = {**SECRETS, "CICD_ENV": "stage"}


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


COMPOSE = compose_command()
NO_COMPOSE = ("neither `docker-compose` nor `docker compose` is installed, so compose's own reading of the file "
              "is not checked (`make test` installs docker-compose when it runs as root); the PyYAML checks still run")


def compose_config(**variables: str) -> subprocess.CompletedProcess:
    # Only what the file is documented to read: none of the caller's CICD_*/FLOWER_* settings.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CICD_", "FLOWER_", "COMPOSE_")) and k not in SECRETS}
    env.update(variables)
    return subprocess.run([*COMPOSE, "-f", str(COMPOSE_FILE), "config"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


# Compose's substitutions: $$ (a `$` left for the container's shell), ${NAME}, ${NAME:-default},
# ${NAME:?error}.
_SUBSTITUTION = re.compile(r"\$\$|\$\{(\w+)(?::([-?])([^}]*))?\}")


def substitute(value, variables: dict[str, str]):
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, kind, word = match.groups()
        if name is None:
            return "$"
        if name in variables:
            return variables[name]
        assert kind != "?", f"{name} is required: {word}"
        return word if kind == "-" else ""
    return _SUBSTITUTION.sub(one, value)


def read_with_pyyaml() -> dict:
    # safe_load resolves the anchors and `<<` merges; compose's ${...} are substituted here.
    return substitute(yaml.safe_load(COMPOSE_FILE.read_text()), VARIABLES)


def read_with_compose() -> dict:
    if COMPOSE is None:
        pytest.skip(NO_COMPOSE)
    out = compose_config(**VARIABLES)
    assert out.returncode == 0, f"compose refuses docker-compose.yml:\n{out.stderr}"
    # `$$` is compose's escape for a `$` the container's shell expands; its output keeps the escape.
    return yaml.safe_load(out.stdout.replace("$$", "$"))


@pytest.fixture(scope="module", params=["pyyaml", "compose"])
def services(request) -> dict:
    return (read_with_pyyaml() if request.param == "pyyaml" else read_with_compose())["services"]


def one_shots(services: dict) -> set[str]:
    """Services that run to completion: others wait for them to exit 0 instead of for their health."""
    return {name for svc in services.values() for name, dep in (svc.get("depends_on") or {}).items()
            if isinstance(dep, dict) and dep.get("condition") == "service_completed_successfully"}


def test_every_agent_has_a_worker_service_and_nothing_else_is_one(services):
    workers = {name for name in services if name.startswith("worker-")}
    assert workers == {f"worker-{agent}" for agent in AGENTS}
    assert {"redis", "postgres", "beat", "flower", "dashboard"} <= set(services)


@pytest.mark.parametrize("agent", AGENTS)
def test_each_worker_runs_what_cicd_up_runs(services, agent):
    service = services[f"worker-{agent}"]
    # The node name differs on purpose: %h (the container's hostname) instead of a replica index.
    assert service["command"] == ["python", *cluster.worker_args("stage", agent, f"stage-{agent}-%h@%h")]
    assert service["healthcheck"]["test"][0] == "CMD-SHELL"
    assert service["environment"]["CICD_AGENT"] == agent
    # Its healthcheck pings this very replica, by the name the command gave it.
    test = " ".join(service["healthcheck"]["test"])
    assert "celery -A workers.app:celery_app inspect ping" in test
    assert f"-d stage-{agent}-$HOSTNAME@$HOSTNAME" in test


def test_flower_runs_what_cicd_up_runs_with_its_credentials_in_its_environment(services):
    flower = services["flower"]
    assert flower["command"] == ["python", *cluster.flower_args("0.0.0.0", 5555, "/app/var/flower/flower.db")]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == f"admin:{SECRETS['FLOWER_PASSWORD']}"


def test_every_service_watches_its_health_and_restarts(services):
    shots = one_shots(services)
    assert shots == {"bootstrap"}
    for name, service in services.items():
        if name in shots:
            # Its health is its exit status; a failed one runs again until the others can start.
            assert service["restart"] == "on-failure", name
            continue
        assert service["restart"] in ("always", "unless-stopped"), name
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL") and not (service["healthcheck"].get("disable")), name


def test_beat_never_scales(services):
    beat = services["beat"]
    assert "scale" not in beat
    assert (beat.get("deploy") or {}).get("replicas", 1) == 1
    assert beat["healthcheck"]["test"] == ["CMD", "python", "-m", "workers.beat", "check"]
    # What `cicd up` runs, with its schedule file in the shared var volume.
    assert beat["command"] == ["python", *cluster.beat_args("/app/var/celerybeat-schedule")]


def test_scaled_services_cannot_clash(services):
    for name, service in services.items():
        assert "container_name" not in service, name
        if name.startswith("worker-"):
            assert not service.get("ports"), f"{name} publishes a port: a second replica could not start"
    # What is published, is published on the Docker host's loopback only.
    for name, service in services.items():
        for port in service.get("ports") or []:
            published = port if isinstance(port, str) else f"{port.get('host_ip')}:{port.get('published')}"
            assert published.startswith("127.0.0.1:"), (name, port)


def test_the_agents_use_postgres_and_the_password_protected_redis(services):
    for name, service in services.items():
        if service.get("image") == "cicd-heal:latest":
            env = service["environment"]
            assert env["CICD_DATABASE_URL"] == (f"postgresql+psycopg2://cicd:{SECRETS['POSTGRES_PASSWORD']}"
                                                "@postgres:5432/cicd_{env}"), name
            assert env["CICD_BROKER_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0", name
    conf = (ROOT / "docker" / "redis.conf").read_text().split("\n")
    for line in ("appendonly yes", "maxmemory-policy noeviction"):
        assert line in conf
    assert 'requirepass "$REDIS_PASSWORD"' in " ".join(services["redis"]["command"])
    assert "dashboard" in services["dashboard"]["command"]


def test_no_secret_is_on_a_command_line_or_in_the_image(services):
    """`ps` on the Docker host shows every container's command lines to every user; environment
    variables it does not show."""
    for name, service in services.items():
        argv = " ".join(service.get("command") or []) + " " + " ".join((service.get("healthcheck") or {}).get("test") or [])
        for variable, secret in SECRETS.items():
            assert secret not in argv, f"{variable} on the command line of {name}"
    # Its comments may explain why; its instructions must neither hold a password nor copy the
    # whole working tree (var/ holds the signing keys `cicd up` wrote).
    instructions = [line for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines()
                    if not line.lstrip().startswith("#")]
    assert instructions and not [line for line in instructions if "PASSWORD" in line or "COPY . " in line]


def test_every_password_is_required_by_name():
    """Without a password, compose must stop and say which one, not start a Redis or a Flower
    without authentication (a plain ${NAME} would become an empty string)."""
    text = COMPOSE_FILE.read_text()
    references = re.findall(r"\$\{(\w*PASSWORD)([^}]*)\}", text)
    assert {name for name, _ in references} == set(SECRETS)
    for name, rest in references:
        assert rest == f":?set {name}", f"${{{name}{rest}}} in docker-compose.yml"


@pytest.mark.skipif(COMPOSE is None, reason=NO_COMPOSE)
def test_compose_refuses_a_missing_password_by_name():
    for missing in SECRETS:
        out = compose_config(**{k: v for k, v in VARIABLES.items() if k != missing})
        assert out.returncode != 0 and f"set {missing}" in out.stderr, (missing, out.stderr)


# docker/compose.host.yml: the override for a Docker host without a bridge (the Docker tier runs it).
HOST_OVERRIDE = ROOT / "docker" / "compose.host.yml"
HOST_PORTS = {"CICD_REDIS_PORT": "21001", "CICD_POSTGRES_PORT": "21002", "CICD_FLOWER_PORT": "21003",
              "CICD_DASHBOARD_PORT": "21004"}


@pytest.fixture(scope="module")
def host_services() -> dict:
    if COMPOSE is None:
        pytest.skip(NO_COMPOSE)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CICD_", "FLOWER_", "COMPOSE_")) and k not in SECRETS}
    env.update(VARIABLES, **HOST_PORTS)
    out = subprocess.run([*COMPOSE, "-f", str(COMPOSE_FILE), "-f", str(HOST_OVERRIDE), "config"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"compose refuses the override:\n{out.stderr}"
    return yaml.safe_load(out.stdout.replace("$$", "$"))["services"]


def test_the_host_override_runs_everything_on_the_hosts_network_bound_to_loopback(host_services):
    running = {name: s for name, s in host_services.items() if "bridge-only" not in (s.get("profiles") or [])}
    assert {"flower-host", "dashboard-host"} <= set(running) and not {"flower", "dashboard"} & set(running)
    for name, service in running.items():
        assert service.get("network_mode") == "host", name
        assert not service.get("ports"), name  # host networking refuses published ports
        env = service.get("environment") or {}
        if service.get("image") == "cicd-heal:latest" and name != "redis":
            assert env["CICD_BROKER_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@127.0.0.1:21001/0", name
            assert env["CICD_DATABASE_URL"].endswith("@127.0.0.1:21002/cicd_{env}"), name
        # Only the agents' workers act on app processes; nothing else sees the host's processes.
        assert (service.get("pid") == "host") == name.startswith("worker-"), name
    redis = " ".join(running["redis"]["command"])
    assert 'requirepass "$REDIS_PASSWORD"' in redis and "bind 127.0.0.1" in redis and "port 21001" in redis
    assert "--address=127.0.0.1" in running["flower-host"]["command"]
    assert running["dashboard-host"]["command"][-3:] == ["127.0.0.1", "--port", "21004"]
    argv = " ".join(" ".join(s.get("command") or []) for s in running.values())
    for variable, secret in SECRETS.items():
        assert secret not in argv, variable


@pytest.mark.parametrize("agent", AGENTS)
def test_the_host_override_workers_run_what_cicd_up_runs_under_a_name_of_their_own(host_services, agent):
    service = host_services[f"worker-{agent}"]
    # docker/host-worker.sh adds `-m celery -A ... worker -n <a name with a random part>`.
    expected = cluster.worker_args("stage", agent, "NAME")
    at = expected.index("-n")
    assert expected[:5] == ["-m", "celery", "-A", "workers.app:celery_app", "worker"]
    assert service["command"] == ["sh", "/usr/local/bin/host-worker", agent, *expected[5:at], *expected[at + 2:]]
    assert service["environment"]["CICD_AGENT"] == agent
    assert "/tmp/celery-node" in " ".join(service["healthcheck"]["test"])
    script = (ROOT / "docker" / "host-worker.sh").read_text()
    assert 'exec python -m celery -A workers.app:celery_app worker -n "$node" "$@"' in script
