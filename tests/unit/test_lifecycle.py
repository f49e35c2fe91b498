"""The lifecycle: every allowed transition passes, the others raise; next_step over stored state."""
import json
import re

import pytest

from cicd.core import events, lifecycle
from cicd.core.lifecycle import (ApprovalStatus, ExecutionStatus, Idle, IllegalTransition,
                                 IncidentStatus, ReleaseStatus, Step, next_step, transition)

KINDS = (IncidentStatus, ExecutionStatus, ReleaseStatus, ApprovalStatus)


def test_statuses_are_the_stored_strings():
    assert IncidentStatus.OPEN == "open" and ReleaseStatus.ROLLED_BACK == "rolled_back"
    assert ExecutionStatus.AWAITING_APPROVAL == "awaiting_approval" and ApprovalStatus.EXPIRED == "expired"
    assert json.dumps({"status": ReleaseStatus.LIVE}) == '{"status": "live"}'
    assert f"{IncidentStatus.ESCALATED}" == "escalated"
    assert {"live": 1}[ReleaseStatus.LIVE] == 1  # a plain-string key finds the member, and back
    assert [s.value for s in ReleaseStatus] == ["fetching", "starting", "switching", "live", "failed",
                                                "superseded", "rolled_back"]


def test_events_takes_the_incident_statuses_from_the_lifecycle():
    assert events.OPEN is IncidentStatus.OPEN
    assert events.INCIDENT_END_STATES == (IncidentStatus.STABLE, IncidentStatus.ESCALATED, IncidentStatus.REFUSED)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_every_allowed_transition_passes_from_the_stored_string_too(kind):
    for old, targets in lifecycle.TRANSITIONS[kind].items():
        for new in targets:
            assert transition(old, new) is new
            if old is not None:
                assert transition(old.value, new) is new


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.__name__)
def test_every_transition_outside_the_table_raises(kind):
    table = lifecycle.TRANSITIONS[kind]
    refused = 0
    for old in (None, *kind):
        for new in kind:
            if new in table.get(old, ()):
                continue
            with pytest.raises(IllegalTransition):
                transition(old, new)
            refused += 1
    assert refused > 0


@pytest.mark.parametrize("old, new", [
    ("live", ReleaseStatus.STARTING),        # a finished release never starts again
    ("failed", ReleaseStatus.LIVE),          # ... nor goes live after it was concluded
    ("switching", ReleaseStatus.SWITCHING),  # only one of gate, cancel and reconciler claims it
    (None, ReleaseStatus.LIVE),
    ("expired", ApprovalStatus.GRANTED),
    ("denied", ApprovalStatus.GRANTED),
    ("stable", IncidentStatus.OPEN),
    ("escalated", IncidentStatus.STABLE),
    ("done", ExecutionStatus.STARTED),
    ("refused", ExecutionStatus.STARTED),
    ("deferred", ExecutionStatus.DONE),
])
def test_a_sample_of_disallowed_transitions_raise_a_value_error(old, new):
    with pytest.raises(ValueError, match=re.escape(f"{old or '(new)'} -> {new.value} is not allowed")):
        transition(old, new)


def test_an_unknown_stored_value_cannot_move_and_a_plain_string_is_not_a_status():
    with pytest.raises(IllegalTransition):
        transition("half-live", ReleaseStatus.LIVE)
    with pytest.raises(TypeError):
        transition("open", "stable")


def test_the_order_of_an_attempt():
    assert lifecycle.STEPS == (Step.DETECT, Step.DECIDE, Step.EXECUTE, Step.VERIFY, Step.LEARN)
    assert set(lifecycle.STEP_OF_EVENT) <= events.PROOF_EVENTS
    assert set(lifecycle.OUTCOME_OF_EVENT) <= {e for e, s in lifecycle.STEP_OF_EVENT.items() if s == Step.VERIFY}


DECISION_1 = {"attempt": 1, "action": "restart_service"}


@pytest.mark.parametrize("status, attempt, decision, execution, expected", [
    ("open", 1, None, None, Step.DECIDE),
    ("open", 2, DECISION_1, "failed", Step.DECIDE),   # the decision is the previous attempt's
    ("open", 1, DECISION_1, None, Step.EXECUTE),
    ("open", 1, DECISION_1, "started", Step.EXECUTE),  # claimed, maybe acted: executing again is safe
    ("open", 1, DECISION_1, "done", Step.VERIFY),
    ("open", 1, DECISION_1, "failed", Step.VERIFY),
    ("open", 1, DECISION_1, "refused", Step.VERIFY),
    ("open", 1, DECISION_1, "deferred", Idle.WAITING),
    ("open", 1, DECISION_1, "awaiting_approval", Idle.WAITING),
    ("stable", 1, DECISION_1, "done", Idle.FINISHED),
    ("escalated", 3, None, None, Idle.FINISHED),
    ("refused", 1, DECISION_1, "refused", Idle.FINISHED),
])
def test_next_step(status, attempt, decision, execution, expected):
    assert next_step(status, attempt, decision, execution) is expected


def test_an_execution_row_of_the_orm_is_summarised_like_a_core_row():
    # The reconciler resends a stalled verification with the ORM's Execution: summary() took only
    # Core rows and dicts, and housekeeping failed on it every time (TypeError), for ever.
    from cicd.healing.orchestrator import summary
    from cicd.store.models import Execution
    row = Execution(env="stage", app="a", incident_id="inc-1", attempt=2, action="restart_service",
                    params={"slots": [0]}, status="done", gate="", reason="", result={"effect": "restarted"})
    assert summary(row) == {"env": "stage", "incident_id": "inc-1", "attempt": 2, "app": "a",
                            "action": "restart_service", "params": {"slots": [0]}, "status": "done", "gate": "",
                            "reason": "", "result": {"effect": "restarted"}}
