"""The one base of the errors a person can act on.

A CicdError's message says what went wrong and what to do about it; whoever shows it to a
person (the `cicd` command: "Error: ..." and status 1) needs nothing else from it. The subclasses
keep their older bases too (ValueError, RuntimeError), so code that catches those still does.
"""
from __future__ import annotations


class CicdError(Exception):
    """A failure its message fully explains, never a bug: shown as it is, without a traceback."""
