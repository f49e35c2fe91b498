"""Hostile input, generated (hypothesis): random and adversarial strings, look-alike letters, path
traversal, shell metacharacters, file:// and credentials in URLs, huge payloads, wrong types;
forged, replayed, stale and cross-environment signatures; blocklisted actions spelt otherwise.
Nothing crashes, nothing invalid is accepted, no unsafe action gets through, every refusal is
logged. How many inputs were tried is printed after the run."""
from __future__ import annotations

import string
from collections import Counter
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cicd.core import actions, gates, signing
from cicd.delivery import onboarding
from cicd.store import proof
from cicd.config import Settings
from cicd.core.events import Decision, MalformedEvent, Signal, iso, utcnow
from cicd.runtime.base import RuntimeFailure
from cicd.runtime.local import LocalRuntime
from tests.conftest import REPORTS

TRIED: Counter = Counter()
KEY, DEV_KEY = b"s" * 32, b"d" * 32
EXAMPLES = 400

LOOKALIKES = "аеорсухіјѕԁһӏοαεικνρτυ"  # Cyrillic and Greek letters that pass for Latin ones
SHELLISH = ";|&$`<>()\\'\"{}*?!~^[]\n\t "
nasty_text = st.text(alphabet=st.sampled_from(string.ascii_letters + string.digits + "-_./:@%" + SHELLISH
                                               + LOOKALIKES + "\u200b\u200d\u0301\uff0e\x00"), max_size=80)
any_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                        | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)


@pytest.fixture(scope="module", autouse=True)
def report_counts():
    yield
    REPORTS.append("hostile inputs tried: " + ", ".join(f"{k} {v}" for k, v in sorted(TRIED.items()))
                   + f" (total {sum(TRIED.values())})")


def valid_name(name) -> bool:
    return isinstance(name, str) and 2 <= len(name) <= 40 and onboarding.NAME_PATTERN.fullmatch(name) is not None


# -- onboarding ----------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None)
@given(name=st.one_of(nasty_text, st.from_regex(r"[a-z0-9][a-z0-9-]{0,45}", fullmatch=True), any_json),
       repo=st.one_of(nasty_text, st.builds(lambda s, h, p: f"{s}://{h}/{p}",
                                            st.sampled_from(["http", "https", "file", "ssh", "git", "ftp", "HTTPS"]),
                                            nasty_text, nasty_text), any_json),
       runtime=st.one_of(st.sampled_from(onboarding.RUNTIMES), nasty_text, any_json),
       env=st.one_of(st.sampled_from(["dev", "stage", "prod"]), nasty_text))
def test_onboarding_never_crashes_and_never_accepts_anything_invalid(name, repo, runtime, env):
    TRIED["onboarding"] += 1
    refusals = onboarding.validate(name, repo, runtime, env)
    assert all(r.field in ("name", "repo", "runtime", "env") and r.rule and r.message for r in refusals)
    if not refusals:
        assert valid_name(name) and runtime in onboarding.RUNTIMES and env in ("dev", "stage")
        assert repo.startswith(("http://", "https://")) and repo.isascii()
        assert not set(repo) & (set(SHELLISH) | {"@"}) and ".." not in repo.split("/")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=nasty_text, repo=st.one_of(nasty_text, st.text(min_size=5000, max_size=20000)))
def test_every_refused_onboarding_is_logged_and_bounded(tmp_path_factory, name, repo):
    TRIED["onboarding (registered)"] += 1
    home = tmp_path_factory.mktemp("onboard")
    settings_ = Settings(env="stage", home=home)
    result = onboarding.register(settings_, name, repo, "backend")
    records = proof.tail(settings_, 10)
    assert records[0]["event_name"] == "ONBOARDING_STARTED"
    assert records[-1]["event_name"] == ("DEPLOYMENT_TRIGGERED" if result["ok"] else "ONBOARDING_REFUSED")
    assert all(len(r["payload"].get("repo", "")) <= 200 for r in records)  # what is logged is bounded
    assert proof.verify(settings_).ok
    if not result["ok"]:
        assert not (home / "apps" / "registry" / "stage").exists() or not any((home / "apps" / "registry" / "stage").iterdir())


@settings(max_examples=EXAMPLES, deadline=None)
@given(name=st.one_of(nasty_text, st.sampled_from(["..", "../x", "a/../../b", "/etc", "~root", ".", "a\x00b"])))
def test_app_names_can_never_escape_the_runtime_directory(tmp_path_factory, name):
    TRIED["app names"] += 1
    runtime = LocalRuntime(Settings(env="stage", home=tmp_path_factory.getbasetemp()))
    try:
        path = runtime.app_dir(name)
    except RuntimeFailure:
        assert not valid_name(name)
        return
    assert valid_name(name) and path.parent == runtime.root and path.resolve().parent == runtime.root.resolve()


# -- event intake ----------------------------------------------------------------------------------
signal_fields = st.fixed_dictionaries({}, optional={
    "env": st.one_of(st.just("stage"), nasty_text, any_json),
    "app": st.one_of(st.just("shop-api"), nasty_text, any_json, st.text(min_size=1000, max_size=3000)),
    "kind": st.one_of(st.sampled_from(["replica_down", "replica_hot", "deploy_failed", "nope"]), any_json),
    "slots": st.one_of(st.lists(st.integers(-5, 100), max_size=70), any_json),
    "observed_at": st.one_of(st.just(iso(utcnow())), nasty_text, any_json),
    "utilization": st.one_of(st.floats(allow_nan=True, allow_infinity=True), any_json),
    "replicas_total": any_json, "release": any_json, "detail": st.one_of(nasty_text, any_json),
})


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(raw=st.one_of(signal_fields, any_json))
def test_signals_are_parsed_or_refused_naming_the_field(raw):
    TRIED["signals"] += 1
    try:
        signal = Signal.from_dict(raw)
    except MalformedEvent as exc:
        assert exc.field and exc.rule
        return
    assert signal.kind in ("replica_down", "replica_hot", "deploy_failed")
    assert all(isinstance(s, int) and 0 <= s < 64 for s in signal.slots) and len(signal.app) <= 40


# -- the gates ----------------------------------------------------------------------------------
def signed(env="stage", key=KEY, action="restart_service", params=None, issued_at=None, **changes):
    d = Decision(env=env, incident_id="inc-hostile", attempt=1, app="shop-api", action=action,
                 params={"slots": [0]} if params is None else params,
                 issued_at=iso(issued_at or utcnow()), nonce="n", mode="greedy")
    try:
        signature = signing.sign(d.signed_body(), key)
    except ValueError:
        signature = ""  # params no JSON can carry (inf): nobody could have signed it
    raw = {**d.to_dict(), "signature": signature}
    raw.update(changes)
    return raw


CTX = dict(env="stage", key=KEY, current_replicas=2, max_replicas=6)


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(raw=st.one_of(any_json, st.dictionaries(st.sampled_from(list(Decision.SIGNED_FIELDS) + ["signature"]),
                                                any_json, max_size=12)))
def test_garbage_decisions_are_refused_at_intake(raw):
    TRIED["decisions (garbage)"] += 1
    verdict, _ = gates.evaluate(raw, gates.GateContext(now=utcnow(), **CTX))
    assert not verdict.allowed and verdict.gate == "intake" and verdict.event == "INTAKE_REFUSED"


@settings(max_examples=EXAMPLES, deadline=None)
@given(field=st.sampled_from(["action", "params", "app", "attempt", "incident_id", "issued_at", "nonce", "mode", "env"]),
       value=any_json)
def test_a_signed_decision_changed_in_any_field_is_refused(field, value):
    TRIED["decisions (tampered)"] += 1
    raw = signed()
    if raw[field] == value:
        return
    raw[field] = value
    verdict, _ = gates.evaluate(raw, gates.GateContext(now=utcnow(), **CTX))
    assert not verdict.allowed and verdict.gate == "intake"


@settings(max_examples=EXAMPLES, deadline=None)
@given(age_s=st.floats(min_value=-10_000, max_value=100_000), key=st.sampled_from([KEY, DEV_KEY, b"", b"x" * 64]),
       env=st.sampled_from(["stage", "dev", "prod"]))
def test_stale_future_and_cross_environment_signatures(age_s, key, env):
    TRIED["decisions (signatures)"] += 1
    now = utcnow()
    raw = signed(env=env, key=key, issued_at=now - timedelta(seconds=age_s))
    verdict, _ = gates.evaluate(raw, gates.GateContext(now=now, max_age_s=900, **CTX))
    fresh = -5 <= age_s <= 900
    assert verdict.allowed == (key == KEY and env == "stage" and fresh)


def spellings(name: str):
    letters = st.lists(st.sampled_from(["lower", "upper", "lookalike", "fullwidth", "accent", "zwj"]),
                       min_size=len(name), max_size=len(name))
    separator = st.sampled_from(["_", "-", " ", ".", "__", "\u200b", "/", "＿"])
    wrap = st.tuples(st.sampled_from(["", "please_", "x-", " "]), st.sampled_from(["", "_now", "!", " "]))

    def spell(ops, sep, around):
        out = []
        for ch, op in zip(name, ops):
            if ch == "_":
                out.append(sep)
            elif op == "upper":
                out.append(ch.upper())
            elif op == "lookalike" and ch in "aeopcyxi":
                out.append("аеорсухі"["aeopcyxi".index(ch)])
            elif op == "fullwidth":
                out.append(chr(ord(ch) + 0xFEE0))
            elif op == "accent":
                out.append(ch + "\u0301")
            elif op == "zwj":
                out.append(ch + "\u200d")
            else:
                out.append(ch)
        return around[0] + "".join(out) + around[1]
    return st.builds(spell, letters, separator, wrap)


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(data=st.data())
def test_blocklisted_actions_under_any_spelling_never_pass(data):
    TRIED["blocklisted spellings"] += 1
    name = data.draw(st.sampled_from(sorted(actions.BLOCKLIST)))
    spelt = data.draw(spellings(name))
    assert actions.is_blocklisted(spelt), spelt
    verdict, _ = gates.evaluate(signed(action=spelt, params={}), gates.GateContext(now=utcnow(), **CTX))
    assert not verdict.allowed and verdict.event == "UNSAFE_ACTION_REFUSED"


@settings(max_examples=EXAMPLES, deadline=None)
@given(action=nasty_text, params=any_json)
def test_only_catalogued_actions_with_good_params_are_ever_allowed(action, params):
    TRIED["actions"] += 1
    verdict, _ = gates.evaluate(signed(action=action, params=params if isinstance(params, dict) else {}),
                                gates.GateContext(now=utcnow(), **CTX))
    if verdict.allowed:
        assert action in actions.CATALOGUE and not actions.is_blocklisted(action)
