"""The action catalogue: what the orchestrator may do, and what each action does via a Runtime.

Only catalogued actions can execute. Destructive ones are named on a global blocklist so that
no spelling of them gets through even if a future catalogue entry is careless.
"""
from __future__ import annotations

import re
import unicodedata

from .runtime.base import Runtime

BLOCKLIST = frozenset({
    "delete_production_data", "drop_database", "delete_backups", "format_drives", "remove_snapshots",
    "modify_user_accounts", "change_security_settings", "disable_authentication", "modify_permissions",
    "access_external_systems", "modify_system_files", "execute_shell_commands", "install_software",
    "modify_kernel", "change_network_config",
})

# action -> (description, the parameters it takes)
CATALOGUE = {
    "noop": "do nothing: the signal was a false alarm or the app recovers by itself",
    "restart_service": "stop and start the failing replicas (params: slots)",
    "scale_workers": "set the number of replicas (params: replicas)",
}
ACTIONS = tuple(CATALOGUE)

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
    return f"{action} is not in the catalogue"


def action_class(action: str, params: dict, current_replicas: int) -> str:
    if action == "scale_workers":
        replicas = params.get("replicas", 0)
        if replicas == current_replicas:
            return "noop"
        return "scale_up" if replicas > current_replicas else "scale_down"
    return action


def perform(runtime: Runtime, app: str, action: str, params: dict, op_key: str) -> dict:
    """Do it. op_key makes the effect happen once even if the same execution runs twice."""
    if action == "noop":
        return {"effect": "none"}
    if action == "restart_service":
        return runtime.restart(app, params["slots"], op_key=op_key)
    if action == "scale_workers":
        return runtime.scale(app, params["replicas"], op_key=op_key)
    raise ValueError(f"{action} is not in the catalogue")
