"""What an app may be called: one rule for onboarding, which refuses a bad name with the reason,
and for the runtimes, which check again before a name becomes a path or a label."""
from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
NAME_MIN, NAME_MAX = 2, 40


def is_app_name(name) -> bool:
    return isinstance(name, str) and NAME_MIN <= len(name) <= NAME_MAX and NAME_PATTERN.fullmatch(name) is not None
