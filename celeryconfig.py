"""Celery configuration: the agents and their queues, task routes, and every reliability setting.

Queue and task names are contracts. Each agent is a queue named {env}.{agent}; a task's agent is
the second part of its name (cicd.<agent>.<verb>), and its environment is the `env` argument
every task takes, so a message always lands in the queue of the environment it belongs to.

The configuration is a function of the Settings it is for (and of the agent the process serves),
so importing this module reads nothing: workers/app.py calls celery_config() when Celery first
needs its configuration, and a test can build the configuration of any environment side by side.
"""
from __future__ import annotations

import functools

from cicd.config import AGENTS, Settings

import beat_schedule

# The tasks `cicd bench` chains as its bare-Celery baseline: loaded only into the bench's workers.
BENCH_TASKS = "workers.bench"


def agent_of(task_name: str) -> str | None:
    parts = task_name.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "cicd" and parts[1] in AGENTS else None


# The tasks of a host agent ({env}.host.{name}): its own (workers/host.py), and the deploy agent's,
# which it runs for the apps placed on its host (a release is built where it will run).
HOST_AGENT = "host"
HOST_AGENT_IMPORTS = ("workers.host", "workers.deploy")


def route_task(name, args, kwargs, options, task=None, default_env: str | None = None, **kw):
    """One place maps tasks to agents: the queue of the task's agent in the message's environment
    (its `env` argument), else in the environment of the process that sends it (default_env).
    A task sent with a `host` argument goes to that host's agent instead: {env}.host.{host}."""
    kwargs = kwargs or {}
    env = kwargs.get("env") or default_env
    if env is None:
        return None
    if kwargs.get("host") and name.startswith("cicd."):
        return {"queue": f"{env}.host.{kwargs['host']}"}
    agent = agent_of(name)
    if agent is None:
        return None
    return {"queue": f"{env}.{agent}"}


def celery_config(settings: Settings, agent: str = "", bench_tasks: bool = False) -> dict:
    """The Celery configuration of a process of settings.env that serves agent ("" for the CLI, beat
    and Flower, which only publish or watch); bench_tasks adds the benchmark's no-op tasks."""
    # A worker loads its own agent's tasks (CICD_AGENT, set by `cicd up` and the compose file) and
    # so only the domain code it needs. Everything else (commands, beat) sends tasks by name and
    # loads none: every task sent anywhere is named in workers/chains.py or by its caller.
    imports = (f"workers.{agent}",) if agent in AGENTS else HOST_AGENT_IMPORTS if agent == HOST_AGENT else ()
    if imports and bench_tasks:
        imports += (BENCH_TASKS,)
    # A host agent's bookkeeping keys are its own host's: it restores only what it was handed.
    keys_of = f"host.{settings.host_name}" if agent == HOST_AGENT else agent or "any"
    # Redis re-delivers a message a dead worker held once its visibility timeout runs out. It must be
    # longer than any task and any countdown, or a slow task runs twice at once; it should be short, or
    # a killed worker's work waits. So per agent, each with its own bookkeeping keys (a worker only
    # ever restores its own agent's messages): deploys may take minutes, everything else seconds.
    long_running = agent in ("deploy", HOST_AGENT, "")  # "": the CLI and beat publish only; they restore nothing
    time_limit = 600 if long_running else 30
    return {
        # -- broker and results ----------------------------------------------------------------
        "broker_url": settings.broker_url,
        # Results are off by default: the chain passes values along itself, and nothing reads them.
        # Only tasks a command waits on (onboarding) turn them on.
        "result_backend": settings.broker_url,
        "task_ignore_result": True,
        "result_expires": 3600,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],  # never pickle: a message must not be able to run code
        "timezone": "UTC",
        "enable_utc": True,

        # -- routing ---------------------------------------------------------------------------
        "task_routes": (functools.partial(route_task, default_env=settings.env),),
        "imports": imports,
        "task_create_missing_queues": True,
        # A task without a route would land in a queue nobody consumes; make that queue's name say so.
        "task_default_queue": "unrouted",

        # -- reliability (each line: why) ------------------------------------------------------
        # Ack after the task ran, not before: a worker that dies mid-task leaves the message to be redone.
        "task_acks_late": True,
        # ...and when a pool child is killed, requeue its message instead of marking it failed.
        "task_reject_on_worker_lost": True,
        # Take one message at a time: a busy agent must not hoard work another replica could do now.
        "worker_prefetch_multiplier": 1,
        # A task that outlives its agent's limit is stopped: before Redis would hand it out again.
        "task_time_limit": time_limit,
        # ...and warned ten seconds before, so it can end cleanly.
        "task_soft_time_limit": time_limit - 10,
        "broker_transport_options": {
            # Longer than the task's time limit: a message is only re-delivered once its task is over.
            "visibility_timeout": time_limit + 60,
            "unacked_key": f"unacked:{keys_of}",
            "unacked_index_key": f"unacked_index:{keys_of}",
            "unacked_mutex_key": f"unacked_mutex:{keys_of}",
        },
        # The broker may come up after the workers (compose, restarts): keep trying, loudly, at start-up.
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # On connection loss, late-acked tasks will be redelivered anyway: stop them rather than finish twice.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Publishing retries, then raises: a send that cannot be done fails the task that made it.
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 5, "interval_start": 0.1, "interval_step": 0.5,
                                      "interval_max": 2.0},

        # -- beat ------------------------------------------------------------------------------
        "beat_schedule": beat_schedule.build(settings),
        "beat_max_loop_interval": 1.0,
        # Beat must never run twice (every probe would go out twice): it holds a lock in Redis while it
        # runs, and a second beat for the same environment refuses to start (workers/beat.py).
        "beat_scheduler": "workers.beat:SingleBeatScheduler",
    }
