"""The way into prod is promotion from stage with a human's approval; in prod, deploy actions wait
for one too, with the incident open meanwhile. Who answered and why is in prod's proof chain."""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from cicd.store import proof, reports
from cicd.runtime.local import LocalRuntime

pytestmark = pytest.mark.integration

APP = "promo-api"


@pytest.fixture(scope="module")
def prod(stack):
    # Prod explores a little by default; here it must not, so each test knows what it decides.
    with stack.other_env("prod", CICD_EXPLORATION="0") as settings:
        stack.onboard(APP)
        yield settings


def approval_id(output: str) -> str:
    return re.search(r"(apr-prod-[0-9a-f]{8})", output).group(1)


def prod_events(prod, name=None):
    return [r for r in proof.records_since(prod, 0) if name is None or r["event_name"] == name]


def test_onboarding_straight_into_prod_is_refused_and_logged(stack, prod):
    out = stack.cicd("onboard", "sneaky-api", "--repo", stack.repo_url(APP), "--runtime", "backend",
                     "--env", "prod", check=False)
    assert out.returncode == 2 and "env (no-direct-prod)" in out.stderr
    refused = prod_events(prod, "ONBOARDING_REFUSED")[-1]
    assert refused["payload"]["refusals"][0]["rule"] == "no-direct-prod"


def test_promotion_waits_for_approval_then_deploys_the_same_revision(stack, prod):
    out = stack.cicd("promote", APP, "--from", "stage", "--to", "prod")
    request = approval_id(out.stdout)
    pending = json.loads(stack.cicd("approvals", "--env", "prod", "--json").stdout)
    assert [a["id"] for a in pending] == [request] and pending[0]["kind"] == "promotion"
    assert not LocalRuntime(prod).apps()  # nothing happens before a human answers
    stack.cicd("approve", request, "--as", "alice", "--reason", "soaked in stage for an hour")
    again = stack.cicd("approve", request, "--as", "bob", check=False)
    assert again.returncode == 1 and "already granted by alice" in again.stderr
    stack.wait_steady(APP, env="prod")
    stage_live = reports.latest_release(stack.settings, APP, status="live")
    prod_live = reports.latest_release(prod, APP, status="live")
    assert prod_live["sha"] == stage_live["sha"] and prod_live["kind"] == "promotion"
    granted = prod_events(prod, "APPROVAL_GRANTED")[-1]["payload"]
    assert (granted["by"], granted["reason"], granted["approval"]) == ("alice", "soaked in stage for an hour", request)
    assert prod_events(prod, "PROMOTED")[-1]["payload"]["approved_by"] == "alice"


def test_a_denied_promotion_changes_nothing(stack, prod):
    before = reports.latest_release(prod, APP, status="live")
    request = approval_id(stack.cicd("promote", APP).stdout)
    missing_reason = stack.cicd("deny", request, check=False)
    assert missing_reason.returncode == 2  # --reason is required: a denial says why
    stack.cicd("deny", request, "--as", "carol", "--reason", "change freeze")
    assert reports.latest_release(prod, APP, status="live") == before
    answered = {a["id"]: a for a in json.loads(stack.cicd("approvals", "--all", "--json").stdout)}
    assert answered[request]["status"] == "denied" and answered[request]["decided_by"] == "carol"
    assert prod_events(prod, "APPROVAL_DENIED")[-1]["payload"]["reason"] == "change freeze"


def test_requests_expire(stack, prod):
    os.environ["CICD_APPROVAL_TTL"] = "1"
    try:
        request = approval_id(stack.cicd("promote", APP).stdout)
    finally:
        del os.environ["CICD_APPROVAL_TTL"]
    deadline = time.monotonic() + 20
    while not [r for r in prod_events(prod, "APPROVAL_EXPIRED") if r["payload"]["approval"] == request]:
        assert time.monotonic() < deadline, "housekeeping did not expire the request"
        time.sleep(0.5)
    late = stack.cicd("approve", request, check=False)
    assert late.returncode == 1 and "expired" in late.stderr


def test_in_prod_a_retry_and_a_rollback_wait_for_a_human(stack, prod):
    stack.wait_steady(APP, env="prod")
    live_before = reports.latest_release(prod, APP, status="live")["release"]
    stack.cicd("inject", "failed-deploy", APP, "--env", "prod")

    def wait_request():
        deadline = time.monotonic() + 60
        while not (waiting := json.loads(stack.cicd("approvals", "--env", "prod", "--json").stdout)):
            assert time.monotonic() < deadline, "no approval was requested"
            time.sleep(0.3)
        return waiting[0]

    first = wait_request()
    assert first["kind"] == "action" and "retry_deployment" in first["summary"]
    incident = json.loads(stack.cicd("incidents", "--env", "prod", "--app", APP, "--json").stdout)[0]
    assert incident["status"] == "open" and incident["id"] == first["incident_id"]  # open and visible meanwhile
    stack.cicd("approve", first["id"], "--as", "dave", "--reason", "try once more")
    second = wait_request()  # the retry fails (the revision is broken): now a rollback, again held
    assert "rollback_deployment" in second["summary"] and second["incident_id"] == incident["id"]
    stack.cicd("deny", second["id"], "--as", "erin", "--reason", "I will look at it myself")
    deadline = time.monotonic() + 30
    while (row := json.loads(stack.cicd("incidents", "--env", "prod", "--app", APP, "--json").stdout)[0])["status"] == "open":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert row["status"] == "refused" and "erin" in row["resolution"]
    assert reports.latest_release(prod, APP, status="live")["release"] == live_before  # served throughout
    names = [r["event_name"] for r in prod_events(prod) if r["incident_id"] == incident["id"]]
    assert names.count("APPROVAL_REQUESTED") == 2 and "APPROVAL_GRANTED" in names and "APPROVAL_DENIED" in names
    assert "INCIDENT_REFUSED" in names and "ORCH_EXEC" in names
