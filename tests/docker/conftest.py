"""The Docker tier: a real dockerd of the suite's own (tests/dockerd.py) and a base image made
here. Every test in it is marked `docker`; where no daemon can start, they skip with the reason."""
from __future__ import annotations

import os

import pytest

from tests import dockerd as dockerd_support
from tests.integration.conftest import started_stack


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/docker/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def dockerd():
    try:
        daemon = dockerd_support.Dockerd().start()
    except dockerd_support.Unavailable as why:
        pytest.skip(f"no Docker daemon: {why}")
    try:
        daemon.base_image()
    except dockerd_support.Unavailable as why:
        daemon.stop()
        pytest.skip(f"no base image: {why}")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def stack(dockerd, tmp_path_factory):
    """The whole embedded stack (`cicd up`) on the Docker runtime, against the tier's daemon."""
    saved = {k: os.environ.get(k) for k in ("DOCKER_HOST", "CICD_RUNTIME", "CICD_DOCKER_BASE_IMAGE")}
    os.environ.update({**dockerd.env, "CICD_RUNTIME": "docker", "CICD_DOCKER_BASE_IMAGE": dockerd.base_image()})
    try:
        with started_stack(tmp_path_factory.mktemp("docker-stack")) as running:
            yield running
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
