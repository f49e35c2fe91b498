"""A stack the CLI did not start (docker-compose, other hosts) is up when a worker of the environment
answers; without CICD_BROKER_URL only `cicd up`'s own record counts, and nothing is asked."""
from __future__ import annotations

import pytest

from cicd.cli import context
from cicd.config import Settings
from cicd.stack import cluster


class Plane:
    def __init__(self, answer):
        self.answer = answer

    def answering(self, timeout: float) -> set[str]:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_without_a_broker_url_only_the_local_record_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(context, "control_plane", lambda settings: pytest.fail("asked the broker"))
    assert context.stack_is_up(Settings(env="stage", home=tmp_path)) is False
    with pytest.raises(cluster.StackDown):
        context.require_stack(Settings(env="stage", home=tmp_path))


@pytest.mark.parametrize("answer, up", [
    ({"stage-deploy-1a2b3c4d@vm", "stage-monitor-99@vm"}, True),
    ({"prod-deploy-1a2b3c4d@vm"}, False),   # another environment's workers do not count
    (set(), False),
    (cluster.StackDown("stage", "its broker does not answer"), False),
])
def test_with_a_broker_url_a_worker_of_the_environment_that_answers_is_enough(tmp_path, monkeypatch, answer, up):
    monkeypatch.setattr(context, "control_plane", lambda settings: Plane(answer))
    settings = Settings(env="stage", home=tmp_path, broker_url_override="redis://127.0.0.1:1/0")
    assert context.stack_is_up(settings) is up
