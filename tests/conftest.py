"""Figures tests report (the chaos table, how many hostile inputs were tried), printed after the run."""
from __future__ import annotations

REPORTS: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if REPORTS:
        terminalreporter.section("figures")
        for text in REPORTS:
            terminalreporter.write_line(text)
