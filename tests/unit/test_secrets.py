"""Secrets come from the environment or 0600 files, are never printed, and no text reaches a shell."""
from __future__ import annotations

import ast
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import pytest

from cicd.config import ConfigError, Settings, read_secret_file, redact_url, signing_key
from cicd.runtime import process

ROOT = Path(__file__).resolve().parents[2]


def test_a_key_file_others_can_read_is_refused(tmp_path):
    settings = Settings(env="stage", home=tmp_path)
    key = signing_key(settings, create=True)
    path = settings.env_dir / "secret.key"
    assert oct(path.stat().st_mode & 0o777) == "0o600" and len(key) == 64
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="too open; it must be 0600"):
        signing_key(settings)


def test_a_key_from_the_environment_must_be_long_enough(tmp_path, monkeypatch):
    settings = Settings(env="prod", home=tmp_path)
    monkeypatch.setenv("CICD_SECRET_KEY_PROD", "short")
    with pytest.raises(ConfigError, match="at least 32"):
        signing_key(settings)
    monkeypatch.setenv("CICD_SECRET_KEY_PROD", "k" * 40)
    assert signing_key(settings) == b"k" * 40
    assert not (settings.env_dir / "secret.key").exists()  # nothing written when the environment has it


def test_no_key_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cicd up --env dev"):
        signing_key(Settings(env="dev", home=tmp_path))


def test_the_broker_password_comes_from_a_0600_file(tmp_path, monkeypatch):
    secret = tmp_path / "redis-password"
    secret.write_text("s3cr/t@pw\n")
    secret.chmod(0o600)
    monkeypatch.setenv("CICD_BROKER_URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("CICD_BROKER_PASSWORD_FILE", str(secret))
    url = Settings.load("stage").broker_url
    assert url == "redis://:s3cr%2Ft%40pw@127.0.0.1:6390/0"
    assert redact_url(url) == "redis://:***@127.0.0.1:6390/0"
    secret.chmod(0o640)
    with pytest.raises(ConfigError, match="broker password file"):
        Settings.load("stage").broker_url
    with pytest.raises(ConfigError, match="No such file"):
        read_secret_file(tmp_path / "missing", "broker password")


def test_the_environment_of_a_spawned_process_is_on_no_command_line(tmp_path):
    """`cicd up` starts every process through a short-lived launcher, with an environment that may
    hold a secret (FLOWER_BASIC_AUTH, CICD_BROKER_URL, CICD_SECRET_KEY_<ENV>). Every user can read a
    command line, so while the launchers run, a scan of all of them must never find it."""
    secret = f"not-on-argv-{secrets.token_hex(16)}".encode()
    seen, done = [], threading.Event()

    def scan():
        while not done.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if secret in open(f"/proc/{pid}/cmdline", "rb").read():
                        seen.append(pid)
                except OSError:
                    pass

    scanner = threading.Thread(target=scan)
    scanner.start()
    try:
        for i in range(5):
            out = tmp_path / f"out-{i}"
            # It stays until stopped: one that is gone before the launcher looks is "exited at once".
            pid, ticks = process.spawn_detached(
                [sys.executable, "-c", f"import os, time; open({str(out)!r}, 'w').write(os.environ['S']); time.sleep(60)"],
                str(tmp_path), {"S": secret.decode(), "PATH": os.environ["PATH"]}, str(tmp_path / "log"))
            deadline = time.monotonic() + 10
            while not (out.exists() and out.read_text()) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert out.read_text() == secret.decode()  # the process did get its environment
            process.stop(pid, ticks, grace_s=1)
    finally:
        done.set()
        scanner.join()
    assert not seen, f"the secret was on the command line of pid {seen[0]}"


@pytest.mark.parametrize("url, shown", [
    ("redis://:pw@host:1/0", "redis://:***@host:1/0"),
    ("redis://user:pw@host/0", "redis://user:***@host/0"),
    ("redis://host:6379/0", "redis://host:6379/0"),
    ("postgresql+psycopg://cicd:p%40ss@db/cicd_stage", "postgresql+psycopg://cicd:***@db/cicd_stage"),
])
def test_urls_are_redacted_for_printing(url, shown):
    assert redact_url(url) == shown


def test_a_backoff_longer_than_a_decision_lives_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="CICD_DECISION_MAX_AGE"):
        Settings(env="stage", home=tmp_path, decision_max_age_s=100, backoff_max_s=300)


def python_sources():
    for base in ("cicd", "workers"):
        yield from (ROOT / base).rglob("*.py")
    for name in ("cli.py", "celeryconfig.py", "beat_schedule.py"):
        yield ROOT / name


@pytest.mark.parametrize("path", list(python_sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_text_reaches_a_shell(path):
    """No shell=True, no os.system/os.popen, no subprocess.getoutput: every command is an argv list."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            assert name not in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"), \
                f"{path}:{node.lineno}: {name}"
            for keyword in node.keywords:
                if keyword.arg == "shell":
                    assert isinstance(keyword.value, ast.Constant) and keyword.value.value is False, \
                        f"{path}:{node.lineno}: shell=..."
