"""A real Node app, written here as a git repo, deployed by the buildpack conventions through the
local runtime: an Express app started with `npm start`, express installed from the real npm
registry through the shared npm cache (var/cache/npm). No stack needed, as in test_real_apps.

The first release has no lockfile (`npm install`, cold cache); the second, the same commit,
installs from the warm cache without asking the registry (npm's own debug log says so); then the
lockfile npm wrote is committed and the third release installs it with `npm ci`. Build times
are printed (pytest -s), never asserted.
"""
from __future__ import annotations

import shutil
import time
import urllib.request

import pytest

from cicd.delivery import examples, gitsource, onboarding
from tests.integration.test_real_apps import deploy, git_repo, git_server, runtime, wait_for  # noqa: F401

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("npm") is None,
                                 reason="npm is not installed: the Node toolchain (frontend template) cannot run")]

EXPRESS_APP = {
    "package.json": '{\n  "name": "express-hello",\n  "version": "1.0.0",\n  "private": true,\n'
                    '  "scripts": {"start": "node server.js"},\n  "dependencies": {"express": "^4.21.0"}\n}\n',
    "server.js": "const express = require('express');\nconst app = express();\n"
                 "app.get('/', (req, res) => res.send('hello from express'));\n"
                 # Blocks the event loop for 30 ms, as synchronous work does, so requests queue
                 # (a setTimeout never would). Atomics.wait sleeps without the CPU: a busy loop would
                 # keep each replica's CPU at 100% under any closed-loop load, however many replicas.
                 "const cell = new Int32Array(new SharedArrayBuffer(4));\n"
                 "app.get('/slow', (req, res) => { Atomics.wait(cell, 0, 0, 30); res.send('slow hello from express'); });\n"
                 "app.listen(Number(process.env.PORT), process.env.HOST, () => console.log('listening'));\n",
}


def healthy(runtime, app: str, number: int | None = None):
    statuses = runtime.probe_release(app, number) if number else runtime.probe([app])[app]
    return statuses and all(s.healthy for s in statuses) and statuses


def test_an_express_app_installs_from_npm_serves_crashes_and_restarts(tmp_path, git_server, runtime):
    repo = git_repo(tmp_path / "git", "express-hello", EXPRESS_APP)
    url = f"{git_server['url']}/{repo}"
    spec = onboarding.generate_spec("express-hello", url, "frontend", "stage")
    mirror = tmp_path / "mirror.git"
    gitsource.fetch(url, mirror)

    cold = deploy(runtime, spec, 1, mirror, gitsource.resolve(mirror, "main"), tmp_path / "incoming-1")
    logs = runtime.app_dir("express-hello") / "logs"
    assert "npm install --no-audit --no-fund" in (logs / "build-1.log").read_text()
    gate_started = time.monotonic()
    seen = wait_for(lambda: healthy(runtime, "express-hello", 1), timeout=60)
    gate_s = time.monotonic() - gate_started
    runtime.activate_release("express-hello", 1)
    assert len(seen) == spec["replicas"]
    for status in seen:
        assert urllib.request.urlopen(f"http://127.0.0.1:{status.port}/", timeout=5).read() == b"hello from express"
    release_dir = runtime.app_dir("express-hello") / "releases" / "1"
    assert (release_dir / "node_modules" / "express" / "package.json").is_file()
    assert (runtime.settings.var_dir / "cache" / "npm" / "_cacache").is_dir()  # the shared cache was filled

    # Crash one replica: it is down, and a restart (what the healing chain runs) brings it back.
    crashed = runtime.inject("express-hello", "crash", slot=0)
    assert not runtime.probe(["express-hello"])["express-hello"][0].alive
    runtime.restart("express-hello", [crashed["slot"]], op_key="heal-1")
    back = wait_for(lambda: healthy(runtime, "express-hello"), timeout=30)
    assert back[0].pid != crashed["pid"]
    assert urllib.request.urlopen(f"http://127.0.0.1:{back[0].port}/", timeout=5).read() == b"hello from express"

    # A redeploy of the same dependencies: a new node_modules, filled from the shared cache.
    sha = gitsource.resolve(mirror, "main")
    warm = deploy(runtime, spec, 2, mirror, sha, tmp_path / "incoming-2")
    misses = [line for line in npm_debug_log(runtime, "install").splitlines() if "(cache miss)" in line]
    assert not misses, f"the warm build went to the registry: {misses[:3]}"
    wait_for(lambda: healthy(runtime, "express-hello", 2), timeout=60)
    runtime.activate_release("express-hello", 2)

    # Commit the lockfile npm wrote: the next release is `npm ci`.
    work = tmp_path / "git" / "express-hello-work"
    shutil.copy(release_dir / "package-lock.json", work / "package-lock.json")
    examples._git(work, "add", "package-lock.json")
    examples._git(work, "commit", "--quiet", "-m", "lockfile")
    examples._git(work, "push", "--quiet", str(tmp_path / "git" / repo), "main")
    examples._git(tmp_path / "git" / repo, "update-server-info")
    gitsource.fetch(url, mirror)
    locked = deploy(runtime, spec, 3, mirror, gitsource.resolve(mirror, "main"), tmp_path / "incoming-3")
    assert "npm ci --no-audit --no-fund" in (logs / "build-3.log").read_text()
    wait_for(lambda: healthy(runtime, "express-hello", 3), timeout=60)
    runtime.activate_release("express-hello", 3)
    assert urllib.request.urlopen(f"http://127.0.0.1:{runtime.replicas('express-hello')[0]['port']}/",
                                  timeout=5).read() == b"hello from express"
    print(f"\nexpress build (stage_release): cold cache {cold:.1f} s (npm install), warm cache {warm:.1f} s "
          f"(npm install), first npm ci after committing the lockfile {locked:.1f} s; "
          f"health gate after the cold build {gate_s:.1f} s")


def npm_debug_log(runtime, command: str) -> str:
    """npm's own debug log of its latest `npm COMMAND` run, kept in the shared cache's _logs."""
    logs = sorted((runtime.settings.var_dir / "cache" / "npm" / "_logs").glob("*-debug-*.log"))
    for log in reversed(logs):
        text = log.read_text(errors="replace")
        if f'verbose argv "{command}"' in text:
            return text
    raise AssertionError(f"no npm {command} debug log among {[p.name for p in logs]}")
