"""`cicd demo` (what `make demo` runs) against the running stack: 3/3 scenarios, DEMO COMPLETE."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.integration


def test_demo_completes_with_every_scenario_recovered(stack):
    out = stack.cicd("demo", timeout=400)
    text = out.stdout
    assert "Scenarios executed: 3/3 recovered as expected" in text
    for label, fault, action in [("A", "crash", "restart_service"), ("B", "overload", "scale_workers"),
                                 ("C", "false-alarm", "noop")]:
        assert re.search(rf"{label}\s+{fault}\s+-> {action}\s+time to recover\s+\d+\.\d+ s\s+ok", text), text
    assert re.search(r"Proof verify: OK: \d+ records, chain intact", text)
    assert text.rstrip().splitlines()[-2] == "Status: DEMO COMPLETE"
    assert stack.cicd("proof", "verify").returncode == 0
