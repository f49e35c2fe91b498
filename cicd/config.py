"""Settings, read from environment variables, each with an embedded default.

Every process of one environment (dev, stage, prod) reads the same variables, so a worker
started by `cicd up` and a `cicd` command typed in another shell agree on where things are.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from cicd.core.clock import SYSTEM_CLOCK, Clock
from cicd.errors import CicdError

ENVIRONMENTS = ("dev", "stage", "prod")
AGENTS = ("onboard", "deploy", "detect", "decide", "orchestrate", "monitor")

# The policy mode of each environment: stage is deterministic (greedy, frozen), dev explores
# and learns, prod learns with little exploration (and needs approval for risky actions).
POLICY_MODES = {"dev": "explore", "stage": "greedy", "prod": "cautious"}


class ConfigError(CicdError, ValueError):
    """A setting has a value the tool cannot use; the message names the variable and the rule."""


def _env_float(name: str, default: float, minimum: float = 0.0) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    raw = os.environ.get(name) or default
    if raw not in choices:
        raise ConfigError(f"{name}={raw!r}: must be one of {', '.join(choices)}")
    return raw


def _env_probability(name: str) -> float | None:
    if not os.environ.get(name):
        return None
    value = _env_float(name, 0.0, 0.0)
    if value > 1.0:
        raise ConfigError(f"{name}={value}: must be between 0 and 1")
    return value


def _env_fraction(name: str, default: float) -> float:
    value = _env_float(name, default, 0.05)
    if value > 1.0:
        raise ConfigError(f"{name}={value}: must be between 0.05 and 1")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r}: must be true or false")


HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")


def check_host_name(name: str, what: str = "host") -> str:
    """A host's name: 1-32 lowercase letters, digits and inner hyphens (it is part of a queue's name)."""
    if name and not HOST_NAME.fullmatch(name):
        raise ConfigError(f"{what} {name!r}: must be 1-32 lowercase letters, digits and hyphens, "
                          f"starting and ending with a letter or digit")
    return name


def _env_address(name: str) -> str:
    raw = os.environ.get(name) or "127.0.0.1"
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: must be an IP address (the one other machines reach this one at)") from None
    return raw


def check_env_name(env: str) -> str:
    if env not in ENVIRONMENTS:
        raise ConfigError(f"environment {env!r}: must be one of {', '.join(ENVIRONMENTS)}")
    return env


@dataclass(frozen=True)
class Settings:
    env: str = "stage"
    home: Path = field(default_factory=Path.cwd)
    broker_url_override: str | None = None
    database_url_override: str | None = None
    demo_mode: bool = False
    # Probing and detection.
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 0.5
    overload_threshold: float = 0.75
    overload_probes: int = 3
    unhealthy_probes: int = 3
    start_grace_s: float = 10.0
    # Verification.
    verify_interval_s: float = 0.2
    verify_timeout_s: float = 20.0
    stable_checks: int = 2
    max_attempts: int = 3
    # Orchestrator gates.
    decision_max_age_s: float = 900.0
    budget_window_s: float = 600.0
    restart_budget: int = 6
    # Restart backoff, as Kubernetes does it: 10 s after the first restart, doubling to 300 s,
    # forgotten once the app has gone 600 s without one.
    backoff_base_s: float = 10.0
    backoff_max_s: float = 300.0
    backoff_reset_s: float = 600.0
    scale_budget: int = 6
    underload_threshold: float = 0.2
    underload_probes: int = 10
    # What the platform measures (any app): a replica is restarted once its resident memory
    # reaches this share of the spec's memory_limit_mb; CPU counts toward overload as a share of
    # this many cores per replica (one: a Python process is held to about one by its GIL).
    memory_restart_at: float = 0.9
    cpu_cores_per_replica: float = 1.0
    # Deploys: a release not healthy after this long is a slow deploy (its own deadline is in
    # the spec); a crash this soon after a release counts as the release's fault.
    slow_deploy_s: float = 10.0
    fresh_release_s: float = 120.0
    # Human approval (promotions; risky actions in prod): how long a request stays answerable.
    approval_ttl_s: float = 3600.0
    # The policy's exploration rate; None: the environment's default (dev 0.10, prod 0.02, stage 0).
    exploration: float | None = None
    # Where apps run: real processes ("local"), containers ("docker"), or the simulated fleet ("sim", seeded).
    runtime: str = "local"
    sim_seed: int = 0
    # The Docker runtime: the image an app without a Dockerfile of its own is built on.
    docker_base_image: str = "python:3.11-slim"
    # Notice a replica's exit the moment it happens (Linux pidfds), not only at the next probe.
    watch_exits: bool = True
    # An open incident with no progress for this long has its chain sent on again (a message
    # lost with a killed worker or a restarted broker must not leave it open for ever).
    stall_after_s: float = 120.0
    # What the domain steps take the time from: the system's, or a test's manual clock. Carried
    # here because every step already takes the settings (not compared: it is not configuration).
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False, repr=False)
    # Host agents (`cicd host-agent`): this machine's name, "" on the control plane's own machine
    # (its apps run under its own workers), and the address the others reach its apps at. An app
    # placed on a host (its spec's "host") has its runtime actions done by that host's agent, on
    # the queue {env}.host.{name}; its replicas listen on host_address, where the monitor probes.
    host_name: str = ""
    host_address: str = "127.0.0.1"

    @classmethod
    def load(cls, env: str | None = None) -> "Settings":
        env = check_env_name(env or os.environ.get("CICD_ENV") or "stage")
        home = Path(os.environ.get("CICD_HOME") or Path.cwd()).resolve()
        return cls(
            env=env,
            home=home,
            broker_url_override=os.environ.get("CICD_BROKER_URL") or None,
            database_url_override=os.environ.get("CICD_DATABASE_URL") or None,
            demo_mode=_env_bool("CICD_DEMO_MODE", False),
            probe_interval_s=_env_float("CICD_PROBE_INTERVAL", 1.0, 0.05),
            probe_timeout_s=_env_float("CICD_PROBE_TIMEOUT", 0.5, 0.05),
            overload_threshold=_env_float("CICD_OVERLOAD_THRESHOLD", 0.75, 0.05),
            overload_probes=_env_int("CICD_OVERLOAD_PROBES", 3, 1),
            unhealthy_probes=_env_int("CICD_UNHEALTHY_PROBES", 3, 1),
            start_grace_s=_env_float("CICD_START_GRACE", 10.0, 0.0),
            verify_interval_s=_env_float("CICD_VERIFY_INTERVAL", 0.2, 0.02),
            verify_timeout_s=_env_float("CICD_VERIFY_TIMEOUT", 20.0, 1.0),
            stable_checks=_env_int("CICD_STABLE_CHECKS", 2, 1),
            max_attempts=_env_int("CICD_MAX_ATTEMPTS", 3, 1),
            decision_max_age_s=_env_float("CICD_DECISION_MAX_AGE", 900.0, 1.0),
            budget_window_s=_env_float("CICD_BUDGET_WINDOW", 600.0, 1.0),
            restart_budget=_env_int("CICD_RESTART_BUDGET", 6, 0),
            backoff_base_s=_env_float("CICD_BACKOFF_BASE", 10.0, 0.0),
            backoff_max_s=_env_float("CICD_BACKOFF_MAX", 300.0, 0.0),
            backoff_reset_s=_env_float("CICD_BACKOFF_RESET", 600.0, 0.0),
            scale_budget=_env_int("CICD_SCALE_BUDGET", 6, 0),
            underload_threshold=_env_float("CICD_UNDERLOAD_THRESHOLD", 0.2, 0.0),
            underload_probes=_env_int("CICD_UNDERLOAD_PROBES", 10, 1),
            memory_restart_at=_env_fraction("CICD_MEMORY_RESTART_AT", 0.9),
            cpu_cores_per_replica=_env_float("CICD_CPU_CORES_PER_REPLICA", 1.0, 0.05),
            slow_deploy_s=_env_float("CICD_SLOW_DEPLOY", 10.0, 0.5),
            fresh_release_s=_env_float("CICD_FRESH_RELEASE", 120.0, 0.0),
            approval_ttl_s=_env_float("CICD_APPROVAL_TTL", 3600.0, 1.0),
            exploration=_env_probability("CICD_EXPLORATION"),
            runtime=_env_choice("CICD_RUNTIME", ("local", "docker", "sim"), "local"),
            docker_base_image=os.environ.get("CICD_DOCKER_BASE_IMAGE") or "python:3.11-slim",
            sim_seed=_env_int("CICD_SIM_SEED", 0, 0),
            watch_exits=_env_bool("CICD_WATCH_EXITS", True),
            stall_after_s=_env_float("CICD_STALL_AFTER", 120.0, 5.0),
            host_name=check_host_name(os.environ.get("CICD_HOST_NAME") or "", "CICD_HOST_NAME"),
            host_address=_env_address("CICD_HOST_ADDRESS"),
        )

    def __post_init__(self):
        # A restart held back by the backoff must still be fresh enough to run when its time comes.
        if self.decision_max_age_s < self.backoff_max_s + 60:
            raise ConfigError(f"CICD_DECISION_MAX_AGE={self.decision_max_age_s:g}: must be at least "
                              f"CICD_BACKOFF_MAX + 60 ({self.backoff_max_s + 60:g})")

    def for_env(self, env: str) -> "Settings":
        return replace(self, env=check_env_name(env))

    # Where things live. Everything an environment owns sits under its own directory. (Cached:
    # the fields they derive from never change, and the hot path asks on every transaction.)
    @functools.cached_property
    def var_dir(self) -> Path:
        return self.home / "var"

    @functools.cached_property
    def env_dir(self) -> Path:
        return self.var_dir / self.env

    @functools.cached_property
    def apps_dir(self) -> Path:
        return self.env_dir / "apps"

    @functools.cached_property
    def logs_dir(self) -> Path:
        return self.home / "logs" / self.env

    @functools.cached_property
    def registry_dir(self) -> Path:
        return self.home / "apps" / "registry" / self.env

    @functools.cached_property
    def proof_mirror_path(self) -> Path:
        return self.logs_dir / "proof.jsonl"

    @functools.cached_property
    def stack_file(self) -> Path:
        return self.var_dir / "stack.json"

    @functools.cached_property
    def database_url(self) -> str:
        if self.database_url_override:
            # One server can hold every environment: "{env}" picks a database per environment.
            return self.database_url_override.replace("{env}", self.env)
        return f"sqlite:///{self.env_dir / 'cicd.db'}"

    @property
    def policy_mode(self) -> str:
        return POLICY_MODES[self.env]

    @property
    def broker_url(self) -> str:
        """CICD_BROKER_URL if set, else the broker that `cicd up` started (var/stack.json); with
        the password from CICD_BROKER_PASSWORD_FILE (or the embedded Redis's file) put in."""
        stack = {}
        try:
            stack = json.loads(self.stack_file.read_text())
        except (OSError, ValueError):
            pass
        url = self.broker_url_override or stack.get("broker_url") or "redis://127.0.0.1:6379/0"
        password_file = os.environ.get("CICD_BROKER_PASSWORD_FILE") or (
            None if self.broker_url_override else stack.get("password_file"))
        if password_file and "@" not in url.split("//", 1)[-1].split("/", 1)[0]:
            password = quote(read_secret_file(Path(password_file), "broker password"), safe="")
            scheme, rest = url.split("//", 1)
            url = f"{scheme}//:{password}@{rest}"
        return url

    def host_queue(self, host: str) -> str:
        """The queue of a host's agent: runtime actions for the apps placed on that host."""
        if not host:
            raise ConfigError("a host queue needs a host name")
        return f"{self.env}.host.{check_host_name(host)}"

    def queue(self, agent: str) -> str:
        if agent not in AGENTS:
            raise ConfigError(f"agent {agent!r}: must be one of {', '.join(AGENTS)}")
        return f"{self.env}.{agent}"


def signing_key(settings: Settings, create: bool = False) -> bytes:
    """The environment's HMAC key: CICD_SECRET_KEY_<ENV>, else var/<env>/secret.key (0600).

    Never from code, never printed. `cicd up` creates the file on first start.
    """
    from_env = os.environ.get(f"CICD_SECRET_KEY_{settings.env.upper()}")
    if from_env:
        if len(from_env) < 32:
            raise ConfigError(f"CICD_SECRET_KEY_{settings.env.upper()}: must be at least 32 characters")
        return from_env.encode()
    path = settings.env_dir / "secret.key"
    if not path.exists():
        if not create:
            raise ConfigError(f"no signing key for {settings.env}: run `cicd up --env {settings.env}` "
                              f"or set CICD_SECRET_KEY_{settings.env.upper()}")
        # A reader never sees a half-written key, and of two racing creators exactly one wins.
        write_secret_file(path, secrets.token_hex(32))
    st = path.stat()
    return _read_key_file(path, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


@functools.lru_cache(maxsize=8)
def _read_key_file(path: Path, mtime_ns: int, ctime_ns: int, mode: int) -> bytes:
    # Cached while the file is unchanged (contents, owner, permissions): every decision and every
    # gate needs the key.
    return read_secret_file(path, "signing key").encode()


def read_secret_file(path: Path, what: str) -> str:
    """A secret from a file only its owner can read (0600 or stricter), else a clear error."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{what} file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(f"{what} file {path}: permissions {oct(mode)} are too open; it must be 0600")
    return path.read_text().strip()


def redact_url(url: str) -> str:
    """A URL fit to print: any password in it replaced."""
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url or "")


def write_secret_file(path: Path, value: str) -> None:
    """Create a 0600 file atomically (private temp name, then linked into place); keep an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
