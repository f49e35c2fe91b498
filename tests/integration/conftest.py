"""A real stack for the integration tests: Redis, six agent workers and beat, started by `cicd up`
in a private CICD_HOME, driven through the real `cicd` command, stopped by `cicd down --apps`."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cicd.stack import cluster
from cicd.store import proof, reports
from cicd.config import Settings
from cicd.runtime import make_runtime
from cicd.runtime.local import LocalRuntime

CICD = Path(sys.executable).with_name("cicd")
# Faster probes than the default 1 s, and shorter waits for slow deploys, so the suite stays
# short; everything else is as shipped.
STACK_ENV = {"CICD_ENV": "stage", "CICD_PROBE_INTERVAL": "0.5", "CICD_VERIFY_TIMEOUT": "6", "CICD_SLOW_DEPLOY": "3",
             "CICD_BACKOFF_BASE": "1", "CICD_BACKOFF_MAX": "4", "CICD_BACKOFF_RESET": "20"}


@dataclass
class Stack:
    home: Path

    @property
    def settings(self) -> Settings:
        return Settings.load("stage")

    @property
    def runtime(self) -> LocalRuntime:
        return make_runtime(self.settings)   # the stack's own: local processes, or containers

    def cicd(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        out = subprocess.run([str(CICD), *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
        if check and out.returncode != 0:
            raise AssertionError(f"cicd {' '.join(args)} exited {out.returncode}\n--- stdout\n{out.stdout}\n"
                                 f"--- stderr\n{out.stderr}")
        return out

    def events(self, name: str | None = None, incident_id: str | None = None) -> list[dict]:
        rows = proof.records_since(self.settings, 0)
        return [r for r in rows if (name is None or r["event_name"] == name)
                and (incident_id is None or r["incident_id"] == incident_id)]

    def wait_steady(self, app: str, timeout: float = 60, env: str = "stage") -> None:
        settings = self.settings.for_env(env)
        runtime = make_runtime(settings)
        deadline = time.monotonic() + timeout
        while not reports.steady(settings, runtime, app):
            if time.monotonic() > deadline:
                raise AssertionError(f"{app} not steady within {timeout} s: {reports.apps(settings, runtime)}")
            time.sleep(0.2)

    @contextlib.contextmanager
    def other_env(self, env: str, **variables: str):
        """Another environment's stack beside stage (same Redis), started with extra variables;
        stopped when the block ends."""
        saved = {k: os.environ.get(k) for k in variables}
        os.environ.update(variables)
        try:
            self.cicd("up", "--env", env)
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
        try:
            yield self.settings.for_env(env)
        finally:
            self.cicd("down", "--env", env, check=False)

    def repo_url(self, name: str) -> str:
        """A real git repository of the sample service, served over loopback HTTP."""
        return f"{cluster.example_git_server(self.settings, [name])}/{name}.git"

    def onboard(self, name: str, env: str = "stage") -> None:
        settings = self.settings.for_env(env)
        if name not in LocalRuntime(settings).apps():
            self.cicd("onboard", name, "--repo", self.repo_url(name), "--runtime", "backend", "--env", env)
        self.wait_steady(name, env=env)


@contextlib.contextmanager
def started_stack(home: Path, *up_args: str):
    """`cicd up [up_args]` in a private home with the suite's settings; `cicd down --apps` after,
    and the environment as it was (another stack's, if one is running)."""
    saved = dict(os.environ)
    os.environ.update({**STACK_ENV, "CICD_HOME": str(home)})
    # Always our own broker and credentials, never a developer's.
    for name in ("CICD_BROKER_URL", "CICD_DEMO_MODE", "CICD_FLOWER_USER", "CICD_FLOWER_PASSWORD_FILE"):
        os.environ.pop(name, None)
    running = Stack(home)
    try:
        running.cicd("up", *up_args)
        yield running
    finally:
        running.cicd("down", "--apps", check=False)
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    with started_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running
