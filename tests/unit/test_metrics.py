"""The metrics collector on a store filled as the healing chain fills it: every series with the
value the store implies, counted once as the log grows, recounted when the store is replaced,
and a broker that is down reported as down, not as a failed scrape."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cicd.web import metrics
from cicd import store
from cicd.store import proof
from cicd.config import Settings
from cicd.runtime import process
from cicd.store import session_scope

from .filled_store import fill, stable


def scrape(reg) -> dict:
    """{(sample name, frozenset of labels): value} from the exposition text."""
    text, content_type = metrics.render(reg)
    assert content_type.startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def series(samples: dict, name: str) -> dict:
    """One metric's samples, keyed by their labels other than env (all of them env=stage here)."""
    out = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            labels = dict(labels)
            assert labels.pop("env") == "stage"
            out[tuple(sorted(labels.items()))] = value
    return out


def settings_at(home, broker_port=None) -> Settings:
    # A broker on a port where nothing listens: the collector must say so and carry on.
    port = broker_port or process.free_port()
    return Settings(env="stage", home=home, broker_url_override=f"redis://127.0.0.1:{port}/0")


def test_every_series_has_the_value_the_store_implies(tmp_path):
    settings = settings_at(tmp_path)
    fill(settings)
    samples = scrape(metrics.registry([settings]))

    assert series(samples, "cicd_incidents_total") == {
        (("kind", "crash"), ("outcome", "stable")): 2, (("kind", "overload"), ("outcome", "refused")): 1}
    assert series(samples, "cicd_incidents_open") == {
        (("kind", k),): (1 if k == "false_alarm" else 0)
        for k in ("crash", "overload", "false_alarm", "underload", "slow_deploy", "failed_deploy")}
    assert series(samples, "cicd_policy_decisions_total") == {
        (("action", "restart_service"), ("choice", "greedy")): 2, (("action", "scale_workers"), ("choice", "greedy")): 1,
        (("action", "retry_deployment"), ("choice", "greedy")): 1, (("action", "noop"), ("choice", "explored")): 1}
    assert series(samples, "cicd_actions_executed_total") == {
        (("action", "restart_service"), ("status", "done")): 1, (("action", "restart_service"), ("status", "failed")): 1,
        (("action", "scale_workers"), ("status", "done")): 1}
    # The forged decision's markup is not a label value: the label set stays bounded.
    assert series(samples, "cicd_actions_refused_total") == {
        (("action", "retry_deployment"), ("gate", "allowlist"), ("reason", "DEMO_MODE_BLOCK")): 1,
        (("action", "uncatalogued"), ("gate", "intake"), ("reason", "INTAKE_REFUSED")): 1}

    # Two crashes recovered in 1.5 s and 7.2 s.
    buckets = {dict(k)["le"]: v for k, v in series(samples, "cicd_time_to_recover_seconds_bucket").items()}
    assert buckets == {"0.5": 0, "1.0": 0, "2.0": 1, "5.0": 1, "10.0": 2, "20.0": 2, "30.0": 2, "60.0": 2,
                       "120.0": 2, "300.0": 2, "+Inf": 2}
    assert series(samples, "cicd_time_to_recover_seconds_count") == {(("kind", "crash"),): 2}
    assert series(samples, "cicd_time_to_recover_seconds_sum") == {(("kind", "crash"),): 8.7}

    assert series(samples, "cicd_app_uptime_ratio") == {
        (("app", "api"),): 0.5, (("app", "called"),): 1.0, (("app", "down"),): 0.25, (("app", "old"),): 1.0,
        (("app", "web"),): 0.9}
    assert series(samples, "cicd_app_probes_total")[(("app", "web"),)] == 10
    assert series(samples, "cicd_app_up_probes_total")[(("app", "down"),)] == 2
    assert series(samples, "cicd_app_healthy_replicas")[(("app", "api"),)] == 1
    assert series(samples, "cicd_app_replicas")[(("app", "api"),)] == 2
    assert series(samples, "cicd_proof_records_total") == {(): 33}
    assert series(samples, "cicd_store_up") == {(): 1}


def test_a_broker_that_is_down_is_a_metric_not_a_failed_scrape(tmp_path):
    settings = settings_at(tmp_path)
    fill(settings)
    samples = scrape(metrics.registry([settings]))
    assert series(samples, "cicd_broker_up") == {(): 0}
    assert series(samples, "cicd_queue_depth") == {}
    assert series(samples, "cicd_incidents_total")  # and the store's series are all still there


def test_no_broker_configured_at_all_is_down_too(tmp_path):
    settings = Settings(env="stage", home=tmp_path)  # no CICD_BROKER_URL and no stack started here
    fill(settings)
    assert series(scrape(metrics.registry([settings])), "cicd_broker_up") == {(): 0}


def test_the_log_is_tallied_once_as_it_grows(tmp_path):
    settings = settings_at(tmp_path)
    fill(settings)
    reg = metrics.registry([settings])
    scrape(reg)
    with session_scope(settings) as session:  # one more recovery, slower than the last bucket
        stable(session, "stage", "inc-e", "web", "overload", "scale_workers", 1, 400.0)
    for _ in range(2):  # and a scrape with nothing new counts nothing again
        samples = scrape(reg)
        assert series(samples, "cicd_time_to_recover_seconds_count") == {(("kind", "crash"),): 2,
                                                                          (("kind", "overload"),): 1}
        overload = {dict(k)["le"]: v for k, v in series(samples, "cicd_time_to_recover_seconds_bucket").items()
                    if dict(k)["kind"] == "overload"}
        assert (overload["300.0"], overload["+Inf"]) == (0, 1)
        assert series(samples, "cicd_proof_records_total") == {(): 35}
        assert series(samples, "cicd_actions_executed_total")[(("action", "restart_service"), ("status", "done"))] == 1


def test_a_replaced_store_is_counted_again_from_the_start(tmp_path):
    settings = settings_at(tmp_path)
    fill(settings)
    reg = metrics.registry([settings])
    assert series(scrape(reg), "cicd_time_to_recover_seconds_count") == {(("kind", "crash"),): 2}
    # A restore: the same database path, a chain as long but different (one recovery only).
    store.dispose_engines()
    for path in settings.env_dir.glob("cicd.db*"):
        path.unlink()
    with session_scope(settings) as session:
        for i in range(17):
            stable(session, "stage", f"inc-{i}", "web", "crash", "noop", 1, 0.2) if i == 0 else \
                proof.append(session, "stage", "DLQ_RETRIED", payload={"dead_letter": i})
        for i in range(16):
            proof.append(session, "stage", "DLQ_RETRIED", payload={"dead_letter": 100 + i})
    assert proof.head_seq(settings) == 34  # longer than what was tallied: only the hash tells
    samples = scrape(reg)
    assert series(samples, "cicd_time_to_recover_seconds_count") == {(("kind", "crash"),): 1}
    assert series(samples, "cicd_time_to_recover_seconds_sum") == {(("kind", "crash"),): 0.2}
    assert series(samples, "cicd_actions_executed_total") == {}


def test_an_unreadable_store_is_reported_and_the_scrape_goes_on(tmp_path):
    settings = settings_at(tmp_path)
    settings.env_dir.mkdir(parents=True)
    (settings.env_dir / "cicd.db").write_text("this is not a database")
    samples = scrape(metrics.registry([settings]))
    assert series(samples, "cicd_store_up") == {(): 0}
    assert series(samples, "cicd_broker_up") == {(): 0}
