"""Stable endpoints: one address per app (a port on 127.0.0.1), served by the environment's Caddy.

The runtime calls `Endpoints.publish(app, upstreams)` after every change to an app's live
replicas (a release switched after its health gate, a restart, a scale, a stop); this module
records the wanted state in var/ENV/proxy/endpoints.json (the admin address, and each app's port
and upstreams) and pushes the whole configuration to Caddy through its admin API (POST /load,
JSON). The record is the truth: a Caddy that was down, or restarted by the supervisor, is given
the same configuration again (`apply`), so ports and routes survive restarts of Caddy and of the
stack. Without a running Caddy a publish only records: the runtime keeps working on its ports.

`app_server` and `caddy_config` are pure (unit-tested): the JSON Caddy gets.
"""
from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import threading

from cicd.config import Settings
from cicd.runtime import process

ADMIN_TIMEOUT_S = 5.0
# Caddy's own retry: a request whose upstream refuses or drops it is tried on another one for up
# to this long (covers a replica that dies mid-request, and the moment between two configs).
TRY_DURATION = "5s"
TRY_INTERVAL = "50ms"
# Passive health: an upstream that failed a request is left out for this long (the runtime
# replaces a dead replica well within it, and publishes the new one).
FAIL_DURATION = "10s"
# What a stopped app's address answers while it has no live replica.
NO_UPSTREAM_BODY = "no live release of this app\n"
# The fault listener: a 503 that a probe is pointed at for a false alarm (`cicd inject
# false-alarm`). Part of every config from Caddy's start, so an injection changes no route and
# reloads nothing (a reload can reset connections of clients on the stable addresses).
FAULT_SERVER = "fault"
FAULT_BODY = "false alarm injected by cicd\n"


def app_server(port: int, upstreams: list[str]) -> dict:
    """Caddy's server for one app: its stable port on loopback, a round-robin reverse proxy over
    the live replicas (host:port), with retries and passive health; a plain 503 with none."""
    if upstreams:
        handler = {
            "handler": "reverse_proxy",
            "upstreams": [{"dial": u} for u in upstreams],
            "load_balancing": {"selection_policy": {"policy": "round_robin"},
                               "try_duration": TRY_DURATION, "try_interval": TRY_INTERVAL},
            "health_checks": {"passive": {"fail_duration": FAIL_DURATION, "max_fails": 1}},
        }
    else:
        handler = {"handler": "static_response", "status_code": 503, "body": NO_UPSTREAM_BODY,
                   "headers": {"Retry-After": ["1"]}}
    return {"listen": [f"127.0.0.1:{port}"], "routes": [{"handle": [handler]}],
            # Plain HTTP on loopback: no certificates, no redirect to https.
            "automatic_https": {"disable": True}}


def fault_server(port: int) -> dict:
    """Caddy's fault listener: 503 to anything, on loopback."""
    return {"listen": [f"127.0.0.1:{port}"],
            "routes": [{"handle": [{"handler": "static_response", "status_code": 503, "body": FAULT_BODY}]}],
            "automatic_https": {"disable": True}}


def server_name(app: str) -> str:
    # "app-" first: no app name can make a server called FAULT_SERVER.
    return f"app-{app}"


def caddy_config(admin: str, apps: dict[str, dict], fault_port: int | None = None) -> dict:
    """The whole configuration: the admin API on loopback (nothing persisted by Caddy: our record
    is the truth), a server per app ({app: {"port", "upstreams"}}), the fault listener if it has a
    port, and Prometheus metrics on the admin API's /metrics (figures per server, so per app)."""
    servers = {server_name(app): app_server(entry["port"], entry.get("upstreams", []))
               for app, entry in sorted(apps.items())}
    if fault_port:
        servers[FAULT_SERVER] = fault_server(fault_port)
    return {
        "admin": {"listen": admin, "config": {"persist": False}},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "apps": {"http": {
            # A config change lets requests in flight finish on the old one for up to this long.
            "grace_period": "10s",
            "metrics": {},
            "servers": servers}},
    }


def admin_load(admin: str, config: dict) -> None:
    """POST the configuration to Caddy's admin API; OSError if it does not answer or refuses it."""
    host, _, port = admin.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=ADMIN_TIMEOUT_S)
    try:
        conn.request("POST", "/load", body=json.dumps(config), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read(4000).decode(errors="replace")
    except http.client.HTTPException as exc:
        raise OSError(f"caddy admin {admin}: {exc}") from None
    finally:
        conn.close()
    if response.status >= 400:
        raise OSError(f"caddy refused the configuration ({response.status}): {body.strip()}")


class Endpoints:
    """The record of one environment's stable endpoints, and its pushes to Caddy."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.dir = settings.env_dir / "proxy"
        self.path = self.dir / "endpoints.json"

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"admin": None, "apps": {}}

    @contextlib.contextmanager
    def _locked(self):
        # One writer at a time across every worker process, and configs reach Caddy in the order
        # they were recorded.
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "endpoints.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                state = self.read()
                yield state
                tmp = self.path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                tmp.replace(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _push(state: dict) -> str | None:
        """Push the recorded state; None if Caddy took it (or there is no Caddy), else why not."""
        if not state.get("admin"):
            return None
        try:
            admin_load(state["admin"], caddy_config(state["admin"], state.get("apps", {}), state.get("fault_port")))
        except OSError as exc:
            return str(exc)
        return None

    def publish(self, app: str, upstreams: list[str]) -> str | None:
        """Route app's stable address to these upstreams (an empty list: answer 503). Gives the app
        its port on first use. Returns None, or why Caddy did not take it (the record stands:
        the supervisor pushes it again when Caddy is back)."""
        with self._locked() as state:
            entry = state.setdefault("apps", {}).setdefault(app, {"port": None})
            if entry["port"] is None:
                entry["port"] = self._new_port(state)
            entry["upstreams"] = list(upstreams)
            return self._push(state)

    @staticmethod
    def _new_port(state: dict) -> int:
        used = {e["port"] for e in state.get("apps", {}).values()} | {state.get("fault_port")}
        port = process.free_port()
        while port in used:
            port = process.free_port()
        return port

    def forget(self, app: str) -> str | None:
        """Free the app's address (`cicd remove`)."""
        with self._locked() as state:
            if state.get("apps", {}).pop(app, None) is None:
                return None
            return self._push(state)

    def url(self, app: str) -> str | None:
        entry = self.read().get("apps", {}).get(app)
        return f"http://127.0.0.1:{entry['port']}" if entry else None

    def proxied(self) -> bool:
        """Is a Caddy recorded for this environment (so traffic reaches apps through it)?"""
        return bool(self.read().get("admin"))

    def attach(self, admin: str | None) -> str | None:
        """The stack's Caddy now answers at admin (None: it was stopped): push everything to it."""
        with self._locked() as state:
            state["admin"] = admin
            if admin and not state.get("fault_port"):
                state["fault_port"] = self._new_port(state)
            return self._push(state)

    def fault_address(self) -> str | None:
        """host:port of the fault listener of the running Caddy (None: no Caddy recorded)."""
        state = self.read()
        if not state.get("admin"):
            return None
        if not state.get("fault_port"):
            # A record from before the fault listener: given one now (a single reload, ever).
            with self._locked() as state:
                state.setdefault("fault_port", self._new_port(state))
                if problem := self._push(state):
                    raise OSError(problem)
        return f"127.0.0.1:{state['fault_port']}"

    def admin(self) -> str | None:
        return self.read().get("admin")


def upstreams_of(replicas: list[dict]) -> list[str]:
    """The dial addresses of replicas (the runtime's records), in slot order."""
    return [f"127.0.0.1:{r['port']}" for r in sorted(replicas, key=lambda r: int(r["slot"])) if r.get("port")]

