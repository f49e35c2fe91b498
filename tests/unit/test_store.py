"""The store on both backends (the `db` fixture: SQLite, and a real PostgreSQL server): one chain
from many writer processes while readers verify it, readers that see one commit throughout,
values that come back as they went in, and database URLs that cannot work refused by name."""
from __future__ import annotations

import multiprocessing
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from cicd import store
from cicd.store import proof
from cicd.config import ConfigError, Settings
from cicd.core.events import as_utc, utcnow
from tests.conftest import REPORTS

ENV = "stage"
APPENDERS, PER_APPENDER = 4, 50


def _appender(settings: Settings, worker: int, start) -> None:
    start.wait(timeout=60)
    for i in range(PER_APPENDER):
        # The healing chain's way in (Core) for even records, the commands' (ORM) for odd ones.
        if i % 2 == 0:
            with store.transaction(settings) as conn:
                proof.append(conn, ENV, "ORCH_EXEC", incident_id=f"w{worker}-{i}", app="web",
                             payload={"worker": worker, "i": i})
        else:
            with store.session_scope(settings) as session:
                proof.append(session, ENV, "RL_UPDATE", incident_id=f"w{worker}-{i}", app="web",
                             payload={"worker": worker, "i": i})


def _verifier(settings: Settings, start, done, results) -> None:
    """Verify the chain again and again while it grows: every verification must find it intact."""
    start.wait(timeout=60)
    outcomes = []
    while True:
        finished = done.is_set()
        result = proof.verify(settings)
        outcomes.append((result.ok, result.records, result.describe()))
        if finished:
            break
    results.put(outcomes)


def test_writer_processes_append_one_chain_while_readers_verify_it(db):
    # spawn: fresh interpreters that share nothing with this one but the database. They all
    # start at once on an empty chain, so the first append (which creates the head) is raced.
    settings = db.settings(ENV)
    ctx = multiprocessing.get_context("spawn")
    start, done, results = ctx.Barrier(APPENDERS + 2), ctx.Event(), ctx.Queue()
    appenders = [ctx.Process(target=_appender, args=(settings, w, start)) for w in range(APPENDERS)]
    verifier = ctx.Process(target=_verifier, args=(settings, start, done, results))
    for p in (*appenders, verifier):
        p.start()
    try:
        start.wait(timeout=60)
        began = time.perf_counter()
        for p in appenders:
            p.join(timeout=180)
        elapsed = time.perf_counter() - began
        done.set()
        outcomes = results.get(timeout=120)
        verifier.join(timeout=60)
        assert [p.exitcode for p in (*appenders, verifier)] == [0] * (APPENDERS + 1)
    finally:
        for p in (*appenders, verifier):
            if p.is_alive():
                p.kill()

    total = APPENDERS * PER_APPENDER
    REPORTS.append(f"proof appends on {db.name}: {APPENDERS} processes x {PER_APPENDER} records = {total} "
                   f"in {elapsed:.2f} s ({total / elapsed:.0f}/s), verified {len(outcomes)} times meanwhile")
    # Readers saw a consistent chain every time (on PostgreSQL: one snapshot for head and records).
    assert [o for o in outcomes if not o[0]] == []
    assert outcomes[-1][1] == total
    counts = [o[1] for o in outcomes]
    assert counts == sorted(counts)  # the chain only ever grew

    result = proof.verify(settings)
    assert result.ok, result.describe()
    assert result.records == total
    records = proof.records_since(settings, 0)
    assert [r["seq"] for r in records] == list(range(1, total + 1))
    assert all(after["prev_hash"] == before["hash"] for before, after in zip(records, records[1:]))
    for w in range(APPENDERS):  # each worker's records once each, in its own order
        assert [r["payload"]["i"] for r in records if r["payload"]["worker"] == w] == list(range(PER_APPENDER))
    assert proof.head_seq(settings) == total
    assert proof.verify_file(settings.proof_mirror_path).records == total


def test_a_reader_sees_one_commit_throughout_its_transaction(db):
    settings = db.settings(ENV)
    with store.transaction(settings) as conn:
        proof.append(conn, ENV, "ORCH_EXEC", payload={"n": 1})
    count = select(func.count()).select_from(store.ProofRecord.__table__)
    with store.transaction(settings, readonly=True) as reader:
        assert reader.execute(count).scalar() == 1
        # A writer commits while the reader is open; the writer does not wait for it.
        with store.transaction(settings) as writer:
            proof.append(writer, ENV, "ORCH_EXEC", payload={"n": 2})
        assert reader.execute(count).scalar() == 1
    with store.transaction(settings, readonly=True) as reader:
        assert reader.execute(count).scalar() == 2


def test_values_come_back_as_they_went_in_and_unique_keys_hold(db):
    settings = db.settings(ENV)
    opened = utcnow() - timedelta(microseconds=123457)
    signal = {"app": "wéb", "slots": [0, 2], "utilization": 0.8125, "note": "é€😀", "nested": {"ok": True}}
    with store.session_scope(settings) as session:
        session.add(store.Incident(id="inc-1", env=ENV, app="web", kind="crash", severity="high", status="open",
                                   signal=signal, opened_at=opened, open_key=f"{ENV}/web"))
        session.add(store.Release(env=ENV, app="web", number=1, status="live", replicas=2, slow_signalled=True,
                                  request_id="req-1"))
    with store.session_scope(settings, readonly=True) as session:
        incident = session.get(store.Incident, "inc-1")
        assert incident.signal == signal
        assert as_utc(incident.opened_at) == opened  # to the microsecond, as UTC
        assert incident.context == {} and incident.decision is None
        assert session.scalar(select(store.Release.number).where(store.Release.slow_signalled.is_(True))) == 1
    # "One open incident per app" is the database's unique key, on both backends.
    with pytest.raises(IntegrityError):
        with store.session_scope(settings) as session:
            session.add(store.Incident(id="inc-2", env=ENV, app="web", kind="crash", severity="high",
                                       status="open", signal={}, open_key=f"{ENV}/web"))
    with store.session_scope(settings, readonly=True) as session:
        assert session.scalar(select(func.count()).select_from(store.Incident)) == 1


def test_a_missing_postgresql_database_is_named_and_the_password_is_not(postgres_server):
    url = postgres_server.url("no_such_db").replace("cicd_test@", "cicd_test:pw-Do-Not-Show@")
    settings = Settings(env=ENV, database_url_override=url)
    with pytest.raises(ConfigError) as raised:
        store.engine_for(settings)
    message = str(raised.value)
    assert message.startswith("CICD_DATABASE_URL: ")
    assert "no_such_db" in message and "does not exist" in message
    assert "pw-Do-Not-Show" not in message


def test_a_database_url_of_another_kind_is_refused_by_name(tmp_path):
    settings = Settings(env=ENV, home=tmp_path, database_url_override="mysql://u:secret@host/db")
    with pytest.raises(ConfigError, match=r"CICD_DATABASE_URL: 'mysql' is not supported") as raised:
        store.engine_for(settings)
    assert "secret" not in str(raised.value)
