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
from dataclasses import dataclass

# Run by a short-lived launcher process: the app is started in its own session and the launcher
# exits at once, so the app is re-parented away from the worker that started it: it outlives
# that worker, and no worker ever holds it as a zombie child. The launcher reads what to start
# (environment included, which may hold secrets) from its stdin: its command line is visible to
# every user.
_LAUNCHER = r"""
import json, subprocess, sys
spec = json.loads(sys.stdin.read())
log = open(spec["log"], "ab")
p = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL,
                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
print(p.pid)
"""

# The same, when the exit must be known: only a parent can learn an exit code (waitpid; a pidfd
# or /proc of a non-child cannot tell it), so the launcher forks a keeper, a small parent in a
# session of its own, which starts the app in the app's own session (its pid and process group
# are what probes, restarts and kills act on, as above), waits for it, and writes how it ended
# to the exit file, keyed by the app's pid and start ticks, with where the app's output begins in
# the log. The keeper drops the spec (the environment with it) once the app runs. No shell.
_KEEPER = r"""
import json, os, subprocess, sys
spec = json.loads(sys.stdin.read())
ready_r, ready_w = os.pipe()
if os.fork():
    os.close(ready_w)
    answer = os.read(ready_r, 4096).decode()
    print(answer)
    sys.exit(0 if answer.isdigit() else 1)
os.close(ready_r)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)  # let go of the launcher's pipes: whoever reads them sees their end
log = open(spec["log"], "ab")
offset = log.seek(0, os.SEEK_END)
try:
    p = subprocess.Popen(spec["argv"], cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
except OSError as exc:
    os.write(ready_w, str(exc).encode())
    os._exit(1)
exit_path = spec["exit"]
del spec
log.close()
try:
    with open(f"/proc/{p.pid}/stat", "rb") as fh:
        ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
except (OSError, IndexError, ValueError):
    ticks = None
os.write(ready_w, str(p.pid).encode())
os.close(ready_w)
os.chdir("/")
code = p.wait()
tmp = f"{exit_path}.tmp{os.getpid()}"
with open(tmp, "w") as fh:
    json.dump({"pid": p.pid, "ticks": ticks, "code": code, "log_offset": offset}, fh)
os.replace(tmp, exit_path)
"""


def exit_path_for(log_path) -> str:
    """Where a kept process's exit is written: beside its log (replica-0.log -> replica-0.exit)."""
    root, _ = os.path.splitext(str(log_path))
    return root + ".exit"


def stat_fields(pid: int | str) -> list[bytes] | None:
    """/proc/PID/stat after the command name (fields[0] is the state), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return raw[raw.rindex(b")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it is gone or a zombie."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
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


def spawn_detached(argv: list[str], cwd: str, env: dict, log_path: str,
                   record_exit: bool = True) -> tuple[int, int]:
    """Start argv in its own session, not as our child; returns (pid, start ticks).

    With record_exit, a keeper writes how it ended to exit_path_for(log_path) (see exit_of)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    spec = {"argv": argv, "cwd": cwd, "env": env, "log": log_path}
    if record_exit:
        spec["exit"] = exit_path_for(log_path)
    # The launcher (and so a keeper that lives as long as the app) gets no environment of ours:
    # what it needs comes on stdin, and /proc/PID/environ of a long-lived keeper must hold nothing.
    launcher_env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
    out = subprocess.run([sys.executable, "-I", "-S", "-c", _KEEPER if record_exit else _LAUNCHER],
                         input=json.dumps(spec), capture_output=True, text=True, timeout=30, env=launcher_env)
    if out.returncode != 0:
        raise OSError(f"could not start {argv[0]}: {(out.stdout + out.stderr).strip()[-500:]}")
    pid = int(out.stdout.strip())
    ticks = start_ticks(pid)
    if ticks is None:
        why = "exited at once"
        if record_exit:
            # The keeper writes the exit a moment after the app ends.
            deadline = time.monotonic() + 2.0
            while (ended := exit_of(log_path, pid, None)) is None and time.monotonic() < deadline:
                time.sleep(0.01)
            why = describe_exit(ended)
            tail = log_tail(log_path, (ended or {}).get("log_offset", 0))
        else:
            tail = ""
        raise OSError(f"{argv[0]} {why} (log: {log_path})" + (f"; its log ends: {tail}" if tail else ""))
    return pid, ticks


def exit_of(log_path, pid: int | None, ticks: int | None) -> dict | None:
    """How the kept process (pid, ticks) ended: {"code": int (negative: killed by that signal),
    "log_offset": where its output begins}; None while it runs, or if that is not known (no keeper,
    or the exit file is of another process that used the same log)."""
    try:
        with open(exit_path_for(log_path)) as fh:
            ended = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(ended, dict) or ended.get("pid") != pid:
        return None
    if ticks is not None and ended.get("ticks") not in (None, ticks):
        return None
    return ended


def describe_exit(ended: dict | None) -> str:
    """"exited with code 3", "was killed by SIGKILL", or "exited" when the exit is not known."""
    code = (ended or {}).get("code")
    if not isinstance(code, int):
        return "exited"
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"was killed by signal {-code}"


TAIL_LINES = 5
TAIL_LINE_CHARS = 160


def log_tail(log_path, offset: int = 0, lines: int = TAIL_LINES, max_line: int = TAIL_LINE_CHARS) -> str:
    """The last few lines a process wrote to its log since offset, each cut to max_line, joined
    with " | ": bounded, so it fits an error message and a proof record."""
    try:
        with open(log_path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(offset if 0 <= offset <= size else 0, size - lines * (max_line + 1) * 4)
            fh.seek(start)
            raw = fh.read()
    except OSError:
        return ""
    text = raw.decode("utf-8", "replace").replace("\r", "\n")
    kept = [line.strip() for line in text.split("\n") if line.strip()][-lines:]
    return " | ".join(line if len(line) <= max_line else line[:max_line - 3] + "..." for line in kept)


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
    for pid, ticks in running:
        # A stopped process (SIGSTOP: a hang injected, or a debugger's) keeps SIGTERM pending and
        # would sit out the whole grace period; continued, it gets the SIGTERM and can shut down
        # cleanly (as systemd and Kubernetes do). Harmless to a process that is running.
        signal_process(pid, ticks, signal.SIGCONT)
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


def suspend(pid: int, ticks: int | None, within_s: float = 5.0) -> bool:
    """SIGSTOP the process's group and return once the process is stopped (False if it was not
    running). Like SIGKILL, SIGSTOP takes effect asynchronously; waiting makes "hung" true when
    this returns."""
    if not signal_process(pid, ticks, signal.SIGSTOP):
        return False
    deadline = time.monotonic() + within_s
    while (fields := stat_fields(pid)) is not None and fields[0] not in (b"T", b"t") and time.monotonic() < deadline:
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


# -- what a process uses, from /proc -----------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Usage:
    """What the processes of one session (a replica and everything it started) use right now."""
    rss_bytes: int        # resident memory, summed over the session's processes
    cpu_ticks: int        # user + system CPU time so far of the live ones, in clock ticks
    processes: int
    stopped: bool         # the leader is stopped (state T: SIGSTOP, or t: a tracer)
    started_ticks: int    # the leader's start time (clock ticks since boot)


def uptime_ticks() -> int:
    with open("/proc/uptime") as fh:
        return int(float(fh.read().split()[0]) * CLOCK_TICKS)


def session_usage(leaders: set[int]) -> dict[int, Usage]:
    """Usage per session, for the sessions led by these pids: one pass over /proc/*/stat.

    A replica leads its own session (it is started with start_new_session), so its session is the
    replica: gunicorn's or npm's worker processes count with it, and a process it forks cannot
    escape the count by changing its process group. Leaders gone (or zombies) are left out."""
    totals: dict[int, list] = {}
    try:
        entries = os.scandir("/proc")
    except OSError:
        return {}
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                fields = stat_fields(entry.name)
                if fields is None:
                    continue  # gone while we looked
                session = int(fields[3])
                if session not in leaders:
                    continue
                state, rss, cpu = fields[0], int(fields[21]) * PAGE_SIZE, int(fields[11]) + int(fields[12])
            except (OSError, ValueError, IndexError):
                continue  # gone while we looked, or not ours to read
            if state in (b"Z", b"X"):
                continue
            total = totals.setdefault(session, [0, 0, 0, False, None])
            total[0] += rss
            total[1] += cpu
            total[2] += 1
            if int(entry.name) == session:
                total[3], total[4] = state in (b"T", b"t"), int(fields[19])
    return {leader: Usage(rss, cpu, count, stopped, started) for leader, (rss, cpu, count, stopped, started)
            in totals.items() if started is not None}
