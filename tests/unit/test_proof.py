"""The proof log: a hash chain per environment, its JSONL mirror, its exports, and tampering.

The tamper tests edit the database (or an exported file) the way an attacker with write
access would, and check that verification names the first record that no longer fits.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update

from cicd import store
from cicd.store import proof
from cicd.config import Settings
from cicd.core.events import PROOF_EVENTS, canonical

ENV = "stage"
# A few real event names, cycled so records differ in more than their payload.
EVENT_CYCLE = ("INCIDENT_DETECTED", "RL_DECISION", "ORCH_EXEC", "SYSTEM_STABLE", "RL_UPDATE")


def _append(settings: Settings, i: int, **overrides) -> None:
    """One record in its own transaction."""
    fields = {"incident_id": f"inc-{i}", "app": "web", "payload": {"i": i, "note": f"record {i}"}}
    fields.update(overrides)
    with store.session_scope(settings) as s:
        proof.append(s, settings.env, EVENT_CYCLE[i % len(EVENT_CYCLE)], **fields)


def _chain(db, n: int = 10, env: str = ENV) -> Settings:
    """n records in the chain of env, on the test's backend (the `db` fixture: SQLite, PostgreSQL)."""
    settings = db.settings(env)
    for i in range(1, n + 1):
        _append(settings, i)
    return settings


def _db_records(settings: Settings) -> list[dict]:
    with store.session_scope(settings) as s:
        rows = s.scalars(select(store.ProofRecord).where(store.ProofRecord.env == settings.env)
                         .order_by(store.ProofRecord.seq)).all()
        return [proof.as_dict(r) for r in rows]


def _mirror_lines(settings: Settings) -> list[str]:
    return settings.proof_mirror_path.read_text(encoding="utf-8").splitlines()


def _tamper(settings: Settings, fn) -> None:
    """Run fn(session) in one committed transaction: direct edits, no proof API involved."""
    with store.session_scope(settings) as s:
        fn(s)


def _rec(s, seq: int) -> store.ProofRecord:
    record = s.get(store.ProofRecord, (ENV, seq))
    assert record is not None, f"record {seq} missing before tampering"
    return record


# --- append and verify -------------------------------------------------------------------

def test_append_then_verify_links_every_record_to_the_previous(db):
    settings = _chain(db, 7)

    result = proof.verify(settings)
    assert result.ok, result.describe()
    assert result.records == 7
    assert result.first_bad_seq is None

    records = _db_records(settings)
    assert [r["seq"] for r in records] == list(range(1, 8))
    assert records[0]["prev_hash"] == proof.GENESIS
    for before, after in zip(records, records[1:]):
        assert after["prev_hash"] == before["hash"]
    assert len({r["hash"] for r in records}) == 7
    assert proof.head_seq(settings) == 7
    # Each stored hash is the hash of the record's own fields.
    for r in records:
        assert r["hash"] == proof.record_hash(r["seq"], r["ts"], r["env"], r["event_name"], r["incident_id"],
                                              r["app"], canonical(r["payload"]), r["prev_hash"])


def test_several_appends_in_one_transaction_chain_in_order(db):
    settings = db.settings()
    with store.session_scope(settings) as s:
        for i in range(1, 4):
            proof.append(s, ENV, "INCIDENT_DETECTED", incident_id="inc-1", app="web", payload={"i": i})
    assert proof.verify(settings).records == 3
    assert [r["payload"] for r in _db_records(settings)] == [{"i": 1}, {"i": 2}, {"i": 3}]


def test_append_without_payload_or_ids_stores_an_empty_object_and_nulls(db):
    settings = db.settings()
    with store.session_scope(settings) as s:
        proof.append(s, ENV, "FAILURE_INJECTED")
    (record,) = _db_records(settings)
    assert record["payload"] == {}
    assert record["incident_id"] is None and record["app"] is None
    assert proof.verify(settings).ok


def test_unknown_event_name_raises_and_appends_nothing(db):
    settings = _chain(db, 3)
    before = _db_records(settings)
    mirror_before = _mirror_lines(settings)
    assert "INCIDENT_DETECTD" not in PROOF_EVENTS

    with pytest.raises(proof.ProofError, match="INCIDENT_DETECTD"):
        with store.session_scope(settings) as s:
            proof.append(s, ENV, "INCIDENT_DETECTD", incident_id="inc-9", payload={"x": 1})

    assert _db_records(settings) == before
    assert proof.head_seq(settings) == 3
    assert proof.verify(settings).ok
    assert _mirror_lines(settings) == mirror_before


def test_a_failed_transaction_rolls_back_its_valid_appends_too(db):
    # The incident and its proof events commit together or not at all.
    settings = _chain(db, 2)
    with pytest.raises(proof.ProofError):
        with store.session_scope(settings) as s:
            proof.append(s, ENV, "INCIDENT_DETECTED", incident_id="inc-3", payload={"ok": True})
            proof.append(s, ENV, "NOT_AN_EVENT")

    assert proof.head_seq(settings) == 2
    assert proof.verify(settings).records == 2
    assert len(_mirror_lines(settings)) == 2
    # The next append takes seq 3: the rolled-back one left no gap.
    _append(settings, 3)
    assert [r["seq"] for r in _db_records(settings)] == [1, 2, 3]
    assert proof.verify(settings).ok



def test_core_transactions_chain_with_orm_ones_and_roll_back_whole(db):
    # The healing chain appends through store.transaction (Core); commands through sessions.
    settings = _chain(db, 2)
    with store.transaction(settings) as conn:
        first = proof.append(conn, ENV, "ORCH_EXEC", incident_id="inc-c", payload={"n": 1})
        second = proof.append(conn, ENV, "SYSTEM_STABLE", incident_id="inc-c", payload={"n": 2})
    assert (first["seq"], second["seq"], second["prev_hash"]) == (3, 4, first["hash"])
    with pytest.raises(RuntimeError):
        with store.transaction(settings) as conn:
            proof.append(conn, ENV, "ORCH_EXEC", incident_id="inc-d")
            raise RuntimeError("the hop failed after appending")
    _append(settings, 5)
    assert [r["seq"] for r in _db_records(settings)] == [1, 2, 3, 4, 5]
    assert [json.loads(line)["seq"] for line in _mirror_lines(settings)] == [1, 2, 3, 4, 5]
    assert proof.verify(settings).ok and proof.verify_file(settings.proof_mirror_path).ok


def test_a_session_rolled_back_midway_forgets_its_records(db):
    # A rolled-back record must neither reach the mirror nor be taken for the chain's head.
    settings = _chain(db, 1)
    with store.session_scope(settings) as s:
        proof.append(s, ENV, "ORCH_EXEC", incident_id="inc-r", payload={"gone": True})
        s.rollback()
        proof.append(s, ENV, "ORCH_EXEC", incident_id="inc-r", payload={"kept": True})
    records = _db_records(settings)
    assert [(r["seq"], r["payload"]) for r in records][1:] == [(2, {"kept": True})]
    assert _mirror_lines(settings) == [canonical(r) for r in records]
    assert proof.verify(settings).ok


def test_append_refuses_a_connection_not_begun_by_the_store(db):
    # Only store.transaction knows when its records are committed (and may go to the mirror).
    settings = _chain(db, 1)
    with store.engine_for(settings).begin() as conn:
        with pytest.raises(proof.ProofError, match="store.transaction"):
            proof.append(conn, ENV, "ORCH_EXEC")
    assert proof.head_seq(settings) == 1

# --- the JSONL mirror --------------------------------------------------------------------

def test_mirror_holds_the_same_records_in_order(db):
    settings = _chain(db, 6)

    lines = _mirror_lines(settings)
    assert lines == [canonical(r) for r in _db_records(settings)]
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 7))
    result = proof.verify_file(settings.proof_mirror_path)
    assert result.ok, result.describe()
    assert result.records == 6


def test_mirror_catches_up_when_one_transaction_appends_several(db):
    settings = _chain(db, 2)
    with store.session_scope(settings) as s:
        for i in range(3, 6):
            proof.append(s, ENV, "ORCH_EXEC", incident_id="inc-x", payload={"i": i})
    assert [json.loads(line)["seq"] for line in _mirror_lines(settings)] == [1, 2, 3, 4, 5]
    assert proof.verify_file(settings.proof_mirror_path).records == 5


def test_mirror_over_64k_with_non_ascii_payloads_keeps_up(db):
    settings = db.settings()
    payload = {"detail": "€" * 150}  # 3 bytes per character in UTF-8
    appended = 0
    # Grow the mirror past 64 KiB until the next tail read would start inside a character.
    # Line lengths are deterministic (fixed-width ts and hashes), so this point is too.
    for i in range(1, 400):
        _append(settings, i, payload=payload)
        appended = i
        data = settings.proof_mirror_path.read_bytes()
        offset = len(data) - 65536
        if offset > 0 and 0x80 <= data[offset] <= 0xBF:  # a UTF-8 continuation byte
            break
    else:
        pytest.fail("never reached a tail offset inside a multi-byte character")

    _append(settings, appended + 1, payload=payload)

    assert len(_mirror_lines(settings)) == appended + 1
    assert proof.verify_file(settings.proof_mirror_path).ok


# --- tampering with the database -----------------------------------------------------------

def _edit(seq: int, **fields):
    def fn(s):
        record = _rec(s, seq)
        for name, value in fields.items():
            setattr(record, name, value)
    return fn


@pytest.mark.parametrize("tamper, first_bad", [
    pytest.param(_edit(4, payload=canonical({"i": 999, "note": "record 4"})), 4, id="payload"),
    pytest.param(_edit(6, event_name="ESCALATED"), 6, id="event_name"),
    pytest.param(_edit(2, ts="2020-01-01T00:00:00.000000Z"), 2, id="ts"),
    pytest.param(_edit(7, app="billing"), 7, id="app"),
    pytest.param(_edit(1, incident_id="inc-999"), 1, id="incident_id"),
    pytest.param(_edit(1, incident_id=None), 1, id="incident_id-nulled"),
    pytest.param(_edit(8, hash="f" * 64), 8, id="stored-hash"),
    pytest.param(_edit(10, hash="0" * 64), 10, id="stored-hash-of-last"),
    pytest.param(_edit(5, prev_hash="e" * 64), 5, id="prev_hash"),
    pytest.param(_edit(3, payload="{not json"), 3, id="payload-not-json"),
])
def test_edited_field_is_detected_at_its_record(db, tamper, first_bad):
    settings = _chain(db)
    assert proof.verify(settings).ok
    _tamper(settings, tamper)

    result = proof.verify(settings)
    assert not result.ok
    assert result.first_bad_seq == first_bad, result.describe()
    assert result.records == first_bad - 1  # records before it were checked and fit


def test_edit_with_the_records_own_hash_recomputed_is_caught_by_the_next_record(db):
    settings = _chain(db)

    def forge(s):
        r = _rec(s, 4)
        r.payload = canonical({"i": 4, "note": "nothing happened here"})
        r.hash = proof.record_hash(r.seq, r.ts, r.env, r.event_name, r.incident_id, r.app, r.payload, r.prev_hash)
    _tamper(settings, forge)

    result = proof.verify(settings)
    assert not result.ok
    assert result.first_bad_seq == 5  # record 4 fits on its own; record 5 still points at the old hash
    assert "prev_hash" in result.reason


def test_deleted_record_is_detected(db):
    settings = _chain(db)
    _tamper(settings, lambda s: s.delete(_rec(s, 5)))

    result = proof.verify(settings)
    assert not result.ok
    assert result.first_bad_seq == 5
    assert result.records == 4


def test_inserted_forged_record_is_detected(db):
    settings = _chain(db)
    insert_at = 6

    def forge(s):
        R = store.ProofRecord
        # Make room: 6..10 become 7..11 (in two steps so the primary key never collides).
        s.execute(update(R).where(R.env == ENV, R.seq >= insert_at).values(seq=R.seq + 1000))
        s.execute(update(R).where(R.env == ENV, R.seq >= 1000).values(seq=R.seq - 999))
        prev = _rec(s, insert_at - 1)
        ts, payload = prev.ts, canonical({"forged": True})
        digest = proof.record_hash(insert_at, ts, ENV, "SYSTEM_STABLE", "inc-6", "web", payload, prev.hash)
        s.add(R(env=ENV, seq=insert_at, ts=ts, event_name="SYSTEM_STABLE", incident_id="inc-6", app="web",
                payload=payload, prev_hash=prev.hash, hash=digest))
        # The attacker also moves the head to the new last record.
        last = _rec(s, 11)
        head = s.get(store.ProofHead, ENV)
        head.seq, head.hash = 11, last.hash
    _tamper(settings, forge)

    result = proof.verify(settings)
    assert not result.ok
    # The forged record itself fits (right seq, prev_hash and its own recomputed hash), so it
    # cannot be the one named; the record after it still carries prev_hash = hash of record 5
    # (and its seq moved, which changes its own hash too), so the break shows at insert_at + 1.
    # Hiding the insertion would need every later record rewritten, which is the
    # "rewrite the tail and the head" case below.
    assert result.first_bad_seq is not None and result.first_bad_seq <= insert_at + 1
    assert result.first_bad_seq == insert_at + 1


def test_reordered_records_are_detected(db):
    settings = _chain(db)
    fields = ("ts", "event_name", "incident_id", "app", "payload", "prev_hash", "hash")

    def swap(s):
        a, b = _rec(s, 3), _rec(s, 4)
        va, vb = [getattr(a, f) for f in fields], [getattr(b, f) for f in fields]
        for f, x, y in zip(fields, va, vb):
            setattr(a, f, y)
            setattr(b, f, x)
    _tamper(settings, swap)

    result = proof.verify(settings)
    assert not result.ok
    assert result.first_bad_seq == 3


def test_truncated_tail_is_detected_by_the_head(db):
    settings = _chain(db)
    _tamper(settings, lambda s: s.execute(delete(store.ProofRecord).where(
        store.ProofRecord.env == ENV, store.ProofRecord.seq >= 9)))

    result = proof.verify(settings)
    assert not result.ok
    assert result.first_bad_seq == 9
    assert result.records == 8
    assert "truncated" in result.reason


def test_truncated_tail_with_head_rewritten_is_not_detectable(db):
    # Known limitation of a hash chain without an external anchor: an attacker who deletes the
    # tail AND moves the head back to the new last record leaves a chain that is internally
    # consistent. Only a copy of the head kept elsewhere (the mirror, the Redis stream, a
    # published checkpoint) shows that records 9 and 10 ever existed. Same for an attacker who
    # rewrites every record from some point on: the chain proves integrity, not authorship.
    settings = _chain(db)

    def truncate(s):
        s.execute(delete(store.ProofRecord).where(store.ProofRecord.env == ENV, store.ProofRecord.seq >= 9))
        head = s.get(store.ProofHead, ENV)
        head.seq, head.hash = 8, _rec(s, 8).hash
    _tamper(settings, truncate)

    result = proof.verify(settings)
    assert result.ok
    assert result.records == 8
    # The mirror written before the truncation still holds the evidence.
    assert proof.verify_file(settings.proof_mirror_path).records == 10


def test_head_hash_edited_alone_is_detected(db):
    settings = _chain(db)

    def edit_head(s):
        s.get(store.ProofHead, ENV).hash = "a" * 64
    _tamper(settings, edit_head)

    result = proof.verify(settings)
    assert not result.ok
    assert result.first_bad_seq == 10


def test_forged_record_appended_past_the_head_is_named(db):
    settings = _chain(db)

    def forge(s):
        last = _rec(s, 10)
        payload = canonical({"forged": True})
        digest = proof.record_hash(11, last.ts, ENV, "SYSTEM_STABLE", "inc-11", "web", payload, last.hash)
        s.add(store.ProofRecord(env=ENV, seq=11, ts=last.ts, event_name="SYSTEM_STABLE", incident_id="inc-11",
                                app="web", payload=payload, prev_hash=last.hash, hash=digest))
    _tamper(settings, forge)

    result = proof.verify(settings)
    assert not result.ok  # this part holds today
    assert result.first_bad_seq == 11  # today: 10


# --- tampering with an exported file -------------------------------------------------------

def _exported_lines(settings: Settings, path: Path) -> list[str]:
    with open(path, "w", encoding="utf-8") as fh:
        assert proof.export(settings, "jsonl", fh) == 10
    lines = path.read_text(encoding="utf-8").splitlines()
    assert proof.verify_file(path).ok
    return lines


def _edit_line(lines: list[str]) -> list[str]:
    row = json.loads(lines[3])
    row["payload"]["note"] = "edited"
    return lines[:3] + [canonical(row)] + lines[4:]


def _unparseable(lines: list[str]) -> list[str]:
    return lines[:5] + ["{this is not json"] + lines[6:]


@pytest.mark.parametrize("tamper, first_bad", [
    pytest.param(_edit_line, 4, id="edit-line-4"),
    pytest.param(lambda lines: lines[:4] + lines[5:], 5, id="delete-line-5"),
    pytest.param(lambda lines: lines[:2] + [lines[3], lines[2]] + lines[4:], 3, id="swap-lines-3-4"),
    pytest.param(_unparseable, 6, id="unparseable-line-6"),
    pytest.param(lambda lines: lines[:9] + [lines[9][:40]], 10, id="cut-last-line"),
])
def test_tampered_export_file_is_detected(db, tamper, first_bad):
    settings = _chain(db)
    path = db.home / "export.jsonl"
    lines = _exported_lines(settings, path)

    tampered = db.home / "tampered.jsonl"
    tampered.write_text("\n".join(tamper(lines)) + "\n", encoding="utf-8")

    result = proof.verify_file(tampered)
    assert not result.ok
    assert result.first_bad_seq == first_bad, result.describe()


def test_truncated_export_file_verifies_because_a_file_has_no_head(db):
    # A file alone cannot show a missing tail: compare its count with `cicd proof verify`.
    settings = _chain(db)
    path = db.home / "export.jsonl"
    lines = _exported_lines(settings, path)
    path.write_text("\n".join(lines[:8]) + "\n", encoding="utf-8")

    result = proof.verify_file(path)
    assert result.ok and result.records == 8


# --- export --------------------------------------------------------------------------------

def test_export_jsonl_matches_the_database(db):
    settings = _chain(db, 5)
    buf = io.StringIO()

    assert proof.export(settings, "jsonl", buf) == 5

    lines = buf.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == _db_records(settings)
    assert proof.verify_records(json.loads(line) for line in lines).ok


def test_export_csv_has_the_columns_rows_and_canonical_payload_text(db):
    settings = _chain(db, 4)
    with store.session_scope(settings) as s:
        proof.append(s, ENV, "FAILURE_INJECTED", payload={"z": [1, 2], "a": "é"})  # no incident, no app
    buf = io.StringIO()

    assert proof.export(settings, "csv", buf) == 5

    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    assert tuple(rows[0]) == proof.EXPORT_COLUMNS
    body = rows[1:]
    assert len(body) == 5
    for row, record in zip(body, _db_records(settings)):
        as_row = dict(zip(proof.EXPORT_COLUMNS, row))
        assert as_row["seq"] == str(record["seq"])
        assert as_row["payload"] == canonical(record["payload"])
        assert as_row["hash"] == record["hash"] and as_row["prev_hash"] == record["prev_hash"]
        assert as_row["event_name"] == record["event_name"] and as_row["env"] == ENV
        assert as_row["incident_id"] == (record["incident_id"] or "")
    assert body[-1][proof.EXPORT_COLUMNS.index("payload")] == '{"a":"é","z":[1,2]}'


def test_export_unknown_format_raises(db):
    settings = _chain(db, 1)
    buf = io.StringIO()
    with pytest.raises(proof.ProofError, match="xml"):
        proof.export(settings, "xml", buf)
    assert buf.getvalue() == ""


# --- concurrency ---------------------------------------------------------------------------

WORKERS, PER_WORKER = 4, 40


def _append_worker(settings: Settings, worker: int, barrier) -> None:
    barrier.wait(timeout=60)
    for i in range(PER_WORKER):
        with store.session_scope(settings) as s:
            proof.append(s, ENV, "INCIDENT_DETECTED", incident_id=f"w{worker}-{i}", app="web",
                         payload={"worker": worker, "i": i})


def test_concurrent_appenders_in_separate_processes_keep_one_chain(db):
    # fork, like Celery's prefork pool: store keys its engines by pid, so each child opens its
    # own connections and only the writer lock (BEGIN IMMEDIATE on SQLite, an advisory lock on
    # PostgreSQL) keeps the writers apart. They all start on an empty chain: the first append,
    # which creates the head, is raced too.
    settings = db.settings()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_append_worker, args=(settings, w, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        assert [p.exitcode for p in procs] == [0] * WORKERS
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()

    result = proof.verify(settings)
    assert result.ok, result.describe()
    assert result.records == WORKERS * PER_WORKER

    records = _db_records(settings)
    # Each worker's records appear once each, in that worker's own order.
    for w in range(WORKERS):
        mine = [r["payload"]["i"] for r in records if r["payload"]["worker"] == w]
        assert mine == list(range(PER_WORKER))

    lines = _mirror_lines(settings)
    assert len(lines) == WORKERS * PER_WORKER
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, WORKERS * PER_WORKER + 1))
    assert lines == [canonical(r) for r in records]
    assert proof.verify_file(settings.proof_mirror_path).ok


# --- environments --------------------------------------------------------------------------

def _interleave(dev: Settings, stage: Settings) -> None:
    for i in range(1, 4):
        _append(dev, i)
        _append(stage, i)
        _append(stage, 10 + i)


@pytest.mark.parametrize("shared_db", [False, True], ids=["own-db", "shared-db"])
def test_environments_are_separate_chains(db, shared_db):
    override = db.database_url(one_per_env=not shared_db)
    dev = Settings(env="dev", home=db.home, database_url_override=override)
    stage = Settings(env="stage", home=db.home, database_url_override=override)
    _interleave(dev, stage)

    for settings, count in ((dev, 3), (stage, 6)):
        result = proof.verify(settings)
        assert result.ok, result.describe()
        assert result.records == count
        records = _db_records(settings)
        assert [r["seq"] for r in records] == list(range(1, count + 1))
        assert records[0]["prev_hash"] == proof.GENESIS
        assert {r["env"] for r in records} == {settings.env}
        assert proof.verify_file(settings.proof_mirror_path).records == count

    assert dev.proof_mirror_path != stage.proof_mirror_path
    if shared_db:
        with store.session_scope(stage) as s:
            assert s.scalar(select(func.count()).select_from(store.ProofRecord)) == 9

    # Breaking one environment's chain leaves the other intact.
    with store.session_scope(dev) as s:
        s.get(store.ProofRecord, ("dev", 2)).app = "evil"
    assert proof.verify(dev).first_bad_seq == 2
    assert proof.verify(stage).ok


def test_a_partly_written_mirror_line_is_cut_and_rewritten(db):
    settings = _chain(db, n=3)
    with open(settings.proof_mirror_path, "ab") as fh:
        fh.write(b'{"seq":4,"ts":"2026-')  # a crash in the middle of writing record 4
    _append(settings, 4)
    lines = _mirror_lines(settings)
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3, 4]
    assert proof.verify_file(settings.proof_mirror_path).ok


def test_a_payload_spelled_as_a_string_in_a_file_is_refused(db):
    settings = _chain(db, n=3)
    lines = _mirror_lines(settings)
    record = json.loads(lines[1])
    record["payload"] = canonical(record["payload"])  # same content, another spelling
    lines[1] = canonical(record)
    path = db.home / "respelled.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = proof.verify_file(path)
    assert (result.ok, result.first_bad_seq) == (False, 2)


def test_records_without_a_head_are_reported_from_the_first(db):
    settings = _chain(db, n=3)
    _tamper(settings, lambda s: s.execute(delete(store.ProofHead)))
    result = proof.verify(settings)
    assert (result.ok, result.first_bad_seq) == (False, 1)
