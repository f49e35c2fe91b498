"""Every single tamper of the proof chain is found, at every position, and named: an edit of each
field, a deletion, an insertion, a swap of neighbours, a truncated tail. (`cicd proof verify`
prints what proof.verify finds; the last test checks the command itself.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete, update

from cicd import store
from cicd.store import proof
from cicd.core.events import canonical

N = 12


@pytest.fixture
def chain(db):
    settings = db.settings("stage")
    for i in range(1, N + 1):
        with store.session_scope(settings) as s:
            proof.append(s, "stage", "ORCH_EXEC", incident_id=f"inc-{i}", app="web", payload={"i": i})
    return settings


def tamper(settings, fn):
    with store.session_scope(settings) as s:
        fn(s)


def record(s, seq):
    return s.get(store.ProofRecord, ("stage", seq))


FIELDS = {"payload": '{"i":999}', "event_name": "SYSTEM_STABLE", "ts": "2020-01-01T00:00:00.000000Z",
          "app": "other", "incident_id": "inc-forged", "prev_hash": "f" * 64, "hash": "e" * 64}


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("seq", range(1, N + 1))
def test_an_edit_of_any_field_of_any_record_is_named(chain, field, seq):
    tamper(chain, lambda s: setattr(record(s, seq), field, FIELDS[field]))
    result = proof.verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, seq), result


@pytest.mark.parametrize("seq", range(1, N + 1))
def test_a_deletion_anywhere_is_named(chain, seq):
    tamper(chain, lambda s: s.execute(delete(store.ProofRecord).where(store.ProofRecord.seq == seq)))
    result = proof.verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, seq), result


@pytest.mark.parametrize("after", range(0, N + 1))
def test_an_insertion_anywhere_is_named(chain, after):
    """A forged record after `after`, with a correct hash of its own, later records renumbered."""
    def insert(s):
        for seq in range(N, after, -1):
            s.execute(update(store.ProofRecord).where(store.ProofRecord.seq == seq).values(seq=seq + 1))
        prev = record(s, after).hash if after else proof.GENESIS
        ts, payload = "2026-01-01T00:00:00.000000Z", canonical({"forged": True})
        digest = proof.record_hash(after + 1, ts, "stage", "ORCH_EXEC", None, "web", payload, prev)
        s.add(store.ProofRecord(env="stage", seq=after + 1, ts=ts, event_name="ORCH_EXEC", incident_id=None, app="web",
                                payload=payload, prev_hash=prev, hash=digest))
    tamper(chain, insert)
    result = proof.verify(chain)
    # The forged record links up; the record after it does not. At the end, the head names it.
    assert (result.ok, result.first_bad_seq) == (False, after + 2 if after < N else N + 1), result


@pytest.mark.parametrize("seq", range(1, N))
def test_a_swap_of_neighbours_anywhere_is_named(chain, seq):
    def swap(s):
        a, b = record(s, seq), record(s, seq + 1)
        for name in ("ts", "event_name", "incident_id", "app", "payload", "prev_hash", "hash"):
            va, vb = getattr(a, name), getattr(b, name)
            setattr(a, name, vb)
            setattr(b, name, va)
    tamper(chain, swap)
    result = proof.verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, seq), result


@pytest.mark.parametrize("keep", range(0, N))
def test_a_truncated_tail_of_any_length_is_named(chain, keep):
    tamper(chain, lambda s: s.execute(delete(store.ProofRecord).where(store.ProofRecord.seq > keep)))
    result = proof.verify(chain)
    assert (result.ok, result.first_bad_seq) == (False, keep + 1), result


def test_the_command_names_the_first_bad_record_and_fails(chain):
    tamper(chain, lambda s: setattr(record(s, 7), "payload", '{"i":7,"also":"this"}'))
    env = {**os.environ, "CICD_HOME": str(chain.home)}
    if chain.database_url_override:  # PostgreSQL: the command finds the database as an operator's would
        env["CICD_DATABASE_URL"] = chain.database_url_override
    cicd = str(Path(sys.executable).with_name("cicd"))
    out = subprocess.run([cicd, "proof", "verify"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and "BROKEN at record 7" in out.stdout, out.stdout
    mirror = subprocess.run([cicd, "proof", "verify", "--file", str(chain.proof_mirror_path)], capture_output=True,
                            text=True, env=env, timeout=60)
    assert mirror.returncode == 0  # the mirror was written before the edit: it still holds the truth
    lines = chain.proof_mirror_path.read_text().splitlines()
    edited = json.loads(lines[3])
    edited["payload"]["i"] = 44
    lines[3] = json.dumps(edited)
    chain.proof_mirror_path.write_text("\n".join(lines) + "\n")
    out = subprocess.run([cicd, "proof", "verify", "--file", str(chain.proof_mirror_path)], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 1 and "BROKEN at record 4" in out.stdout
