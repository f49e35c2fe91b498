"""The local runtime: every replica is a real process on a free loopback port.

Layout under var/ENV/apps/APP/: state.json (the replicas, the build plan of each release and the
op journal, replaced whole on every change), releases/N/ (the code of each release, with its own
virtualenv in releases/N/.cicd/venv), config/N.json (the app settings release N was staged with,
0600, outside the release so an app serving its own directory cannot serve them), logs/
(build-N.log, release-N.log, replica-S.log), and .lock (an flock that serialises changes to one
app across all worker processes).

Builds follow the buildpack conventions (cicd.delivery.buildpack): the template's build step,
then a virtualenv per release made from the interpreter the release asks for, its dependencies
installed by pip through one wheelhouse under var/cache/wheels (so a redeploy of unchanged
dependencies takes seconds, offline), Django's collectstatic, and the Procfile's release command.
The frontend and fullstack templates add the Node toolchain before the Python steps: `npm ci` (or
`npm install`) and `npm run build`, through one npm cache under var/cache/npm.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import http.client
import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from cicd.config import Settings
from cicd.core.names import is_app_name
from cicd.delivery import appconfig, buildpack, onboarding
from cicd.runtime import loadgen, process, proxyfigures
from cicd.runtime.endpoints import Endpoints, upstreams_of
from cicd.runtime.base import ReplicaStatus, Runtime, RuntimeFailure

OPS_KEPT = 500
RELEASES_KEPT = 3
# `cicd inject overload`: an app that reports its capacity (the sample service) gets its /work
# route, which occupies one of its slots; any other app its health path (the probes then queue
# behind the load, as they would behind real traffic), unless --path says what to load.
SAMPLE_WORK_PATH = "/work?ms=100"
LOAD_MAX_CLIENTS = 64
LOAD_RAMP_TIMEOUT_S = 60.0
VENV_DIR = Path(".cicd") / "venv"   # inside the release: removed with it, never the control plane's
STEP_TIMEOUT_S = 900                # one build step: a cold pip install of a large app takes minutes
# After the proxy stops sending a replica requests, the ones it already has get this long to finish
# before it is stopped (the sample service answers in milliseconds; Caddy retries the rest).
DRAIN_S = 0.5
Progress = Callable[[str], None]   # told each build step as it begins: "installing dependencies (...)"


def shlex_join(argv: list[str]) -> str:
    return shlex.join(str(a) for a in argv)


def _substitute(argv: list[str], values: dict) -> list[str]:
    # Whole-argument substitution only: a value can never become more than one argument.
    return [values.get(arg[1:-1], arg) if arg.startswith("{") and arg.endswith("}") else arg for arg in argv]


def _judge(status: int, body: bytes) -> tuple[bool, float, int]:
    """(healthy, utilization, capacity) of one probe's answer. Any status below 400 is healthy,
    for any app; a JSON body like the sample service's adds what it reports of its load and may
    say it is degraded."""
    ok = status < 400
    try:
        data = json.loads(body)
    except ValueError:
        return ok, 0.0, 0
    if not isinstance(data, dict):
        return ok, 0.0, 0
    try:
        utilization, capacity = float(data.get("utilization", 0.0)), int(data.get("capacity", 0))
    except (ValueError, TypeError):
        utilization, capacity = 0.0, 0
    return ok and data.get("status") != "degraded", utilization, capacity


# CPU is a rate: the CPU time a replica used since this process last looked, over the time
# that passed. Kept per process (the monitor worker probes every second and lives long); the
# first look at a replica falls back to its average since it started.
_cpu_samples: dict[tuple[int, int], tuple[float, int, float]] = {}  # (pid, ticks) -> (when, cpu ticks, cores)
CPU_MIN_INTERVAL_S = 0.25    # closer looks than this say more about the clock tick than the load
CPU_SAMPLES_KEPT_S = 120.0
CPU_YOUNG_S = 1.0            # a replica's start (imports) is not load: no average before this age


def _cpu_cores(pid: int, used: process.Usage) -> float:
    now = time.monotonic()
    key = (pid, used.started_ticks)
    seen = _cpu_samples.get(key)
    if seen is not None and now - seen[0] < CPU_MIN_INTERVAL_S:
        return seen[2]
    if seen is not None:
        cores = max(0, used.cpu_ticks - seen[1]) / process.CLOCK_TICKS / (now - seen[0])
    else:
        age_s = (process.uptime_ticks() - used.started_ticks) / process.CLOCK_TICKS
        cores = used.cpu_ticks / process.CLOCK_TICKS / age_s if age_s >= CPU_YOUNG_S else 0.0
    cores = round(cores, 3)
    _cpu_samples[key] = (now, used.cpu_ticks, cores)
    return cores


def _forget_cpu_samples() -> None:
    cutoff = time.monotonic() - CPU_SAMPLES_KEPT_S
    for key in [k for k, (when, _, _) in _cpu_samples.items() if when < cutoff]:
        _cpu_samples.pop(key, None)


def load_path(option: str | None, capacity: int, health_path: str) -> str:
    """What `cicd inject overload` requests: --path if given, /work on an app that reports a
    capacity (the sample service), else the app's health path."""
    if option:
        if not option.startswith("/") or any(c.isspace() or ord(c) < 32 for c in option):
            raise RuntimeFailure(f"overload --path {option!r}: must start with / and have no spaces or "
                                 f"control characters")
        return option
    return SAMPLE_WORK_PATH if capacity else health_path or "/"


class LocalRuntime(Runtime):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.apps_dir
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = None
        self.endpoints = Endpoints(settings)
        self.proxy_figures_of = proxyfigures.Recorder(settings)
        # Where the replicas listen and are probed: loopback, or on a host agent the address the
        # control plane reaches this machine at (CICD_HOST_ADDRESS).
        self.address = settings.host_address

    # -- state ---------------------------------------------------------------------------
    def app_dir(self, app: str) -> Path:
        # The registry validated the name already; checking again here means no caller can make
        # the runtime touch a path outside var/ENV/apps.
        if not is_app_name(app):
            raise RuntimeFailure(f"app name {app!r}: not a valid app name")
        return self.root / app

    def _read(self, app: str) -> dict:
        try:
            return json.loads((self.app_dir(app) / "state.json").read_text())
        except FileNotFoundError:
            return {}

    def _write(self, app: str, state: dict) -> None:
        path = self.app_dir(app) / "state.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(path)

    @contextlib.contextmanager
    def _locked(self, app: str):
        directory = self.app_dir(app)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self._read(app) or {"app": app, "live": None, "replicas": {}, "staged": {}, "ops": []}
                try:
                    yield state
                finally:
                    # Written even when the operation failed half-way: the state must always name
                    # every process we started, or a failure would leave orphans nobody stops.
                    self._write(app, state)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _done(state: dict, op_key: str):
        for key, result in state["ops"]:
            if key == op_key:
                return result
        return None

    @staticmethod
    def _record(state: dict, op_key: str, result: dict) -> dict:
        state["ops"] = (state["ops"] + [[op_key, result]])[-OPS_KEPT:]
        return result

    # -- replicas ------------------------------------------------------------------------
    def _start_replica(self, state: dict, release: int, slot: int) -> dict:
        app, spec = state["app"], state["spec"]
        port = process.free_port()
        release_dir = self.app_dir(app) / "releases" / str(release)
        plan = state.get("plans", {}).get(str(release))
        # The release's own settings, whenever it starts a replica: a restart or a scale-out keeps
        # the values the release was staged with, whatever `cicd config` changed since.
        _, config = appconfig.read_snapshot(self._config_snapshot(app, release))
        env = self._app_env(release_dir, plan, {"PORT": port, "CICD_APP": app, "CICD_REPLICA": slot,
                                                "CICD_RELEASE": release, "CICD_ENV": self.settings.env},
                            config=config)
        if plan and plan.get("web"):
            argv = buildpack.expand_port(plan["web"], port)
        else:
            # No Procfile: the template's documented start, run by the release's own interpreter.
            argv = _substitute(spec["start"], {"python": self._python_of(release_dir, plan), "port": str(port)})
        argv = self._resolve(argv, env, f"replica {slot} of {app} did not start")
        log = str(self.app_dir(app) / "logs" / f"replica-{slot}.log")
        try:
            pid, ticks = process.spawn_detached(argv, str(release_dir), env, log)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeFailure(f"replica {slot} of {app} did not start: {exc}") from None
        return {"slot": slot, "pid": pid, "ticks": ticks, "port": port, "release": release,
                "started_at": time.time(), "health_path": buildpack.health_path(plan, spec),
                "memory_limit_mb": buildpack.memory_limit_mb(plan, spec)}

    @staticmethod
    def _python_of(release_dir: Path, plan: dict | None) -> str:
        venv_python = release_dir / VENV_DIR / "bin" / "python"
        # A release staged before builds made virtualenvs has no plan: it keeps our interpreter.
        return str(venv_python) if plan and venv_python.exists() else sys.executable

    def _config_snapshot(self, app: str, release: int) -> Path:
        return self.app_dir(app) / "config" / f"{release}.json"

    def _app_env(self, release_dir: Path, plan: dict | None, extra: dict, config: dict | None = None) -> dict:
        """What the app's processes get: its settings (`cicd config`), the release's virtualenv
        first on PATH, loopback as HOST (the probes and the proxy reach it there), and no shell.
        The platform's own values (extra) win; appconfig refuses the keys they use anyway."""
        env = process.clean_env({**(config or {}), **extra})
        venv = release_dir / VENV_DIR
        if plan and venv.exists():
            env["VIRTUAL_ENV"] = str(venv)
            env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", os.defpath)])
        if plan and plan.get("npm_install"):
            env.update(self._npm_env())
            env.setdefault("NODE_ENV", "production")  # what the Node buildpacks set for the app
        env.setdefault("HOST", self.address)
        return env

    def _npm_env(self) -> dict:
        # One cache for every app (a redeploy of unchanged dependencies reads it, offline first),
        # which also keeps npm's own logs there rather than in the operator's ~/.npm; no update
        # check, which would be a registry call on every build and every `npm start`.
        return {"npm_config_cache": str(self.settings.var_dir / "cache" / "npm"),
                "npm_config_prefer_offline": "true", "npm_config_update_notifier": "false",
                "npm_config_progress": "false"}

    @staticmethod
    def _resolve(argv: list[str], env: dict, what: str) -> list[str]:
        # Looked up on the app's PATH (its virtualenv first), so `gunicorn` is the release's own;
        # a missing program is named now rather than surfacing as a replica that never listens.
        if os.sep in argv[0]:
            return argv
        found = shutil.which(argv[0], path=env.get("PATH"))
        if found is None:
            raise RuntimeFailure(f"{what}: {argv[0]!r} is not installed in the release or on PATH "
                                 f"(a Python tool belongs in requirements.txt)")
        return [found, *argv[1:]]

    def _build(self, spec: dict, number: int, release_dir: Path, config: dict | None = None,
               progress: Progress | None = None) -> dict:
        """Build release `number` in place by its buildpack plan; returns the plan (as a dict).

        Every step's output goes to logs/build-N.log (the release command's to release-N.log);
        a failing step fails the release with its exit status and the end of its output. Each
        step is announced as it begins, to progress and as a `--> ` line in the build log (what
        `cicd logs -f` and a waiting `cicd deploy` show). The app's settings (config) reach only
        the steps that run the app's own code: collectstatic (Django imports its settings) and
        the release command; the installers never see them."""
        app = spec["name"]
        try:
            plan = buildpack.plan(release_dir, runtime=spec.get("runtime"))
        except buildpack.BuildpackError as exc:
            raise RuntimeFailure(f"build of release {number}: {exc}") from None
        logs = self.app_dir(app) / "logs"
        build_log, step = self._build_log(app, number, plan, progress)
        venv = release_dir / VENV_DIR
        python = str(venv / "bin" / "python")
        # The template's step first (compileall), so it compiles the app and not the virtualenv.
        step("compiling the app (the template's build step)")
        self._step(f"build of release {number}", _substitute(spec["build"], {"python": plan.python}),
                   release_dir, process.clean_env({}), build_log)
        if plan.npm_install:
            self._node(number, plan, release_dir, build_log, step)
        # pip runs from the control plane into the release's virtualenv (pip --python), which
        # then needs no pip of its own: making it takes a tenth of a second, not several.
        own_pip = importlib.util.find_spec("pip") is not None
        step("creating the virtualenv" + (f" (Python from {plan.python_from})" if plan.python_from else ""))
        self._step(f"virtualenv of release {number}",
                   [plan.python, "-m", "venv", *(["--without-pip"] if own_pip else []), str(venv)],
                   release_dir, process.clean_env({}), build_log)
        build_plan = plan.to_dict()
        pip_env = {"PIP_CACHE_DIR": self.settings.var_dir / "cache" / "pip", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                   "PIP_NO_INPUT": "1", "PIP_PROGRESS_BAR": "off"}
        env = self._app_env(release_dir, build_plan, pip_env)
        app_env = self._app_env(release_dir, build_plan, pip_env, config=config)
        if plan.install:
            pip = [sys.executable, "-m", "pip", "--python", python] if own_pip else [python, "-m", "pip"]
            source = "requirements.txt" if plan.install[:1] == ["-r"] else "pyproject.toml"
            self._install(number, pip, plan.install, release_dir, env, build_log,
                          lambda how: step(f"installing dependencies ({source}{how})"))
        if plan.collectstatic and (config or {}).get("DISABLE_COLLECTSTATIC") == "1":
            step("not collecting static files: the app's setting DISABLE_COLLECTSTATIC is 1")
        elif plan.collectstatic and self._has_django(python, release_dir, env):
            # What the Heroku Python buildpack does for a Django app; a failure fails the build there
            # too, and the same setting turns it off.
            step("collecting static files (Django collectstatic)")
            try:
                self._step(f"collectstatic of release {number}", [python, "manage.py", "collectstatic", "--noinput"],
                           release_dir, app_env, build_log)
            except RuntimeFailure as exc:
                raise RuntimeFailure(f"{exc}\n(fix the app's static files settings, such as STATIC_ROOT, or turn "
                                     f"collectstatic off: cicd config set {app} DISABLE_COLLECTSTATIC=1)") from None
        if plan.release:
            argv = self._resolve(plan.release, app_env, f"release command of release {number}")
            step(f"running the release command ({shlex_join(plan.release)})")
            self._step(f"release command of release {number} ({shlex_join(plan.release)})", argv,
                       release_dir, app_env, logs / f"release-{number}.log")
        return build_plan

    def _build_log(self, app: str, number: int, plan: buildpack.BuildPlan,
                   progress: Progress | None) -> tuple[Path, Progress]:
        """logs/build-N.log begun with the plan's notes, and the step announcer: each step as it
        begins, as a `--> ` line there and to progress."""
        logs = self.app_dir(app) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        build_log = logs / f"build-{number}.log"
        build_log.write_text("".join(f"note: {n}\n" for n in plan.notes))

        def step(text: str) -> None:
            with open(build_log, "a") as out:
                out.write(f"--> {text}\n")
            if progress is not None:
                progress(text)
        return build_log, step

    def _node(self, number: int, plan: buildpack.BuildPlan, release_dir: Path, log: Path,
              step: Progress) -> None:
        """The Node toolchain, before the Python steps (fullstack: the Python app may serve what
        the Node build made). NODE_ENV stays unset here so that devDependencies, where build tools
        live, are installed as `npm ci` does by default."""
        env = process.clean_env(self._npm_env())
        npm = self._resolve(["npm"], env, f"Node build of release {number}")
        step(f"installing Node dependencies (npm {plan.npm_install[0]})")
        self._step(f"Node dependencies of release {number} (npm {plan.npm_install[0]})",
                   [*npm, *plan.npm_install], release_dir, env, log)
        if plan.npm_build:
            step("building the frontend (npm run build)")
            self._step(f"Node build of release {number} (npm run build)", [*npm, "run", "build"],
                       release_dir, env, log)

    def _install(self, number: int, pip: list[str], what: list[str], release_dir: Path, env: dict,
                 log: Path, step: Progress) -> None:
        """pip install through a wheelhouse shared by every app (var/cache/wheels).

        Offline first: dependencies that were installed before are all there, so an unchanged
        redeploy needs no network and takes seconds (pip's own HTTP cache is kept too, but it
        cannot be relied on: it stores nothing when a proxy marks responses uncacheable). When
        something is missing, `pip wheel` fetches it into the wheelhouse and the install runs
        again. Like Heroku's cache, unpinned requirements keep the versions first resolved."""
        wheels = self.settings.var_dir / "cache" / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        local = ["--find-links", str(wheels)]
        step("")
        if self._step(f"dependencies of release {number} (from the wheelhouse)",
                      [*pip, "install", "--no-index", *local, *what], release_dir, env, log, check=False) == 0:
            return
        step(", downloading what the cache lacks")
        self._step(f"dependencies of release {number} (download)", [*pip, "wheel", "--wheel-dir", str(wheels),
                                                                    *local, *what], release_dir, env, log)
        self._step(f"dependencies of release {number}", [*pip, "install", *local, *what], release_dir, env, log)

    @staticmethod
    def _has_django(python: str, release_dir: Path, env: dict) -> bool:
        found = subprocess.run([python, "-c", "import django"], cwd=release_dir, env=env,
                               capture_output=True, timeout=60)
        return found.returncode == 0

    @staticmethod
    def _step(what: str, argv: list[str], cwd: Path, env: dict, log: Path, check: bool = True) -> int:
        with open(log, "a") as out:
            out.write(f"$ {shlex_join(argv)}\n")
            out.flush()
            begin = out.tell()
            started = time.monotonic()
            try:
                done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, timeout=STEP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise RuntimeFailure(f"{what} could not run: {exc}") from None
            out.write(f"# exit {done.returncode} after {time.monotonic() - started:.1f} s\n")
        if done.returncode != 0 and check:
            with open(log, "rb") as fh:
                fh.seek(begin)
                output = fh.read().decode(errors="replace").rsplit("# exit", 1)[0].strip()
            raise RuntimeFailure(f"{what} failed (exit {done.returncode}): {output[-800:]}")
        return done.returncode

    # -- one replica: what a runtime that runs them elsewhere (containers) does its own way -------
    @staticmethod
    def _stop_replica(replica: dict) -> bool:
        return process.stop(replica.get("pid"), replica.get("ticks"))

    @staticmethod
    def _stop_replicas(replicas: list[dict]) -> int:
        return process.stop_all([(r.get("pid"), r.get("ticks")) for r in replicas])

    @staticmethod
    def _alive(replica: dict) -> bool:
        return process.is_alive(replica.get("pid"), replica.get("ticks"))

    @staticmethod
    def _kill_replica(replica: dict) -> dict | None:
        """A real crash (SIGKILL); what was done, or None if it was not running."""
        if not process.kill(replica["pid"], replica.get("ticks")):
            return None
        return {"pid": replica["pid"], "signal": "SIGKILL"}

    @staticmethod
    def _suspend_replica(replica: dict) -> dict | None:
        # SIGSTOP to its process group: alive to every process check, answering nothing, like a
        # deadlock. Only the probes can tell, and a restart has to SIGCONT or SIGKILL it.
        if not process.suspend(replica["pid"], replica.get("ticks")):
            return None
        return {"pid": replica["pid"], "signal": "SIGSTOP"}

    @staticmethod
    def _measured(replicas: list[dict]) -> list[dict | None]:
        """What the platform measures of each replica (cpu in cores, rss_mb, stopped), in order;
        None where it cannot be measured. One pass over /proc for the whole batch."""
        usage = process.session_usage({r["pid"] for r in replicas if r.get("pid")})
        out = []
        for replica in replicas:
            pid = replica.get("pid")
            used = usage.get(pid)
            if used is None or replica.get("ticks") not in (None, used.started_ticks):
                out.append(None)
                continue
            out.append({"cpu": _cpu_cores(pid, used), "rss_mb": round(used.rss_bytes / 2**20, 1),
                        "stopped": used.stopped})
        return out

    def _ended(self, app: str, replica: dict) -> dict:
        """How a replica that is no longer running ended: exit, code, log_tail (see Runtime.exits)."""
        pid, ticks = replica.get("pid"), replica.get("ticks")
        log = self.replica_log(app, int(replica["slot"]))
        ended = process.exit_of(log, pid, ticks)
        # Without a known exit, the tail of the whole log is still the best clue there is.
        return {"exit": process.describe_exit(ended), "code": (ended or {}).get("code"),
                "log_tail": process.log_tail(log, (ended or {}).get("log_offset", 0))}

    # -- the stable endpoint -------------------------------------------------------------
    def _publish(self, state: dict) -> str | None:
        """Point the app's stable address at its live replicas (called under the app's lock, after
        each change, so the proxy sees the changes in order). None, or why the proxy did not take it."""
        running = [r for r in state.get("replicas", {}).values() if self._alive(r)]
        return self.endpoints.publish(state["app"], upstreams_of(running))

    @staticmethod
    def _proxy_note(problem: str | None) -> dict:
        return {"proxy": problem} if problem else {}

    def _drain(self, replicas: list[dict]) -> None:
        # Only a replica still running has requests to finish: a crashed one is replaced at once
        # (draining it cost every crash restart DRAIN_S, `make bench`'s crash to healthy).
        running = [r for r in replicas if self._alive(r)]
        if running and self.endpoints.proxied():
            time.sleep(DRAIN_S)

    def _await_ready(self, spec: dict, replicas: list[dict]) -> None:
        """Until every replica answers its health probe, has exited, or its start grace is over."""
        deadline = time.monotonic() + self.settings.start_grace_s
        waiting = list(replicas)
        while waiting and time.monotonic() < deadline:
            waiting = [r for r, s in zip(waiting, self._probe_replicas(spec, waiting)) if s.alive and not s.healthy]
            if waiting:
                time.sleep(0.05)

    def endpoint(self, app: str) -> str | None:
        return self.endpoints.url(app)

    # -- releases ------------------------------------------------------------------------
    def stage_release(self, spec: dict, number: int, source_dir: Path, progress: Progress | None = None) -> dict:
        app = spec["name"]
        try:
            onboarding.memory_limit_mb(spec)
        except onboarding.OnboardingRefused as exc:
            raise RuntimeFailure(f"spec of {app}: {exc}") from None
        with self._locked(app) as state:
            state["spec"] = spec
            if str(number) in state["staged"]:
                return {"release": number, "already": True}
            release_dir = self.app_dir(app) / "releases" / str(number)
            if release_dir.exists():
                shutil.rmtree(release_dir)
            release_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source_dir), str(release_dir))
            plans = state.setdefault("plans", {})
            for kept in [n for n in plans if not (release_dir.parent / n).exists()]:
                del plans[kept]  # its release was pruned
            # The settings as they are now become the release's: copied before the build, so its
            # release command and its replicas see the same version.
            try:
                config = appconfig.load(self.settings, app)
            except appconfig.ConfigRefused as exc:
                raise RuntimeFailure(f"settings of {app}: {exc}") from None
            appconfig.write_snapshot(self._config_snapshot(app, number), config)
            plans[str(number)] = self._build(spec, number, release_dir, config.values, progress)
            plans[str(number)]["config_version"] = config.version
            used = {int(s) for s in state["replicas"]}
            slots = [s for s in range(64) if s not in used][:spec["replicas"]]
            if progress is not None:
                progress(f"starting {len(slots)} replica{'' if len(slots) == 1 else 's'}, then the health gate")
            staged = state["staged"][str(number)] = {}
            for slot in slots:
                staged[str(slot)] = self._start_replica(state, number, slot)
            return {"release": number, "slots": slots, "pids": [r["pid"] for r in staged.values()],
                    "config_version": config.version}

    def probe_release(self, app: str, number: int) -> list[ReplicaStatus]:
        state = self._read(app)
        replicas = list(state.get("staged", {}).get(str(number), {}).values())
        return self._probe_replicas(state.get("spec", {}), replicas)

    def replica_log(self, app: str, slot: int) -> Path:
        return self.app_dir(app) / "logs" / f"replica-{slot}.log"

    def exits(self, app: str, number: int) -> list[dict]:
        state = self._read(app)
        replicas = state.get("staged", {}).get(str(number))
        if replicas is None and state.get("live") == number:
            replicas = state.get("replicas", {})
        out = []
        for replica in sorted((replicas or {}).values(), key=lambda r: int(r["slot"])):
            if not self._alive(replica):
                out.append({"slot": int(replica["slot"]), **self._ended(app, replica)})
        return out

    def activate_release(self, app: str, number: int) -> dict:
        with self._locked(app) as state:
            staged = state["staged"].pop(str(number), None)
            old = [] if staged is None else list(state["replicas"].values())
            if staged is not None:
                state["replicas"], state["live"] = staged, number
            # The replicas taken out of service stay on record until they are stopped: a worker
            # killed while stopping them (a grace period each) leaves them to the next activate,
            # the reconciler's, instead of running unowned for ever.
            state["retiring"] = state.get("retiring", []) + old
            retiring = list(state["retiring"])
            # Blue/green: the stable address moves to the new release only now, after its gate.
            proxy = self._publish(state) if staged is not None else None
        self._drain(retiring)
        self._stop_replicas(retiring)
        with self._locked(app) as state:
            state["retiring"] = [r for r in state.get("retiring", []) if r not in retiring]
            live = state.get("live")
        if staged is None:
            return {"release": number, "already": live == number}
        self._prune_releases(app, keep=number)
        return {"release": number, "replicas": len(staged), "stopped": len(old), **self._proxy_note(proxy)}

    def discard_release(self, app: str, number: int) -> dict:
        with self._locked(app) as state:
            staged = state["staged"].pop(str(number), {})
        self._stop_replicas(list(staged.values()))
        return {"release": number, "stopped": len(staged)}

    def _prune_releases(self, app: str, keep: int) -> None:
        releases = self.app_dir(app) / "releases"
        numbers = sorted(int(p.name) for p in releases.iterdir() if p.name.isdigit())
        for n in numbers[:-RELEASES_KEPT]:
            if n != keep:
                shutil.rmtree(releases / str(n), ignore_errors=True)
                self._config_snapshot(app, n).unlink(missing_ok=True)

    # -- probes --------------------------------------------------------------------------
    def _executor(self) -> ThreadPoolExecutor:
        # A pool made before a fork is useless in the child: make one per process.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(max_workers=16), os.getpid()
        return self._pool

    def _probe_one(self, spec: dict, replica: dict, usage: dict | None) -> ReplicaStatus:
        slot, pid, port = int(replica["slot"]), replica.get("pid"), replica.get("port")
        if not self._alive(replica):
            return ReplicaStatus(slot, pid, port, alive=False, status="down")
        measured = {"cpu": 0.0, "rss_mb": 0.0, "stopped": False,
                    "memory_limit_mb": replica.get("memory_limit_mb") or buildpack.memory_limit_mb(None, spec)}
        measured.update(usage or {})
        path = replica.get("health_path") or spec.get("health_path", "/health")
        started = time.monotonic()
        try:
            answer = None
            if (fault := replica.get("probe_fault")) and time.time() < fault["until"]:
                # A false alarm: this probe asks the proxy's fault listener instead. If that does
                # not answer (Caddy gone meanwhile), there is no fault, and the app is asked.
                with contextlib.suppress(ConnectionRefusedError):
                    answer = self._ask(fault["port"], path)
            status_code, body = answer or self._ask(port, path)
        except ConnectionRefusedError:
            young = time.time() - replica.get("started_at", 0) < self.settings.start_grace_s
            return ReplicaStatus(slot, pid, port, alive=True, status="starting" if young else "refused", **measured)
        except (OSError, http.client.HTTPException):
            return ReplicaStatus(slot, pid, port, alive=True, status="timeout",
                                 latency_ms=round((time.monotonic() - started) * 1000, 2), **measured)
        latency = (time.monotonic() - started) * 1000
        ok, utilization, capacity = _judge(status_code, body)
        return ReplicaStatus(slot, pid, port, alive=True, status="ok" if ok else "degraded",
                             utilization=utilization, capacity=capacity, latency_ms=round(latency, 2), **measured)

    def _ask(self, port: int, path: str) -> tuple[int, bytes]:
        # The load generator's own request, so its sampler measures what the probes see.
        return loadgen.request((self.address, port), path, self.settings.probe_timeout_s)

    def _probe_replicas(self, spec: dict, replicas: list[dict]) -> list[ReplicaStatus]:
        if not replicas:
            return []
        usage = self._measured(replicas)
        if len(replicas) == 1:
            return [self._probe_one(spec, replicas[0], usage[0])]
        return list(self._executor().map(lambda r, u: self._probe_one(spec, r, u), replicas, usage))

    def probe(self, apps: list[str]) -> dict[str, list[ReplicaStatus]]:
        jobs = []
        for app in apps:
            state = self._read(app)
            for replica in state.get("replicas", {}).values():
                jobs.append((app, state.get("spec", {}), replica))
        # Measured for the whole batch at once (one pass over /proc), not once per replica.
        usage = self._measured([job[2] for job in jobs])
        results: dict[str, list[ReplicaStatus]] = {app: [] for app in apps}
        statuses = self._executor().map(lambda job, used: self._probe_one(job[1], job[2], used), jobs, usage)
        # One scrape of the proxy's figures per cycle, for every app (while the replicas answer).
        proxied = self._scrape_proxy() if jobs else {}
        for (app, _, _), status in zip(jobs, statuses):
            if latency := proxied.get(app, {}).get("latency_ms"):
                status = dataclasses.replace(status, proxy_latency_ms=latency)
            results[app].append(status)
        for statuses_of_app in results.values():
            statuses_of_app.sort(key=lambda s: s.slot)
        _forget_cpu_samples()
        return results

    def _scrape_proxy(self) -> dict[str, dict]:
        admin = self.endpoints.admin()
        return self.proxy_figures_of.update(admin) if admin else {}

    def proxy_figures(self, app: str) -> dict | None:
        return self.proxy_figures_of.of(app) if self.endpoints.url(app) else None

    def replica_count(self, app: str) -> int:
        return len(self._read(app).get("replicas", {}))

    def replicas(self, app: str) -> list[dict]:
        """The live replicas as recorded: slot, pid, start ticks, port."""
        return [{**r, "slot": int(r["slot"])} for r in self._read(app).get("replicas", {}).values()]

    def apps(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "state.json").exists())

    def live_release(self, app: str) -> int | None:
        return self._read(app).get("live")

    def config_version(self, app: str, release: int) -> int | None:
        """The version of the app's settings release `release` was staged with (None: unknown)."""
        return self._read(app).get("plans", {}).get(str(release), {}).get("config_version")

    # -- actions -------------------------------------------------------------------------
    def restart(self, app: str, slots: list[int], op_key: str) -> dict:
        with self._locked(app) as state:
            if (done := self._done(state, op_key)) is not None:
                return {**done, "deduplicated": True}
            if state.get("live") is None:
                raise RuntimeFailure(f"{app} has no live release to restart")
            restarted, failed, proxy = [], [], None
            for slot in slots:
                old = state["replicas"].get(str(slot))
                if old is None:
                    continue  # scaled away meanwhile: nothing to restart
                # One slot at a time, the new process beside the old one: behind the proxy it
                # takes over the slot once it answers, then the old one is taken out, drained
                # and stopped, so even a single replica restarts without a failed request.
                try:
                    new = self._start_replica(state, state["live"], slot)
                except RuntimeFailure as exc:
                    failed.append(str(exc))
                    self._stop_replica(old)  # as before: a restart that cannot start stops the old one
                    proxy = self._publish(state)
                    continue
                if self.endpoints.proxied():
                    self._await_ready(state.get("spec", {}), [new])
                state["replicas"][str(slot)] = new
                proxy = self._publish(state)
                # On record before the old one stops: the exit watcher signals the exit of a replica
                # still counted, and this stop is on purpose (in a blip's incident it would be a crash).
                self._write(app, state)
                self._drain([old])
                was_running = self._stop_replica(old)
                restarted.append({"slot": slot, "old_pid": old["pid"], "new_pid": new["pid"],
                                  "was_running": was_running})
            result = self._record(state, op_key, {"effect": "restarted", "replicas": restarted, "failed": failed,
                                                  **self._proxy_note(proxy)})
        if failed:
            raise RuntimeFailure("; ".join(failed))
        return result

    def scale(self, app: str, replicas: int, op_key: str) -> dict:
        stopped = []
        with self._locked(app) as state:
            if (done := self._done(state, op_key)) is not None:
                return {**done, "deduplicated": True}
            if state.get("live") is None:
                raise RuntimeFailure(f"{app} has no live release to scale")
            current = sorted(int(s) for s in state["replicas"])
            before = len(current)
            if replicas > before:
                used = set(current)
                started = [self._start_replica(state, state["live"], slot)
                           for slot in [s for s in range(64) if s not in used][:replicas - before]]
                if self.endpoints.proxied():
                    # Added to the stable address once they answer (or their grace is over:
                    # Caddy's retry covers one that is still slow).
                    self._await_ready(state.get("spec", {}), started)
                for replica in started:
                    state["replicas"][str(replica["slot"])] = replica
            else:
                for slot in current[replicas:]:
                    stopped.append(state["replicas"].pop(str(slot)))
            # Scaling in: out of the proxy first, then drained, then stopped.
            proxy = self._publish(state)
            result = self._record(state, op_key, {"effect": "scaled", "from": before, "to": replicas,
                                                  **self._proxy_note(proxy)})
        self._drain(stopped)
        self._stop_replicas(stopped)
        return result

    # -- faults on purpose ---------------------------------------------------------------
    def _pick(self, state: dict, slot: int | None) -> dict:
        replicas = state.get("replicas", {})
        if not replicas:
            raise RuntimeFailure(f"{state.get('app')} has no running replicas")
        if slot is not None:
            if str(slot) not in replicas:
                raise RuntimeFailure(f"replica {slot} does not exist (replicas: {', '.join(sorted(replicas))})")
            return replicas[str(slot)]
        alive = [r for r in replicas.values() if self._alive(r)]
        if not alive:
            raise RuntimeFailure(f"no replica of {state.get('app')} is running")
        return min(alive, key=lambda r: int(r["slot"]))

    def inject(self, app: str, kind: str, **options) -> dict:
        state = self._read(app)
        if not state:
            raise RuntimeFailure(f"{app} is not deployed in {self.settings.env}")
        if kind == "crash":
            replica = self._pick(state, options.get("slot"))
            if (done := self._kill_replica(replica)) is None:
                raise RuntimeFailure(f"replica {replica['slot']} of {app} is not running")
            return {"kind": kind, "slot": int(replica["slot"]), **done}
        if kind == "false-alarm":
            return self._false_alarm(app, state, options.get("slot"))
        if kind == "hang":
            replica = self._pick(state, options.get("slot"))
            if (done := self._suspend_replica(replica)) is None:
                raise RuntimeFailure(f"replica {replica['slot']} of {app} is not running")
            return {"kind": kind, "slot": int(replica["slot"]), **done}
        if kind == "leak":
            return self._start_leak(app, state, options)
        if kind == "overload":
            return self._start_load(app, state, options)
        raise RuntimeFailure(f"fault kind {kind!r}: must be crash, hang, leak, overload or false-alarm")

    def _false_alarm(self, app: str, state: dict, slot: int | None) -> dict:
        """A transient failure of one replica's probes, for any app: for a short window its probes
        ask the proxy's fault listener (a 503) instead of the replica, then the replica again. The
        app and its stable address are untouched; only the monitor's view blips. Without a proxy,
        an app that degrades on request (the sample service's POST /admin/blip) can still blip."""
        # Short enough to clear before the detector would call it a crash, long enough to be seen.
        seconds = max(0.3, (self.settings.unhealthy_probes - 1.5) * self.settings.probe_interval_s)
        try:
            fault = self.endpoints.fault_address()
        except OSError as exc:
            raise RuntimeFailure(f"false alarm on {app}: the proxy did not take its fault listener: {exc}") from None
        if fault is None:
            return self._blip_by_app(app, self._pick(state, slot), seconds)
        port = int(fault.rpartition(":")[2])
        try:
            answered = self._ask(port, "/")[0]
        except (OSError, http.client.HTTPException) as exc:
            answered = exc
        if answered != 503:
            raise RuntimeFailure(f"false alarm on {app}: the proxy's fault listener ({fault}) answered {answered}, "
                                 f"not 503: is Caddy running? (`cicd up` starts it)")
        with self._locked(app) as state:
            replica = self._pick(state, slot)
            replica["probe_fault"] = {"port": port, "until": time.time() + seconds}
        return {"kind": "false-alarm", "slot": int(replica["slot"]), "blip_s": round(seconds, 2),
                "via": "proxy", "fault_listener": fault}

    def _blip_by_app(self, app: str, replica: dict, seconds: float) -> dict:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", replica["port"], timeout=2)
            conn.request("POST", f"/admin/blip?seconds={seconds:.2f}", headers={"Connection": "close"})
            answer = conn.getresponse().status
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            answer = exc
        if answer != 200:
            raise RuntimeFailure(f"false alarm on {app}: no proxy runs in {self.settings.env}, and replica "
                                 f"{replica['slot']} answered {answer} to POST /admin/blip (only the sample "
                                 f"service blips by itself). Start the proxy (`cicd up` starts it) for a false "
                                 f"alarm on any app.")
        return {"kind": "false-alarm", "slot": int(replica["slot"]), "blip_s": round(seconds, 2),
                "via": "app (POST /admin/blip: no proxy)"}

    def _start_leak(self, app: str, state: dict, options: dict) -> dict:
        replica = self._pick(state, options.get("slot"))
        limit = replica.get("memory_limit_mb") or buildpack.memory_limit_mb(None, state.get("spec", {}))
        # Fast enough to reach the limit within half a minute by default; it stops a little past
        # the limit, so a leak nobody heals cannot take the machine with it.
        mb_per_s = float(options.get("mb_per_s") or max(1.0, limit / 20))
        if not 0 < mb_per_s <= 1000:
            raise RuntimeFailure(f"leak rate {mb_per_s} MB/s: must be more than 0 and at most 1000")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", replica["port"], timeout=2)
            conn.request("POST", f"/admin/leak?mb_per_s={mb_per_s:.2f}&max_mb={int(limit * 1.5)}",
                         headers={"Connection": "close"})
            answer = conn.getresponse().status
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeFailure(f"replica {replica['slot']} of {app} did not take the leak request: {exc}") from None
        if answer != 200:
            raise RuntimeFailure(f"replica {replica['slot']} of {app} answered {answer} to POST /admin/leak: "
                                 f"only an app that grows its memory on request (the sample service does) can leak")
        return {"kind": "leak", "slot": int(replica["slot"]), "pid": replica["pid"], "mb_per_s": mb_per_s,
                "memory_limit_mb": limit}

    def _start_load(self, app: str, state: dict, options: dict) -> dict:
        self.stop_load(app)
        replicas = list(state["replicas"].values())
        statuses = [s for s in self._probe_replicas(state["spec"], replicas) if s.alive]
        if not statuses:
            raise RuntimeFailure(f"{app} has no live replica to load")
        health = (replicas[0].get("health_path") if replicas else None) or state["spec"].get("health_path") or "/"
        capacity = sum(s.capacity or 0 for s in statuses)
        path = load_path(options.get("path"), capacity, health)
        url = self.endpoints.url(app) if self.endpoints.proxied() else None
        duration = float(options.get("duration") or 30.0)
        directory = self.app_dir(app)
        report = directory / "load-report.json"
        report.unlink(missing_ok=True)
        # A first guess from the capacity it reports, else one client per replica and some: the
        # ramp finds the real count either way.
        start = math.ceil(sum(loadgen.band(self.settings.overload_threshold)) / 2 * capacity) if capacity \
            else 2 * len(statuses)
        argv = [sys.executable, "-I", "-S", str(Path(__file__).with_name("loadgen.py")),
                *(["--url", url] if url else []), "--state", str(directory / "state.json"),
                "--path", path, "--probe-path", health,
                "--probe-timeout", str(self.settings.probe_timeout_s),
                "--threshold", str(self.settings.overload_threshold),
                "--start-clients", str(start), "--max-clients", str(LOAD_MAX_CLIENTS),
                "--ramp-timeout", str(LOAD_RAMP_TIMEOUT_S), "--duration", str(duration), "--report", str(report)]
        log = directory / "logs" / "load.log"
        pid, ticks = process.spawn_detached(argv, str(directory), process.clean_env({}), str(log), record_exit=False)
        (directory / "load.json").write_text(json.dumps({"pid": pid, "ticks": ticks}))
        # The ramp's outcome is part of the answer: an app this load cannot overload is said so now.
        deadline = time.monotonic() + LOAD_RAMP_TIMEOUT_S + 10
        while not report.exists():
            if not process.is_alive(pid, ticks) or time.monotonic() > deadline:
                self.stop_load(app)
                tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                raise RuntimeFailure(f"the load generator for {app} ended before its ramp did: {tail.strip()}")
            time.sleep(0.2)
        ramp = json.loads(report.read_text())
        detail = {"kind": "overload", "target": url or "replicas directly (no proxy running)", "path": path,
                  "clients": ramp["clients"], "p50_ms": ramp["p50_ms"], "load": ramp["load"],
                  "overloaded": ramp["overloaded"], "duration_s": duration, "pid": pid}
        if not ramp["overloaded"]:
            detail["warning"] = f"{app}: {ramp['why']}"
        return detail

    def stop_load(self, app: str) -> bool:
        path = self.app_dir(app) / "load.json"
        try:
            load = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        path.unlink(missing_ok=True)
        return process.stop(load.get("pid"), load.get("ticks"), grace_s=1.0)

    def stop_app(self, app: str) -> int:
        self.stop_load(app)
        with self._locked(app) as state:
            replicas = list(state["replicas"].values()) + state.get("retiring", [])
            for staged in state["staged"].values():
                replicas.extend(staged.values())
            state["replicas"], state["staged"], state["live"], state["retiring"] = {}, {}, None, []
            if self.endpoints.url(app):
                self._publish(state)  # the address stays the app's, answering 503 until a release
        return self._stop_replicas(replicas)

    def remove_app(self, app: str) -> int:
        directory = self.app_dir(app)
        if not directory.exists():
            return 0
        stopped = self.stop_app(app)
        self.endpoints.forget(app)  # its stable address is free again
        # Its releases, state and logs go (the proof log is the record that stays). An action that
        # was waiting on the app's lock meanwhile then fails loudly: there is no app to act on.
        shutil.rmtree(directory, ignore_errors=True)
        return stopped
