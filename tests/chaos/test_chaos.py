"""The chaos run at the size `make test` can afford (`make chaos` runs a bigger one)."""
from __future__ import annotations

import json

import pytest

from tests.chaos import harness
from tests.conftest import REPORTS

pytestmark = pytest.mark.integration


def test_nothing_is_lost_and_nothing_happens_twice_while_workers_and_the_broker_die(tmp_path):
    report = harness.run(apps=12, faults=20, kill_every=2.0, chaos_s=15.0, redis_kills=1, seed=11, home=tmp_path)
    REPORTS.append(report.table())
    summary = json.loads(report.table().splitlines()[-1])
    assert summary == report.summary()
    assert report.sent == 20 and report.ended >= report.sent
    assert report.lost == 0
    assert report.duplicate_effects == 0
    assert report.worker_kills >= 5 and report.broker_restarts == 1
    assert report.proof_ok, report.proof
