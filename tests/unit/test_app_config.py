"""App settings (`cicd config`): validated keys, a 0600 file, values that never reach argv or
output, and the values a release was staged with reaching its real processes (read back from
/proc/PID/environ), kept through restarts and scaling, replaced only by the next release. Also the
progress of a build: each step announced as it begins, in the build log and the release's detail."""
from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import threading
import time

import pytest

from cicd.config import Settings
from cicd.delivery import appconfig, deployer, examples, onboarding
from cicd.runtime import process
from cicd.runtime.local import LocalRuntime
from cicd.store import proof, releases, session_scope
from tests.unit.test_cli import CICD, LISTINGS, run
from tests.unit.test_detection import runtime  # noqa: F401  (the fixture: a local runtime, its apps stopped after)
from tests.unit.test_local_runtime import sample_source, wait_for

APP = "conf-api"


def environ_of(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return dict(item.split("=", 1) for item in fh.read().decode().split("\0") if "=" in item)


@pytest.fixture
def settings(tmp_path):
    settings = Settings(env="stage", home=tmp_path, probe_timeout_s=1.0)
    assert onboarding.register(settings, APP, f"https://git.example.com/{APP}.git", "backend")["ok"]
    return settings


# -- the rules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key, rule", [
    ("1ABC", "environment variable name"), ("MY-KEY", "environment variable name"), ("", "environment variable name"),
    ("A B", "environment variable name"), ("PORT", "set by the platform"), ("HOST", "set by the platform"),
    ("CICD_APP", "set by the platform"), ("CICD_ANYTHING", "set by the platform"), ("PATH", "set by the platform"),
])
def test_keys_are_env_names_the_platform_does_not_set(key, rule):
    with pytest.raises(appconfig.ConfigRefused, match=rule) as refused:
        appconfig.check_key(key)
    assert f"key {key!r}" in str(refused.value)


def test_a_refused_value_is_named_by_its_key_never_shown():
    secret = "hunter2-" + secrets.token_hex(8)
    for bad in (secret + "\0", secret * 5000):
        with pytest.raises(appconfig.ConfigRefused, match="value of TOKEN") as refused:
            appconfig.check_value("TOKEN", bad)
        assert secret not in str(refused.value)
    with pytest.raises(appconfig.ConfigRefused, match="argument 3: must be KEY=VALUE") as refused:
        appconfig.parse_assignment(secret, 3)
    assert secret not in str(refused.value)
    assert appconfig.parse_assignment("URL=a=b", 2) == ("URL", "a=b")  # only the first '=' splits


def test_settings_are_a_0600_file_and_a_too_open_one_is_refused(settings):
    config, changed = appconfig.set_values(settings, APP, {"A": "1"})
    assert changed and config.version == 1
    path = appconfig.path_of(settings, APP)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert appconfig.set_values(settings, APP, {"A": "1"})[1] is False  # unchanged: same version
    path.chmod(0o644)
    with pytest.raises(appconfig.ConfigRefused, match="too open; it must be 0600"):
        appconfig.load(settings, APP)
    with pytest.raises(appconfig.ConfigRefused, match="not a valid app name"):
        appconfig.path_of(settings, "../etc")


# -- the command ---------------------------------------------------------------------------------
def test_the_command_never_prints_a_value_and_takes_a_secret_from_stdin(settings):
    home, secret = settings.home, "s3cr3t-" + secrets.token_hex(12)
    started = time.monotonic()
    plain = run(home, "config", "set", APP, "DEBUG=0", "GREETING=hello world")
    assert plain.returncode == 0, plain.stderr
    assert "set DEBUG, GREETING for conf-api in stage (settings version 1)" in plain.stdout
    env = {**os.environ, "CICD_HOME": str(home), "CICD_ENV": "stage"}
    env.pop("CICD_BROKER_URL", None)
    piped = subprocess.run([str(CICD), "config", "set", APP, "API_TOKEN", "--stdin", "--secret"],
                           input=secret + "\n", capture_output=True, text=True, env=env, timeout=60)
    assert piped.returncode == 0 and "settings version 2" in piped.stdout, piped.stderr
    assert appconfig.load(settings, APP).values["API_TOKEN"] == secret  # the line ending is not the value

    listed = run(home, "config", "list", APP)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()]
    assert rows == [["KEY", "SECRET", "VALUE"], ["API_TOKEN", "yes", "(secret)"], ["DEBUG", "no", "(set)"],
                    ["GREETING", "no", "(set)"]]
    assert "settings version 2; conf-api has no live release" in listed.stderr
    shown = run(home, "config", "list", APP, "--show-values")
    assert "hello world" in shown.stdout and "(secret)" in shown.stdout
    as_json = json.loads(run(home, "config", "list", APP, "--json", "--show-values").stdout)
    assert as_json["version"] == 2 and {r["key"]: r.get("value") for r in as_json["settings"]} == \
        {"API_TOKEN": None, "DEBUG": "0", "GREETING": "hello world"}
    # Set again without --secret: a secret stays one.
    run(home, "config", "set", APP, "API_TOKEN=other")
    assert "(secret)" in run(home, "config", "list", APP, "--show-values").stdout

    refused = run(home, "config", "set", APP, "PORT=80")
    assert refused.returncode == 1 and "key 'PORT': set by the platform" in refused.stderr
    typo = run(home, "config", "set", APP, secret)
    assert typo.returncode == 1 and "argument 2: must be KEY=VALUE" in typo.stderr
    unknown = run(home, "config", "list", "nope-api")
    assert unknown.returncode == 1 and "'nope-api' is not onboarded in stage" in unknown.stderr
    unset = run(home, "config", "unset", APP, "DEBUG", "NEVER_SET")
    assert unset.returncode == 0 and "unset DEBUG" in unset.stdout and "NEVER_SET was not set" in unset.stderr

    changes = [r for r in proof.records_since(settings, 0) if r["event_name"] == "CONFIG_CHANGED"]
    assert [(c["payload"]["action"], c["payload"]["keys"]) for c in changes] == [
        ("set", ["DEBUG", "GREETING"]), ("set", ["API_TOKEN"]), ("set", ["API_TOKEN"]), ("unset", ["DEBUG"])]
    everything = [plain, piped, listed, shown, refused, typo, unknown, unset]
    assert all(secret not in out.stdout + out.stderr and "Traceback" not in out.stderr for out in everything)
    assert secret not in json.dumps(changes) and secret not in (settings.env_dir / "cicd.db").read_bytes().decode(errors="replace")
    removed = run(home, "remove", APP, "--yes")
    assert removed.returncode == 0 and not appconfig.path_of(settings, APP).exists()  # the settings go with it
    print(f"\n`cicd config` round trip: {time.monotonic() - started:.1f} s")


def test_the_config_listing_is_one_json_document(settings):
    assert ("config", "list") in LISTINGS  # the listings walk knows it; it needs an onboarded app, so here
    out = run(settings.home, "config", "list", APP, "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["settings"] == []


# -- what the app's processes get --------------------------------------------------------------
def test_a_release_keeps_the_settings_it_was_staged_with_until_the_next(settings, runtime):
    spec = onboarding.generate_spec(APP, f"https://git.example.com/{APP}.git", "backend", "stage")
    spec["max_replicas"] = 4
    secret = "tok-" + secrets.token_hex(12)
    appconfig.set_values(settings, APP, {"GREETING": "one", "API_TOKEN": secret, "LANG": "C"})
    # A release command sees them too (it runs the app's code once per release).
    procfile = 'release: python -c "import os; print(\'release saw\', os.environ[\'GREETING\'])"\n'
    runtime.stage_release(spec, 1, sample_source(settings.home, {"Procfile": procfile}))
    assert "release saw one" in (runtime.app_dir(APP) / "logs" / "release-1.log").read_text()
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(APP, 1)), timeout=20)
    runtime.activate_release(APP, 1)
    first = runtime.replicas(APP)[0]
    seen = environ_of(first["pid"])
    assert (seen["GREETING"], seen["API_TOKEN"], seen["LANG"]) == ("one", secret, "C")  # LANG: the app's wins
    assert seen["PORT"] == str(first["port"]) and seen["CICD_APP"] == APP
    snapshot = runtime.app_dir(APP) / "config" / "1.json"
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600 and runtime.config_version(APP, 1) == 1

    appconfig.set_values(settings, APP, {"GREETING": "two"})
    runtime.restart(APP, [first["slot"]], op_key="restart/1")
    runtime.scale(APP, 3, op_key="scale/1")
    for replica in runtime.replicas(APP):
        assert replica["pid"] != first["pid"] or len(runtime.replicas(APP)) == 1
        assert environ_of(replica["pid"])["GREETING"] == "one"  # the release's values, not the newest

    runtime.stage_release(spec, 2, sample_source(settings.home))
    wait_for(lambda: all(s.healthy for s in runtime.probe_release(APP, 2)), timeout=20)
    runtime.activate_release(APP, 2)
    assert {environ_of(r["pid"])["GREETING"] for r in runtime.replicas(APP)} == {"two"}
    assert runtime.config_version(APP, 2) == 2
    # Nothing of ours holds a value: not the state file, not a command line, not the build log.
    logs = runtime.app_dir(APP) / "logs"
    assert secret not in (runtime.app_dir(APP) / "state.json").read_text()
    assert all(secret not in p.read_text() for p in logs.glob("build-*.log"))
    for replica in runtime.replicas(APP):
        with open(f"/proc/{replica['pid']}/cmdline", "rb") as fh:
            assert secret.encode() not in fh.read()


def test_build_steps_are_announced_as_they_begin(settings, runtime):
    spec = onboarding.generate_spec(APP, f"https://git.example.com/{APP}.git", "backend", "stage")
    steps = []
    # An empty requirements.txt: the install step runs (offline, from the empty wheelhouse).
    runtime.stage_release(spec, 1, sample_source(settings.home, {"requirements.txt": "# nothing yet\n"}),
                          progress=steps.append)
    assert steps == ["compiling the app (the template's build step)", "creating the virtualenv",
                     "installing dependencies (requirements.txt)", "starting 2 replicas, then the health gate"]
    build_log = (runtime.app_dir(APP) / "logs" / "build-1.log").read_text()
    announced = [line[4:] for line in build_log.splitlines() if line.startswith("--> ")]
    assert announced == steps[:-1]
    # Each announcement comes before the step's own command line.
    assert build_log.index("--> installing dependencies") < build_log.index("-m pip")


class Watched(LocalRuntime):
    """The real runtime; what the deploy's progress wrote is read back from the store at each step."""

    def stage_release(self, spec, number, source_dir, progress=None):
        self.details = []

        def observed(step):
            progress(step)
            with session_scope(self.settings, readonly=True) as session:
                self.details.append(releases.get(session, "stage", spec["name"], number).detail)
        return super().stage_release(spec, number, source_dir, observed)


def test_a_deploy_writes_each_build_step_into_the_release_detail(tmp_path):
    root = tmp_path / "git"
    examples.make_repo(root, "step-api")
    server = examples.start_server(root, tmp_path / "git.log")
    settings = Settings(env="stage", home=tmp_path)
    runtime = Watched(settings)
    try:
        assert onboarding.register(settings, "step-api", f"{server['url']}/step-api.git", "backend")["ok"]
        state = deployer.start(settings, runtime, "step-api", "deploy/steps", ref="main")
        assert state["status"] == "starting"
        assert runtime.details[0] == "compiling the app (the template's build step)..."
        assert runtime.details[-1] == "starting 2 replicas, then the health gate..."
    finally:
        for app in runtime.apps():
            runtime.stop_app(app)
        process.stop(server["pid"], server["ticks"])


def test_a_waiting_deploy_is_told_each_step(settings, capsys):
    from cicd.cli.apps import report_release
    with session_scope(settings) as session:
        releases.add(session, env="stage", app=APP, number=1, status="fetching", kind="deploy", ref="main",
                     sha=None, replicas=1, request_id="deploy/w")
    note = deployer._progress(settings, "deploy/w")

    def build():
        for step in ("creating the virtualenv", "installing dependencies (requirements.txt)"):
            time.sleep(0.5)
            note(step)
        time.sleep(0.5)
        with session_scope(settings) as session:
            release = releases.by_request(session, "deploy/w", for_update=True)
            release.status, release.detail, release.finished_at = "failed", "done", settings.clock.now()
    worker = threading.Thread(target=build)
    worker.start()
    with pytest.raises(SystemExit) as ended:
        report_release(settings, APP, after=0, timeout_s=20)  # what `cicd deploy` waits with
    worker.join()
    out = capsys.readouterr()
    assert ended.value.code == 1 and "release 1 failed" in out.out and ": done" in out.out
    # Off a terminal (as here): one line per step on stderr, stdout keeps only the result.
    assert out.err.splitlines() == ["  release 1 fetching", "  release 1 fetching: creating the virtualenv...",
                                    "  release 1 fetching: installing dependencies (requirements.txt)..."]
