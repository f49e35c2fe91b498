"""The `cicd` command's manners, on a home where no stack runs.

Each test runs the real installed `cicd` in its own process (in a pipe, or on a real
pseudo-terminal), against a database filled through the domain code."""
from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import click

import cli
from cicd import deadletters, proof
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
