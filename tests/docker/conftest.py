"""The Docker tier: a real dockerd of the suite's own (tests/dockerd.py) and a base image made
here. Every test in it is marked `docker`; where no daemon can start, they skip with the reason."""
from __future__ import annotations

import pytest

from tests import dockerd as dockerd_support


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
