"""Real apps through the whole stack, with the commands an operator has: a Flask app served by
gunicorn, a Django app with a release command and collected static files, and (when npm is
installed) an Express app started with `npm start`. Each is written here as a git repo, served
over loopback HTTP, onboarded with `cicd onboard`, reached through its stable URL from
`cicd status --json`, then crashed and hung with `cicd inject ... --wait`, which exits 0 only when
the healing chain ended stable, and overloaded by real traffic through that URL until they are
scaled out. A Flask app that leaks memory in its own code (nothing injected) is restarted near
the limit its manifest sets.

Packages come from the real registries through the stack's shared caches, so only the first
Python build is cold (Django's reuses gunicorn's wheel). Deploy times, cold and warm, and the
times to recover are printed (pytest -s), never asserted.
"""
from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request

import pytest

from cicd.delivery import examples
from cicd.runtime import process
from tests.integration.test_real_apps import FLASK_APP, git_repo
from tests.integration.test_real_node_app import EXPRESS_APP
from tests.proxied import wait_for

pytestmark = pytest.mark.integration

DJANGO_SETTINGS = """\
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = "test-only-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django.contrib.staticfiles"]
MIDDLEWARE = ["whitenoise.middleware.WhiteNoiseMiddleware"]
ROOT_URLCONF = "site_hello.urls"
WSGI_APPLICATION = "site_hello.wsgi.application"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "assets"]
USE_TZ = True
"""

DJANGO_APP = {
    "manage.py": "import os\nimport sys\n\nif __name__ == '__main__':\n"
                 "    os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'site_hello.settings')\n"
                 "    from django.core.management import execute_from_command_line\n"
                 "    execute_from_command_line(sys.argv)\n",
    "site_hello/__init__.py": "",
    "site_hello/settings.py": DJANGO_SETTINGS,
    # The page counts users: it answers only if the release command (migrate) made the tables.
    # /slow holds the single sync worker for 30 ms: requests queue (`cicd inject overload --path /slow`).
    "site_hello/urls.py": "import time\n\nfrom django.contrib.auth.models import User\nfrom django.http import HttpResponse\n"
                          "from django.urls import path\n\n\ndef index(request):\n"
                          "    return HttpResponse(f'hello from django, {User.objects.count()} users')\n\n\n"
                          "def slow(request):\n    time.sleep(0.03)\n    return HttpResponse('slow hello from django')\n\n\n"
                          "urlpatterns = [path('', index), path('slow', slow)]\n",
    "site_hello/wsgi.py": "import os\n\nfrom django.core.wsgi import get_wsgi_application\n\n"
                          "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'site_hello.settings')\n"
                          "application = get_wsgi_application()\n",
    "assets/hello.txt": "a static file, collected by collectstatic\n",
    "requirements.txt": "django>=4.2,<6\ngunicorn>=21\nwhitenoise>=6\n",
    "Procfile": "web: gunicorn --bind 127.0.0.1:$PORT --workers 1 site_hello.wsgi\n"
                "release: python manage.py migrate --noinput\n",
}

# name: (files, template, what GET / answers)
APPS = {
    "flask-hello": (FLASK_APP, "backend", b"hello from flask"),
    "django-hello": (DJANGO_APP, "backend", b"hello from django, 0 users"),
    "express-hello": (EXPRESS_APP, "frontend", b"hello from express"),
}
NEEDS_NPM = pytest.mark.skipif(shutil.which("npm") is None,
                               reason="npm is not installed: the Node toolchain (frontend template) cannot run")
PARAMS = [pytest.param("flask-hello"), pytest.param("django-hello"),
          pytest.param("express-hello", marks=NEEDS_NPM)]
# A cold pip or npm install from the registries can take minutes on a busy machine.
DEPLOY_TIMEOUT_S = 400
TIMINGS: dict[str, dict] = {}


def get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@pytest.fixture(scope="module")
def git_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-apps-git")
    server = examples.start_server(root, root.parent / "real-apps-git-server.log")
    server["root_path"] = root
    yield server
    process.stop(server["pid"], server["ticks"], grace_s=1)


def seconds_of(output: str, pattern: str) -> float:
    match = re.search(pattern, output)
    assert match, output
    return float(match.group(1))


@pytest.fixture(scope="module", params=PARAMS)
def app(request, stack, git_server):
    """The app onboarded and live in stage, as a new user would do it."""
    name = request.param
    files, template, _ = APPS[name]
    url = f"{git_server['url']}/{git_repo(git_server['root_path'], name, files)}"
    started = time.monotonic()
    out = stack.cicd("onboard", name, "--repo", url, "--runtime", template, timeout=DEPLOY_TIMEOUT_S + 30)
    TIMINGS.setdefault(name, {})["cold_deploy_s"] = seconds_of(out.stdout, r"release 1 live in ([0-9.]+) s")
    TIMINGS[name]["cold_onboard_wall_s"] = round(time.monotonic() - started, 1)
    stack.wait_steady(name)
    yield name
    print(f"\n{name}: {json.dumps(TIMINGS.get(name, {}))}")
    stack.cicd("remove", name, "--yes", check=False)


def stable_url(stack, name: str) -> str:
    status = json.loads(stack.cicd("status", "--json").stdout)
    row = [a for a in status["apps"] if a["app"] == name][0]
    assert row["url"] and row["url"].startswith("http://127.0.0.1:"), row
    return row["url"]


def test_it_deploys_and_answers_through_its_stable_url(stack, app):
    _, _, expected = APPS[app]
    url = stable_url(stack, app)
    assert get(url + "/") == expected
    assert stack.runtime.replica_count(app) == 2
    names = [r["event_name"] for r in stack.events() if r["app"] == app]
    for event in ("BUILD_SUCCEEDED", "HEALTH_GATE_PASSED", "DEPLOY_SUCCEEDED"):
        assert event in names
    release = stack.runtime.app_dir(app) / "releases" / "1"
    if app == "django-hello":
        # collectstatic ran (the buildpack's Django step), and whitenoise serves what it collected.
        assert (release / "staticfiles" / "hello.txt").is_file()
        assert get(url + "/static/hello.txt") == DJANGO_APP["assets/hello.txt"].encode()
        release_log = (stack.runtime.app_dir(app) / "logs" / "release-1.log").read_text()
        assert "Applying auth.0001_initial" in release_log


def inject(stack, kind: str, app: str, which: int) -> float:
    """`cicd inject KIND APP --wait` on the app's replica `which` (in slot order: a redeploy gave
    the replicas new slots); only that one is replaced. Returns the time to recover."""
    stack.wait_steady(app)
    before = {s.slot: s.pid for s in stack.runtime.probe([app])[app]}
    slot = sorted(before)[which]
    out = stack.cicd("inject", kind, app, "--slot", str(slot), "--wait", "--timeout", "90", timeout=150)
    assert "restart_service: stable; time to recover" in out.stdout, out.stdout
    after = {s.slot: s.pid for s in stack.runtime.probe([app])[app]}
    others = [s for s in before if s != slot]
    assert after[slot] != before[slot] and all(after[s] == before[s] for s in others), (before, after)
    assert all(s.healthy and not s.stopped for s in stack.runtime.probe([app])[app])
    return seconds_of(out.stdout, r"time to recover ([0-9.]+) s")


def test_a_crash_heals_and_it_answers_again(stack, app):
    TIMINGS[app]["crash_recover_s"] = inject(stack, "crash", app, which=0)
    assert get(stable_url(stack, app) + "/") == APPS[app][2]


def test_a_hang_heals_and_it_answers_again(stack, app):
    # The other replica: the crash restarted the first, and its restart backoff is not what this is about.
    TIMINGS[app]["hang_recover_s"] = inject(stack, "hang", app, which=1)
    assert get(stable_url(stack, app) + "/") == APPS[app][2]


def test_an_overload_heals_by_scaling_out(stack, app):
    """Real traffic through the stable URL on /slow (its one sync worker, or Node's one thread, is
    held 30 ms a request): the clients ramp until the probes' latency is over the threshold, the
    healing chain scales out, and the same clients on one more replica queue less. A probe that
    times out in that queue is load (scaled out), not a hang (restarted) nor a blip."""
    stack.wait_steady(app)
    url = stable_url(stack, app)
    before = stack.runtime.replica_count(app)
    started = time.monotonic()
    try:
        out = stack.cicd("inject", "overload", app, "--path", "/slow", "--duration", "90", "--wait",
                         "--timeout", "90", timeout=240)
    finally:
        stack.runtime.stop_load(app)
    assert f"target={url}, path=/slow" in out.stdout and "overloaded=True" in out.stdout, out.stdout
    assert re.search(r"overload -> scale_workers: stable; time to recover", out.stdout), out.stdout
    incident = [i for i in json.loads(stack.cicd("incidents", "--json").stdout)
                if i["app"] == app and i["kind"] == "overload"][0]
    assert incident["status"] == "stable" and incident["action"] == "scale_workers", incident
    executed = [r["payload"] for r in stack.events("ORCH_EXEC", incident_id=incident["id"])]
    assert executed and executed[0]["action"] == "scale_workers", executed
    assert executed[0]["result"]["from"] == before and executed[-1]["result"]["to"] > before, executed
    assert stack.runtime.replica_count(app) == executed[-1]["result"]["to"]
    TIMINGS[app]["overload_scaled"] = f"{before} -> {executed[-1]['result']['to']}"
    assert get(url + "/") == APPS[app][2]
    TIMINGS[app]["overload_recover_s"] = seconds_of(out.stdout, r"time to recover ([0-9.]+) s")
    TIMINGS[app]["overload_wall_s"] = round(time.monotonic() - started, 1)
    TIMINGS[app]["overload_load"] = re.search(r"clients=\d+, p50_ms=[0-9.]+", out.stdout).group(0)
    # The load gone, it is scaled back in by the healing chain, as it was before.
    wait_for(lambda: stack.runtime.replica_count(app) == before, timeout=90)
    stack.wait_steady(app)


def test_a_redeploy_of_the_same_dependencies_is_warm(stack, app):
    # Last: a crash within CICD_FRESH_RELEASE of a deploy is healed by a rollback, not a restart.
    out = stack.cicd("deploy", app, timeout=DEPLOY_TIMEOUT_S + 30)
    number = seconds_of(out.stdout, r"release (\d+) live in")
    TIMINGS[app]["warm_deploy_s"] = seconds_of(out.stdout, r"release \d+ live in ([0-9.]+) s")
    build_log = (stack.runtime.app_dir(app) / "logs" / f"build-{number:.0f}.log").read_text()
    assert "wheel --wheel-dir" not in build_log, "the warm build went to the package index"
    stack.wait_steady(app)
    assert get(stable_url(stack, app) + "/") == APPS[app][2]


def test_a_build_longer_than_the_health_deadline_still_deploys(stack, git_server):
    """The health deadline (the template's 30 s) is for becoming healthy: a release phase that
    takes longer (a long migration, or a cold install) is not counted, nor is it a slow deploy."""
    name = "slow-release"
    deadline = 30
    # The app takes a moment to import, as a big one does, so the gate's first look finds it not
    # yet healthy (counted from the release's start, that look would already be past the deadline).
    files = {"app.py": "import time\ntime.sleep(2)\n" + FLASK_APP["app.py"],
             "requirements.txt": FLASK_APP["requirements.txt"],
             "Procfile": FLASK_APP["Procfile"] + f"release: python -c 'import time; time.sleep({deadline + 3})'\n"}
    url = f"{git_server['url']}/{git_repo(git_server['root_path'], name, files)}"
    try:
        out = stack.cicd("onboard", name, "--repo", url, "--runtime", "backend", timeout=DEPLOY_TIMEOUT_S + 30)
        spec = json.loads((stack.home / "apps" / "registry" / "stage" / f"{name}.json").read_text())
        assert spec["health_deadline_s"] == deadline
        assert seconds_of(out.stdout, r"release 1 live in ([0-9.]+) s") > deadline
        stack.wait_steady(name)
        assert get(stable_url(stack, name) + "/") == APPS["flask-hello"][2]
        assert not [r for r in stack.events("INCIDENT_DETECTED") if r["app"] == name]
    finally:
        stack.cicd("remove", name, "--yes", check=False)


def test_a_false_alarm_at_the_proxy_ends_stable_with_no_restart(stack, app):
    """`cicd inject false-alarm` on an app that knows nothing of it: the proxy's fault listener
    answers one replica's probes for a moment, the chain calls it a false alarm, and nothing is
    restarted."""
    stack.wait_steady(app)
    before = {s.slot: s.pid for s in stack.runtime.probe([app])[app]}
    out = stack.cicd("inject", "false-alarm", app, "--wait", "--timeout", "90", timeout=150)
    assert "via=proxy" in out.stdout and "false_alarm -> noop: stable" in out.stdout, out.stdout
    latest = json.loads(stack.cicd("incidents", "--app", app, "--json").stdout)[0]
    assert (latest["kind"], latest["action"], latest["status"]) == ("false_alarm", "noop", "stable"), latest
    assert {s.slot: s.pid for s in stack.runtime.probe([app])[app]} == before  # no replica restarted
    assert get(stable_url(stack, app) + "/") == APPS[app][2]


# A real leak, in the app's own code: each GET /grow keeps 4 MB more (written, so resident) in a
# list nobody empties. The manifest sets the limit leak detection judges by; no fault is injected.
LEAKY_LIMIT_MB = 160
LEAKY_APP = {
    "app.py": FLASK_APP["app.py"] + "\n\nKEPT = []\n\n\n@app.get('/grow')\ndef grow():\n"
              "    KEPT.append(b'x' * (4 << 20))\n    return f'{len(KEPT) * 4} MB kept'\n",
    "requirements.txt": FLASK_APP["requirements.txt"],
    "Procfile": FLASK_APP["Procfile"],
    "cicd.toml": f"[resources]\nmemory_limit_mb = {LEAKY_LIMIT_MB}\n",
}


def test_a_leak_in_the_apps_own_code_is_seen_and_healed_by_a_restart(stack, git_server):
    """Nothing injected: traffic through the stable URL grows a replica's memory (the platform
    measures its resident memory, and the manifest's limit is what it judges by); near the limit
    the detector opens a leak incident, the chain restarts that replica, and the app answers."""
    name = "leaky-flask"
    url = f"{git_server['url']}/{git_repo(git_server['root_path'], name, LEAKY_APP)}"
    try:
        stack.cicd("onboard", name, "--repo", url, "--runtime", "backend", timeout=DEPLOY_TIMEOUT_S + 30)
        stack.wait_steady(name)
        endpoint = stable_url(stack, name)
        pids = {s.slot: s.pid for s in stack.runtime.probe([name])[name]}

        grown = []

        def leak_detected():
            # Bounded: 4 MB a request, at most three times the two replicas' limits in all.
            assert len(grown) < 3 * 2 * LEAKY_LIMIT_MB // 4, stack.runtime.probe([name])[name]
            grown.append(get(endpoint + "/grow"))
            # A leak heals as a crash does: the incident's kind is crash, its signal says leak.
            return [r for r in stack.events("INCIDENT_DETECTED")
                    if r["app"] == name and r["payload"]["signal"]["kind"] == "replica_leak"]
        # 160 MB at 4 MB a request, over two replicas: well under 100 requests reach 90 % of it.
        detected = wait_for(leak_detected, timeout=180, poll=0.2)[0]
        assert detected["payload"]["context"]["cause"] == "leak", detected
        incident = wait_for(lambda: [i for i in json.loads(stack.cicd("incidents", "--app", name, "--json").stdout)
                                     if i["id"] == detected["incident_id"] and i["status"] in ("stable", "escalated")],
                            timeout=120)[0]
        assert (incident["action"], incident["status"]) == ("restart_service", "stable"), incident
        stable = stack.events("SYSTEM_STABLE", incident_id=incident["id"])[0]["payload"]
        TIMINGS.setdefault(name, {})["leak_recover_s"] = stable["time_to_recover_s"]
        after = {s.slot: s for s in stack.runtime.probe([name])[name]}
        restarted = [slot for slot, pid in pids.items() if after[slot].pid != pid]
        assert restarted, (pids, after, detected)   # the one (or two) near the limit, now small again
        assert all(after[slot].rss_mb < 0.5 * LEAKY_LIMIT_MB for slot in restarted), after
        assert get(endpoint + "/") == APPS["flask-hello"][2]
        print(f"\n{name}: {json.dumps(TIMINGS[name])}")
    finally:
        stack.cicd("remove", name, "--yes", check=False)
