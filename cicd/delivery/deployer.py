"""Releases: fetch a revision over git, build it, start it beside the live release, health-gate
it, then switch. A release that fails (fetch, build or gate) is discarded and the live one keeps
serving: it never took traffic, so keeping it is the rollback (ROLLBACK records that).

One deploy per app at a time: a lease in the database (DeployLock), held by the deploy's
request id and renewed while its gate runs, so a worker that dies mid-deploy holds nothing for
long. Deploys of different apps run in parallel on as many deploy workers as there are.
"""
from __future__ import annotations

import contextlib
import shutil
import threading
from datetime import timedelta


from cicd.delivery import gitsource
from cicd.store import proof, releases
from cicd.store.errors import StoreError
from cicd.config import Settings
from cicd.core.events import as_utc, iso, parse_iso
from cicd.core.lifecycle import DEPLOY_ALLOWANCE_S, RELEASE_CLAIMABLE, RELEASE_UNDER_WAY, ReleaseStatus, transition
from cicd.runtime.base import Runtime, RuntimeFailure
from cicd.store import Release, get_app, session_scope

LOCK_TTL_S = 60.0
# A release under way that nobody moves is given up (by the reconciler) once it is this much past
# its spec's health deadline: the gate measures that deadline from the release's start, so by
# then no gate could pass it any more, whatever a slow fetch or build was doing. The allowance
# covers the last gate look and the switch (the verifier allows the same for a deploy it awaits).
KINDS = ("deploy", "retry", "rollback", "promotion")
# Deploys a human asked for raise incidents when they go wrong; the healer's own deploys (retry,
# rollback) are watched by its verifier instead.
SIGNALLING_KINDS = ("deploy", "promotion")


class DeployError(ValueError):
    pass


def _state(release: Release, **extra) -> dict:
    return {"app": release.app, "release": release.number, "status": release.status, "kind": release.kind,
            "ref": release.ref, "sha": release.sha, "started_at": iso(release.started_at), **extra}


def mirror_path(settings: Settings, app: str):
    return settings.env_dir / "repos" / f"{app}.git"


def start(settings: Settings, runtime: Runtime, app_name: str, request_id: str, ref: str = "HEAD",
          reason: str = "", kind: str = "deploy", sha: str | None = None) -> dict:
    """Fetch, build and start release N+1. Returns its state; {"status": "busy"} while another
    deploy of the app holds the lock. Safe to run again for the same request_id."""
    env = settings.env
    if kind not in KINDS:
        raise DeployError(f"kind {kind!r}: must be one of {', '.join(KINDS)}")
    gitsource.check_ref(ref)
    with session_scope(settings) as session:
        release = releases.by_request(session, request_id)
        if release is not None and release.status != ReleaseStatus.FETCHING:
            return _state(release)
        app = get_app(session, env, app_name)
        if app is None:
            raise DeployError(f"app {app_name!r} is not onboarded in {env}")
        if app.spec.get("adopted"):
            raise DeployError(f"{app_name} is adopted (containers cicd-heal did not start): it is restarted in place, "
                              f"never deployed; deploy its new image where it was started, then `cicd adopt` it again")
        if not releases.take_lock(session, env, app_name, request_id, settings.clock.now(), LOCK_TTL_S):
            return {"app": app_name, "status": "busy"}
        if release is None:
            number = (releases.newest_number(session, env, app_name) or 0) + 1
            release = releases.add(session, env=env, app=app_name, number=number,
                                   status=transition(None, ReleaseStatus.FETCHING), kind=kind, ref=ref, sha=sha,
                                   replicas=app.spec["replicas"], request_id=request_id)
            proof.append(session, env, "DEPLOY_STARTED", app=app_name,
                         payload={"release": number, "ref": ref, "kind": kind, "reason": reason,
                                  "replicas": app.spec["replicas"]})
        number, spec, repo = release.number, app.spec, app.repo
    incoming = settings.env_dir / "incoming" / f"{app_name}-{number}"
    shutil.rmtree(incoming, ignore_errors=True)
    try:
        mirror = mirror_path(settings, app_name)
        # An exact commit already in the mirror (a rollback) needs no network; anything else does.
        if sha is None or not gitsource.has_commit(mirror, sha):
            gitsource.fetch(repo, mirror)
        if sha is None:
            sha = gitsource.resolve(mirror, ref)
        elif not gitsource.has_commit(mirror, sha):
            raise gitsource.SourceError(f"commit {sha} is not in {repo}")
        gitsource.export(mirror, sha, incoming)
    except gitsource.SourceError as exc:
        return finish(settings, runtime, app_name, number, ok=False, detail=f"fetch: {exc}", stage="fetch")
    with session_scope(settings) as session:
        releases.by_request(session, request_id).sha = sha
    try:
        with _lease_kept(settings, app_name, request_id):
            staged = runtime.stage_release(spec, number, incoming, progress=_progress(settings, request_id))
    except RuntimeFailure as exc:
        return finish(settings, runtime, app_name, number, ok=False, detail=str(exc), stage="build")
    with session_scope(settings) as session:
        release = releases.by_request(session, request_id, for_update=True)
        concluded = release.status != ReleaseStatus.FETCHING
        if not concluded:
            release.status = transition(release.status, ReleaseStatus.STARTING)
            proof.append(session, env, "BUILD_SUCCEEDED", app=app_name, payload={"release": number, "sha": sha})
            proof.append(session, env, "REPLICAS_STARTED", app=app_name, payload={"release": number, **staged})
        # The gate's clock starts here, when the replicas do: the spec's health deadline is for
        # becoming healthy, and a cold dependency install before it may take minutes.
        state = _state(release, replicas_started_at=iso(settings.clock.now()))
    if concluded:
        # The reconciler gave this release up while we built it (our lease had run out): the
        # replicas just started must not outlive it.
        runtime.discard_release(app_name, number)
    return state


def _progress(settings: Settings, request_id: str):
    """Each build step into the release's detail as it begins, so a waiting `cicd deploy` (and
    `cicd status`) can say what a long build is doing. Only while the release is still fetching:
    one the reconciler gave up meanwhile keeps the detail it was given."""
    def note(step: str) -> None:
        with session_scope(settings) as session:
            release = releases.by_request(session, request_id, for_update=True)
            if release is not None and release.status == ReleaseStatus.FETCHING:
                release.detail = f"{step}..."[:200]
    return note


@contextlib.contextmanager
def _lease_kept(settings: Settings, app_name: str, request_id: str):
    """Renew the deploy's lease while the block runs (the build: a cold install may take minutes,
    longer than LOCK_TTL_S), so the reconciler does not give up a release that is still building.
    A worker that dies stops renewing, and its lease lapses as before."""
    done = threading.Event()

    def renew():
        while not done.wait(LOCK_TTL_S / 3):
            try:
                with session_scope(settings) as session:
                    if not releases.take_lock(session, settings.env, app_name, request_id, settings.clock.now(),
                                              LOCK_TTL_S):
                        return  # taken over: it is not ours to keep
            except StoreError:
                continue  # a busy database: the next renewal, a third of the lease later, may pass
    keeper = threading.Thread(target=renew, name=f"lease-{app_name}", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        done.set()
        keeper.join()


def gate(settings: Settings, runtime: Runtime, app_name: str, number: int, started_at: str):
    """One look at a starting release: (None, signal or None) while waiting, else (finished state, None).

    `started_at` is when its replicas started (start()'s replicas_started_at): the health deadline
    and the slow-deploy signal count from there, so a long build is neither."""
    env = settings.env
    now = settings.clock.now()
    with session_scope(settings) as session:
        release = releases.get(session, env, app_name, number)
        if release is None or release.status != ReleaseStatus.STARTING:
            return (_state(release) if release else {"app": app_name, "release": number, "status": "unknown"}), None
        # Renew the lease while we work.
        releases.take_lock(session, env, app_name, release.request_id, settings.clock.now(), LOCK_TTL_S)
        wanted, kind = release.replicas, release.kind
        deadline = get_app(session, env, app_name).spec["health_deadline_s"]
        slow_due = (kind in SIGNALLING_KINDS and not release.slow_signalled
                    and now - parse_iso(started_at) > timedelta(seconds=settings.slow_deploy_s))
        if slow_due:
            release.slow_signalled = True
    statuses = runtime.probe_release(app_name, number)
    if len(statuses) >= wanted and all(s.healthy for s in statuses):
        return finish(settings, runtime, app_name, number, ok=True, detail=f"{len(statuses)} replicas healthy"), None
    if statuses and not any(s.alive for s in statuses):
        # Nothing left that could become healthy: waiting out the deadline would only hide why.
        exited = exit_detail(runtime, app_name, number, statuses)
        return finish(settings, runtime, app_name, number, ok=False, stage="gate",
                      detail=f"every replica exited before it was healthy: {exited}"), None
    if now - parse_iso(started_at) > timedelta(seconds=deadline):
        seen = ", ".join(f"{s.slot}:{s.status}" for s in statuses)
        exited = exit_detail(runtime, app_name, number, statuses)
        return finish(settings, runtime, app_name, number, ok=False, stage="gate",
                      detail=f"not healthy within {deadline} s ({seen})" + (f": {exited}" if exited else "")), None
    signal = None
    if slow_due:
        signal = deploy_signal(settings, app_name, "deploy_slow", number,
                               f"release {number} not healthy after {settings.slow_deploy_s:.0f} s")
    return None, signal


def exit_detail(runtime: Runtime, app_name: str, number: int, statuses) -> str:
    """Each exited replica of the release: how it ended and the last lines of its log (the app's
    own output, bounded; the environment it was given is never shown). Asked of the runtime only
    when the probe saw a replica gone."""
    if all(s.alive for s in statuses):
        return ""
    return "; ".join(f"replica {e['slot']} {e['exit']}" + (f", its log ends: {e['log_tail']}" if e["log_tail"]
                                                           else ", its log is empty")
                     for e in runtime.exits(app_name, number))


def deploy_signal(settings: Settings, app_name: str, kind: str, number: int, detail: str) -> dict:
    return {"env": settings.env, "app": app_name, "kind": kind, "slots": [], "release": number,
            "observed_at": iso(settings.clock.now()), "detail": detail[:500]}


def _claim(settings: Settings, app_name: str, number: int, giving_up: str = "") -> Release | None:
    """Move a release that is still under way to "switching"; None if someone else finished it
    first (the health gate and a cancelling rollback may race: exactly one of them acts).

    The switch renews the lease, so a reconciler leaves it alone while it runs; and it records
    why a release is being given up, so one that finds it stuck there finishes it the same way."""
    with session_scope(settings) as session:
        release = releases.get(session, settings.env, app_name, number, for_update=True)
        if release is None or release.status not in RELEASE_CLAIMABLE:
            return None
        release.status = transition(release.status, ReleaseStatus.SWITCHING)
        release.detail = giving_up
        releases.take_lock(session, settings.env, app_name, release.request_id, settings.clock.now(), LOCK_TTL_S)
        return release


def release_info(settings: Settings, app_name: str, number: int) -> dict | None:
    with session_scope(settings) as session:
        release = releases.get(session, settings.env, app_name, number)
        return _state(release) if release else None


def cancel(settings: Settings, runtime: Runtime, app_name: str, number: int, why: str) -> bool:
    """Stop a release that is still fetching or starting; False if it had already finished."""
    if _claim(settings, app_name, number, giving_up=why) is None:
        return False
    _conclude(settings, runtime, app_name, number, ok=False, detail=why, stage="cancelled")
    return True


def finish(settings: Settings, runtime: Runtime, app_name: str, number: int, ok: bool, detail: str,
           stage: str = "") -> dict:
    if _claim(settings, app_name, number, giving_up="" if ok else detail) is None:
        return release_info(settings, app_name, number) or {"app": app_name, "release": number, "status": "unknown"}
    return _conclude(settings, runtime, app_name, number, ok, detail, stage)


def _conclude(settings: Settings, runtime: Runtime, app_name: str, number: int, ok: bool, detail: str,
              stage: str) -> dict:
    env = settings.env
    switched = runtime.activate_release(app_name, number) if ok else runtime.discard_release(app_name, number)
    with session_scope(settings) as session:
        release = releases.get(session, env, app_name, number, for_update=True)
        if release.status != ReleaseStatus.SWITCHING:
            # Concluded meanwhile by whoever else held the switch (a worker thought dead came
            # back): its record stands, and the runtime calls above were the same, idempotent ones.
            return _state(release)
        release.status = transition(release.status, ReleaseStatus.LIVE if ok else ReleaseStatus.FAILED)
        release.detail, release.finished_at = detail, settings.clock.now()
        seconds = round((release.finished_at - as_utc(release.started_at)).total_seconds(), 3)
        live = releases.live_besides(session, env, app_name, number)
        if ok:
            for older in live:
                # A rollback replaces a release that went bad; any other deploy just supersedes it.
                older.status = transition(older.status, ReleaseStatus.ROLLED_BACK if release.kind == "rollback"
                                          else ReleaseStatus.SUPERSEDED)
            proof.append(session, env, "HEALTH_GATE_PASSED", app=app_name, payload={"release": number, "detail": detail})
            proof.append(session, env, "DEPLOY_SUCCEEDED", app=app_name,
                         payload={"release": number, "kind": release.kind, "sha": release.sha, "seconds": seconds,
                                  **switched})
        else:
            if stage == "build":
                proof.append(session, env, "BUILD_FAILED", app=app_name, payload={"release": number, "detail": detail})
            proof.append(session, env, "DEPLOY_FAILED", app=app_name,
                         payload={"release": number, "kind": release.kind, "stage": stage, "detail": detail,
                                  "seconds": seconds})
            if live:
                proof.append(session, env, "ROLLBACK", app=app_name,
                             payload={"failed_release": number, "serving_release": live[0].number,
                                      "detail": "the failed release never took traffic; the live release keeps serving"})
        releases.drop_lock(session, env, app_name, release.request_id)
        state = _state(release, detail=detail, seconds=seconds)
    if not ok and release.kind in SIGNALLING_KINDS:
        state["signal"] = deploy_signal(settings, app_name, "deploy_failed", number, f"{stage}: {detail}")
    return state


def scale(settings: Settings, runtime: Runtime, app_name: str, replicas: int, request_id: str) -> dict:
    """An operator's scaling (not the healer's): within the spec's limits, logged as such."""
    env = settings.env
    with session_scope(settings) as session:
        app = get_app(session, env, app_name)
        if app is None:
            raise DeployError(f"app {app_name!r} is not onboarded in {env}")
        low, high = app.spec["min_replicas"], app.spec["max_replicas"]
        if not low <= replicas <= high:
            raise DeployError(f"replicas: must be within the spec's limits {low}-{high}, got {replicas}")
        before = runtime.replica_count(app_name)
        proof.append(session, env, "SCALE_REQUESTED", app=app_name, payload={"from": before, "to": replicas})
    result = runtime.scale(app_name, replicas, op_key=f"scale/{request_id}")
    with session_scope(settings) as session:
        proof.append(session, env, "SCALED", app=app_name, payload=result)
    return result


# -- releases nobody moves (the reconciler's part) -------------------------------------------------
def unattended(settings: Settings) -> list[tuple[str, int]]:
    """(app, number) of every release under way whose deploy's lease has lapsed."""
    now = settings.clock.now()
    with session_scope(settings, readonly=True) as session:
        return [(r.app, r.number) for r in releases.under_way(session, settings.env)
                if releases.lease_lapsed(session, r, now)]


def resume(settings: Settings, runtime: Runtime, app_name: str, number: int) -> dict | None:
    """Finish or roll back a release whose deploy stopped moving (its worker died); None while
    it should still be left alone. Decided from what is there to see, in this order:
      - the runtime already serves it (the switch happened, its record did not): make it live;
      - it was being given up (a failed gate, a cancel), or a newer release was started since:
        roll it back (stop its replicas; the live release keeps serving);
      - its replicas are all healthy: make it live, as its gate would have;
      - otherwise, once it is past its health deadline plus DEPLOY_ALLOWANCE_S: roll it back.
    Its record then says so as a deploy's would (DEPLOY_SUCCEEDED, or DEPLOY_FAILED with stage
    "stalled" and ROLLBACK), after RELEASE_RESUMED, which says what was found and what it becomes."""
    env = settings.env
    now = settings.clock.now()
    with session_scope(settings, readonly=True) as session:
        release = releases.get(session, env, app_name, number)
        if release is None or release.status not in RELEASE_UNDER_WAY or not releases.lease_lapsed(session, release, now):
            return None
        found, giving_up, wanted = release.status, release.detail, release.replicas
        deadline = get_app(session, env, app_name).spec["health_deadline_s"]
        overdue = now - as_utc(release.started_at) > timedelta(seconds=deadline + DEPLOY_ALLOWANCE_S)
        newer = releases.newest_number(session, env, app_name)
    served = runtime.live_release(app_name) == number
    statuses = [] if served else runtime.probe_release(app_name, number)
    healthy = bool(statuses) and len(statuses) >= wanted and all(s.healthy for s in statuses)
    if served:
        ok, detail = True, "the switch had happened: the runtime serves it"
    elif found == ReleaseStatus.SWITCHING and giving_up:
        ok, detail = False, giving_up
    elif newer > number:
        ok, detail = False, f"release {newer} was started since"
    elif healthy:
        ok, detail = True, f"{len(statuses)} replicas healthy"
    elif overdue:
        seen = ", ".join(f"{s.slot}:{s.status}" for s in statuses) or "no replicas"
        exited = exit_detail(runtime, app_name, number, statuses)
        ok, detail = False, f"not healthy within {deadline} s ({seen})" + (f": {exited}" if exited else "")
    else:
        return None  # not healthy yet, but still within its deadline: its gate may yet come back
    with session_scope(settings) as session:
        release = releases.get(session, env, app_name, number, for_update=True)
        if release.status != found or not releases.lease_lapsed(session, release, settings.clock.now()):
            return None  # its deploy came back to it meanwhile
        if release.status != ReleaseStatus.SWITCHING:
            release.status = transition(release.status, ReleaseStatus.SWITCHING)
        # The switch is ours now, under its key.
        releases.take_lock(session, env, app_name, release.request_id, settings.clock.now(), LOCK_TTL_S)
        proof.append(session, env, "RELEASE_RESUMED", app=app_name,
                     payload={"release": number, "found": found,
                              "becomes": ReleaseStatus.LIVE if ok else ReleaseStatus.FAILED,
                              "detail": detail, "started_at": iso(release.started_at)})
    return _conclude(settings, runtime, app_name, number, ok, f"reconciled: {detail}",
                     stage="" if ok else "stalled")
