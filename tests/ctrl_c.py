"""For the tests that press Ctrl-C on a command they started.

A shell without job control starts background jobs with SIGINT ignored, and a child inherits
that: then Python installs no KeyboardInterrupt handler, and Ctrl-C would do nothing however
the command is written. A test that sends SIGINT starts its command with the default restored,
as a terminal would have it."""
from __future__ import annotations

import signal


def as_in_a_terminal() -> None:
    """preexec_fn for subprocess.Popen: SIGINT back to its default in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
