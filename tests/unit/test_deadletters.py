"""The dead-letter store: kept whole, bounded, listed, retried and purged on the record; and when
the database cannot take a letter, a file does."""
from __future__ import annotations

import json

import pytest

from cicd.store import deadletters, proof
from cicd.config import Settings


@pytest.fixture
def settings(tmp_path):
    return Settings(env="stage", home=tmp_path)


def test_a_letter_is_kept_whole_with_its_chain(settings):
    chain = [{"task": "cicd.decide.choose", "kwargs": {"env": "stage"}}]
    letter_id = deadletters.keep(settings, "cicd.detect.classify", [{"app": "x"}], {"env": "stage"}, "unknown app",
                                 chain)
    letter = deadletters.get(settings, letter_id)
    assert (letter["task"], letter["args"], letter["kwargs"], letter["chain"], letter["status"]) == \
        ("cicd.detect.classify", [{"app": "x"}], {"env": "stage"}, chain, "kept")
    assert [row["id"] for row in deadletters.listing(settings)] == [letter_id]


def test_huge_hostile_input_is_kept_bounded(settings):
    letter_id = deadletters.keep(settings, "cicd.detect.classify", ["A" * 5_000_000], {}, "malformed")
    kept = deadletters.get(settings, letter_id)["args"]
    assert len(json.dumps(kept)) < 200_000 and "truncated_json" in kept


def test_retry_and_purge_are_on_the_record(settings):
    a = deadletters.keep(settings, "t.a", [], {}, "x")
    b = deadletters.keep(settings, "t.b", [], {}, "y")
    deadletters.mark_retried(settings, a, "alice")
    assert [row["id"] for row in deadletters.listing(settings)] == [b]
    assert deadletters.listing(settings, include_retried=True)[0]["retries"] == 1
    with pytest.raises(deadletters.DeadLetterError, match="no dead letter 99"):
        deadletters.purge(settings, [b, 99], "bob")
    assert deadletters.purge(settings, [b], "bob") == 1
    assert deadletters.purge(settings, None, "bob") == 1  # the retried one
    names = [r["event_name"] for r in proof.records_since(settings, 0)]
    assert names == ["DLQ_RETRIED", "DLQ_PURGED", "DLQ_PURGED"]
    purged = proof.records_since(settings, 1)[0]["payload"]
    assert purged["by"] == "bob" and purged["letters"][0]["task"] == "t.b"


def test_when_the_database_refuses_a_file_keeps_the_letter(settings):
    settings.env_dir.mkdir(parents=True)
    (settings.env_dir / "cicd.db").write_text("this is not a database")
    assert deadletters.keep(settings, "t.x", [1], {"k": 2}, "store down") is None
    line = json.loads((settings.logs_dir / "dead-letters.jsonl").read_text())
    assert (line["task"], line["args"], line["reason"]) == ("t.x", [1], "store down") and line["store_error"]


def test_retry_sends_the_letter_with_its_chain_then_records_it(settings):
    chain = [{"task": "cicd.decide.choose", "kwargs": {"env": "stage"}}]
    letter_id = deadletters.keep(settings, "cicd.detect.classify", [{"app": "x"}], {"env": "stage"}, "broker gone",
                                 chain)
    sent = []
    letter = deadletters.retry(settings, letter_id, "alice", lambda *message: sent.append(message))
    assert sent == [("cicd.detect.classify", [{"app": "x"}], {"env": "stage"}, chain)]
    assert letter["id"] == letter_id and deadletters.get(settings, letter_id)["status"] == "retried"
    assert proof.records_since(settings, 0)[0]["payload"]["by"] == "alice"
    with pytest.raises(deadletters.DeadLetterError, match="no dead letter 99"):
        deadletters.retry(settings, 99, "alice", lambda *message: sent.append(message))
    assert len(sent) == 1  # nothing is sent for a letter that is not there
