"""Queue and task names are contracts: every task has an explicit name and a route to its agent."""
from __future__ import annotations

import importlib

import pytest
from celery import Task

import beat_schedule
import celeryconfig
from cicd.config import AGENTS, ENVIRONMENTS, Settings
from workers.app import celery_app

AGENT_MODULES = {agent: f"workers.{agent}" for agent in AGENTS}


def tasks_defined_in(module_name: str) -> list[Task]:
    importlib.import_module(module_name)
    celery_app.finalize()
    return [task for task in celery_app.tasks.values() if task.__module__ == module_name]


@pytest.mark.parametrize("agent", AGENTS)
def test_every_task_has_an_explicit_name_of_its_agent(agent):
    tasks = tasks_defined_in(AGENT_MODULES[agent])
    assert tasks, f"workers/{agent}.py defines no task"
    for task in tasks:
        # Celery's automatic name would be "workers.<module>.<function>": ours are chosen, stable.
        assert task.name.startswith(f"cicd.{agent}."), task.name
        assert task.name.count(".") == 2
        assert celery_app.tasks[task.name] is task


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_every_task_routes_to_its_agent_queue_in_the_message_environment(env):
    names = [t.name for agent in AGENTS for t in tasks_defined_in(AGENT_MODULES[agent])]
    for name in names:
        agent = name.split(".")[1]
        route = celeryconfig.route_task(name, (), {"env": env}, {})
        assert route == {"queue": f"{env}.{agent}"}, name
    assert celeryconfig.route_task("something.else", (), {}, {}) is None


def test_every_task_of_the_workers_package_is_in_an_agent_module():
    ours = {t.name for agent in AGENTS for t in tasks_defined_in(AGENT_MODULES[agent])}
    in_workers = {t.name for t in celery_app.tasks.values() if t.__module__.startswith("workers.")}
    named_cicd = {name for name in celery_app.tasks if name.startswith("cicd.")}
    assert in_workers == ours == named_cicd


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_beat_entries_go_to_the_monitor_queue_and_expire(env):
    schedule = beat_schedule.build(Settings(env=env))
    assert schedule
    for entry in schedule.values():
        assert entry["task"] in celery_app.tasks
        assert entry["options"]["queue"] == f"{env}.monitor"
        assert 0 < entry["options"]["expires"] <= entry["schedule"]
        assert entry["kwargs"]["env"] == env


def test_reliability_settings_are_on():
    conf = celery_app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"]
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
