"""The embedded stack as components: the walks start each component after what it requires, stop
in reverse, act per environment where a component is per environment, and let an inessential
component fail without keeping the rest from starting. `down` is walked over real (sleeping)
processes recorded as the stack's; starting the real stack is tests/integration/test_stack.py's."""
from __future__ import annotations

import json
import sys

import pytest

from cicd.config import AGENTS, Settings
from cicd.runtime import process
from cicd.stack import cluster
from cicd.stack.component import Component, in_start_order, in_stop_order, start_all, stop_all
from cicd.stack.record import Context, StackError, read_stack, write_stack


def test_the_stack_starts_each_component_after_what_it_requires_and_stops_in_reverse():
    order = [c.name for c in in_start_order(cluster.components())]
    assert order == ["redis", "caddy", "gitserver", "workers", "beat", "watcher", "supervisor", "flower"]
    for i, component in enumerate(in_start_order(cluster.components())):
        assert set(component.requires) <= set(order[:i]), component.name
    assert [c.name for c in in_stop_order(cluster.components())] == order[::-1]


class Recording(Component):
    """A component that notes each step done to it, in one journal shared by the walk's components."""

    def __init__(self, name, journal, requires=(), per_env=False, essential=True, fails=False):
        self.name, self.requires, self.per_env, self.essential = name, tuple(requires), per_env, essential
        self.journal, self.fails = journal, fails

    def start(self, ctx):
        self.journal.append(("start", self.name, ctx.settings.env if self.per_env else "*"))
        if self.fails:
            raise StackError(f"{self.name} cannot start")

    def stop(self, ctx):
        self.journal.append(("stop", self.name, ctx.settings.env if self.per_env else "*"))
        return 1


def context(tmp_path) -> Context:
    return Context(Settings(env="stage", home=tmp_path), {}, say=lambda text: None)


def test_requirements_decide_the_order_whatever_the_listing(tmp_path):
    journal = []
    listed = [Recording("beat", journal, ["workers"]), Recording("workers", journal, ["redis"]),
              Recording("redis", journal)]
    assert [c.name for c in in_start_order(listed)] == ["redis", "workers", "beat"]
    assert [c.name for c in in_stop_order(listed)] == ["beat", "workers", "redis"]


def test_a_missing_requirement_or_a_cycle_is_refused():
    with pytest.raises(StackError, match="beat requires workers, which is not a component"):
        in_start_order([Recording("beat", [], ["workers"])])
    with pytest.raises(StackError, match="a, b go round in a cycle"):
        in_start_order([Recording("a", [], ["b"]), Recording("b", [], ["a"]), Recording("c", [])])


def test_per_environment_components_are_walked_once_per_environment(tmp_path):
    journal = []
    parts = [Recording("redis", journal), Recording("workers", journal, ["redis"], per_env=True)]
    assert stop_all(parts, context(tmp_path), ["dev", "stage"], whole_stack=False) == 2
    assert journal == [("stop", "workers", "dev"), ("stop", "workers", "stage")]
    journal.clear()
    assert stop_all(parts, context(tmp_path), ["dev"], whole_stack=True) == 2
    assert journal == [("stop", "workers", "dev"), ("stop", "redis", "*")]


def test_an_inessential_failure_lets_the_rest_start_and_is_returned(tmp_path):
    journal, records = [], []
    parts = [Recording("redis", journal), Recording("flower", journal, ["redis"], essential=False, fails=True),
             Recording("workers", journal, ["redis"], per_env=True)]
    failed = start_all(parts, context(tmp_path), ["stage"], record=lambda: records.append(len(journal)))
    assert [step[1] for step in journal] == ["redis", "flower", "workers"]
    assert list(failed) == ["flower"] and "flower cannot start" in str(failed["flower"])
    assert records == [1, 2, 3]  # the record is written after every start, failed or not


def test_an_essential_failure_stops_the_walk(tmp_path):
    journal = []
    parts = [Recording("redis", journal, fails=True), Recording("workers", journal, ["redis"], per_env=True)]
    with pytest.raises(StackError, match="redis cannot start"):
        start_all(parts, context(tmp_path), ["stage"], record=lambda: None)
    assert [step[1] for step in journal] == ["redis"]


def test_scale_is_checked_before_anything_starts():
    with pytest.raises(StackError, match="agent must be one of"):
        cluster.components({"nobody": 2})
    with pytest.raises(StackError, match="replicas must be 1-16"):
        cluster.components({"decide": 17})


def sleeper(settings: Settings, name: str) -> dict:
    pid, ticks = process.spawn_detached([sys.executable, "-c", "import time; time.sleep(600)"],
                                        str(settings.home), {}, str(settings.home / "logs" / f"{name}.log"))
    return {"pid": pid, "ticks": ticks, "log": str(settings.home / "logs" / f"{name}.log")}


@pytest.fixture
def recorded_stack(tmp_path):
    """var/stack.json naming live processes as the stack's (sleepers standing in for each)."""
    settings = Settings(env="stage", home=tmp_path)
    settings.var_dir.mkdir(parents=True)
    envs = {}
    for env in ("dev", "stage"):
        envs[env] = {"workers": [{**sleeper(settings, f"{env}-{agent}"), "agent": agent, "index": 1,
                                  "node": f"{env}-{agent}-1@host"} for agent in AGENTS],
                     "beat": sleeper(settings, f"{env}-beat"), "watcher": sleeper(settings, f"{env}-watcher")}
    stack = {"envs": envs, "redis": {**sleeper(settings, "redis"), "port": 6390},
             "gitserver": {**sleeper(settings, "git"), "port": 8470}, "supervisor": None,
             "flower": {**sleeper(settings, "flower"), "port": 5560}}
    write_stack(settings, stack)
    everything = [e for section in envs.values() for e in [*section["workers"], section["beat"], section["watcher"]]]
    everything += [stack["redis"], stack["gitserver"], stack["flower"]]
    yield settings, everything
    process.stop_all([(e["pid"], e["ticks"]) for e in everything], grace_s=1)


def test_down_of_one_environment_leaves_the_others_and_the_shared_parts(recorded_stack):
    settings, everything = recorded_stack
    said = []
    assert cluster.down(settings, "dev", say=said.append) == len(AGENTS) + 2
    assert said == ["stopped dev: 6 workers and beat"]
    record = read_stack(settings)
    assert list(record["envs"]) == ["stage"]
    running = [e for e in everything if process.is_alive(e["pid"], e["ticks"])]
    assert len(running) == len(AGENTS) + 2 + 3  # stage's workers, beat and watcher; redis, git, flower


def test_down_of_everything_stops_in_reverse_order_and_keeps_the_ports(recorded_stack):
    settings, everything = recorded_stack
    said = []
    # Every worker, beat and watcher of both environments, Flower and Redis (the git server is not counted).
    assert cluster.down(settings, say=said.append) == 2 * (len(AGENTS) + 2) + 2
    assert said[0] == "stopped flower"
    assert said[1:3] == ["stopped dev: 6 workers and beat", "stopped stage: 6 workers and beat"]
    assert said[3] == "stopped the example git server"
    assert said[4].startswith("stopped redis (pid ")
    assert not [e for e in everything if process.is_alive(e["pid"], e["ticks"])]
    record = json.loads(settings.stack_file.read_text())
    assert record["envs"] == {} and record["supervisor"] is None
    # The next `up` comes back on the same ports.
    assert (record["redis"], record["gitserver"], record["flower"]) == ({"port": 6390}, {"port": 8470}, {"port": 5560})


def test_ready_says_whether_what_the_record_names_runs_and_answers(recorded_stack):
    settings, everything = recorded_stack
    stack = read_stack(settings)
    answering = {w["node"] for w in stack["envs"]["stage"]["workers"]}
    ctx = Context(settings, stack, say=lambda text: None, ping=lambda nodes, timeout: answering & set(nodes))
    parts = {c.name: c for c in cluster.components()}
    for name in ("redis", "gitserver", "workers", "beat", "watcher"):
        assert parts[name].ready(ctx), name
    assert not parts["supervisor"].ready(ctx)  # the record names none
    answering.discard(f"stage-{AGENTS[0]}-1@host")
    assert not parts["workers"].ready(ctx)  # one replica does not answer
    process.stop(stack["redis"]["pid"], stack["redis"]["ticks"], grace_s=1)
    assert not parts["redis"].ready(ctx)
