"""Removing an app: its replicas stop, its runtime state, spec and registry entry go, and its
history stays (releases, incidents, and the proof log, which records APP_REMOVED).

Healing stops first: in the transaction that starts the removal, the app's open incident closes
as refused (INCIDENT_REFUSED, its reason naming the removal), a restart waiting for its backoff
or an action waiting for a human is refused, and the app is marked as needing no healing, so no
new incident opens while its replicas stop. A healing step already on its way then finds no open
incident (or no app) and ends as a logged noop.

Refused while a deploy of the app is under way (the app's deploy lease is held for the removal,
so no deploy starts during it either). In prod a removal needs a person's approval: it is a
request (`cicd.healing.approvals.request_removal`), and the grant is given here, in the same
transaction that takes the lease, so a grant whose removal cannot start is never recorded.
"""
from __future__ import annotations

import shutil
from typing import Callable

from cicd.config import Settings
from cicd.core.lifecycle import EXECUTION_WAITING, ApprovalStatus, ExecutionStatus, IncidentStatus, transition
from cicd.delivery import appconfig, deployer
from cicd.errors import CicdError
from cicd.runtime.base import Runtime
from cicd.store import apps as app_rows
from cicd.store import get_app, proof, releases, session_scope
from cicd.store.incidents import ATTENTION_CHARS

LEASE_S = 120.0
KIND = "removal"  # the approval kind of a prod removal


class RemoveRefused(CicdError, ValueError):
    pass


def remove(settings: Settings, runtime: Runtime, app_name: str, who: str,
           grant: Callable[[object], dict] | None = None,
           on_granted: Callable[[dict], None] = lambda granted: None) -> dict:
    """Remove the app. In prod, `grant(session)` answers its approval request inside the removal's
    first transaction (returning the request as approvals.as_dict does); `on_granted` hears of the
    grant once it is committed, before any replica stops."""
    env = settings.env
    holder = f"remove/{app_name}"
    approval = None
    with session_scope(settings) as session:
        if grant is not None:
            # First, so an answered or expired request says so; raising, it changes nothing.
            approval = grant(session)
            if (approval["kind"], approval["app"]) != (KIND, app_name):
                raise RemoveRefused(f"{approval['id']} is a {approval['kind']} request for {approval['app']}, "
                                    f"not the removal of {app_name}")
        record = get_app(session, env, app_name)
        if record is None:
            raise RemoveRefused(f"{app_name} is not onboarded in {env} (`cicd status --env {env}` lists its apps)")
        if env == "prod" and grant is None:
            proof.append(session, env, "APP_REMOVE_REFUSED", app=app_name,
                         payload={"by": who, "rule": "prod needs approval"})
            refused = True
        else:
            refused = False
            under_way = [r for r in releases.under_way(session, env) if r.app == app_name]
            if under_way or not releases.take_lock(session, env, app_name, holder, settings.clock.now(), LEASE_S):
                busy = (f"release {under_way[0].number} is {under_way[0].status}" if under_way
                        else "its deploy lease is held")
                then = (f"approve {approval['id']} again (it stays pending)" if approval else "remove it")
                raise RemoveRefused(f"a deploy of {app_name} is under way in {env} ({busy}); "
                                    f"wait for it to finish (`cicd status`), then {then}")
            why = f"{app_name} removed by {who}" + (f" (approved in {approval['id']})" if approval else "")
            closed = _stop_healing(session, settings, app_name, who, why)
            record.attention = why[:ATTENTION_CHARS]  # the detector opens nothing while it stops
    if refused:
        # Raised after the refusal's record is committed: the proof log keeps the attempt.
        raise RemoveRefused(f"removing {app_name} from prod needs an approval; nothing was changed. "
                            f"Ask for one with `cicd remove {app_name} --env prod`, then `cicd approve ID`. "
                            f"Remove it from stage or dev without one")
    if approval is not None:
        on_granted(approval)
    stopped = runtime.remove_app(app_name)
    # The fetched git history goes too: an app onboarded again under this name starts afresh.
    shutil.rmtree(deployer.mirror_path(settings, app_name), ignore_errors=True)
    (settings.registry_dir / f"{app_name}.json").unlink(missing_ok=True)
    appconfig.forget(settings, app_name)  # its settings (secrets among them) go with it
    with session_scope(settings) as session:
        # An incident a detector opened just before the first transaction committed closes too.
        closed += _stop_healing(session, settings, app_name, who, why)
        live = app_rows.remove(session, env, app_name, detail=f"app removed by {who}")
        result = {"app": app_name, "env": env, "stopped": stopped, "live_release": live, "by": who,
                  "closed_incidents": closed}
        if approval is not None:
            result.update(approval=approval["id"], requested_by=approval["requested_by"], approved_by=who)
        proof.append(session, env, "APP_REMOVED", app=app_name, payload=result)
    return result


def _stop_healing(session, settings: Settings, app_name: str, who: str, why: str) -> list[str]:
    """Close the app's open incident as refused, with what waits on it; the ids closed."""
    env, now, closed = settings.env, settings.clock.now(), []
    for incident in app_rows.open_incidents(session, env, app_name):
        claim = app_rows.claim_of(session, incident)
        if claim is not None and claim.status in EXECUTION_WAITING:
            claim.status, claim.reason = transition(claim.status, ExecutionStatus.REFUSED), why
        incident.status = transition(incident.status, IncidentStatus.REFUSED)
        incident.resolution, incident.closed_at, incident.open_key = why, now, None
        proof.append(session, env, "INCIDENT_REFUSED", incident_id=incident.id, app=app_name,
                     payload={"attempt": incident.attempt, "reason": why, "removed_by": who})
        closed.append(incident.id)
    # A held action has nothing left to act on: its request is answered no, by the one removing.
    for held in app_rows.pending_approvals(session, env, app_name, "action"):
        held.status = transition(held.status, ApprovalStatus.DENIED)
        held.decided_by, held.decided_at, held.reason = who, now, why
        proof.append(session, env, "APPROVAL_DENIED", incident_id=held.incident_id, app=app_name,
                     payload={"approval": held.id, "kind": held.kind, "by": who, "reason": why,
                              "summary": held.summary})
    return closed
