"""Real processes: start them detached, know whether they are alive, stop them.

A process is identified by (pid, start time in clock ticks from /proc), so a recycled pid is
never mistaken for our replica and never killed by us.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

# Run by a short-lived launcher process: the app is started in its own session and the launcher
# exits at once, so the app is re-parented to init. It outlives the worker that started it,
# and no worker ever holds it as a zombie child. The launcher reads what to start (environment
# included, which may hold secrets) from its stdin: its command line is visible to every user.
_LAUNCHER = r"""
import json, subprocess, sys
spec = json.loads(sys.stdin.read())
log = open(spec["log"], "ab")
p = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL,
                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
print(p.pid)
"""


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def is_alive(pid: int | None, ticks: int | None) -> bool:
    if not pid:
        return False
    now = start_ticks(pid)
    return now is not None and (ticks is None or now == ticks)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_detached(argv: list[str], cwd: str, env: dict, log_path: str) -> tuple[int, int]:
    """Start argv in its own session, not as our child; returns (pid, start ticks)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    spec = json.dumps({"argv": argv, "cwd": cwd, "env": env, "log": log_path})
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER], input=spec, capture_output=True,
                         text=True, timeout=30)
    if out.returncode != 0:
        raise OSError(f"could not start {argv[0]}: {out.stderr.strip()[-500:]}")
    pid = int(out.stdout.strip())
    ticks = start_ticks(pid)
    if ticks is None:
        raise OSError(f"{argv[0]} exited at once; see {log_path}")
    return pid, ticks


def signal_process(pid: int, ticks: int | None, sig: int) -> bool:
    """Send sig to the process (and its process group), only if it is still the one we started."""
    if not is_alive(pid, ticks):
        return False
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
    return True


def stop_all(targets: list[tuple[int | None, int | None]], grace_s: float = 3.0) -> int:
    """SIGTERM every target at once, SIGKILL what is left after the grace period.

    Returns how many were running. In parallel, so stopping ten processes costs one grace period.
    """
    running = [(pid, ticks) for pid, ticks in targets if pid and signal_process(pid, ticks, signal.SIGTERM)]
    deadline = time.monotonic() + grace_s
    left = running
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [(pid, ticks) for pid, ticks in left if is_alive(pid, ticks)]
    for pid, ticks in left:
        signal_process(pid, ticks, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [(pid, ticks) for pid, ticks in left if is_alive(pid, ticks)]
    return len(running)


def kill(pid: int, ticks: int | None, gone_within_s: float = 5.0) -> bool:
    """SIGKILL the process and return once it is gone (False if it was not running).

    A SIGKILLed process dies asynchronously: until its exit is done it still looks alive and may
    still hold its socket. Waiting makes "crashed" true when this returns, so what looks next
    (a probe, a test) sees the crash and not a process on its way out."""
    if not signal_process(pid, ticks, signal.SIGKILL):
        return False
    deadline = time.monotonic() + gone_within_s
    while is_alive(pid, ticks) and time.monotonic() < deadline:
        time.sleep(0.005)
    return True


def stop(pid: int | None, ticks: int | None, grace_s: float = 3.0) -> bool:
    """SIGTERM, then SIGKILL after the grace period; True if the process was running."""
    return stop_all([(pid, ticks)], grace_s) == 1


def clean_env(extra: dict) -> dict:
    """What a managed app gets: no secrets of ours, just enough to run, plus its own identity."""
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TZ", "TMPDIR") if k in os.environ}
    env.setdefault("LANG", "C.UTF-8")
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env
