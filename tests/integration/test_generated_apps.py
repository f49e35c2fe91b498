"""Apps exactly as the frameworks' own generators make them, deployed with the commands an
operator has and no change to their code: the Express generator's app (`npx express-generator`,
from the npm registry; `npm start` runs bin/www, which reads PORT) and Django's `startproject`
(from PyPI; started by the default WSGI start, `gunicorn mysite.wsgi`, since it has no Procfile).

The Django project gets the one file every platform's Django guide adds, a requirements.txt.
It sets no STATIC_ROOT, so collectstatic fails the build, as on Heroku; the error says to set
DISABLE_COLLECTSTATIC=1, which `cicd config set` does, and the next deploy goes live. Deploy
times are printed (pytest -s), never asserted.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from cicd.delivery import examples
from tests.integration.test_real_apps_stack import DEPLOY_TIMEOUT_S, get, inject, seconds_of, stable_url
from tests.integration.test_real_apps_stack import git_server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration


def commit(work, root, name: str) -> str:
    """`work` as a bare repository under root, as the example git server serves it."""
    examples._git(work, "init", "--quiet", "--initial-branch=main")
    examples._git(work, "add", "-A")
    examples._git(work, "commit", "--quiet", "-m", f"{name}, as generated")
    examples._git(root, "clone", "--quiet", "--bare", str(work), str(root / f"{name}.git"))
    examples._git(root / f"{name}.git", "update-server-info")
    return f"{name}.git"


def run(argv, cwd, timeout=300):
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.mark.skipif(shutil.which("npx") is None, reason="npm is not installed: the Express generator cannot run")
def test_the_express_generators_app_deploys_and_heals_a_crash_and_a_hang_unchanged(stack, git_server, tmp_path):
    name = "express-generated"
    run(["npx", "--yes", "express-generator@4", name], tmp_path)
    assert (tmp_path / name / "bin" / "www").is_file() and not (tmp_path / name / "Procfile").exists()
    url = f"{git_server['url']}/{commit(tmp_path / name, git_server['root_path'], name)}"
    try:
        out = stack.cicd("onboard", name, "--repo", url, "--runtime", "frontend", timeout=DEPLOY_TIMEOUT_S + 30)
        print(f"\n{name}: cold deploy {seconds_of(out.stdout, r'release 1 live in ([0-9.]+) s')} s")
        stack.wait_steady(name)
        assert b"<title>Express</title>" in get(stable_url(stack, name) + "/")
        print(f"{name}: crash recovered in {inject(stack, 'crash', name, which=0)} s")
        assert b"Welcome to Express" in get(stable_url(stack, name) + "/")
        print(f"{name}: hang recovered in {inject(stack, 'hang', name, which=1)} s")
        assert b"Welcome to Express" in get(stable_url(stack, name) + "/")
    finally:
        stack.cicd("remove", name, "--yes", check=False)


def test_djangos_startproject_deploys_and_heals_with_one_file_added(stack, git_server, tmp_path):
    name = "django-generated"
    venv = tmp_path / "django-tools"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "django>=5.2,<6"], tmp_path)
    work = tmp_path / name
    work.mkdir()
    run([str(venv / "bin" / "django-admin"), "startproject", "mysite", str(work)], tmp_path)
    (work / "requirements.txt").write_text("django>=5.2,<6\ngunicorn\n")
    url = f"{git_server['url']}/{commit(work, git_server['root_path'], name)}"
    try:
        failed = stack.cicd("onboard", name, "--repo", url, "--runtime", "backend", check=False,
                            timeout=DEPLOY_TIMEOUT_S + 30)
        assert failed.returncode != 0
        assert "STATIC_ROOT" in failed.stderr + failed.stdout
        assert f"cicd config set {name} DISABLE_COLLECTSTATIC=1" in failed.stderr + failed.stdout
        stack.cicd("config", "set", name, "DISABLE_COLLECTSTATIC=1")
        started = time.monotonic()
        stack.cicd("deploy", name, timeout=DEPLOY_TIMEOUT_S + 30)
        print(f"\n{name}: deploy after the setting {time.monotonic() - started:.1f} s")
        stack.wait_steady(name, timeout=120)
        page = get(stable_url(stack, name) + "/")
        assert b"The install worked successfully!" in page   # Django's own page for a new project
        live = stack.runtime.replicas(name)[0]["release"]
        build_log = (stack.runtime.app_dir(name) / "logs" / f"build-{live}.log").read_text()
        assert "start: gunicorn --bind 127.0.0.1:$PORT mysite.wsgi" in build_log
        assert "not collecting static files" in build_log
        # A crash this soon after a deploy is healed by a rollback (to the same revision here).
        stack.wait_steady(name)
        out = stack.cicd("inject", "crash", name, "--wait", "--timeout", "90", timeout=150)
        assert ": stable; time to recover" in out.stdout, out.stdout
        print(f"{name}: crash recovered in {seconds_of(out.stdout, r'time to recover ([0-9.]+) s')} s")
        assert b"The install worked successfully!" in get(stable_url(stack, name) + "/")
    finally:
        stack.cicd("remove", name, "--yes", check=False)
