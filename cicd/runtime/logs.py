"""An app's logs as files: which there are, their last lines, and what is appended to them.

The local runtime writes them under var/ENV/apps/APP/logs/: replica-N.log (each replica slot's
output, appended across restarts and releases), and the build's and release phase's logs
(build-N.log, release-N.log for release N) where the build writes them. Reading them needs no
stack: `cicd logs` works on a stopped one too.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Iterator

_REPLICA = re.compile(r"replica-(\d+)\.log")
_NUMBERED = re.compile(r"(build|release)-(\d+)\.log")
READ_CHUNK = 1 << 16


def replica_slot(path: Path) -> int | None:
    match = _REPLICA.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _order(path: Path) -> tuple:
    # Build and release logs first, by release, in the order they were written; then the replicas by slot.
    if match := _NUMBERED.fullmatch(path.name):
        return (0, int(match.group(2)), match.group(1) == "release", path.name)
    if (slot := replica_slot(path)) is not None:
        return (1, slot, False, path.name)
    return (2, 0, False, path.name)


def log_files(logs_dir: Path) -> list[Path]:
    if not logs_dir.is_dir():
        return []
    return sorted((p for p in logs_dir.iterdir() if p.suffix == ".log" and p.is_file()), key=_order)


def tail(path: Path, lines: int) -> tuple[list[str], int]:
    """The last `lines` lines of path (all of them for lines <= 0) and the offset it was read up to.
    Only the end of a big log is read."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        start = size
        data = b""
        # Read backwards a chunk at a time until there are enough lines (or the start of the file).
        while start > 0 and (lines <= 0 or data.count(b"\n") <= lines):
            step = min(READ_CHUNK, start)
            start -= step
            fh.seek(start)
            data = fh.read(step) + data
    text = data.decode("utf-8", "replace")
    # An unfinished last line is shown too: a crash often ends in one.
    kept = text.splitlines()
    return (kept[-lines:] if lines > 0 else kept), size


def follow(files: Callable[[], list[Path]], offsets: dict[Path, int], poll_s: float = 0.25,
           keep_going: Callable[[], bool] = lambda: True) -> Iterator[tuple[Path, str]]:
    """(file, line) for every complete line appended to any of files() after offsets (a file not
    in offsets is new: read from its start). files() is asked again on every poll, so a replica
    started meanwhile is followed too. A file that shrank (replaced, truncated) is read again
    from its start."""
    partial: dict[Path, bytes] = {}
    while keep_going():
        for path in files():
            try:
                with open(path, "rb") as fh:
                    size = fh.seek(0, os.SEEK_END)
                    offset = offsets.get(path, 0)
                    if size < offset:
                        offset, partial[path] = 0, b""
                    if size == offset:
                        continue
                    fh.seek(offset)
                    data = partial.pop(path, b"") + fh.read(size - offset)
            except OSError:
                continue  # gone between the listing and the read (an app removed): nothing to show
            offsets[path] = size
            *complete, rest = data.split(b"\n")
            if rest:
                partial[path] = rest
            for line in complete:
                yield path, line.decode("utf-8", "replace").rstrip("\r")
        time.sleep(poll_s)
