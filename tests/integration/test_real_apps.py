"""A real app, written here as a git repo, deployed by the buildpack conventions through the local
runtime: a Flask app served by gunicorn, its packages from the real package index through the
shared pip cache. No stack needed: the runtime is driven directly (stage, probe, activate).

Build times, cold and with a warm cache, are printed (pytest -s), never asserted.
"""
from __future__ import annotations

import shutil
import time
import urllib.request

import pytest

from cicd.config import Settings
from cicd.delivery import examples, gitsource, onboarding
from cicd.runtime.local import LocalRuntime
from tests.proxied import wait_for

pytestmark = pytest.mark.integration

# /slow holds its (single, sync) gunicorn worker for 30 ms, as a handler waiting on a database
# does: requests queue behind it, health checks too (`cicd inject overload --path /slow`).
FLASK_APP = {
    "app.py": "import time\n\nfrom flask import Flask\n\napp = Flask(__name__)\n\n\n@app.get('/')\ndef index():\n"
              "    return 'hello from flask'\n\n\n@app.get('/slow')\ndef slow():\n"
              "    time.sleep(0.03)\n    return 'slow hello from flask'\n",
    "requirements.txt": "flask>=3\ngunicorn>=21\n",
    "Procfile": "web: gunicorn --bind 127.0.0.1:$PORT --workers 1 app:app\n",
}


def git_repo(root, name: str, files: dict) -> str:
    """A bare repository of `files` (paths may have directories) under root, as the example git
    server would serve it."""
    work = root / f"{name}-work"
    work.mkdir(parents=True)
    for path, text in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
    examples._git(work, "init", "--quiet", "--initial-branch=main")
    examples._git(work, "add", "-A")
    examples._git(work, "commit", "--quiet", "-m", name)
    examples._git(root, "clone", "--quiet", "--bare", str(work), str(root / f"{name}.git"))
    examples._git(root / f"{name}.git", "update-server-info")
    return f"{name}.git"


@pytest.fixture
def git_server(tmp_path):
    server = examples.start_server(tmp_path / "git", tmp_path / "git-server.log")
    yield server
    from cicd.runtime import process
    process.stop(server["pid"], server["ticks"], grace_s=1)


@pytest.fixture
def runtime(tmp_path):
    rt = LocalRuntime(Settings(env="stage", home=tmp_path / "home", probe_timeout_s=2.0))
    yield rt
    for app in rt.apps():
        rt.stop_app(app)


def deploy(runtime, spec, number: int, mirror, sha, incoming) -> float:
    """Export, build and start release `number`; returns the seconds stage_release took."""
    shutil.rmtree(incoming, ignore_errors=True)
    gitsource.export(mirror, sha, incoming)
    started = time.monotonic()
    runtime.stage_release(spec, number, incoming)
    return time.monotonic() - started


def test_a_flask_app_with_gunicorn_deploys_serves_and_heals(tmp_path, git_server, runtime):
    repo = git_repo(tmp_path / "git", "flask-hello", FLASK_APP)
    url = f"{git_server['url']}/{repo}"
    spec = onboarding.generate_spec("flask-hello", url, "backend", "stage")
    mirror = tmp_path / "mirror.git"
    gitsource.fetch(url, mirror)
    sha = gitsource.resolve(mirror, "main")

    cold = deploy(runtime, spec, 1, mirror, sha, tmp_path / "incoming-1")
    gate_started = time.monotonic()
    healthy = wait_for(lambda: (s := runtime.probe_release("flask-hello", 1)) and all(x.healthy for x in s) and s,
                       timeout=60)
    gate_s = time.monotonic() - gate_started
    runtime.activate_release("flask-hello", 1)
    assert len(healthy) == spec["replicas"]
    for status in healthy:
        body = urllib.request.urlopen(f"http://127.0.0.1:{status.port}/", timeout=5).read()
        assert body == b"hello from flask"
    release_dir = runtime.app_dir("flask-hello") / "releases" / "1"
    assert (release_dir / ".cicd" / "venv" / "bin" / "gunicorn").exists()
    wheelhouse = sorted(p.name for p in (runtime.settings.var_dir / "cache" / "wheels").iterdir())
    assert any(name.startswith("gunicorn-") for name in wheelhouse), wheelhouse

    # Crash one replica: it is down, and a restart (what the healing chain runs) brings it back.
    crashed = runtime.inject("flask-hello", "crash", slot=0)
    assert not runtime.probe(["flask-hello"])["flask-hello"][0].alive
    runtime.restart("flask-hello", [crashed["slot"]], op_key="heal-1")
    back = wait_for(lambda: (s := runtime.probe(["flask-hello"])["flask-hello"]) and all(x.healthy for x in s) and s,
                    timeout=30)
    assert back[0].pid != crashed["pid"]
    assert urllib.request.urlopen(f"http://127.0.0.1:{back[0].port}/", timeout=5).read() == b"hello from flask"

    # A redeploy of the same dependencies: a new virtualenv, filled from the cache.
    warm = deploy(runtime, spec, 2, mirror, sha, tmp_path / "incoming-2")
    build_log = (runtime.app_dir("flask-hello") / "logs" / "build-2.log").read_text()
    assert "wheel --wheel-dir" not in build_log, "the warm build went to the network"
    wait_for(lambda: (s := runtime.probe_release("flask-hello", 2)) and all(x.healthy for x in s), timeout=60)
    runtime.activate_release("flask-hello", 2)
    print(f"\nflask+gunicorn build (stage_release): cold cache {cold:.1f} s, warm cache {warm:.1f} s; "
          f"health gate after the cold build {gate_s:.1f} s")
