"""celeryconfig.py: the Celery configuration is a function of Settings (and of the agent a process
serves), read when Celery first needs it; the benchmark's no-op tasks load only into bench workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import celeryconfig
from cicd.config import AGENTS, Settings

ROOT = Path(__file__).resolve().parents[2]


def test_two_settings_give_two_configurations_side_by_side(tmp_path):
    dev = celeryconfig.celery_config(Settings(env="dev", home=tmp_path, probe_interval_s=0.5), "deploy")
    prod = celeryconfig.celery_config(Settings(env="prod", home=tmp_path, probe_interval_s=2.0), "detect")
    # Each environment's beat sends its own probes, at its own interval.
    assert set(dev["beat_schedule"]) == {"dev-housekeeping", "dev-probe-apps"}
    assert prod["beat_schedule"]["prod-probe-apps"]["schedule"] == 2.0
    assert dev["beat_schedule"]["dev-probe-apps"]["schedule"] == 0.5
    # A task without an env argument goes to the queue of the sender's environment.
    (dev_route,), (prod_route,) = dev["task_routes"], prod["task_routes"]
    assert dev_route("cicd.detect.classify", (), {}, {}) == {"queue": "dev.detect"}
    assert prod_route("cicd.detect.classify", (), {}, {}) == {"queue": "prod.detect"}
    # ...and one with it, to the queue of the message's environment, whoever sends it.
    assert dev_route("cicd.decide.choose", (), {"env": "stage"}, {}) == {"queue": "stage.decide"}
    # Each agent restores only its own unacked messages, after a timeout longer than its tasks may run.
    assert dev["imports"] == ("workers.deploy",) and prod["imports"] == ("workers.detect",)
    assert (dev["task_time_limit"], prod["task_time_limit"]) == (600, 30)
    for config, agent in ((dev, "deploy"), (prod, "detect")):
        options = config["broker_transport_options"]
        assert options["visibility_timeout"] > config["task_time_limit"] > config["task_soft_time_limit"]
        assert options["unacked_key"] == f"unacked:{agent}"


def test_a_publishing_process_loads_no_tasks_and_waits_longest(tmp_path):
    config = celeryconfig.celery_config(Settings(env="stage", home=tmp_path), "", bench_tasks=True)
    assert config["imports"] == ()
    assert config["broker_transport_options"]["unacked_key"] == "unacked:any"
    assert config["task_time_limit"] == 600


def test_the_broker_is_the_settings_one(tmp_path):
    config = celeryconfig.celery_config(Settings(env="stage", home=tmp_path,
                                                 broker_url_override="redis://broker.invalid:6380/2"), "detect")
    assert config["broker_url"] == config["result_backend"] == "redis://broker.invalid:6380/2"


def python(code: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CICD_", "FLOWER_"))}
    env.update({"CICD_HOME": str(tmp_path), **variables})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_importing_the_configuration_reads_no_settings(tmp_path):
    """With settings that cannot load, the modules still import; the error comes when Celery needs them."""
    out = python("import celeryconfig, workers.app\n"
                 "print('imported')\n"
                 "workers.app.celery_app.conf.broker_url\n", tmp_path, CICD_ENV="nowhere")
    assert out.stdout == "imported\n"
    assert out.returncode != 0 and "ConfigError: environment 'nowhere'" in out.stderr


# What a worker does at start-up before it consumes (celery.worker.WorkController.setup_instance).
REGISTERED = ("import json\nfrom workers.app import celery_app\ncelery_app.loader.init_worker()\n"
              "print(json.dumps(sorted(celery_app.tasks)))\n")


def registered_tasks(tmp_path: Path, **variables: str) -> list[str]:
    out = python(REGISTERED, tmp_path, **variables)
    assert out.returncode == 0, out.stderr
    return [name for name in json.loads(out.stdout) if name.startswith("cicd.")]


def test_a_production_worker_registers_its_agent_tasks_and_no_noop(tmp_path):
    for agent in ("detect", "monitor"):
        tasks = registered_tasks(tmp_path, CICD_AGENT=agent)
        assert tasks and all(name.startswith(f"cicd.{agent}.") for name in tasks), tasks
        assert not [name for name in tasks if name.endswith(".noop")], tasks


def test_a_bench_worker_registers_the_noop_of_every_agent_too(tmp_path):
    production = registered_tasks(tmp_path, CICD_AGENT="decide")
    bench = registered_tasks(tmp_path, CICD_AGENT="decide", CICD_BENCH_TASKS="1")
    assert sorted(bench) == sorted(production + [f"cicd.{agent}.noop" for agent in AGENTS])
