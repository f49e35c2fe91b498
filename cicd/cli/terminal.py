"""What the `cicd` command prints, for a person at a terminal and for a pipe.

One way to print a table, used by every listing: rich, with colour for health, severity and
status and the terminal's width when stdout is a terminal; when it is not (a pipe, a file, a
test), plain text with no colour, no box, no wrapping and no cut, so `grep` and `cut` still
work. Scripts should read --json instead: nothing parses these tables.
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import Callable, Iterable, Iterator

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from cicd.core.lifecycle import RELEASE_UNDER_WAY, ApprovalStatus, IncidentStatus, ReleaseStatus

# Colour says how things are: green is fine, yellow is in progress or waiting, red needs a human.
# (ok, alive, down: a replica's health; kept, retried: a dead letter's state)
STATUS_STYLES = {
    IncidentStatus.STABLE: "green", ReleaseStatus.LIVE: "green", ApprovalStatus.GRANTED: "green", "ok": "green",
    "alive": "green",
    IncidentStatus.OPEN: "yellow", ApprovalStatus.PENDING: "yellow", "kept": "yellow",
    **{status: "yellow" for status in RELEASE_UNDER_WAY},
    IncidentStatus.ESCALATED: "bold red", ReleaseStatus.FAILED: "red", IncidentStatus.REFUSED: "red",
    ApprovalStatus.DENIED: "red", "down": "bold red",
    ApprovalStatus.EXPIRED: "dim", "retried": "dim", ReleaseStatus.SUPERSEDED: "dim", ReleaseStatus.ROLLED_BACK: "dim",
}
SEVERITY_STYLES = {"low": "dim", "medium": "yellow", "high": "red", "critical": "bold red"}
# The steps of the healing chain, so a live tail reads as a story.
EVENT_STYLES = {
    "INCIDENT_DETECTED": "bold yellow", "RL_DECISION": "cyan", "EXECUTION_GATE_PASSED": "green",
    "ORCH_EXEC": "bold cyan", "SYSTEM_STABLE": "bold green", "ESCALATED": "bold red", "ATTEMPT_FAILED": "red",
    "ORCH_REFUSE": "red", "INCIDENT_REFUSED": "red", "APPROVAL_REQUESTED": "magenta", "RESTART_BACKOFF": "yellow",
}


def _ratio_style(good: str, total: str) -> Callable[[dict], str | None]:
    """green when all are good, red when none is, yellow in between (healthy of replicas, alive of replicas)."""
    def style(row: dict) -> str | None:
        have, want = row.get(good), row.get(total)
        if not isinstance(have, int) or not isinstance(want, int) or want == 0:
            return None
        return "green" if have >= want else "bold red" if have == 0 else "yellow"
    return style


def _lookup(styles: dict[str, str], key: str) -> Callable[[dict], str | None]:
    def style(row: dict) -> str | None:
        value = row.get(key)
        return styles.get(value.lower()) if isinstance(value, str) else None
    return style


def _event_style(row: dict) -> str | None:
    name = row.get("event_name") or ""
    return EVENT_STYLES.get(name) or ("red" if name.endswith(("_REFUSED", "_BLOCK", "_EXCEEDED", "_FAILED")) else None)


# Colour by what a column is, the same in every listing: a new listing gets it for free.
COLUMN_STYLES: dict[str, Callable[[dict], str | None]] = {
    "status": _lookup(STATUS_STYLES, "status"),
    "severity": _lookup(SEVERITY_STYLES, "severity"),
    "healthy": _ratio_style("healthy", "replicas"),
    "alive": _ratio_style("alive", "replicas"),
    "event_name": _event_style,
    "attention": lambda row: "bold red" if row.get("attention") else None,
    "open_incident": lambda row: "yellow" if row.get("open_incident") else None,
}


ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
# Columns of free text, which may wrap in a narrow terminal; every other column stays whole.
FREE_TEXT = frozenset({"resolution", "summary", "reason", "why", "what", "detail", "then", "now"})
FREE_MIN = 12


def stdout_console() -> Console:
    # Made per call, not at import: tests and `click.testing` swap sys.stdout.
    return Console(file=sys.stdout, highlight=False, emoji=False, soft_wrap=False)


def is_terminal(stream=None) -> bool:
    """As rich decides it: a TTY, or FORCE_COLOR / TTY_COMPATIBLE set; TERM=dumb is not one."""
    return Console(file=stream or sys.stdout).is_terminal


def cell(value) -> str:
    return "-" if value is None or value == "" else str(value)


def print_table(rows: Iterable[dict], columns: list[tuple[str, str]], title: str | None = None) -> None:
    """Print rows as a table; columns are (key, heading). None shows as '-'."""
    rows = list(rows)
    console = stdout_console()
    if console.is_terminal:
        table = Table(box=box.SIMPLE_HEAD, header_style="bold", title=title, title_justify="left",
                      title_style="bold", show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
        cells = [[_short_time(cell(row.get(key))) for key, _ in columns] for row in rows]
        narrowest = 0
        for i, (key, heading) in enumerate(columns):
            # Ids, times and names stay whole; free text (reasons, payloads) wraps to make room.
            free = key in FREE_TEXT
            table.add_column(heading.upper(), no_wrap=not free, overflow="fold", ratio=1 if free else None,
                             min_width=FREE_MIN if free else None)
            narrowest += 2 + (FREE_MIN if free else max([len(heading)] + [len(c[i]) for c in cells]))
        for row, texts in zip(rows, cells):
            table.add_row(*(Text(text, style=_style_of(key, row) or "") for text, (key, _) in zip(texts, columns)))
        if narrowest > console.width:
            # Too narrow even so: rather let the terminal wrap long lines than cut or drop a cell.
            console = Console(file=sys.stdout, highlight=False, emoji=False, soft_wrap=False, width=narrowest)
        console.print(table)
        return
    # Not a terminal: render without a width limit, then drop the padding rich leaves at line
    # ends, so a row is always one line, whatever the width of the pipe.
    table = Table(box=None, header_style="", show_edge=False, pad_edge=False, padding=(0, 2, 0, 0))
    for _, heading in columns:
        table.add_column(heading.upper(), no_wrap=True, overflow="ignore")
    for row in rows:
        table.add_row(*(Text(cell(row.get(key))) for key, _ in columns))
    plain = Console(file=io.StringIO(), width=1_000_000, color_system=None, highlight=False, emoji=False)
    plain.print(table)
    text = "\n".join(line.rstrip() for line in plain.file.getvalue().splitlines()).strip("\n")
    if title:
        text = f"{title}\n{text}"
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _short_time(value: str) -> str:
    """2026-11-22T02:18:11.849953Z -> 2026-11-22 02:18:11 (UTC), on a terminal only: a whole
    table fits on a screen, and the exact time stays in pipes and --json."""
    return f"{value[:10]} {value[11:19]}" if ISO_TIME.fullmatch(value) else value


def _style_of(key: str, row: dict) -> str | None:
    style = COLUMN_STYLES.get(key)
    return style(row) if style else None


def echo(*parts, err: bool = False) -> None:
    """One line from parts: plain strings, or (text, style) pairs coloured on a terminal only."""
    console = Console(file=sys.stderr if err else sys.stdout, highlight=False, emoji=False, soft_wrap=True)
    line = Text()
    for part in parts:
        text, style = part if isinstance(part, tuple) else (part, None)
        line.append(str(text), style=(style or "") if console.is_terminal else "")
    if console.is_terminal:
        console.print(line)
    else:
        stream = console.file
        stream.write(line.plain + "\n")
        stream.flush()


def status_word(value: str) -> tuple[str, str | None]:
    """(text, style) for a word like open or stable: for echo()."""
    return value, STATUS_STYLES.get(value.lower())


def alive_word(alive: bool) -> tuple[str, str | None]:
    return status_word("alive" if alive else "DOWN")


class Underway:
    """Long work as progress() shows it: update() moves the bar or notes the step; echo() prints
    a line of output (to stdout) without tearing the bar."""

    def __init__(self, bar: Progress | None = None, label: str = "", total: int | None = None):
        self.bar = bar
        self.task = bar.add_task(label, total=total, note="") if bar else None

    def update(self, done: int | None = None, note: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, **({} if done is None else {"completed": done}),
                            **({} if note is None else {"note": note}))

    def echo(self, line: str) -> None:
        if self.bar is not None and is_terminal(sys.stdout):
            # Stdout is on the screen with the bar: printed through the bar's console, the line
            # lands above it. (A pipe gets the line as it is, below.)
            self.bar.console.print(Text(line))
        else:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()


@contextlib.contextmanager
def progress(label: str, total: int | None = None) -> Iterator[Underway]:
    """Show long work on stderr while it runs, then clear it: a bar when the total is known, else a
    spinner, with the time taken and a note of the step. Only when stderr is a terminal: a pipe,
    a log file or a --json reader never sees it."""
    if not is_terminal(sys.stderr):
        yield Underway()
        return
    columns = [SpinnerColumn(), TextColumn("{task.description}", markup=False)]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[note]}", style="dim", markup=False)]
    bar = Progress(*columns, console=Console(file=sys.stderr, highlight=False), transient=True,
                   redirect_stdout=False, redirect_stderr=False)
    with bar:
        yield Underway(bar, label, total)
