"""The Docker runtime (CICD_RUNTIME=docker): every replica is a container, driven through the
Docker Engine API (the `docker` package, Docker's own client; DOCKER_HOST says which daemon).

A release is an image: the repo's own Dockerfile when it has one, else the buildpack template
rendered onto CICD_DOCKER_BASE_IMAGE (the same plan as the local runtime: the Procfile, $PORT,
requirements.txt or pyproject.toml, package.json, Django's collectstatic, the release command).
Replicas are containers labelled cicd.app, cicd.env, cicd.release and cicd.slot, on the host's
network, each on a port of its own; everything above the replica is the local runtime's: the
state file and its lock, the op journal, blue/green behind the stable endpoint (Caddy),
restart beside the old container, scale, rollback to the previous release's image, the probes.

What differs is how a replica is started, stopped, measured and broken: `docker run --init`
(so a stop does not wait out the grace on a PID 1 that ignores SIGTERM), CPU and memory from
the container's stats, a crash as SIGKILL to the container, a hang as `docker pause` (the
freezer: alive, answering nothing), exits from the container's state (OOMKilled included), and
the exit watcher reads the daemon's event stream (`die`) instead of pidfds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from cicd.config import Settings
from cicd.delivery import buildpack
from cicd.runtime import process
from cicd.runtime.base import ReplicaStatus, RuntimeFailure
from cicd.runtime.local import RELEASES_KEPT, LocalRuntime, Progress, _substitute

LABEL = "cicd"                 # labels: cicd.app, cicd.env, cicd.release, cicd.slot
APP_DIR = "/app"               # where the template puts the code in the image
VENV = "/app/.cicd/venv"       # the release's virtualenv in the image
DOCKERFILE = ".cicd/Dockerfile"
STOP_GRACE_S = 3
BUILD_TIMEOUT_S = 900
RELEASE_COMMAND_TIMEOUT_S = 600
API_TIMEOUT_S = 60


def client():
    """A client of the daemon DOCKER_HOST names (the local socket by default); RuntimeFailure
    naming the daemon and what to do when it cannot be reached."""
    try:
        import docker
    except ImportError:  # pragma: no cover - a dependency in setup.cfg
        raise RuntimeFailure("the Docker runtime needs the `docker` package: pip install -e .") from None
    try:
        found = docker.from_env(timeout=API_TIMEOUT_S)
        found.ping()
        return found
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        raise RuntimeFailure(f"no Docker daemon answers at {where} (DOCKER_HOST): {exc}; start dockerd, or set "
                             f"DOCKER_HOST to the daemon of this host") from None


def image_of(settings: Settings, app: str, number: int) -> str:
    return f"cicd-heal/{settings.env}-{app}:{number}"


def render_dockerfile(plan: buildpack.BuildPlan, spec: dict, base: str, collectstatic: bool) -> str:
    """The buildpack template as a Dockerfile: the image the local runtime's build steps would
    make, onto `base`. RUN lines use exec form, so nothing the repo says reaches a shell."""
    def run(argv: list[str]) -> str:
        return "RUN " + json.dumps(argv)
    lines = ["# Rendered by cicd-heal from the buildpack template (no Dockerfile in the repo).",
             f"FROM {base}", f"WORKDIR {APP_DIR}", "COPY . .",
             "ENV PYTHONUNBUFFERED=1 LANG=C.UTF-8"]
    if plan.npm_install:
        lines.append(run(["npm", *plan.npm_install]))
        if plan.npm_build:
            lines.append(run(["npm", "run", "build"]))
        lines.append("ENV NODE_ENV=production")
    lines.append(run(["python3", "-m", "venv", *([] if plan.install else ["--without-pip"]), VENV]))
    lines.append(f"ENV VIRTUAL_ENV={VENV} PATH={VENV}/bin:$PATH")
    if plan.install:
        lines.append(run(["pip", "install", "--no-cache-dir", "--disable-pip-version-check", *plan.install]))
    lines.append(run(_substitute(spec["build"], {"python": "python"})))
    if collectstatic:
        lines.append(run(["python", "manage.py", "collectstatic", "--noinput"]))
    return "\n".join(lines) + "\n"


def source_digest(release_dir: Path) -> str:
    """A digest of what an image is built from: every file of the release (paths and contents,
    the rendered Dockerfile included; the release's other build files are not)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in release_dir.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(release_dir).as_posix()
        if relative.startswith(".cicd/") and relative != DOCKERFILE:
            continue
        digest.update(relative.encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def describe(state: dict) -> dict:
    """How a container ended, from its state: exit, code, and oom when the kernel killed it."""
    code = state.get("ExitCode")
    if state.get("OOMKilled"):
        return {"exit": "was killed: out of memory (the container's limit)", "code": code}
    if isinstance(code, int) and code > 128 and code - 128 in signal.valid_signals():
        return {"exit": f"was killed by {signal.Signals(code - 128).name}", "code": code}
    if isinstance(code, int):
        return {"exit": f"exited with code {code}", "code": code}
    return {"exit": "exited", "code": None}


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_number(path: Path, key: str | None = None) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    if key is None:
        return int(text.split()[0])
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def cgroup_usage(pid: int) -> tuple[int, int] | None:
    """(memory in bytes less the droppable page cache, CPU in ns so far) of the cgroup of process
    `pid` (a container's init), cgroup v1 or v2; None if it is not a process of this machine."""
    if pid <= 0:
        return None
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    paths = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path.lstrip("/")
    if "memory" in paths:   # v1: a hierarchy per controller
        memory = CGROUP_ROOT / "memory" / paths["memory"]
        cpu = CGROUP_ROOT / "cpuacct" / paths.get("cpuacct", paths["memory"])
        used = _read_number(memory / "memory.usage_in_bytes")
        inactive = _read_number(memory / "memory.stat", "total_inactive_file")
        cpu_ns = _read_number(cpu / "cpuacct.usage")
    elif "" in paths:       # v2: one hierarchy
        unified = CGROUP_ROOT / paths[""]
        used = _read_number(unified / "memory.current")
        inactive = _read_number(unified / "memory.stat", "inactive_file")
        usec = _read_number(unified / "cpu.stat", "usage_usec")
        cpu_ns = None if usec is None else usec * 1000
    else:
        return None
    if used is None or cpu_ns is None:
        return None
    return max(0, used - (inactive or 0)), cpu_ns


class DockerRuntime(LocalRuntime):
    def __init__(self, settings: Settings):
        super().__init__(settings)
        self._client = None
        self._cpu: dict[str, tuple[float, int]] = {}   # container id -> (when, cpu ns so far)

    @property
    def docker(self):
        if self._client is None:
            self._client = client()
        return self._client

    def _labels(self, app: str, **more) -> dict:
        return {f"{LABEL}.env": self.settings.env, f"{LABEL}.app": app,
                **{f"{LABEL}.{k}": str(v) for k, v in more.items()}}

    # -- the image ---------------------------------------------------------------------------
    def _build(self, spec: dict, number: int, release_dir: Path, config: dict | None = None,
               progress: Progress | None = None) -> dict:
        app = spec["name"]
        logs = self.app_dir(app) / "logs"
        own = (release_dir / "Dockerfile").is_file()
        try:
            # The image's toolchain is the image's: every interpreter and npm are taken to exist,
            # and the build says so if the base lacks one.
            plan = buildpack.plan(release_dir, which=lambda name: f"/usr/bin/{name}", runtime=spec.get("runtime"))
        except buildpack.BuildpackError as exc:
            if not own:
                raise RuntimeFailure(f"build of release {number}: {exc}") from None
            plan = buildpack.BuildPlan(python="python3")
        build_log, step = self._build_log(app, number, plan, progress)
        image = image_of(self.settings, app, number)
        if own:
            dockerfile = "Dockerfile"
            step(f"building image {image} from the repo's Dockerfile")
        else:
            collectstatic = plan.collectstatic and (config or {}).get("DISABLE_COLLECTSTATIC") != "1"
            (release_dir / DOCKERFILE).parent.mkdir(exist_ok=True)
            (release_dir / DOCKERFILE).write_text(
                render_dockerfile(plan, spec, self.settings.docker_base_image, collectstatic and self._django(release_dir)))
            dockerfile = DOCKERFILE
            step(f"building image {image} from the buildpack template on {self.settings.docker_base_image}")
        # The same source and the same Dockerfile make the same image: a rollback (or a redeploy of
        # an unchanged revision) takes the image already built, as it is, with no build at all.
        digest = source_digest(release_dir)
        same = self.docker.images.list(filters={"label": [f"{LABEL}.env={self.settings.env}", f"{LABEL}.app={app}",
                                                          f"{LABEL}.source={digest}"]})
        if same:
            same[0].tag(image)
            step(f"the image of this source exists ({same[0].short_id}): taken as it is, no build")
        else:
            self._docker_build(release_dir, dockerfile, image, self._labels(app, source=digest), build_log, step, number)
        build_plan = plan.to_dict()
        build_plan.update(image=image, own_dockerfile=own)
        if plan.release and not own:
            step(f"running the release command ({shlex.join(plan.release)})")
            self._one_off(app, image, plan.release, config or {}, logs / f"release-{number}.log", number)
        return build_plan

    @staticmethod
    def _django(release_dir: Path) -> bool:
        # Without the image's interpreter at hand, what the requirements name is the best guess;
        # a Django app lists Django.
        for name in ("requirements.txt", "pyproject.toml"):
            path = release_dir / name
            if path.is_file() and "django" in path.read_text(errors="replace").lower():
                return True
        return False

    def _docker_build(self, context: Path, dockerfile: str, image: str, labels: dict, log: Path,
                      step: Progress, number: int) -> None:
        import docker
        started = time.monotonic()
        errors = []
        with open(log, "a") as out:
            out.write(f"$ docker build -f {dockerfile} -t {image} .\n")
            try:
                # The host's network: a daemon without a bridge has no other, and pip needs PyPI.
                for chunk in self.docker.api.build(path=str(context), dockerfile=dockerfile, tag=image, rm=True,
                                                   forcerm=True, decode=True, labels=labels, network_mode="host",
                                                   timeout=BUILD_TIMEOUT_S):
                    text = chunk.get("stream") or chunk.get("status") or ""
                    if text.strip():
                        out.write(text if text.endswith("\n") else text + "\n")
                        if text.startswith("Step ") and " : RUN " in text:
                            step(text.split(" : ", 1)[1].strip()[:120])
                    if "error" in chunk:
                        errors.append(chunk["error"].strip())
                        out.write(f"error: {chunk['error']}\n")
            except (docker.errors.DockerException, OSError) as exc:
                errors.append(str(exc))
            out.write(f"# {'failed' if errors else 'built'} after {time.monotonic() - started:.1f} s\n")
        if errors:
            tail = process.log_tail(log, lines=8)
            raise RuntimeFailure(f"image build of release {number} failed: {errors[-1][-400:]} ({tail[-600:]})")

    def _one_off(self, app: str, image: str, argv: list[str], config: dict, log: Path, number: int) -> None:
        """The Procfile's release command, once, in a container of the new image with the app's settings."""
        import docker
        container = self.docker.containers.create(
            image, command=argv, environment=self._environment({}, config), network_mode="host", init=True,
            labels=self._labels(app, release=number, role="release"))
        try:
            container.start()
            code = container.wait(timeout=RELEASE_COMMAND_TIMEOUT_S).get("StatusCode")
            output = container.logs().decode(errors="replace")
        except (docker.errors.DockerException, OSError) as exc:
            raise RuntimeFailure(f"release command of release {number} could not run: {exc}") from None
        finally:
            container.remove(force=True)
        log.write_text(output)
        if code != 0:
            raise RuntimeFailure(f"release command of release {number} ({shlex.join(argv)}) failed "
                                 f"(exit {code}): {output[-800:]}")

    # -- replicas ----------------------------------------------------------------------------
    def _environment(self, extra: dict, config: dict) -> dict:
        # What the app gets is the local runtime's (its settings, then the platform's values, which
        # win), without the host's PATH or HOME: the image has its own. They reach the daemon in the
        # create request, never a command line.
        env = {k: str(v) for k, v in config.items()}
        env.update({k: str(v) for k, v in extra.items()})
        env.setdefault("HOST", self.address)
        return env

    def _start_replica(self, state: dict, release: int, slot: int) -> dict:
        import docker
        from cicd.delivery import appconfig
        app, spec = state["app"], state["spec"]
        plan = state.get("plans", {}).get(str(release)) or {}
        image = plan.get("image") or image_of(self.settings, app, release)
        port = process.free_port()
        _, config = appconfig.read_snapshot(self._config_snapshot(app, release))
        env = self._environment({"PORT": port, "CICD_APP": app, "CICD_REPLICA": slot, "CICD_RELEASE": release,
                                      "CICD_ENV": self.settings.env}, config)
        if plan.get("own_dockerfile"):
            command = None   # the image's own CMD, told its port by $PORT
        elif plan.get("web"):
            command = buildpack.expand_port(plan["web"], port)
        else:
            command = _substitute(spec["start"], {"python": "python", "port": str(port)})
        limit = buildpack.memory_limit_mb(plan, spec)
        name = f"cicd-{self.settings.env}-{app}-r{release}-s{slot}-{secrets.token_hex(3)}"
        try:
            container = self.docker.containers.run(
                image, command=command, name=name, detach=True, init=True, network_mode="host",
                environment=env, labels=self._labels(app, release=release, slot=slot),
                # The limit as the kernel holds it: the detector restarts a replica at 90 % of it
                # (CICD_MEMORY_RESTART_AT); a leak faster than that is killed here, an exit it sees.
                mem_limit=f"{limit}m", memswap_limit=f"{limit}m",
                log_config={"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}})
            container.reload()
            pid = container.attrs["State"].get("Pid") or None   # the init's, in the host's view
        except (docker.errors.DockerException, OSError) as exc:
            raise RuntimeFailure(f"replica {slot} of {app} did not start: {exc}") from None
        return {"slot": slot, "container": container.id, "name": name, "pid": pid, "port": port,
                "release": release, "started_at": time.time(), "image": image,
                "health_path": buildpack.health_path(plan, spec), "memory_limit_mb": limit}

    def _container_state(self, replica: dict) -> dict | None:
        import docker
        if not replica.get("container"):
            return None
        try:
            return self.docker.api.inspect_container(replica["container"])["State"]
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, OSError) as exc:
            raise RuntimeFailure(f"the Docker daemon did not say how container {replica.get('name')} is: {exc}") \
                from None

    def _alive(self, replica: dict) -> bool:
        state = self._container_state(replica)
        return bool(state and state.get("Running"))

    def _remove(self, replica: dict, grace_s: int = STOP_GRACE_S) -> bool:
        """Stop (SIGTERM, then SIGKILL after the grace) and remove; True if it was running."""
        import docker
        if not replica.get("container"):
            return False
        try:
            container = self.docker.containers.get(replica["container"])
        except docker.errors.NotFound:
            return False
        running = container.status in ("running", "paused")
        try:
            if container.status == "paused":
                container.kill()     # a frozen process cannot take a SIGTERM
            elif running:
                container.stop(timeout=grace_s)
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            raise RuntimeFailure(f"container {replica.get('name')} did not stop: {exc}") from None
        return running

    def _stop_replica(self, replica: dict) -> bool:
        return self._remove(replica)

    def _stop_replicas(self, replicas: list[dict]) -> int:
        if not replicas:
            return 0
        with ThreadPoolExecutor(max_workers=min(8, len(replicas))) as pool:
            return sum(pool.map(self._remove, replicas))

    def _kill_replica(self, replica: dict) -> dict | None:
        import docker
        try:
            self.docker.containers.get(replica["container"]).kill(signal="SIGKILL")
        except docker.errors.DockerException:
            return None
        return {"container": replica.get("name"), "signal": "SIGKILL"}

    def _suspend_replica(self, replica: dict) -> dict | None:
        import docker
        try:
            self.docker.containers.get(replica["container"]).pause()
        except docker.errors.DockerException:
            return None
        return {"container": replica.get("name"), "signal": "pause (the cgroup freezer, like SIGSTOP)"}

    def _measured(self, replicas: list[dict]) -> list[dict | None]:
        if not replicas:
            return []
        return list(self._executor().map(self._stats, replicas))

    def _stats(self, replica: dict) -> dict | None:
        """CPU (cores, over the time since the last look), memory and paused, of one container.

        From the container's cgroup, as `docker stats` itself reads it, when the daemon is on this
        machine (the container's init is one of our processes); else from the API's stats, which
        the daemon samples once a second, so a probe cycle waits up to that long for them."""
        import docker
        state = self._container_state(replica)
        if not state or not state.get("Running"):
            return None
        usage = cgroup_usage(state.get("Pid") or 0)
        if usage is None:
            try:
                stats = self.docker.api.stats(replica["container"], stream=False, one_shot=True)
            except (docker.errors.DockerException, OSError, ValueError):
                return None
            memory = stats.get("memory_stats") or {}
            detail = memory.get("stats") or {}
            inactive = detail.get("total_inactive_file") or detail.get("inactive_file") or 0
            usage = (max(0, (memory.get("usage") or 0) - inactive),
                     ((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0)
        used, cpu_ns = usage
        now = time.monotonic()
        seen = self._cpu.get(replica["container"])
        cores = 0.0
        if seen is not None and now - seen[0] > 0:
            cores = round(max(0, cpu_ns - seen[1]) / 1e9 / (now - seen[0]), 3)
        self._cpu[replica["container"]] = (now, cpu_ns)
        return {"cpu": cores, "rss_mb": round(used / 2**20, 1), "stopped": bool(state.get("Paused"))}

    def _ended(self, app: str, replica: dict) -> dict:
        import docker
        state = self._container_state(replica) or {}
        tail = ""
        try:
            raw = self.docker.containers.get(replica["container"]).logs(tail=process.TAIL_LINES)
            tail = " | ".join(line.strip()[:process.TAIL_LINE_CHARS] for line in raw.decode(errors="replace").splitlines()
                              if line.strip())
        except (docker.errors.DockerException, KeyError):
            pass
        return {**describe(state), "log_tail": tail}

    # -- adopted containers ----------------------------------------------------------------
    # Containers cicd-heal did not start, brought under watch (`cicd adopt`): probed (their own
    # HEALTHCHECK's status, or an HTTP check on a port they serve on the host), their exits seen,
    # restarted in place (`docker restart`: the container keeps the configuration, volumes and
    # ports cicd-heal never had). Never stopped, removed or scaled by cicd-heal: `cicd remove` and
    # `cicd down --apps` only let go of them.
    def adoptable(self, names: list[str]) -> list[dict]:
        """The running containers named (names or ids), as adoption records; RuntimeFailure naming
        any that does not exist, is not running, or is one of ours already."""
        import docker
        found = []
        for name in names:
            try:
                container = self.docker.containers.get(name)
            except docker.errors.NotFound:
                raise RuntimeFailure(f"container {name!r}: no such container on {self._where()}") from None
            except docker.errors.DockerException as exc:
                raise RuntimeFailure(f"container {name!r}: the daemon did not answer: {exc}") from None
            if container.status != "running":
                raise RuntimeFailure(f"container {name!r} is {container.status}, not running: start it, then adopt it")
            if f"{LABEL}.slot" in container.labels:
                raise RuntimeFailure(f"container {name!r} is a replica cicd-heal started "
                                     f"(app {container.labels.get(f'{LABEL}.app')}): it is watched already")
            memory = (container.attrs.get("HostConfig") or {}).get("Memory") or 0
            found.append({"container": container.id, "name": container.name,
                          "image": (container.attrs.get("Config") or {}).get("Image"),
                          "pid": container.attrs["State"].get("Pid") or None,
                          "health_check": bool((container.attrs.get("Config") or {}).get("Healthcheck")),
                          "memory_limit_mb": int(memory // 2**20)})
        return found

    def _where(self) -> str:
        return os.environ.get("DOCKER_HOST") or "the local Docker daemon"

    def adopt(self, app: str, spec: dict, found: list[dict], port: int | None, health_path: str | None) -> None:
        with self._locked(app) as state:
            if state.get("replicas"):
                raise RuntimeFailure(f"{app} already has replicas in {self.settings.env}")
            state.update(spec=spec, live=0, adopted=True, replicas={
                str(slot): {**record, "slot": slot, "port": port, "health_path": health_path, "adopted": True,
                            "started_at": time.time()}
                for slot, record in enumerate(found)})

    @staticmethod
    def _is_adopted(state: dict) -> bool:
        return bool(state.get("adopted"))

    def _probe_one(self, spec: dict, replica: dict, usage: dict | None) -> ReplicaStatus:
        if replica.get("adopted"):
            state = self._container_state(replica)
            if not state or not state.get("Running"):
                return ReplicaStatus(int(replica["slot"]), replica.get("pid"), replica.get("port"), alive=False,
                                     status="down")
            if (status := adopted_status(int(replica["slot"]), state, replica)) is not None:
                return dataclasses.replace(status, **{k: v for k, v in (usage or {}).items()
                                                      if k in ("cpu", "rss_mb", "stopped")})
            if not replica.get("port"):   # nothing to ask: running is all that can be known
                return ReplicaStatus(int(replica["slot"]), state.get("Pid"), None, alive=True, status="ok",
                                     memory_limit_mb=replica.get("memory_limit_mb") or 0, **(usage or {}))
        return super()._probe_one(spec, replica, usage)

    def restart(self, app: str, slots: list[int], op_key: str) -> dict:
        if not self._is_adopted(self._read(app)):
            return super().restart(app, slots, op_key)
        import docker
        with self._locked(app) as state:
            if (done := self._done(state, op_key)) is not None:
                return {**done, "deduplicated": True}
            restarted, failed = [], []
            for slot in slots:
                replica = state["replicas"].get(str(slot))
                if replica is None:
                    continue
                # Marked first: its die during the restart is on purpose (the watcher skips it).
                replica["restarting"] = True
                self._write(app, state)
                try:
                    container = self.docker.containers.get(replica["container"])
                    was_running = container.status == "running"
                    if container.status == "paused":
                        container.unpause()
                    container.restart(timeout=STOP_GRACE_S)
                    container.reload()
                except docker.errors.NotFound:
                    failed.append(f"container {replica['name']} of {app} no longer exists: whoever runs it removed "
                                  f"it; start it again and `cicd adopt` it")
                    continue
                except docker.errors.DockerException as exc:
                    failed.append(f"container {replica['name']} of {app} did not restart: {exc}")
                    continue
                finally:
                    replica.pop("restarting", None)
                replica.update(pid=container.attrs["State"].get("Pid") or None, started_at=time.time())
                restarted.append({"slot": slot, "container": replica["name"], "was_running": was_running})
            result = self._record(state, op_key, {"effect": "restarted", "in_place": True, "replicas": restarted,
                                                  "failed": failed})
        if failed:
            raise RuntimeFailure("; ".join(failed))
        return result

    def scale(self, app: str, replicas: int, op_key: str) -> dict:
        if self._is_adopted(self._read(app)):
            raise RuntimeFailure(f"{app} is adopted: cicd-heal restarts its containers in place but does not copy "
                                 f"them (their ports, volumes and names are whoever started them's); scale it "
                                 f"where it was started (docker compose up --scale)")
        return super().scale(app, replicas, op_key)

    def stop_app(self, app: str) -> int:
        if self._is_adopted(self._read(app)):
            return 0   # never stopped by us: they are someone else's
        return super().stop_app(app)

    def _prune_releases(self, app: str, keep: int) -> None:
        """Release directories as the local runtime prunes them; images by what served: the images of
        the last RELEASES_KEPT live releases stay (the one a rollback goes back to among them, even
        after newer failed releases), the tags of pruned releases that never served go."""
        import docker
        super()._prune_releases(app, keep)
        with self._locked(app) as state:
            image = (state.get("plans", {}).get(str(keep)) or {}).get("image")
            try:
                served = self.docker.images.get(image).id if image else None
            except docker.errors.DockerException:
                served = None
            history = [i for i in state.get("served_images", []) if i != served] + ([served] if served else [])
            state["served_images"] = history = history[-RELEASES_KEPT:]
        kept = {p.name for p in (self.app_dir(app) / "releases").iterdir()}
        for found in self.docker.images.list(name=f"cicd-heal/{self.settings.env}-{app}"):
            if found.id in history:
                continue
            for tag in found.tags:
                if tag.rpartition(":")[2] not in kept:
                    try:
                        self.docker.images.remove(tag)
                    except docker.errors.DockerException:
                        pass   # still in use by a container that is stopping: the next prune takes it

    def remove_app(self, app: str) -> int:
        import docker
        if self._is_adopted(self._read(app)):
            # Let go of them: the containers run on as they were, outside cicd-heal.
            shutil.rmtree(self.app_dir(app), ignore_errors=True)
            return 0
        stopped = super().remove_app(app)
        # Its containers that no state names any more (a crashed worker's half-started one) and its images.
        for container in self.docker.containers.list(all=True, filters={"label": [f"{LABEL}.env={self.settings.env}",
                                                                                     f"{LABEL}.app={app}"]}):
            container.remove(force=True)
        for image in self.docker.images.list(name=f"cicd-heal/{self.settings.env}-{app}"):
            try:
                self.docker.images.remove(image.id, force=True)
            except docker.errors.DockerException:
                pass
        return stopped


def adopted_status(slot: int, state: dict, replica: dict) -> ReplicaStatus | None:
    """An adopted replica's status from its container's own health check (None: it has none, or a
    port to probe): healthy is ok, unhealthy is an error answer (a failing check, counted like an
    HTTP error), starting is starting."""
    health = (state.get("Health") or {}).get("Status")
    if replica.get("port") or health is None:
        return None
    status = {"healthy": "ok", "unhealthy": "degraded", "starting": "starting"}.get(health, "degraded")
    return ReplicaStatus(slot, state.get("Pid") or None, None, alive=True, status=status,
                         memory_limit_mb=replica.get("memory_limit_mb") or 0)


def watch(settings: Settings, send: Callable[[dict], None], keep_going: Callable[[], bool] = lambda: True,
          check_s: float = 0.5) -> None:
    """The exit watcher on the daemon's event stream: a replica_down signal for each container of a
    replica still counted as live that dies (one stopped on purpose is gone from the state first)."""
    from cicd.core.events import iso
    runtime = DockerRuntime(settings)
    # Every die on the daemon: adopted containers carry none of our labels; ours are told apart by id.
    stream = runtime.docker.events(decode=True, filters={"type": "container", "event": "die"})
    stop = threading.Event()

    def closer():
        while not stop.wait(check_s):
            if not keep_going():
                stream.close()
                return
    threading.Thread(target=closer, daemon=True).start()
    try:
        for event in stream:
            attributes = (event.get("Actor") or {}).get("Attributes") or {}
            container = event.get("id")
            owner = next(((app, r) for app in runtime.apps() for r in runtime.replicas(app)
                          if r.get("container") == container), None)
            # Not ours, or an adopted container restarted in place (it dies on purpose: not a crash).
            if owner is None or owner[1].get("restarting"):
                continue
            app, slot = owner[0], owner[1]["slot"]
            send({"env": settings.env, "app": app, "kind": "replica_down", "slots": [slot],
                  "observed_at": iso(settings.clock.now()), "replicas_total": runtime.replica_count(app),
                  "detail": f"{slot}:exited (container {attributes.get('name')}, exit code "
                            f"{attributes.get('exitCode')})"})
    except Exception:
        if keep_going():
            raise
    finally:
        stop.set()
