"""The Docker runtime's pure parts: the template rendered as a Dockerfile, how a container ended,
its cgroup's figures, what an image is built from, and what adoption accepts."""
from __future__ import annotations

import json
import os

from cicd.delivery import adoption, buildpack, onboarding
from cicd.runtime import docker as docker_runtime


def sample_spec():
    return {**onboarding.TEMPLATES["backend"], "name": "shop", "runtime": "backend"}


def run_lines(text: str) -> list[list[str]]:
    return [json.loads(line[4:]) for line in text.splitlines() if line.startswith("RUN ")]


def test_the_template_becomes_exec_form_steps_on_the_base_image():
    plan = buildpack.BuildPlan(python="python3", install=["-r", "requirements.txt"])
    text = docker_runtime.render_dockerfile(plan, sample_spec(), "python:3.12-slim", collectstatic=False)
    assert text.splitlines()[1] == "FROM python:3.12-slim"
    assert run_lines(text) == [["python3", "-m", "venv", "/app/.cicd/venv"],
                               ["pip", "install", "--no-cache-dir", "--disable-pip-version-check", "-r",
                                "requirements.txt"],
                               ["python", "-m", "compileall", "-q", "."]]


def test_without_dependencies_the_venv_has_no_pip_and_node_and_django_steps_come_when_asked():
    plan = buildpack.BuildPlan(python="python3", npm_install=["ci", "--no-audit", "--no-fund"], npm_build=True)
    text = docker_runtime.render_dockerfile(plan, sample_spec(), "base", collectstatic=True)
    runs = run_lines(text)
    assert runs[0] == ["npm", "ci", "--no-audit", "--no-fund"] and runs[1] == ["npm", "run", "build"]
    assert ["python3", "-m", "venv", "--without-pip", "/app/.cicd/venv"] in runs
    assert runs[-1] == ["python", "manage.py", "collectstatic", "--noinput"]
    assert "ENV NODE_ENV=production" in text


def test_how_a_container_ended_is_told_from_its_state():
    assert docker_runtime.describe({"ExitCode": 137})["exit"] == "was killed by SIGKILL"
    assert docker_runtime.describe({"ExitCode": 3}) == {"exit": "exited with code 3", "code": 3}
    assert "out of memory" in docker_runtime.describe({"ExitCode": 137, "OOMKilled": True})["exit"]
    assert docker_runtime.describe({})["exit"] == "exited"


def test_the_cgroup_of_a_process_of_this_machine_is_read_and_of_none_is_none():
    usage = docker_runtime.cgroup_usage(os.getpid())
    assert usage is not None and usage[0] > 0 and usage[1] > 0
    assert docker_runtime.cgroup_usage(0) is None and docker_runtime.cgroup_usage(2**22 + 1) is None


def test_the_source_digest_follows_the_files_and_the_dockerfile_but_not_other_build_files(tmp_path):
    (tmp_path / "server.py").write_text("print(1)\n")
    first = docker_runtime.source_digest(tmp_path)
    (tmp_path / ".cicd").mkdir()
    (tmp_path / ".cicd" / "venv-marker").write_text("x")
    assert docker_runtime.source_digest(tmp_path) == first
    (tmp_path / ".cicd" / "Dockerfile").write_text("FROM a\n")
    with_dockerfile = docker_runtime.source_digest(tmp_path)
    assert with_dockerfile != first
    (tmp_path / "server.py").write_text("print(2)\n")
    assert docker_runtime.source_digest(tmp_path) not in (first, with_dockerfile)


def test_an_adopted_replica_is_judged_by_its_own_health_check_unless_it_has_a_port():
    judged = docker_runtime.adopted_status
    assert judged(0, {"Pid": 5, "Health": {"Status": "healthy"}}, {}).status == "ok"
    assert judged(0, {"Pid": 5, "Health": {"Status": "unhealthy"}}, {}).status == "degraded"
    assert judged(0, {"Pid": 5, "Health": {"Status": "starting"}}, {}).status == "starting"
    assert judged(0, {"Pid": 5, "Health": {"Status": "unhealthy"}}, {"port": 8080}) is None
    assert judged(0, {"Pid": 5}, {}) is None


def test_adoption_refuses_a_bad_port_and_path_naming_the_field_and_rule():
    assert [(r.field, r.rule) for r in adoption.check_port(70000)] == [("port", "range")]
    assert adoption.check_port(8080) == [] and adoption.check_port(None) == []
    assert [(r.field, r.rule) for r in adoption.check_health_path("health")] == [("health_path", "pattern")]
    assert [(r.field, r.rule) for r in adoption.check_health_path("/a b")] == [("health_path", "pattern")]
    assert adoption.check_health_path("/healthz?full=1") == []


def test_an_adopted_container_without_a_memory_limit_is_never_restarted_for_its_memory():
    class S:
        env = "stage"
    found = [{"name": "a", "image": "img", "health_check": True, "memory_limit_mb": 0, "container": "x"}]
    spec = adoption.spec_of(S, "a", found, None, None)
    assert spec["memory_limit_mb"] == 0 and spec["probe"] == "docker health check" and spec["port"] is None
    assert adoption.spec_of(S, "a", found, 8080, None)["health_path"] == "/"

