"""`cicd demo` (what `make demo` runs) and its deploy scenarios, against the running stack."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.integration


def run_demo(stack, *args: str) -> str:
    text = stack.cicd("demo", *args, timeout=400).stdout
    assert re.search(r"Proof verify: OK: \d+ records, chain intact", text), text
    assert text.rstrip().splitlines()[-2] == "Status: DEMO COMPLETE", text
    return text


def test_demo_completes_with_every_scenario_recovered(stack):
    text = run_demo(stack)
    assert "Scenarios executed: 3/3 recovered as expected" in text
    for label, fault, action in [("A", "crash", "restart_service"), ("B", "overload", "scale_workers"),
                                 ("C", "false-alarm", "noop")]:
        assert re.search(rf"{label}\s+demo-api\s+{fault}\s+-> {action}\s+time to recover\s+\d+\.\d+ s\s+ok", text), text


def test_demo_failed_deploy_serves_throughout(stack):
    text = run_demo(stack, "--scenario", "failed-deploy")
    assert re.search(r"F\s+demo-api\s+failed-deploy\s+-> (rollback_deployment|noop)\s", text), text
    served = re.search(r"served throughout: (\d+)/(\d+) probes", text)
    assert served and served.group(1) == served.group(2) != "0"


def test_demo_overloaded_environment_scales_out_and_back_in(stack):
    text = run_demo(stack, "--scenario", "overloaded-env")
    assert "Scenarios executed: 6/6 recovered as expected" in text
    for app in ("demo-api", "demo-web", "demo-jobs"):
        assert re.search(rf"O\d\s+{app}\s+overload\s+-> scale_workers", text)
        assert re.search(rf"U\d\s+{app}\s+load stops\s+-> scale_workers", text)
    assert re.search(r"replicas: demo-api \d+ -> 2, demo-web \d+ -> 2, demo-jobs \d+ -> 2", text), text
