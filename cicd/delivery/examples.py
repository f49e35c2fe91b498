"""Example git repositories of the sample service, served over loopback HTTP.

The demo and the tests deploy real git revisions fetched over http, so they need a git server
that runs anywhere: a bare repository with `git update-server-info` is enough for git's "dumb
HTTP" protocol, and any static file server can serve it (here Python's http.server).

Each example repository has, besides `main`, four branches that misbehave on purpose:
  cicd-inject/slow     takes `slow_delay_s` to start listening (a slow deploy)
  cicd-inject/broken   does not compile (a failed deploy: the build fails)
  cicd-inject/crashy   passes its health gate, then dies after a few seconds (a bad release)
  cicd-inject/stubborn ignores SIGTERM, so replacing it takes the whole stop grace period
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from cicd.runtime import process

SAMPLE_SERVICE = Path(__file__).resolve().parents[2] / "examples" / "sample_service"
INJECT_REFS = {"slow-deploy": "cicd-inject/slow", "failed-deploy": "cicd-inject/broken",
               "bad-release": "cicd-inject/crashy"}
# Fixed author and dates: the same example repository always has the same commit ids.
_GIT_ENV = {"GIT_AUTHOR_NAME": "cicd-heal", "GIT_AUTHOR_EMAIL": "examples@cicd-heal.invalid",
            "GIT_COMMITTER_NAME": "cicd-heal", "GIT_COMMITTER_EMAIL": "examples@cicd-heal.invalid",
            "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}


def _git(cwd: Path, *args: str) -> str:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), **_GIT_ENV}
    out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"git {args[0]} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def make_repo(root: Path, name: str, slow_delay_s: float = 15.0, crash_after_s: float = 4.0) -> Path:
    """Create (or recreate) root/NAME.git: the sample service on main, plus the inject branches."""
    bare = root / f"{name}.git"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        shutil.copytree(SAMPLE_SERVICE, work, ignore=shutil.ignore_patterns("__pycache__"))
        _git(work, "init", "--quiet", "--initial-branch=main")
        _git(work, "add", "-A")
        _git(work, "commit", "--quiet", "-m", "sample service")
        server = (work / "server.py").read_text()
        graceful = "signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())"
        if graceful not in server:
            raise RuntimeError("sample_service/server.py: its SIGTERM handler changed; update cicd-inject/stubborn")
        variants = {
            "cicd-inject/slow": ("startup_delay_s", f"{slow_delay_s}\n", "start slowly"),
            "cicd-inject/crashy": ("crash_after_s", f"{crash_after_s}\n", "die soon after start"),
            "cicd-inject/broken": ("server.py", server + "\ndef broken(:\n", "a syntax error: the build fails"),
            # A switch away from this release waits out the stop grace period (seconds): long
            # enough for a test to kill the deploy worker in the middle of it.
            "cicd-inject/stubborn": ("server.py",
                                     server.replace(graceful, "signal.signal(signal.SIGTERM, signal.SIG_IGN)"),
                                     "ignore SIGTERM: slow to replace"),
        }
        for branch, (file_name, text, message) in variants.items():
            _git(work, "checkout", "--quiet", "-b", branch, "main")
            (work / file_name).write_text(text)
            _git(work, "add", "-A")
            _git(work, "commit", "--quiet", "-m", message)
        _git(work, "checkout", "--quiet", "main")
        shutil.rmtree(bare, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
        _git(root, "clone", "--quiet", "--bare", str(work), str(bare))
    _git(bare, "update-server-info")  # what dumb HTTP clients read: info/refs, objects/info/packs
    return bare


def start_server(root: Path, log: Path, port: int | None = None) -> dict:
    """A static file server for root on loopback, detached: on `port` if it is free, else on a
    free one. Returns its record (pid, ticks, port, url)."""
    root.mkdir(parents=True, exist_ok=True)
    for candidate in ([port] if port else []) + [process.free_port()]:
        argv = [sys.executable, "-I", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(root),
                str(candidate)]
        pid, ticks = process.spawn_detached(argv, str(root), process.clean_env({}), str(log),
                                            record_exit=False)
        url = f"http://127.0.0.1:{candidate}"
        deadline = time.monotonic() + 10
        while process.is_alive(pid, ticks) and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/", timeout=1).close()
                return {"pid": pid, "ticks": ticks, "port": candidate, "url": url, "root": str(root)}
            except OSError:
                time.sleep(0.05)
        process.stop(pid, ticks, grace_s=1)
    raise RuntimeError(f"the example git server did not start; see {log}")
