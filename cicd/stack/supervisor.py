"""The supervisor: `python -m cicd.stack.cluster supervise`, which restarts whatever of the stack
dies (a walk of supervise over every component, once a second)."""
from __future__ import annotations

import sys

from cicd.runtime import process
from cicd.stack.component import Component
from cicd.stack.record import Context, alive, spawn


class Supervisor(Component):
    name = "supervisor"
    # Started once what it looks after runs; stopped first, or it would bring back what `down` is
    # about to stop.
    requires = ("redis", "caddy", "workers", "beat", "watcher")

    def start(self, ctx: Context) -> None:
        if not alive(ctx.stack.get("supervisor")):
            # Without the weight of the CLI: the module's own entry point.
            ctx.stack["supervisor"] = spawn(ctx.settings, [sys.executable, "-m", "cicd.stack.cluster", "supervise"],
                                            "supervisor.log")
            ctx.say(f"supervisor pid {ctx.stack['supervisor']['pid']} (restarts whatever of this stack dies)")

    def ready(self, ctx: Context) -> bool:
        return alive(ctx.stack.get("supervisor"))

    def stop(self, ctx: Context) -> int:
        entry = ctx.stack.get("supervisor") or {}
        stopped = process.stop(entry.get("pid"), entry.get("ticks"), grace_s=5)
        ctx.stack["supervisor"] = None
        return stopped

    # Nothing supervises the supervisor: `cicd up` starts it again if it died.
