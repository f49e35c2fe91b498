"""Removing an app: its replicas stop, its runtime state, spec and registry entry go, and its
history stays (releases, incidents, and the proof log, which records APP_REMOVED).

Refused while a deploy of the app is under way (the app's deploy lease is held for the removal,
so no deploy starts during it either), and refused in prod: prod changes wait for a person, and
there is no approval flow for a removal yet.
"""
from __future__ import annotations

import shutil

from cicd.config import Settings
from cicd.delivery import appconfig, deployer
from cicd.errors import CicdError
from cicd.runtime.base import Runtime
from cicd.store import apps as app_rows
from cicd.store import get_app, proof, releases, session_scope

LEASE_S = 120.0


class RemoveRefused(CicdError, ValueError):
    pass


def remove(settings: Settings, runtime: Runtime, app_name: str, who: str) -> dict:
    env = settings.env
    holder = f"remove/{app_name}"
    with session_scope(settings) as session:
        if get_app(session, env, app_name) is None:
            raise RemoveRefused(f"{app_name} is not onboarded in {env} (`cicd status --env {env}` lists its apps)")
        if env == "prod":
            proof.append(session, env, "APP_REMOVE_REFUSED", app=app_name,
                         payload={"by": who, "rule": "prod needs approval"})
            refused = True
        else:
            refused = False
            under_way = [r for r in releases.under_way(session, env) if r.app == app_name]
            if under_way or not releases.take_lock(session, env, app_name, holder, settings.clock.now(), LEASE_S):
                busy = (f"release {under_way[0].number} is {under_way[0].status}" if under_way
                        else "its deploy lease is held")
                raise RemoveRefused(f"a deploy of {app_name} is under way in {env} ({busy}); "
                                    f"wait for it to finish (`cicd status`), then remove it")
    if refused:
        # Raised after the refusal's record is committed: the proof log keeps the attempt.
        raise RemoveRefused(f"removing {app_name} from prod needs an approval, and no approval flow for a "
                            f"removal exists yet; nothing was changed. Remove it from stage or dev, or stop "
                            f"its traffic and wait for the removal approval flow")
    stopped = runtime.remove_app(app_name)
    # The fetched git history goes too: an app onboarded again under this name starts afresh.
    shutil.rmtree(deployer.mirror_path(settings, app_name), ignore_errors=True)
    (settings.registry_dir / f"{app_name}.json").unlink(missing_ok=True)
    appconfig.forget(settings, app_name)  # its settings (secrets among them) go with it
    with session_scope(settings) as session:
        live = app_rows.remove(session, env, app_name, detail=f"app removed by {who}")
        result = {"app": app_name, "env": env, "stopped": stopped, "live_release": live, "by": who}
        proof.append(session, env, "APP_REMOVED", app=app_name, payload=result)
    return result

