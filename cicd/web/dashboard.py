"""The dashboard: one page and the JSON behind it, read from the store, served on loopback.

    /                       the page (cicd/web/static/): apps, incident timeline, decisions and gates,
                            the policy heatmap, live events
    /api/health             each app: replicas, health, uptime, open incident
    /api/events?limit=N     the last N proof records (1-1000, default 50); &after=SEQ: only newer
    /api/incidents?limit=N  recent incidents (1-500, default 50) with their chain; &app=NAME
    /api/policy             the Q-table (`cicd rl show`)
    /api/stream             Server-Sent Events: proof records as they land (after=SEQ or Last-Event-ID)
    /metrics                Prometheus text format (cicd.metrics)

Read-only, no login: it binds to 127.0.0.1 unless told otherwise. The page draws everything with
DOM text nodes (never markup from data), and the Content-Security-Policy allows only its own
script and style, so a hostile string in the proof log stays text.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import logging
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from cicd.web import api, metrics
from cicd.config import Settings
from cicd.core.events import iso, utcnow
from cicd.errors import CicdError
from cicd.store.errors import StoreError

log = logging.getLogger(__name__)

STATIC = {  # path -> (file in cicd/web/static, content type); nothing else is served from disk
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
DEFAULT_EVENTS, DEFAULT_INCIDENTS = 50, 50
# A stream ends after this long and the browser reconnects (with Last-Event-ID), so a tab left
# open never holds a server thread for ever and a stopping server is not kept waiting.
STREAM_SECONDS, STREAM_POLL_S, KEEPALIVE_S = 30.0, 0.5, 10.0


class DashboardError(CicdError, RuntimeError):
    """The server cannot start (port taken, bad host, no environment); the message says what to do."""


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 8088,
                 stream_seconds: float = STREAM_SECONDS):
        self.settings = settings
        self.registry = metrics.registry([settings])
        self.stream_seconds = stream_seconds
        self.stopping = threading.Event()
        self.static = {path: (_static_file(name), kind) for path, (name, kind) in STATIC.items()}
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except socket.gaierror as exc:
            raise DashboardError(f"--host {host!r}: not an address this machine can listen on ({exc.strerror})") from None
        except OSError as exc:
            hint = " (another dashboard?); pick another with --port, or --port 0 for a free one" \
                if exc.errno == errno.EADDRINUSE else ""
            raise DashboardError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()


def _static_file(name: str) -> bytes:
    try:
        return (resources.files("cicd.web") / "static" / name).read_bytes()
    except OSError:
        raise DashboardError(f"the dashboard's {name} is missing from the installed package "
                             f"(cicd/web/static/): reinstall cicd-heal") from None


def is_loopback(host: str) -> bool:
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except (socket.gaierror, ValueError):
        return False


def check_environment(settings: Settings) -> None:
    """Refuse to serve an environment that was never started here, rather than an empty page
    (and an empty database made as a side effect)."""
    if not settings.database_url_override and not (settings.env_dir / "cicd.db").exists():
        raise DashboardError(f"no {settings.env} environment under {settings.home}: start it with "
                             f"`cicd up --env {settings.env}`, or set CICD_HOME to where it runs")


# -- query parameters --------------------------------------------------------------------------
def _one(query: dict, name: str) -> str | None:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise api.ApiError(name, "give it once")
    return values[0]


def int_param(query: dict, name: str, default: int | None, maximum: int | None) -> int | None:
    """A whole number in range; `maximum` None: any sequence number (0 or more)."""
    raw = _one(query, name)
    if raw is None:
        return default
    rule = f"must be a whole number from 1 to {maximum}" if maximum else "must be a proof sequence number (0 or more)"
    if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        raise api.ApiError(name, f"{rule}, not {raw!r}")
    value = int(raw)
    return api.check_count(value, name, maximum) if maximum else api.check_seq(value, name)


def check_params(query: dict, allowed: tuple[str, ...]) -> None:
    for name in query:
        if name not in allowed:
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise api.ApiError(name, f"unknown parameter (this takes {takes})")


# -- the handler -------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    def version_string(self) -> str:
        return "cicd-dashboard"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        if url.path == "/favicon.ico":
            return self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", cache="max-age=86400")
        if url.path in self.server.static:
            body, kind = self.server.static[url.path]
            return self._send(HTTPStatus.OK, body, kind, cache="no-cache")
        route = ROUTES.get(url.path)
        if route is None:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}; the dashboard is at /, "
                                                              f"its JSON under {', '.join(sorted(ROUTES))}"})
        handler, allowed = route
        try:
            check_params(query, allowed)
            handler(self, query)
        except api.ApiError as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc), "field": exc.field, "rule": exc.rule})
        except StoreError as exc:
            log.warning("dashboard: the store could not be read: %s", exc)
            self._json(HTTPStatus.SERVICE_UNAVAILABLE,
                       {"error": f"the {self.server.settings.env} store could not be read: {type(exc).__name__}"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader went away

    def do_HEAD(self) -> None:
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use GET"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD

    # -- routes --------------------------------------------------------------------------------
    def health(self, query: dict) -> None:
        self._json(HTTPStatus.OK, {"env": self.server.settings.env, "generated_at": iso(utcnow()),
                                   "apps": api.health(self.server.settings)})

    def events(self, query: dict) -> None:
        limit = int_param(query, "limit", DEFAULT_EVENTS, api.MAX_EVENTS)
        after = int_param(query, "after", None, None)
        settings = self.server.settings
        rows = api.events(limit, settings) if after is None else api.events_since(after, settings, limit)
        self._json(HTTPStatus.OK, {"env": settings.env, "events": rows})

    def incidents(self, query: dict) -> None:
        limit = int_param(query, "limit", DEFAULT_INCIDENTS, api.MAX_INCIDENTS)
        app = _one(query, "app")
        self._json(HTTPStatus.OK, {"env": self.server.settings.env,
                                   "incidents": api.incidents(limit, self.server.settings, app or None)})

    def policy(self, query: dict) -> None:
        self._json(HTTPStatus.OK, api.policy_table(self.server.settings))

    def metrics(self, query: dict) -> None:
        body, kind = metrics.render(self.server.registry)
        self._send(HTTPStatus.OK, body, kind)

    def stream(self, query: dict) -> None:
        """Server-Sent Events: each new proof record as `event: proof`, its seq as the event id."""
        settings = self.server.settings
        resume = self.headers.get("Last-Event-ID")
        if resume is not None:
            after = int_param({"Last-Event-ID": [resume]}, "Last-Event-ID", None, None)
        else:
            after = int_param(query, "after", None, None)
        if after is None:
            after = api.head_seq(settings)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self._security_headers()
        self.end_headers()
        self.wfile.write(b"retry: 1000\n\n")
        self.wfile.flush()
        ends, written = time.monotonic() + self.server.stream_seconds, time.monotonic()
        while time.monotonic() < ends and not self.server.stopping.is_set():
            chunk = []
            for record in api.events_since(after, settings, api.MAX_EVENTS):
                chunk.append(f"id: {record['seq']}\nevent: proof\ndata: {json.dumps(record, separators=(',', ':'))}\n\n")
                after = record["seq"]
            if not chunk and time.monotonic() - written > KEEPALIVE_S:
                chunk.append(": keepalive\n\n")  # so a proxy or a dead peer shows up, not a silent hang
            if chunk:
                self.wfile.write("".join(chunk).encode("utf-8"))
                self.wfile.flush()
                written = time.monotonic()
            self.server.stopping.wait(STREAM_POLL_S)

    # -- writing -------------------------------------------------------------------------------
    def _security_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)

    def _send(self, status: HTTPStatus, body: bytes, kind: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "GET")
        self._security_headers()
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: HTTPStatus, value) -> None:
        self._send(status, json.dumps(value, separators=(",", ":"), default=str).encode("utf-8"),
                   "application/json; charset=utf-8")

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-") -> None:
        # Only what went wrong: the page polls and streams, and a line per request buries that.
        if isinstance(code, int) and code >= 400:
            log.warning('%s "%s" %s', self.address_string(), self.requestline, code)


ROUTES = {
    "/api/health": (Handler.health, ()),
    "/api/events": (Handler.events, ("limit", "after")),
    "/api/incidents": (Handler.incidents, ("limit", "app")),
    "/api/policy": (Handler.policy, ()),
    "/api/stream": (Handler.stream, ("after",)),
    "/metrics": (Handler.metrics, ()),
}


def make_server(settings: Settings, host: str = "127.0.0.1", port: int = 8088, **kw) -> DashboardServer:
    """A bound server (not yet serving): call serve_forever(), and shutdown() from another thread."""
    check_environment(settings)
    return DashboardServer(settings, host, port, **kw)
