"""The loopback git server of the example repositories: started by the first command that needs
an example repository (the demo, the tests), brought back by `up`, stopped by `down`."""
from __future__ import annotations

from cicd.config import Settings
from cicd.delivery import examples
from cicd.runtime import process
from cicd.stack.component import Component
from cicd.stack.record import Context, alive, read_stack, stack_lock, write_stack


def _start(settings: Settings, port: int | None) -> dict:
    return examples.start_server(settings.var_dir / "git", settings.var_dir / "git-server.log", port)


def example_git_server(settings: Settings, repos: list[str]) -> str:
    """The loopback git server of the example repositories (started once, stopped by `down`),
    with a repository of the sample service for each name in repos; returns its base URL."""
    root = settings.var_dir / "git"
    with stack_lock(settings):
        stack = read_stack(settings)
        server = stack.get("gitserver")
        if not alive(server):
            # The same port as before if possible: onboarded apps keep their repo URLs.
            server = _start(settings, (server or {}).get("port"))
            stack["gitserver"] = server
            write_stack(settings, stack)
        # The slow revision must be slow by this environment's measure: well past the threshold,
        # well inside a spec's health deadline (30 s and up).
        slow_s = min(25.0, max(settings.slow_deploy_s + 3, settings.slow_deploy_s * 1.5))
        for name in repos:
            if not (root / f"{name}.git" / "HEAD").exists():
                examples.make_repo(root, name, slow_delay_s=slow_s)
    return server["url"]


class GitServer(Component):
    name = "gitserver"

    def start(self, ctx: Context) -> None:
        server = ctx.stack.get("gitserver") or {}
        if server.get("port") and not alive(server):
            # Apps onboarded from the example git server name it in their repo URL: bring it back.
            ctx.stack["gitserver"] = _start(ctx.settings, server["port"])
            ctx.say(f"git server {ctx.stack['gitserver']['url']} (example repositories)")

    def ready(self, ctx: Context) -> bool:
        server = ctx.stack.get("gitserver") or {}
        return not server.get("port") or alive(server)

    def stop(self, ctx: Context) -> int:
        server = ctx.stack.get("gitserver")
        if alive(server):
            process.stop(server["pid"], server["ticks"], grace_s=2)
            ctx.stack["gitserver"] = {"port": server["port"]}
            ctx.say("stopped the example git server")
        return 0  # a helper of the examples, not part of the control plane: not counted as stopped

    # Not supervised: nothing of the control plane needs it to run; `up` brings it back.
