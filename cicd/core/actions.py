"""The action catalogue: what the orchestrator may do, and what each action does via a Runtime.

Only catalogued actions can execute. Destructive ones are named on a global blocklist so that
no spelling of them gets through even if a future catalogue entry is careless.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

from cicd.core.lifecycle import ReleaseStatus
from cicd.runtime.base import Runtime, RuntimeFailure

BLOCKLIST = frozenset({
    "delete_production_data", "drop_database", "delete_backups", "format_drives", "remove_snapshots",
    "modify_user_accounts", "change_security_settings", "disable_authentication", "modify_permissions",
    "access_external_systems", "modify_system_files", "execute_shell_commands", "install_software",
    "modify_kernel", "change_network_config",
})

# action -> what it does (and the params it takes). Order matters: greedy ties go to the earlier.
CATALOGUE = {
    "noop": "do nothing: a false alarm, or a deploy that only needs time",
    "restart_service": "stop and start the failing replicas (params: slots)",
    "scale_workers": "set the number of replicas (params: replicas)",
    "retry_deployment": "deploy the failed release's revision again (params: release)",
    "rollback_deployment": "make an earlier good release the live one again (params: to_release, "
                           "and cancel_release to stop a deploy still under way)",
}
ACTIONS = tuple(CATALOGUE)
DEPLOY_ACTIONS = ("retry_deployment", "rollback_deployment")
DEPLOY_KINDS = ("slow_deploy", "failed_deploy")

# In DEMO_MODE only these classes of action execute (scale_workers counts as scale_up/scale_down).
DEMO_MODE_ALLOWED = frozenset({"noop", "restart_service", "scale_up", "scale_down"})

# Letters from other scripts that look like Latin ones: "drop_dаtabase" with a Cyrillic "а" is
# still drop_database to a human reader, so it is to the blocklist too.
_CONFUSABLES = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j",
    "ѕ": "s", "ԁ": "d", "ԍ": "g", "һ": "h", "ӏ": "l", "ո": "n", "ք": "q", "ԝ": "w", "ο": "o",
    "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "τ": "t", "υ": "u", "ρ": "p",
})


def canonical_action(name: str) -> str:
    """Fold case, width, look-alike letters and separators: 'Drop-Database' -> 'drop_database'."""
    # Decompose first so accents come apart from their letters ("á" -> "a" + mark), drop the marks
    # and invisible format characters, then fold width, case and look-alikes.
    folded = unicodedata.normalize("NFKD", name)
    folded = "".join(ch for ch in folded if unicodedata.category(ch) not in ("Mn", "Me", "Cf"))
    folded = unicodedata.normalize("NFKC", folded).casefold().translate(_CONFUSABLES)
    return re.sub(r"[^a-z0-9]+", "_", folded).strip("_")


def is_blocklisted(name: str) -> bool:
    canon = canonical_action(name)
    squashed = canon.replace("_", "")
    return any(b in canon or b.replace("_", "") in squashed for b in BLOCKLIST)


# Checked once: the catalogue is fixed, and no entry of it may ever be destructive.
SAFE_CATALOGUE = tuple(a for a in ACTIONS if not is_blocklisted(a))


def params_problem(action: str, params: dict) -> str | None:
    """Why the params do not fit the action, or None."""
    if action == "noop":
        return None if not params else "noop takes no params"
    if action == "restart_service":
        slots = params.get("slots")
        if set(params) != {"slots"} or not isinstance(slots, list) or not slots or len(slots) > 64 \
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 64 for s in slots):
            return "restart_service takes params {slots: [replica numbers 0-63]}"
        return None
    if action == "scale_workers":
        replicas = params.get("replicas")
        if set(params) != {"replicas"} or not isinstance(replicas, int) or isinstance(replicas, bool) \
                or not 0 <= replicas <= 64:
            return "scale_workers takes params {replicas: a whole number 0-64}"
        return None
    if action == "retry_deployment":
        if set(params) != {"release"} or not _release_number(params.get("release")):
            return "retry_deployment takes params {release: a release number}"
        return None
    if action == "rollback_deployment":
        if not set(params) <= {"to_release", "cancel_release"} or not _release_number(params.get("to_release")) \
                or ("cancel_release" in params and not _release_number(params["cancel_release"])):
            return "rollback_deployment takes params {to_release: a release number, cancel_release: optional}"
        return None
    return f"{action} is not in the catalogue"


def _release_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10**9


def action_class(action: str, params: dict, current_replicas: int) -> str:
    if action == "scale_workers":
        replicas = params.get("replicas", 0)
        if replicas == current_replicas:
            return "noop"
        return "scale_up" if replicas > current_replicas else "scale_down"
    return action


@dataclass(frozen=True)
class ActionContext:
    """What actions act through: the runtime for replicas; for releases, a way to look them up
    and to ask the deploy agent for a deploy (the agent that deploys is the deploy agent)."""
    runtime: Runtime
    release_info: Callable[[str, int], dict | None]     # (app, number) -> {status, ref, sha} or None
    request_deploy: Callable[..., None]                 # (app, request_id, kind, ref, sha, reason)
    cancel_release: Callable[[str, int, str], bool]     # (app, number, why) -> was it still starting


def perform(ctx: ActionContext, app: str, action: str, params: dict, op_key: str) -> dict:
    """Do it. op_key makes the effect happen once even if the same execution runs twice: the
    runtime remembers applied keys, and a deploy requested under op_key is made at most once."""
    if action == "noop":
        return {"effect": "none"}
    if action == "restart_service":
        return ctx.runtime.restart(app, params["slots"], op_key=op_key)
    if action == "scale_workers":
        return ctx.runtime.scale(app, params["replicas"], op_key=op_key)
    if action == "retry_deployment":
        failed = ctx.release_info(app, params["release"])
        if failed is None:
            raise RuntimeFailure(f"release {params['release']} of {app} does not exist")
        # The ref again, not the sha: a fetch that failed half-way has no sha, and a moved branch
        # may well be the fix.
        ctx.request_deploy(app, op_key, "retry", failed["ref"], None, f"retry of release {params['release']}")
        return {"effect": "deploy_requested", "request_id": op_key, "retry_of": params["release"]}
    if action == "rollback_deployment":
        target = ctx.release_info(app, params["to_release"])
        if target is None or not target.get("sha"):
            raise RuntimeFailure(f"release {params['to_release']} of {app} cannot be rolled back to")
        cancelled = False
        if "cancel_release" in params:
            cancelled = ctx.cancel_release(app, params["cancel_release"], f"cancelled by rollback {op_key}")
        if target["status"] == ReleaseStatus.LIVE:
            return {"effect": "kept", "release": params["to_release"], "cancelled": cancelled}
        ctx.request_deploy(app, op_key, "rollback", target["ref"], target["sha"],
                           f"rollback to release {params['to_release']}")
        return {"effect": "deploy_requested", "request_id": op_key, "rollback_to": params["to_release"]}
    raise ValueError(f"{action} is not in the catalogue")
