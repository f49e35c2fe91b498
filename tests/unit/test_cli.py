"""The `cicd` command's manners, on a home where no stack runs.

Each test runs the real installed `cicd` in its own process (in a pipe, or on a real
pseudo-terminal), against a database filled through the domain code."""
from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import queue
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import click

import cli
from tests.ctrl_c import as_in_a_terminal
from cicd.healing import approvals
from cicd.store import deadletters, proof
from cicd.runtime import process
from cicd.config import Settings
from cicd.store import Incident, session_scope

CICD = Path(sys.executable).with_name("cicd")
SAMPLE_TRACE = Path(__file__).resolve().parents[2] / "examples" / "traces" / "stage-demo.csv"
ESCAPE = "\x1b["


def run(home: Path, *args: str, timeout: float = 120, **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CICD_HOME": str(home), "CICD_ENV": "stage", **variables}
    for name in ("CICD_BROKER_URL", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE"):
        if name not in variables:
            env.pop(name, None)
    return subprocess.run([str(CICD), *args], capture_output=True, text=True, env=env, timeout=timeout)


def on_terminal(home: Path, *args: str, columns: int = 200, timeout: float = 120) -> tuple[str, str, int]:
    """Run with stderr (and, unless said otherwise, stdout) on a real pseudo-terminal.
    Returns (what the terminal showed, what went to the stdout pipe, exit status)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "CICD_HOME": str(home), "CICD_ENV": "stage", "TERM": "xterm-256color"}
    for name in ("CICD_BROKER_URL", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        env.pop(name, None)
    proc = subprocess.Popen([str(CICD), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=slave, env=env)
    os.close(slave)
    shown = bytearray()
    reader = threading.Thread(target=_drain, args=(master, shown), daemon=True)
    reader.start()
    out = proc.communicate(timeout=timeout)[0].decode()
    reader.join(timeout=5)
    os.close(master)
    return shown.decode(errors="replace"), out, proc.returncode


def on_terminal_stdout(home: Path, *args: str, columns: int = 200) -> str:
    """Run with stdout on a real pseudo-terminal; returns what it showed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {**os.environ, "CICD_HOME": str(home), "CICD_ENV": "stage", "TERM": "xterm-256color"}
    for name in ("CICD_BROKER_URL", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        env.pop(name, None)
    proc = subprocess.Popen([str(CICD), *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE,
                            env=env)
    os.close(slave)
    shown = bytearray()
    reader = threading.Thread(target=_drain, args=(master, shown), daemon=True)
    reader.start()
    err = proc.communicate(timeout=120)[1].decode()
    reader.join(timeout=5)
    os.close(master)
    assert proc.returncode == 0, err
    return shown.decode(errors="replace").replace("\r\n", "\n")


def _drain(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: every writer has closed the terminal
            return
        if not chunk:
            return
        into.extend(chunk)


def seed(home: Path) -> Settings:
    """A stage database with two incidents, their proof records and a dead letter."""
    settings = Settings(env="stage", home=home)
    with session_scope(settings) as session:
        session.add(Incident(id="inc-000000000001", env="stage", app="demo-api", kind="crash", severity="high",
                             status="stable", attempt=1, slot=0, signal={}, decision={"action": "restart_service"},
                             resolution="restarted; stable after 2 checks " + "and a long explanation " * 12))
        session.add(Incident(id="inc-000000000002", env="stage", app="shop-api", kind="overload", severity="medium",
                             status="open", attempt=1, slot=0, signal={}, open_key="stage/shop-api"))
        proof.append(session, "stage", "INCIDENT_DETECTED", incident_id="inc-000000000001", app="demo-api",
                     payload={"kind": "crash", "note": "[bold]not markup[/bold]"})
        proof.append(session, "stage", "SYSTEM_STABLE", incident_id="inc-000000000001", app="demo-api",
                     payload={"action": "restart_service"})
    deadletters.keep(settings, "cicd.detect.classify", [], {"signal": "garbage"}, "signal: must be a JSON object")
    return settings


def commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, prefix + (name,))
        else:
            yield prefix + (name,), command


# -- --json on every listing ---------------------------------------------------------------------
# What each command that lists things needs besides --json. A new listing must be added here
# (the walk below fails until it is), so none ships without a --json that parses.
LISTINGS = {
    ("status",): [],
    ("incidents",): [],
    ("approvals",): [],
    ("dlq", "list"): [],
    ("rl", "show"): [],
    ("rl", "eval"): ["--episodes", "200", "--seed", "5"],
    ("proof", "tail"): [],
    ("replay",): [str(SAMPLE_TRACE)],
    ("bench",): None,  # starts stacks of its own for minutes: only its --json is checked to exist
    ("config", "list"): None,  # needs an onboarded app: tests/unit/test_app_config.py runs its --json
}


def test_every_listing_takes_json_and_prints_one_document(tmp_path):
    seed(tmp_path)
    with_json = {path for path, command in commands(cli.main)
                 if any("--json" in p.opts for p in command.params)}
    assert with_json == set(LISTINGS), "a command with --json that this test does not run, or one without it"
    documents = {}
    for path, extra in LISTINGS.items():
        if extra is None:
            continue
        out = run(tmp_path, *path, "--json", *extra)
        assert out.returncode == 0, (path, out.stderr)
        assert "Traceback" not in out.stderr
        documents[path] = json.loads(out.stdout)  # the whole of stdout is one JSON document
    assert [r["id"] for r in documents[("incidents",)]] == ["inc-000000000002", "inc-000000000001"]
    assert [r["event_name"] for r in documents[("proof", "tail")]] == ["INCIDENT_DETECTED", "SYSTEM_STABLE"]
    assert documents[("dlq", "list")][0]["reason"] == "signal: must be a JSON object"
    assert documents[("status",)]["env"] == "stage" and documents[("status",)]["stack"]["envs"] == {}
    assert documents[("approvals",)] == []
    assert set(documents[("rl", "eval")]["policies"]) == {"learned", "playbook", "random", "oracle"}
    assert documents[("rl", "show")]["states"] and documents[("replay",)]


# -- tables --------------------------------------------------------------------------------------
def test_a_piped_table_is_plain_and_never_wraps_or_cuts(tmp_path):
    seed(tmp_path)
    out = run(tmp_path, "incidents", COLUMNS="40")
    assert out.returncode == 0 and ESCAPE not in out.stdout
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "APP", "KIND", "SEVERITY", "STATUS", "ATTEMPT", "ACTION", "OPENED", "RESOLUTION"]
    assert len(lines) == 3  # a header and one line per incident, however long the resolution
    assert lines[2].startswith("inc-000000000001") and lines[2].endswith("and a long explanation")
    assert all(line == line.rstrip() for line in lines)
    tail = run(tmp_path, "proof", "tail").stdout.splitlines()
    assert tail[1].split()[:4] == ["1", tail[1].split()[1], "INCIDENT_DETECTED", "inc-000000000001"]
    assert '"[bold]not markup[/bold]"' in tail[1]  # cells are text, never rich markup


def test_a_table_on_a_terminal_has_colour_and_fits_the_width(tmp_path):
    seed(tmp_path)
    shown = on_terminal_stdout(tmp_path, "incidents", columns=120)
    assert ESCAPE + "32m" in shown and "stable" in shown  # green
    assert ESCAPE + "33m" in shown and "open" in shown  # yellow
    plain = re.sub(r"\x1b\[[0-9;]*m", "", shown)
    assert all(len(line) <= 120 for line in plain.splitlines())
    assert "inc-000000000001" in plain and "inc-000000000002" in plain  # ids are never cut to fit
    # Cells are text, never rich markup (whitespace dropped: a long payload may wrap).
    assert "[bold]notmarkup[/bold]" in re.sub(r"\x1b\[[0-9;]*m|\s", "", on_terminal_stdout(tmp_path, "proof", "tail"))


# -- incidents --follow ----------------------------------------------------------------------------
def _append_events(home: str, worker: int, count: int, barrier) -> None:
    settings = Settings(env="stage", home=Path(home))
    barrier.wait(timeout=60)
    for i in range(count):
        with session_scope(settings) as session:
            proof.append(session, "stage", "RL_DECISION", incident_id=f"inc-{worker:012d}", app="demo-api",
                         payload={"worker": worker, "i": i})
            # Not an incident's event, and another app's: the tail leaves both out.
            proof.append(session, "stage", "SCALED", app="demo-api", payload={"i": i})
            proof.append(session, "stage", "ORCH_EXEC", incident_id="inc-0000000000ff", app="other-api",
                         payload={"i": i})


class Follower:
    def __init__(self, home: Path, *args: str):
        env = {**os.environ, "CICD_HOME": str(home), "CICD_ENV": "stage"}
        env.pop("CICD_BROKER_URL", None)
        self.proc = subprocess.Popen([str(CICD), "incidents", "--follow", "--interval", "0.1", *args],
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, preexec_fn=as_in_a_terminal)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def take(self, n: int, timeout: float = 30) -> list[str]:
        deadline, got = time.monotonic() + timeout, []
        while len(got) < n:
            try:
                got.append(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"only {len(got)} of {n} lines within {timeout} s: {got}") from None
        return got

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=15)
        return code, self.proc.stderr.read()


def test_follow_prints_each_incident_event_once_in_chain_order_until_ctrl_c(tmp_path):
    seed(tmp_path)
    follower = Follower(tmp_path, "--json", "--app", "demo-api")
    try:
        # The listing comes after the tail has noted the chain's head: all that lands next is new.
        first = json.loads(follower.take(1)[0])
        assert (first["type"], first["id"], first["status"]) == ("incident", "inc-000000000001", "stable")
        # Three writer processes at once, as agents append: the tail must miss none, repeat none.
        # (fork, as in test_proof: each child opens its own SQLite connections.)
        ctx = multiprocessing.get_context("fork")
        barrier = ctx.Barrier(3)
        writers = [ctx.Process(target=_append_events, args=(str(tmp_path), w, 40, barrier)) for w in (1, 2, 3)]
        for w in writers:
            w.start()
        for w in writers:
            w.join(timeout=120)
            assert w.exitcode == 0
        # Then one last event: in chain order it can only come after all of theirs, so a
        # repeated or stray line would show up before it, in the 121 lines taken.
        settings = Settings(env="stage", home=tmp_path)
        with session_scope(settings) as session:
            proof.append(session, "stage", "SYSTEM_STABLE", incident_id="inc-000000000001", app="demo-api",
                         payload={"last": True})
        *events, last = [json.loads(line) for line in follower.take(121)]
    finally:
        code, err = follower.interrupt()
    assert code == 0 and "Traceback" not in err, err
    assert (last["event_name"], last["phase"], last["payload"]) == ("SYSTEM_STABLE", "stable", {"last": True})
    assert all(e["type"] == "event" and e["app"] == "demo-api" and e["event_name"] == "RL_DECISION" for e in events)
    assert all(e["phase"] == "decided" for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    expected = [r["seq"] for r in proof.records_since(settings, 2)
                if r["event_name"] == "RL_DECISION"]
    assert seqs == expected and len(seqs) == 120
    for w in (1, 2, 3):  # each writer's events in the order it wrote them
        assert [e["payload"]["i"] for e in events if e["payload"]["worker"] == w] == list(range(40))


def test_follow_for_a_person_lists_then_tails_then_stops_cleanly(tmp_path):
    settings = seed(tmp_path)
    follower = Follower(tmp_path)
    try:
        header = follower.take(3)
        assert header[0].split()[0] == "ID" and header[1].startswith("inc-000000000001")  # oldest first
        # A new incident opens, and an old one changes, as the agents would write them.
        with session_scope(settings) as session:
            session.add(Incident(id="inc-000000000003", env="stage", app="shop-api", kind="crash", severity="high",
                                 status="open", attempt=1, slot=0, signal={}))
            proof.append(session, "stage", "INCIDENT_DETECTED", incident_id="inc-000000000003", app="shop-api",
                         payload={"kind": "crash"})
        with session_scope(settings) as session:
            proof.append(session, "stage", "ESCALATED", incident_id="inc-000000000002", app="shop-api",
                         payload={"attempts": 3})
        opened, escalated = follower.take(2)
    finally:
        code, err = follower.interrupt()
    assert opened.split()[1:5] == ["opened", "inc-000000000003", "shop-api", "INCIDENT_DETECTED"]
    assert escalated.split()[1:5] == ["escalated", "inc-000000000002", "shop-api", "ESCALATED"]
    assert code == 0 and "Ctrl-C stops" in err and "Traceback" not in err and "Aborted" not in err


def test_follow_stops_quietly_when_its_reader_goes_away(tmp_path):
    settings = seed(tmp_path)
    env = {**os.environ, "CICD_HOME": str(tmp_path), "CICD_ENV": "stage"}
    proc = subprocess.Popen([str(CICD), "incidents", "--follow", "--json", "--interval", "0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert json.loads(proc.stdout.readline())["type"] == "incident"
        proc.stdout.close()  # as `| head -1` does once it has its line
        with session_scope(settings) as session:  # so the tail's next line finds no reader
            proof.append(session, "stage", "ESCALATED", incident_id="inc-000000000002", app="shop-api", payload={})
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    err = proc.stderr.read()
    # It ends, as `tail -f | head` does, with click's status for a closed pipe and no traceback.
    assert code == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


# -- when the stack is not up ----------------------------------------------------------------------
def test_a_command_that_needs_the_stack_says_how_to_start_it(tmp_path):
    seed(tmp_path)
    nothing_started = run(tmp_path, "deploy", "demo-api")
    assert nothing_started.returncode == 1 and nothing_started.stdout == ""
    assert nothing_started.stderr == "Error: the stack for stage is not running: start it with `cicd up --env stage`\n"
    # Recorded as up (its one worker is a live process: this test's), but the broker is gone.
    settings = Settings(env="stage", home=tmp_path)
    settings.stack_file.write_text(json.dumps({
        "broker_url": f"redis://127.0.0.1:{process.free_port()}/0",  # nothing listens there
        "envs": {"stage": {"workers": [{"pid": os.getpid(), "ticks": None, "node": "stage-deploy-0@here",
                                        "agent": "deploy"}], "beat": None, "started_at": "2026-01-01T00:00:00Z"}}}))
    for args in (["scale", "demo-api", "2"], ["onboard", "new-api", "--repo", "https://git.example.com/new.git",
                                              "--runtime", "backend"]):
        out = run(tmp_path, *args, timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("Error: the stack for stage is not running (its broker at redis://127.0.0.1:")
        assert out.stderr.endswith("start it with `cicd up --env stage`\n")
    # status still answers, and says what is down.
    out = run(tmp_path, "status", "--json")
    assert out.returncode == 0, out.stderr
    stack = json.loads(out.stdout)["stack"]
    assert stack["broker_alive"] is False
    assert [a["alive"] for a in stack["envs"]["stage"]["agents"] if a["agent"] == "deploy"] == [0]
    assert "(not answering)" in run(tmp_path, "status").stdout.splitlines()[0]
    # An approval would be recorded and its held action never sent: it is refused, still pending.
    with session_scope(settings) as session:
        held = approvals.request_action(session, settings, {
            "action": "restart_service", "params": {"slots": [0]}, "incident_id": "inc-000000000002",
            "app": "shop-api", "attempt": 1}, "prod needs a human")
    out = run(tmp_path, "approve", held["id"], timeout=60)
    assert out.returncode == 1 and "is not running" in out.stderr and "APPROVAL_GRANTED" not in out.stdout
    assert [a["status"] for a in approvals.pending(settings) if a["id"] == held["id"]] == ["pending"]


# -- progress --------------------------------------------------------------------------------------
def test_progress_shows_on_a_terminal_only_and_never_in_stdout(tmp_path):
    piped = run(tmp_path, "rl", "train", "--episodes", "300")
    assert piped.returncode == 0 and piped.stderr == ""  # a pipe or a log gets no bar, not even a label
    assert piped.stdout.startswith("trained 300 episodes (seed 1)")
    shown, out, code = on_terminal(tmp_path, "rl", "train", "--episodes", "300")
    assert code == 0 and out.startswith("trained 300 episodes (seed 1)") and ESCAPE not in out
    assert "training 300 episodes" in shown and "300/300" in shown


# -- shell completion ------------------------------------------------------------------------------
def test_the_documented_completion_line_completes_in_bash(tmp_path):
    help_text = run(tmp_path, "--help").stdout
    assert 'eval "$(_CICD_COMPLETE=bash_source cicd)"' in help_text
    # That line, run by a real bash, then the completion bash would ask for at `cicd proof v<TAB>`.
    script = ('eval "$(_CICD_COMPLETE=bash_source cicd)"; complete -p cicd; '
              'COMP_WORDS=(cicd proof v); COMP_CWORD=2; _cicd_completion cicd; echo "${COMPREPLY[@]}"; '
              'COMP_WORDS=(cicd incidents --fo); COMP_CWORD=2; COMPREPLY=(); _cicd_completion cicd; '
              'echo "${COMPREPLY[@]}"')
    env = {**os.environ, "PATH": f"{CICD.parent}{os.pathsep}{os.environ['PATH']}", "CICD_HOME": str(tmp_path)}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["complete -o nosort -F _cicd_completion cicd", "verify", "--follow"]


def logged_app(home: Path) -> Path:
    """An onboarded app with a build log and two replicas' logs; returns its logs directory."""
    from cicd.delivery import onboarding
    settings = Settings(env="stage", home=home)
    assert onboarding.register(settings, "logs-api", "https://git.example.com/logs-api.git", "backend")["ok"]
    logs = settings.apps_dir / "logs-api" / "logs"
    logs.mkdir(parents=True)
    (logs / "build-1.log").write_text("compiling\nbuilt\n")
    for slot in (0, 1):
        (logs / f"replica-{slot}.log").write_text("".join(f"r{slot} line {i}\n" for i in range(80)))
    return logs


def test_logs_shows_the_build_then_each_replica_and_one_replica_alone(tmp_path):
    logged_app(tmp_path)
    out = run(tmp_path, "logs", "logs-api", "-n", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["build-1 | compiling", "build-1 | built",
                                       "replica-0 | r0 line 78", "replica-0 | r0 line 79",
                                       "replica-1 | r1 line 78", "replica-1 | r1 line 79"]
    one = run(tmp_path, "logs", "logs-api", "--replica", "1")
    assert one.returncode == 0 and one.stdout.splitlines() == [f"r1 line {i}" for i in range(30, 80)]
    everything = run(tmp_path, "logs", "logs-api", "--replica", "0", "-n", "0")
    assert len(everything.stdout.splitlines()) == 80


def test_logs_of_an_unknown_app_or_replica_is_a_clear_error(tmp_path):
    logged_app(tmp_path)
    missing = run(tmp_path, "logs", "logs-api", "--replica", "5")
    assert missing.returncode == 1 and "has no replica 5 (replicas: 0, 1)" in missing.stderr
    unknown = run(tmp_path, "logs", "nope-api")
    assert unknown.returncode == 1 and "'nope-api' is not onboarded in stage" in unknown.stderr
    invalid = run(tmp_path, "logs", "../etc")
    assert invalid.returncode == 2 and "not a valid app name" in invalid.stderr
    for out in (missing, unknown, invalid):
        assert "Traceback" not in out.stderr and not out.stdout


def test_logs_follow_prints_what_a_new_replica_writes_until_ctrl_c(tmp_path):
    logs = logged_app(tmp_path)
    env = {**os.environ, "CICD_HOME": str(tmp_path), "CICD_ENV": "stage"}
    env.pop("CICD_BROKER_URL", None)
    proc = subprocess.Popen([str(CICD), "logs", "logs-api", "-f", "-n", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=as_in_a_terminal)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in proc.stdout], daemon=True).start()
    writer = None
    try:
        first = [lines.get(timeout=30) for _ in range(3)]
        assert first == ["build-1 | built", "replica-0 | r0 line 79", "replica-1 | r1 line 79"]
        # A real process, as a replica started after the tail began: its log is new, and grows.
        writer = process.spawn_detached(
            [sys.executable, "-c", "import time\nfor i in range(3):\n    print('hello', i, flush=True)\n"
                                   "    time.sleep(0.2)\ntime.sleep(60)"],
            str(tmp_path), process.clean_env({}), str(logs / "replica-2.log"))
        with open(logs / "replica-0.log", "a") as fh:
            fh.write("r0 after\n")
        got = sorted(lines.get(timeout=30) for _ in range(4))
        assert got == ["replica-0 | r0 after", "replica-2 | hello 0", "replica-2 | hello 1", "replica-2 | hello 2"]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=15)
        if writer:
            process.stop(*writer, grace_s=1)
    err = proc.stderr.read()
    assert code == 0 and "Traceback" not in err, err


def test_remove_asks_for_yes_off_a_terminal_and_names_an_unknown_app(tmp_path):
    logs = logged_app(tmp_path)
    unconfirmed = run(tmp_path, "remove", "logs-api")
    assert unconfirmed.returncode == 2 and "pass --yes" in unconfirmed.stderr and logs.exists()
    unknown = run(tmp_path, "remove", "nope-api", "--yes")
    assert unknown.returncode == 1 and "Error: nope-api is not onboarded in stage" in unknown.stderr
    removed = run(tmp_path, "remove", "logs-api", "--yes")
    assert removed.returncode == 0, removed.stderr
    assert "removed logs-api from stage: 0 replicas stopped" in removed.stdout and not logs.exists()
    gone = run(tmp_path, "logs", "logs-api")
    assert gone.returncode == 1 and "not onboarded" in gone.stderr
    for out in (unconfirmed, unknown, removed, gone):
        assert "Traceback" not in out.stderr
