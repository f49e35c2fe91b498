"""Faults on purpose (`cicd inject`): break a running app for real, and write down that we did.

Replica faults act on the processes (SIGKILL, SIGSTOP, memory grown on request, real traffic, a
health blip). Deploy faults deploy
a revision that misbehaves: the app's repository must have the branch for it (the example
repositories do: cicd-inject/slow, cicd-inject/broken, cicd-inject/crashy).
"""
from __future__ import annotations

from typing import Callable

from cicd.delivery import gitsource
from cicd.config import Settings
from cicd.core.events import iso
from cicd.delivery.examples import INJECT_REFS
from cicd.runtime.base import Runtime, RuntimeFailure

REPLICA_FAULTS = ("crash", "hang", "leak", "overload", "false-alarm")
FAULT_KINDS = REPLICA_FAULTS + tuple(INJECT_REFS)


def inject(settings: Settings, runtime: Runtime, app: str, kind: str,
           request_deploy: Callable[..., None] | None = None, **options) -> dict:
    """Returns what was done, with `injected_at`, the proof record's seq, and `watch_after_seq`:
    the head of the proof log just before the fault, after which its incident's records land.

    request_deploy(app, ref, reason) hands a deploy to the deploy agent (deploy faults only).
    """
    # The store (SQLAlchemy) only here: `cicd --help` reads FAULT_KINDS without loading it.
    from cicd.store import get_app, proof, session_scope
    if kind not in FAULT_KINDS:
        raise RuntimeFailure(f"fault kind {kind!r}: must be one of {', '.join(FAULT_KINDS)}")
    with session_scope(settings) as session:
        record = get_app(session, settings.env, app)
        if record is None:
            raise RuntimeFailure(f"app {app!r} is not onboarded in {settings.env}")
        repo = record.repo
    # Where to follow the healing from: the exit watcher may open the incident before the record
    # below is written (it sees the SIGKILL at once; this write waits its turn for the lock).
    watch_after_seq = proof.head_seq(settings)
    injected_at = settings.clock.now()
    if kind in REPLICA_FAULTS:
        detail = runtime.inject(app, kind, **options)
    else:
        ref = INJECT_REFS[kind]
        try:
            found = gitsource.remote_has(repo, ref)
        except gitsource.SourceError as exc:
            raise RuntimeFailure(f"cannot read {repo}: {exc}") from None
        if not found:
            raise RuntimeFailure(f"{repo} has no {ref} branch: push a revision that misbehaves there "
                                 f"(the example repositories have one)")
        request_deploy(app, ref, f"cicd inject {kind}")
        detail = {"kind": kind, "ref": ref}
    with session_scope(settings) as session:
        logged = proof.append(session, settings.env, "FAILURE_INJECTED", app=app,
                              payload={**detail, "kind": kind, "at": iso(injected_at)})
        seq = logged["seq"]
    return {**detail, "injected_at": iso(injected_at), "seq": seq, "watch_after_seq": watch_after_seq}
