"""The local runtime with real processes: releases, probes, restart, scale, faults, clean-up.

These start real replica processes of the sample service (no broker needed), so each test
stops what it started.
"""
from __future__ import annotations

import itertools
import os
import shutil
import time

import pytest

from cicd.delivery import onboarding
from cicd.delivery.examples import SAMPLE_SERVICE
from cicd.config import Settings
from cicd.runtime import process
from cicd.runtime.base import RuntimeFailure
from cicd.runtime.local import LocalRuntime


_sources = itertools.count()


def sample_source(tmp_path, files: dict | None = None):
    """A fresh copy of the sample service, as the deployer would export it from git."""
    source = tmp_path / f"source-{next(_sources)}"
    shutil.copytree(SAMPLE_SERVICE, source, ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in (files or {}).items():
        (source / name).write_text(text)
    return source


def wait_for(check, timeout=10.0, poll=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"condition not met within {timeout} s")


@pytest.fixture
def runtime(tmp_path):
    rt = LocalRuntime(Settings(env="stage", home=tmp_path, probe_timeout_s=1.0))
    yield rt
    for app in rt.apps():
        rt.stop_app(app)


@pytest.fixture
def live_app(runtime):
    spec = onboarding.generate_spec("shop-api", "https://git.example.com/shop-api.git", "backend", "stage")
    runtime.stage_release(spec, 1, sample_source(runtime.settings.home))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release("shop-api", 1)))
    runtime.activate_release("shop-api", 1)
    return "shop-api"


def statuses(runtime, app):
    return runtime.probe([app])[app]


def test_release_starts_replicas_that_report_health(runtime, live_app):
    seen = wait_for(lambda: (s := statuses(runtime, live_app)) and all(x.healthy for x in s) and s)
    assert [s.slot for s in seen] == [0, 1]
    assert len({s.pid for s in seen}) == 2 and len({s.port for s in seen}) == 2
    assert all(s.capacity == 4 and 0.0 <= s.utilization <= 1.0 for s in seen)
    assert runtime.replica_count(live_app) == 2
    assert runtime.apps() == [live_app]


def test_replicas_are_not_children_of_the_caller(runtime, live_app):
    # Re-parented to init: they outlive the worker that started them and never become its zombies.
    import os
    for status in statuses(runtime, live_app):
        with open(f"/proc/{status.pid}/stat") as fh:
            ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        assert ppid != os.getpid()
        assert os.getsid(status.pid) == status.pid  # its own session


def test_crash_is_a_real_sigkill_and_probe_sees_it(runtime, live_app):
    before = statuses(runtime, live_app)
    injected = runtime.inject(live_app, "crash")
    assert injected["signal"] == "SIGKILL" and injected["slot"] == 0
    wait_for(lambda: not process.is_alive(before[0].pid, None))
    after = statuses(runtime, live_app)
    assert after[0].status == "down" and not after[0].alive
    assert after[1].healthy


def test_restart_happens_once_per_op_key(runtime, live_app):
    runtime.inject(live_app, "crash", slot=1)
    first = runtime.restart(live_app, [1], op_key="inc-1/1")
    again = runtime.restart(live_app, [1], op_key="inc-1/1")
    assert again["deduplicated"] is True
    assert again["replicas"] == first["replicas"]
    new_pid = first["replicas"][0]["new_pid"]
    wait_for(lambda: statuses(runtime, live_app)[1].healthy)
    assert statuses(runtime, live_app)[1].pid == new_pid


def test_a_replica_restarted_while_running_is_off_the_record_before_it_stops(runtime, live_app, monkeypatch):
    # The exit watcher signals the exit of a replica the state still counts: a restart's stop of
    # the old one must not look like a crash (in a blip's incident it would widen it to one).
    old = runtime.replicas(live_app)[0]
    on_record_at_stop = []
    stop = runtime._stop_replica

    def recording_stop(replica):
        on_record_at_stop.append([r["pid"] for r in runtime.replicas(live_app)])  # read from disk, as the watcher does
        return stop(replica)

    monkeypatch.setattr(runtime, "_stop_replica", recording_stop)
    result = runtime.restart(live_app, [0], op_key="inc-2/1")
    assert result["replicas"][0]["was_running"] is True
    assert on_record_at_stop and old["pid"] not in on_record_at_stop[0]
    assert result["replicas"][0]["new_pid"] in on_record_at_stop[0]


def test_scale_up_and_down(runtime, live_app):
    result = runtime.scale(live_app, 4, op_key="scale-a")
    assert (result["from"], result["to"]) == (2, 4)
    wait_for(lambda: len(s := statuses(runtime, live_app)) == 4 and all(x.healthy for x in s))
    removed = [s.pid for s in statuses(runtime, live_app)[2:]]
    runtime.scale(live_app, 2, op_key="scale-b")
    assert [s.slot for s in statuses(runtime, live_app)] == [0, 1]
    wait_for(lambda: not any(process.is_alive(pid, None) for pid in removed))
    assert runtime.scale(live_app, 7, op_key="scale-a")["deduplicated"] is True
    assert runtime.replica_count(live_app) == 2


def test_without_a_proxy_the_sample_service_blips_by_itself(runtime, live_app):
    # Behind a proxy a false alarm is made there, for any app (tests/unit/test_proxied_app.py).
    injected = runtime.inject(live_app, "false-alarm")
    assert injected["via"] == "app (POST /admin/blip: no proxy)"
    assert statuses(runtime, live_app)[injected["slot"]].status == "degraded"
    wait_for(lambda: statuses(runtime, live_app)[injected["slot"]].healthy, timeout=injected["blip_s"] + 3)


def test_overload_raises_measured_utilization_and_scaling_lowers_it(runtime, live_app):
    threshold = runtime.settings.overload_threshold
    runtime.inject(live_app, "overload", duration=20)
    try:
        # The app's mean, as the detector judges it (mean_load), not its least loaded replica's: the
        # load generator holds the app just over the threshold, and on a busy machine one replica
        # of two can read under it for a while. Generous deadlines: they end as soon as it is true.
        def mean_utilization():
            found = statuses(runtime, live_app)
            return sum(s.utilization for s in found) / len(found)
        wait_for(lambda: mean_utilization() > threshold, timeout=30)
        runtime.scale(live_app, 5, op_key="relief")
        wait_for(lambda: max(s.utilization for s in statuses(runtime, live_app)) < threshold, timeout=30)
    finally:
        assert runtime.stop_load(live_app) is True


def test_failed_gate_is_discarded_and_live_release_keeps_serving(runtime, live_app):
    live_pids = {s.pid for s in statuses(runtime, live_app)}
    spec = onboarding.generate_spec("shop-api", "https://git.example.com/shop-api.git", "backend", "stage")
    staged = runtime.stage_release(spec, 2, sample_source(runtime.settings.home))
    assert len(staged["slots"]) == 2 and not set(staged["pids"]) & live_pids
    runtime.discard_release(live_app, 2)
    assert {s.pid for s in statuses(runtime, live_app)} == live_pids
    assert runtime.live_release(live_app) == 1


def test_activating_a_new_release_stops_the_old_replicas(runtime, live_app):
    old = {s.pid for s in statuses(runtime, live_app)}
    spec = onboarding.generate_spec("shop-api", "https://git.example.com/shop-api.git", "backend", "stage")
    runtime.stage_release(spec, 2, sample_source(runtime.settings.home))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(live_app, 2)))
    runtime.activate_release(live_app, 2)
    assert runtime.live_release(live_app) == 2
    assert not any(process.is_alive(pid, None) for pid in old)
    assert not {s.pid for s in statuses(runtime, live_app)} & old


def test_old_replicas_a_killed_switch_left_running_are_stopped_by_the_next_activate(runtime, live_app):
    old = {s.pid for s in statuses(runtime, live_app)}
    spec = onboarding.generate_spec("shop-api", "https://git.example.com/shop-api.git", "backend", "stage")
    runtime.stage_release(spec, 2, sample_source(runtime.settings.home))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(live_app, 2)))
    # What a deploy worker SIGKILLed mid-switch leaves: traffic on 2, the old replicas retiring
    # on record but never stopped.
    with runtime._locked(live_app) as state:
        state["retiring"] = list(state["replicas"].values())
        state["replicas"], state["live"] = state["staged"].pop("2"), 2
    assert all(process.is_alive(pid, None) for pid in old)
    assert runtime.activate_release(live_app, 2) == {"release": 2, "already": True}
    assert not any(process.is_alive(pid, None) for pid in old)
    assert runtime._read(live_app)["retiring"] == [] and runtime.replica_count(live_app) == 2


def test_build_failure_is_reported_and_starts_nothing(runtime, tmp_path):
    spec = onboarding.generate_spec("broken-api", "https://git.example.com/broken.git", "backend", "stage")
    spec["build"] = ["{python}", "-c", "import sys; print('compile error'); sys.exit(3)"]
    with pytest.raises(RuntimeFailure, match="exit 3.*compile error"):
        runtime.stage_release(spec, 1, sample_source(tmp_path))
    assert runtime.probe_release("broken-api", 1) == []


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "UPPER", "x" * 41])
def test_app_names_never_escape_the_runtime_directory(runtime, name):
    with pytest.raises(RuntimeFailure):
        runtime.app_dir(name)


def test_stop_app_stops_every_process(runtime, live_app):
    runtime.inject(live_app, "overload", duration=30)
    pids = [s.pid for s in statuses(runtime, live_app)]
    assert runtime.stop_app(live_app) == 2
    assert not any(process.is_alive(pid, None) for pid in pids)
    assert runtime.stop_load(live_app) is False  # already stopped with the app
    assert runtime.replica_count(live_app) == 0


def test_a_recycled_pid_is_never_taken_for_our_process():
    import os
    ticks = process.start_ticks(os.getpid())
    assert process.is_alive(os.getpid(), ticks)
    assert not process.is_alive(os.getpid(), ticks + 1)  # same pid, different start time
    assert not process.signal_process(os.getpid(), ticks + 1, 0)


# -- buildpack conventions (no package index needed: the apps use the standard library) ------
STATIC_APP = {"index.html": "hello from a static app\n",
              "Procfile": "release: python -c \"open('released', 'w').write('yes')\"\n"
                          "web: python -m http.server ${PORT} --bind 127.0.0.1\n"}


def test_a_procfile_app_starts_in_its_own_virtualenv_and_is_probed_at_root(runtime, tmp_path):
    import urllib.request
    spec = onboarding.generate_spec("static-site", "https://git.example.com/static.git", "frontend", "stage")
    source = tmp_path / "static"
    source.mkdir()
    for name, text in STATIC_APP.items():
        (source / name).write_text(text)
    runtime.stage_release(spec, 1, source)
    release_dir = runtime.app_dir("static-site") / "releases" / "1"
    # The release command ran once, in the release, before any replica was probed.
    assert (release_dir / "released").read_text() == "yes"
    seen = wait_for(lambda: (s := runtime.probe_release("static-site", 1)) and all(x.healthy for x in s) and s)
    body = urllib.request.urlopen(f"http://127.0.0.1:{seen[0].port}/index.html", timeout=5).read()
    assert body == b"hello from a static app\n"
    replica = runtime._read("static-site")["staged"]["1"]["0"]
    assert replica["health_path"] == "/"  # a Procfile app: "/" unless its cicd.toml says otherwise
    # `python` in the Procfile is the release's own virtualenv, not the control plane's.
    with open(f"/proc/{replica['pid']}/environ", "rb") as fh:
        environ = dict(v.split(b"=", 1) for v in fh.read().split(b"\0") if b"=" in v)
    venv = str(release_dir / ".cicd" / "venv").encode()
    assert environ[b"VIRTUAL_ENV"] == venv and environ[b"PATH"].startswith(venv + b"/bin")
    assert environ[b"PORT"] == str(replica["port"]).encode() and environ[b"HOST"] == b"127.0.0.1"
    with open(f"/proc/{replica['pid']}/cmdline", "rb") as fh:
        assert fh.read().split(b"\0")[0].startswith(venv + b"/bin/python")
    # A restart starts the same command from the recorded plan.
    runtime.activate_release("static-site", 1)
    runtime.restart("static-site", [0], op_key="r1")
    wait_for(lambda: all(s.healthy for s in statuses(runtime, "static-site")))


def test_a_failing_release_command_fails_the_release_and_starts_nothing(runtime, tmp_path):
    spec = onboarding.generate_spec("bad-release", "https://git.example.com/bad.git", "backend", "stage")
    source = sample_source(tmp_path, {"Procfile": "release: python -c \"import sys; print('migration failed'); "
                                                  "sys.exit(4)\"\nweb: python server.py --port $PORT\n"})
    with pytest.raises(RuntimeFailure, match=r"release command of release 1 .* failed \(exit 4\): migration failed"):
        runtime.stage_release(spec, 1, source)
    assert runtime.probe_release("bad-release", 1) == []
    assert "migration failed" in (runtime.app_dir("bad-release") / "logs" / "release-1.log").read_text()


@pytest.mark.parametrize("files, message", [
    ({"Procfile": "web: python server.py --port $PORT | tee out\n"}, r"Procfile line 1 .*'\|' needs a shell"),
    ({".python-version": "3.2\n"}, r"\.python-version: asks for Python 3\.2, which is not installed here"),
    ({"cicd.toml": "[deploy]\n"}, r"cicd\.toml: unknown key 'deploy'"),
])
def test_convention_files_that_cannot_be_followed_fail_the_build(runtime, tmp_path, files, message):
    spec = onboarding.generate_spec("odd-app", "https://git.example.com/odd.git", "backend", "stage")
    with pytest.raises(RuntimeFailure, match=rf"^build of release 1: {message}"):
        runtime.stage_release(spec, 1, sample_source(tmp_path, files))
    assert runtime.probe_release("odd-app", 1) == []


def test_a_web_program_that_is_not_installed_is_named(runtime, tmp_path):
    spec = onboarding.generate_spec("no-gunicorn", "https://git.example.com/x.git", "backend", "stage")
    source = sample_source(tmp_path, {"Procfile": "web: gunicorn-not-here --bind 127.0.0.1:$PORT app:app\n"})
    with pytest.raises(RuntimeFailure, match="'gunicorn-not-here' is not installed in the release"):
        runtime.stage_release(spec, 1, source)


def test_any_status_below_400_is_healthy_and_a_json_body_is_an_extra():
    from cicd.runtime.local import _judge
    assert _judge(200, b"<html>") == (True, 0.0, 0)
    assert _judge(302, b"") == (True, 0.0, 0)
    assert _judge(404, b"not found") == (False, 0.0, 0)
    assert _judge(500, b'{"status": "ok"}')[0] is False
    assert _judge(200, b'{"status": "ok", "utilization": 0.5, "capacity": 4}') == (True, 0.5, 4)
    assert _judge(200, b'{"status": "degraded"}')[0] is False
    assert _judge(200, b'[1, 2]') == (True, 0.0, 0)
    assert _judge(200, b'{"utilization": "lots"}') == (True, 0.0, 0)


def test_a_killed_replica_is_reported_with_its_signal_and_log(runtime, live_app):
    """The keeper that waits for each replica records how it ended; kills act on the app's own
    pid and process group, as before, and the keeper does not outlive it."""
    replica = min(runtime.replicas(live_app), key=lambda r: r["slot"])
    keeper = int(open(f"/proc/{replica['pid']}/stat").read().rsplit(")", 1)[1].split()[1])
    assert os.getpgid(replica["pid"]) == replica["pid"] != os.getpgid(keeper)
    runtime.inject(live_app, "crash", slot=replica["slot"])
    exits = wait_for(lambda: runtime.exits(live_app, 1) and runtime.exits(live_app, 1)[0]["code"] is not None and
                     runtime.exits(live_app, 1))
    assert exits[0]["slot"] == replica["slot"] and exits[0]["exit"] == "was killed by SIGKILL"
    assert exits[0]["code"] == -9 and exits[0]["log_tail"]  # the sample service logs its start
    wait_for(lambda: process.start_ticks(keeper) is None)
    # Without its exit record (a keeper killed too), it still says it exited, with its log.
    os.unlink(process.exit_path_for(runtime.replica_log(live_app, replica["slot"])))
    assert runtime.exits(live_app, 1)[0]["exit"] == "exited" and runtime.exits(live_app, 1)[0]["log_tail"]


def test_a_log_tail_is_bounded_and_starts_with_its_process(tmp_path):
    log = tmp_path / "replica-0.log"
    log.write_text("from an earlier release\n")
    offset = log.stat().st_size
    with open(log, "a") as fh:
        fh.write("".join(f"line {i} " + "x" * 300 + "\n" for i in range(50)))
    tail = process.log_tail(log, offset)
    lines = tail.split(" | ")
    assert len(lines) == process.TAIL_LINES and lines[-1].startswith("line 49")
    assert all(len(line) <= process.TAIL_LINE_CHARS for line in lines)
    assert process.log_tail(log, log.stat().st_size) == "" and process.log_tail(tmp_path / "none") == ""
    assert "earlier" not in process.log_tail(log, offset, lines=100)  # only this process's own output


# -- the Node toolchain, with real npm (no package index needed: no dependencies) -------------
needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed: the Node toolchain "
                                                                   "(frontend/fullstack builds) cannot be tested")
NODE_SERVER = ("const http = require('http');\nconst fs = require('fs');\n"
               "http.createServer((req, res) => {\n"
               "  res.end(fs.readFileSync('public/index.html', 'utf8') + ' ' + process.env.NODE_ENV);\n"
               "}).listen(Number(process.env.PORT), process.env.HOST);\n")
NODE_BUILD = ("const fs = require('fs');\nfs.mkdirSync('public', {recursive: true});\n"
              "fs.writeFileSync('public/index.html', 'built by node');\n")


def node_source(tmp_path, files: dict):
    source = tmp_path / f"source-{next(_sources)}"
    source.mkdir()
    for name, text in files.items():
        (source / name).write_text(text)
    return source


def group_members(pgid: int, needle: bytes) -> list[int]:
    """The pids in process group `pgid` whose command line contains `needle`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            if os.getpgid(int(entry)) == pgid and needle in cmdline:
                found.append(int(entry))
        except (OSError, ProcessLookupError):
            continue
    return found


@needs_npm
def test_a_node_frontend_is_installed_built_and_started_with_npm_start(runtime, tmp_path):
    import urllib.request
    spec = onboarding.generate_spec("node-web", "https://git.example.com/node-web.git", "frontend", "stage")
    source = node_source(tmp_path, {
        "package.json": '{"name": "node-web", "version": "1.0.0", "private": true,\n'
                        ' "scripts": {"build": "node build.js", "start": "node server.js"}}\n',
        "build.js": NODE_BUILD, "server.js": NODE_SERVER})
    runtime.stage_release(spec, 1, source)
    build_log = (runtime.app_dir("node-web") / "logs" / "build-1.log").read_text()
    assert "npm install --no-audit --no-fund" in build_log and "npm run build" in build_log, build_log
    assert (runtime.settings.var_dir / "cache" / "npm").is_dir()  # the shared cache, not ~/.npm
    seen = wait_for(lambda: (s := runtime.probe_release("node-web", 1)) and all(x.healthy for x in s) and s,
                    timeout=30)
    body = urllib.request.urlopen(f"http://127.0.0.1:{seen[0].port}/", timeout=5).read()
    assert body == b"built by node production"  # the build's output, and NODE_ENV for the app
    replica = runtime._read("node-web")["staged"]["1"]["0"]
    assert replica["health_path"] == "/"
    # npm runs the start script in a child: node is in the replica's process group, so a crash
    # (a SIGKILL to the group) takes both, and nothing is left holding the port.
    node = wait_for(lambda: group_members(replica["pid"], b"server.js"))
    runtime.activate_release("node-web", 1)
    runtime.inject("node-web", "crash", slot=0)
    assert not statuses(runtime, "node-web")[0].alive
    wait_for(lambda: all(process.start_ticks(pid) is None for pid in node))
    runtime.restart("node-web", [0], op_key="r1")
    wait_for(lambda: all(s.healthy for s in statuses(runtime, "node-web")), timeout=30)


@needs_npm
def test_fullstack_builds_with_node_first_then_serves_from_the_python_default(runtime, tmp_path):
    import urllib.request
    spec = onboarding.generate_spec("full-app", "https://git.example.com/full.git", "fullstack", "stage")
    server = ("import argparse, http.server, functools\np = argparse.ArgumentParser()\n"
              "p.add_argument('--port', type=int); p.add_argument('--role')\na = p.parse_args()\n"
              "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory='public')\n"
              "http.server.HTTPServer(('127.0.0.1', a.port), handler).serve_forever()\n")
    source = node_source(tmp_path, {"package.json": '{"scripts": {"build": "node build.js"}}\n',
                                    "build.js": NODE_BUILD, "server.py": server,
                                    "cicd.toml": '[health]\npath = "/index.html"\n'})
    runtime.stage_release(spec, 1, source)
    build_log = (runtime.app_dir("full-app") / "logs" / "build-1.log").read_text()
    assert build_log.index("npm run build") < build_log.index("-m venv")  # Node first, then Python
    seen = wait_for(lambda: (s := runtime.probe_release("full-app", 1)) and all(x.healthy for x in s) and s,
                    timeout=30)
    assert urllib.request.urlopen(f"http://127.0.0.1:{seen[0].port}/index.html", timeout=5).read() == b"built by node"
    with open(f"/proc/{seen[0].pid}/cmdline", "rb") as fh:
        assert fh.read().split(b"\0")[1] == b"server.py"  # the template's start, by the release's python


@needs_npm
@pytest.mark.parametrize("files, message", [
    ({"package.json": '{"name": "x", "scripts": {"start": "node s.js"},}'}, r"package\.json: not valid JSON"),
    ({"package.json": '{"scripts": {"build": "node build.js"}}'}, r"package\.json: scripts has no start"),
])
def test_a_node_app_that_cannot_be_followed_fails_the_build_naming_package_json(runtime, tmp_path, files, message):
    spec = onboarding.generate_spec("odd-node", "https://git.example.com/odd.git", "frontend", "stage")
    with pytest.raises(RuntimeFailure, match=rf"^build of release 1: {message}"):
        runtime.stage_release(spec, 1, node_source(tmp_path, files))
    assert runtime.probe_release("odd-node", 1) == []


@needs_npm
def test_a_failing_npm_build_fails_the_release_with_its_output(runtime, tmp_path):
    spec = onboarding.generate_spec("bad-build", "https://git.example.com/bad.git", "frontend", "stage")
    source = node_source(tmp_path, {"package.json": '{"scripts": {"build": "node -e \\"console.log(\'tsc: 3 errors\'); '
                                                    'process.exit(2)\\"", "start": "node s.js"}}'})
    with pytest.raises(RuntimeFailure, match=r"(?s)Node build of release 1 \(npm run build\) failed \(exit 2\): .*\ntsc: 3 errors$"):
        runtime.stage_release(spec, 1, source)
    assert runtime.probe_release("bad-build", 1) == []
