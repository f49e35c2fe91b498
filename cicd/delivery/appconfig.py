"""Per-environment app settings: the environment variables an operator gives an app (`cicd config`).

Kept in var/ENV/config/APP.json, mode 0600, not in the database: the database is read by the
dashboard, the JSON API and anyone who copies it for a report, while this file is read only by
the owner of var/ (the deploy worker that stages releases and the `cicd config` command). A file
that others can read is refused rather than used.

A change bumps the config's version and takes effect on the app's next release: staging a
release copies the values into that release's own 0600 snapshot (var/ENV/apps/APP/config/N.json,
gone when the release is pruned), and every process of the release (its replicas, however often
they are restarted or scaled, and the Procfile's release command) gets the snapshot's values,
so a running release never changes under its replicas.

Keys are POSIX environment variable names, except those the platform sets itself (PORT, HOST,
PATH, VIRTUAL_ENV and every CICD_*). Values are any text without NUL (an environment cannot hold
one), up to MAX_VALUE_BYTES. A key set with --secret stays secret until it is unset: its value is
never shown, not even with --show-values. No value is ever written to a log or an error message.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cicd.config import Settings
from cicd.core.names import is_app_name
from cicd.errors import CicdError

KEY_RULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED = ("PORT", "HOST", "PATH", "VIRTUAL_ENV")
RESERVED_PREFIX = "CICD_"
MAX_VALUE_BYTES = 32 * 1024
MAX_KEYS = 200


class ConfigRefused(CicdError, ValueError):
    """A setting cannot be stored or read; the message names the key or file and the rule."""


@dataclass
class AppConfig:
    version: int = 0
    values: dict[str, str] = field(default_factory=dict)
    secret: set[str] = field(default_factory=set)

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "values": self.values, "secret": sorted(self.secret)},
                          indent=1, sort_keys=True)


def check_key(key: str) -> str:
    if not KEY_RULE.fullmatch(key):
        raise ConfigRefused(f"key {key[:60]!r}: must be an environment variable name (letters, digits and "
                            f"underscores, not starting with a digit)")
    if key in RESERVED or key.startswith(RESERVED_PREFIX):
        raise ConfigRefused(f"key {key!r}: set by the platform for every replica "
                            f"({', '.join(RESERVED)} and {RESERVED_PREFIX}*), so an app cannot set it")
    return key


def check_value(key: str, value: str) -> str:
    # The rule, never the value: it may be a secret.
    if "\0" in value:
        raise ConfigRefused(f"value of {key}: must not contain a NUL character (an environment cannot hold one)")
    if len(value.encode()) > MAX_VALUE_BYTES:
        raise ConfigRefused(f"value of {key}: must be at most {MAX_VALUE_BYTES} bytes")
    return value


def parse_assignment(text: str, position: int) -> tuple[str, str]:
    """KEY=VALUE as (key, value). Without '=' the argument may be a value typed in the wrong place,
    so the error names its position, not its text."""
    key, equals, value = text.partition("=")
    if not equals:
        raise ConfigRefused(f"argument {position}: must be KEY=VALUE (or a single KEY with --stdin)")
    return check_key(key), check_value(key, value)


def path_of(settings: Settings, app: str) -> Path:
    if not is_app_name(app):  # the name becomes a path: never one outside var/ENV/config
        raise ConfigRefused(f"app name {app!r}: not a valid app name")
    return settings.env_dir / "config" / f"{app}.json"


def _read(path: Path) -> AppConfig:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return AppConfig()
    if mode & 0o077:
        raise ConfigRefused(f"app settings file {path}: permissions {oct(mode)} are too open; it must be 0600")
    try:
        data = json.loads(path.read_text())
        return AppConfig(int(data["version"]), dict(data["values"]), set(data.get("secret", [])))
    except (ValueError, KeyError, TypeError):
        raise ConfigRefused(f"app settings file {path}: not a settings file cicd wrote; "
                            f"remove it and set the values again") from None


def _write_private(path: Path, text: str) -> None:
    """Replace path with text, 0600 from the first byte (created so, never chmod-ed after)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def load(settings: Settings, app: str) -> AppConfig:
    return _read(path_of(settings, app))


@contextlib.contextmanager
def _locked(path: Path):
    # `cicd config` may run in two shells at once: one read-modify-write at a time.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def set_values(settings: Settings, app: str, values: dict[str, str], secret: bool = False) -> tuple[AppConfig, bool]:
    """Store values (checked again here); a new version if anything changed. (config, changed)"""
    for key, value in values.items():
        check_value(check_key(key), value)
    path = path_of(settings, app)
    with _locked(path):
        config = _read(path)
        changed = any(config.values.get(k) != v for k, v in values.items()) or (secret and not set(values) <= config.secret)
        if len(set(config.values) | set(values)) > MAX_KEYS:
            raise ConfigRefused(f"{app}: at most {MAX_KEYS} settings per app")
        config.values.update(values)
        if secret:
            config.secret |= set(values)
        if changed:
            config.version += 1
            _write_private(path, config.to_json())
        return config, changed


def unset(settings: Settings, app: str, keys: list[str]) -> tuple[AppConfig, list[str]]:
    """Remove keys; returns the config and the keys that were not set (nothing to remove)."""
    path = path_of(settings, app)
    with _locked(path):
        config = _read(path)
        missing = [k for k in keys if k not in config.values]
        removed = [k for k in keys if k in config.values]
        for key in removed:
            del config.values[key]
            config.secret.discard(key)
        if removed:
            config.version += 1
            _write_private(path, config.to_json())
        return config, missing


def forget(settings: Settings, app: str) -> None:
    """Drop an app's settings (its removal): one onboarded again under the name starts without them."""
    path = path_of(settings, app)
    path.unlink(missing_ok=True)
    path.with_suffix(".lock").unlink(missing_ok=True)


# -- the snapshot a release is staged with (written and read by the runtime) -------------------
def write_snapshot(path: Path, config: AppConfig) -> None:
    _write_private(path, json.dumps({"version": config.version, "values": config.values}))


def read_snapshot(path: Path) -> tuple[int, dict[str, str]]:
    """(config version, values) a release was staged with; (0, {}) for a release staged without
    settings (or before they existed)."""
    config = _read(path)
    return config.version, config.values


# -- what `cicd config` calls: the registry check and the proof record around the file ---------
def _onboarded(settings: Settings, app: str) -> None:
    from cicd.store import get_app, session_scope
    with session_scope(settings, readonly=True) as session:
        if get_app(session, settings.env, app) is None:
            raise ConfigRefused(f"app {app!r} is not onboarded in {settings.env} "
                                f"(`cicd status --env {settings.env}` lists its apps)")


def _record(settings: Settings, app: str, payload: dict) -> None:
    from cicd.store import proof, session_scope
    with session_scope(settings) as session:
        proof.append(session, settings.env, "CONFIG_CHANGED", app=app, payload=payload)


def change(settings: Settings, app: str, *, values: dict[str, str] | None = None, secret: bool = False,
           unset_keys: list[str] | None = None, who: str = "") -> dict:
    """Set or unset an onboarded app's settings and record CONFIG_CHANGED (key names, never values).
    Returns {"version", "changed": bool, "keys", "missing" (unset keys that were not set)}."""
    _onboarded(settings, app)
    missing: list[str] = []
    if values is not None:
        (config, changed), keys, action = set_values(settings, app, values, secret), sorted(values), "set"
    else:
        config, missing = unset(settings, app, list(unset_keys or []))
        keys, action = sorted(set(unset_keys or []) - set(missing)), "unset"
        changed = bool(keys)
    if changed:
        _record(settings, app, {"action": action, "keys": keys, "secret": sorted(set(keys) & config.secret),
                                "version": config.version, "by": who})
    return {"version": config.version, "changed": changed, "keys": keys, "missing": missing}


def listing(settings: Settings, app: str) -> AppConfig:
    _onboarded(settings, app)
    return load(settings, app)
