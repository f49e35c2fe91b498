"""cicd.onboarding: strict input validation, spec generation, and registration with proof events."""
from __future__ import annotations

import copy
import json

import pytest

from cicd.delivery import onboarding
from cicd.store import proof
from cicd.config import Settings
from cicd.delivery.onboarding import RUNTIMES, TEMPLATES, generate_spec, register, validate

NAME = "shop-api"
REPO = "https://git.example.com/team/app.git"
RUNTIME = "backend"
ENV = "stage"

PROOF_SECRET = "secretpw"


def rules(refusals) -> set[tuple[str, str]]:
    return {(r.field, r.rule) for r in refusals}


# --- valid input -----------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", RUNTIMES)
def test_every_runtime_is_accepted(runtime):
    assert validate(NAME, REPO, runtime, ENV) == []


def test_the_three_runtimes_are_backend_frontend_fullstack():
    assert set(RUNTIMES) == {"backend", "frontend", "fullstack"}


@pytest.mark.parametrize("name", [
    pytest.param("ab", id="2-chars-min"),
    pytest.param("a" * 40, id="40-chars-max"),
    pytest.param("a1", id="letter-digit"),
    pytest.param("9lives", id="leading-digit"),
    pytest.param("my-app-2", id="single-hyphens"),
])
def test_valid_names_are_accepted(name):
    assert validate(name, REPO, RUNTIME, ENV) == []


@pytest.mark.parametrize("repo", [
    pytest.param("http://git.example.com/team/app", id="http"),
    pytest.param("https://git.example.com/team/app", id="https"),
    pytest.param("https://git.example.com:8443/team/app", id="https-with-port"),
    pytest.param("http://127.0.0.1:3000/app.git", id="ip-with-port-and-git-suffix"),
    pytest.param("https://github.com/team/app.git", id="git-suffix"),
    pytest.param("https://xn--bcher-kva.example/app.git", id="punycode-host"),
])
def test_valid_repos_are_accepted(repo):
    assert validate(NAME, repo, RUNTIME, ENV) == []


@pytest.mark.parametrize("env", ["dev", "stage"])
def test_dev_and_stage_are_onboardable(env):
    assert validate(NAME, REPO, RUNTIME, env) == []


# --- name ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, rule", [
    pytest.param("a", "length", id="1-char"),
    pytest.param("a" * 41, "length", id="41-chars"),
    # Empty is refused too; the implementation names the length rule (0 < 2), not the pattern.
    pytest.param("", "length", id="empty"),
    pytest.param("MyApp", "pattern", id="uppercase"),
    pytest.param("my_app", "pattern", id="underscore"),
    pytest.param("my--app", "pattern", id="double-hyphen"),
    pytest.param("-myapp", "pattern", id="leading-hyphen"),
    pytest.param("myapp-", "pattern", id="trailing-hyphen"),
    pytest.param("my\u0430pp", "pattern", id="cyrillic-a-lookalike"),
    pytest.param("\u0455hop", "pattern", id="cyrillic-dze-lookalike"),
    pytest.param("caf\u00e9", "pattern", id="accented-letter"),
    pytest.param("\uff41\uff42", "pattern", id="fullwidth-letters"),
    pytest.param("\u0661\u0662", "pattern", id="arabic-indic-digits"),
    pytest.param("../etc", "pattern", id="path-traversal"),
    pytest.param("a/b", "pattern", id="slash"),
    pytest.param("my app", "pattern", id="space"),
    pytest.param("myapp\n", "pattern", id="trailing-newline"),
    pytest.param("my.app", "pattern", id="dot"),
    pytest.param(5, "type", id="int"),
    pytest.param(None, "type", id="none"),
    pytest.param(b"myapp", "type", id="bytes"),
    pytest.param(["myapp"], "type", id="list"),
])
def test_bad_names_are_refused(name, rule):
    assert rules(validate(name, REPO, RUNTIME, ENV)) == {("name", rule)}


# --- repo ------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo, expected", [
    # scheme
    pytest.param("file:///etc/passwd", {"scheme", "host"}, id="file-scheme"),
    pytest.param("ssh://host/x", {"scheme"}, id="ssh-scheme"),
    pytest.param("git@github.com:x/y.git", {"scheme", "credentials"}, id="scp-like-git"),
    pytest.param("ftp://x", {"scheme"}, id="ftp-scheme"),
    pytest.param("https://git.example.com/a/%2e%2e/b", {"path"}, id="percent-encoded-dotdot"),
    pytest.param("https://git.example.com/team/app@v1.git", {"credentials"}, id="at-sign-in-path"),
    pytest.param("/srv/git/app", {"scheme", "host"}, id="bare-path"),
    # credentials
    pytest.param("https://user:pw@host/x", {"credentials"}, id="user-password"),
    pytest.param("https://token@host/x", {"credentials"}, id="token-only"),
    pytest.param("https://:pw@host/x", {"credentials"}, id="password-only"),
    # whitespace and control characters
    pytest.param("https://host/a b", {"whitespace"}, id="space"),
    pytest.param("https://host/a\tb", {"whitespace"}, id="tab"),
    pytest.param("https://host/a\nb", {"whitespace"}, id="newline"),
    pytest.param("https://host/x\n", {"whitespace"}, id="trailing-newline"),
    pytest.param("https://host/a\x00b", {"whitespace"}, id="nul"),
    # shell metacharacters
    pytest.param("https://host/x;id", {"shell-metacharacters"}, id="semicolon"),
    pytest.param("https://host/$(id)", {"shell-metacharacters"}, id="dollar-paren"),
    pytest.param("https://host/`id`", {"shell-metacharacters"}, id="backticks"),
    pytest.param("https://host/x|y", {"shell-metacharacters"}, id="pipe"),
    pytest.param("https://host/x&y", {"shell-metacharacters"}, id="ampersand"),
    pytest.param("https://host/x>y", {"shell-metacharacters"}, id="redirect"),
    pytest.param("https://host/x'y", {"shell-metacharacters"}, id="quote"),
    # ascii
    pytest.param("https://g\u00edthub.com/x", {"ascii", "host"}, id="non-ascii-host"),
    pytest.param("https://host/caf\u00e9", {"ascii"}, id="non-ascii-path"),
    # host
    pytest.param("https:///x", {"host"}, id="empty-host"),
    pytest.param("https://host..evil/x", {"host"}, id="double-dot-host"),
    pytest.param("https://host_1/x", {"host"}, id="underscore-host"),
    # port
    pytest.param("https://host:0/x", {"port"}, id="port-zero"),
    pytest.param("https://host:99999/x", {"url"}, id="port-out-of-range"),
    # path
    pytest.param("https://host/a/../b", {"path"}, id="dotdot-segment"),
    pytest.param("https://host/..", {"path"}, id="trailing-dotdot"),
    # length
    pytest.param("https://host/" + "a" * 500, {"length"}, id="over-500-chars"),
    # type
    pytest.param(None, {"type"}, id="none"),
    pytest.param(5, {"type"}, id="int"),
    pytest.param(b"https://host/x", {"type"}, id="bytes"),
])
def test_bad_repos_are_refused(repo, expected):
    assert rules(validate(NAME, repo, RUNTIME, ENV)) == {("repo", rule) for rule in expected}


def test_repo_of_exactly_500_chars_is_not_too_long():
    repo = "https://host/" + "a" * (500 - len("https://host/"))
    assert len(repo) == 500
    assert validate(NAME, repo, RUNTIME, ENV) == []


def test_dotdot_inside_a_segment_is_not_a_traversal():
    assert validate(NAME, "https://host/team/app..v2.git", RUNTIME, ENV) == []


def test_repo_refusal_messages_do_not_echo_the_password():
    (refusal,) = validate(NAME, f"https://user:{PROOF_SECRET}@host/x", RUNTIME, ENV)
    assert (refusal.field, refusal.rule) == ("repo", "credentials")
    assert PROOF_SECRET not in refusal.message


# --- runtime and env -------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", [
    pytest.param("python", id="python"),
    pytest.param("", id="empty"),
    pytest.param(None, id="none"),
    pytest.param("Backend", id="wrong-case"),
    pytest.param("backend ", id="trailing-space"),
    pytest.param(["backend"], id="list"),
])
def test_unknown_runtime_is_refused(runtime):
    assert rules(validate(NAME, REPO, runtime, ENV)) == {("runtime", "enum")}


@pytest.mark.parametrize("env, rule", [
    pytest.param("prod", "no-direct-prod", id="prod"),
    pytest.param("qa", "enum", id="unknown"),
    pytest.param("Stage", "enum", id="wrong-case"),
    pytest.param("", "enum", id="empty"),
    pytest.param(None, "enum", id="none"),
])
def test_bad_env_is_refused(env, rule):
    assert rules(validate(NAME, REPO, RUNTIME, env)) == {("env", rule)}


# --- several problems at once ----------------------------------------------------------------

def test_all_problems_are_reported_at_once():
    refusals = validate("Bad_Name", "ssh://host/x", "python", ENV)
    assert rules(refusals) == {("name", "pattern"), ("repo", "scheme"), ("runtime", "enum")}


def test_all_four_fields_can_be_refused_together():
    refusals = validate(None, "https://u:p@host/a;b", "", "prod")
    assert rules(refusals) == {("name", "type"), ("repo", "credentials"), ("repo", "shell-metacharacters"),
                               ("runtime", "enum"), ("env", "no-direct-prod")}


def test_every_refusal_has_a_message_and_serialises():
    refusals = validate("x", "ftp://x", "python", "qa")
    assert len(refusals) == 4
    for refusal in refusals:
        assert refusal.message
        assert refusal.to_dict() == {"field": refusal.field, "rule": refusal.rule, "message": refusal.message}


def test_onboarding_refused_names_every_field():
    refusals = validate("x", "ftp://x", "python", ENV)
    exc = onboarding.OnboardingRefused(refusals)
    assert exc.refusals == refusals
    for field in ("name", "repo", "runtime"):
        assert f"{field}:" in str(exc)


# --- generate_spec ---------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", RUNTIMES)
def test_spec_is_the_template_plus_identity_only(runtime):
    spec = generate_spec(NAME, REPO, runtime, ENV)
    assert spec == {**TEMPLATES[runtime], "name": NAME, "env": ENV, "runtime": runtime, "repo": REPO}
    assert set(spec) - set(TEMPLATES[runtime]) == {"name", "env", "runtime", "repo"}


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_mutating_a_spec_leaves_the_templates_alone(runtime):
    before = copy.deepcopy(TEMPLATES)
    spec = generate_spec(NAME, REPO, runtime, ENV)
    spec["build"].append("--evil")
    spec["start"][0] = "/bin/sh"
    spec["port"] = 1
    spec.pop("health_path")
    assert TEMPLATES == before
    assert generate_spec(NAME, REPO, runtime, ENV)["start"][0] == "{python}"


def test_specs_are_plain_json():
    for runtime in RUNTIMES:
        spec = generate_spec(NAME, REPO, runtime, ENV)
        assert json.loads(json.dumps(spec)) == spec


# --- register --------------------------------------------------------------------------------

@pytest.fixture
def settings(tmp_path):
    return Settings(env="stage", home=tmp_path)


def event_names(settings) -> list[str]:
    return [r["event_name"] for r in proof.tail(settings, 50)]


def test_register_accepted_app_logs_events_in_order(settings, tmp_path):
    result = register(settings, NAME, REPO, RUNTIME)

    assert result == {"ok": True, "spec": generate_spec(NAME, REPO, RUNTIME, "stage")}
    assert event_names(settings) == ["ONBOARDING_STARTED", "ONBOARDING_VALIDATION_PASSED",
                                     "SPEC_GENERATED", "DEPLOYMENT_TRIGGERED"]
    records = proof.tail(settings, 50)
    assert all(r["app"] == NAME and r["env"] == "stage" for r in records)
    assert records[2]["payload"] == {"template": RUNTIME, "spec": result["spec"]}
    assert proof.verify(settings).ok


def test_register_exports_the_spec(settings, tmp_path):
    result = register(settings, NAME, REPO, "frontend")

    exported = tmp_path / "apps" / "registry" / "stage" / f"{NAME}.json"
    assert json.loads(exported.read_text()) == result["spec"]
    assert result["spec"]["runtime"] == "frontend"
    assert not list(exported.parent.glob("*.tmp"))


def test_register_same_name_twice_is_refused_as_not_unique(settings, tmp_path):
    first = register(settings, NAME, REPO, RUNTIME)
    assert first["ok"]

    second = register(settings, NAME, "https://other.example.com/app.git", "fullstack")

    assert second["ok"] is False
    assert [(r["field"], r["rule"]) for r in second["refusals"]] == [("name", "unique")]
    assert event_names(settings)[-2:] == ["ONBOARDING_STARTED", "ONBOARDING_REFUSED"]
    assert proof.tail(settings, 1)[0]["payload"] == {"refusals": second["refusals"]}
    # the first registration stands, untouched
    exported = tmp_path / "apps" / "registry" / "stage" / f"{NAME}.json"
    assert json.loads(exported.read_text()) == first["spec"]
    assert proof.verify(settings).ok


def test_same_name_in_another_environment_is_not_a_duplicate(tmp_path):
    stage = Settings(env="stage", home=tmp_path)
    dev = Settings(env="dev", home=tmp_path)
    assert register(stage, NAME, REPO, RUNTIME)["ok"]
    assert register(dev, NAME, REPO, RUNTIME)["ok"]
    assert (tmp_path / "apps" / "registry" / "dev" / f"{NAME}.json").exists()


def test_register_refused_input_logs_refusal_and_writes_nothing(settings, tmp_path):
    result = register(settings, "Bad_Name", "ssh://host/x", "python")

    assert result["ok"] is False
    assert {(r["field"], r["rule"]) for r in result["refusals"]} == {
        ("name", "pattern"), ("repo", "scheme"), ("runtime", "enum")}
    assert event_names(settings) == ["ONBOARDING_STARTED", "ONBOARDING_REFUSED"]
    assert proof.tail(settings, 1)[0]["payload"] == {"refusals": result["refusals"]}
    registry = tmp_path / "apps" / "registry" / "stage"
    assert not registry.exists() or not any(registry.iterdir())
    assert proof.verify(settings).ok


def test_refused_app_can_be_onboarded_once_fixed(settings):
    assert not register(settings, NAME, "ftp://host/x", RUNTIME)["ok"]
    assert register(settings, NAME, REPO, RUNTIME)["ok"]
    assert event_names(settings) == ["ONBOARDING_STARTED", "ONBOARDING_REFUSED",
                                     "ONBOARDING_STARTED", "ONBOARDING_VALIDATION_PASSED",
                                     "SPEC_GENERATED", "DEPLOYMENT_TRIGGERED"]


def test_register_into_prod_is_refused(tmp_path):
    settings = Settings(env="prod", home=tmp_path)
    result = register(settings, NAME, REPO, RUNTIME)
    assert [(r["field"], r["rule"]) for r in result["refusals"]] == [("env", "no-direct-prod")]
    assert event_names(settings) == ["ONBOARDING_STARTED", "ONBOARDING_REFUSED"]
    assert not (tmp_path / "apps" / "registry" / "prod").exists()


def test_register_logs_non_string_input_without_failing(settings):
    result = register(settings, 5, None, ["backend"])
    assert {(r["field"], r["rule"]) for r in result["refusals"]} == {
        ("name", "type"), ("repo", "type"), ("runtime", "enum")}
    started = proof.tail(settings, 2)[0]
    assert started["payload"] == {"name": "5", "repo": "None", "runtime": "['backend']"}


@pytest.mark.parametrize("repo", [
    pytest.param(f"https://user:{PROOF_SECRET}@host/x", id="user-password"),
    pytest.param(f"https://{PROOF_SECRET}@host/x", id="token-only"),
    pytest.param(f"https://user:{PROOF_SECRET}@host/x;id", id="password-plus-metachar"),
    pytest.param(f"https://user:{PROOF_SECRET}@host/x y", id="password-plus-space"),
    pytest.param(f"https://user:hunter@{PROOF_SECRET}@host/x", id="at-sign-in-password"),
    pytest.param(f"https://user:{PROOF_SECRET}" + "x" * 190 + "@host/x", id="long-password-truncated"),
    pytest.param(f"https://user:pass/{PROOF_SECRET}@host/x", id="slash-in-password"),
])
def test_refused_credentials_never_reach_the_proof_log(settings, tmp_path, repo):
    result = register(settings, NAME, repo, RUNTIME)
    assert result["ok"] is False

    records = proof.tail(settings, 50)
    assert [r["event_name"] for r in records] == ["ONBOARDING_STARTED", "ONBOARDING_REFUSED"]
    assert records[0]["payload"]["repo"]  # the request is logged, only without the secret
    for record in records:
        assert PROOF_SECRET not in json.dumps(record, ensure_ascii=False)

    mirror = tmp_path / "logs" / "stage" / "proof.jsonl"
    text = mirror.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 2
    assert PROOF_SECRET not in text
    assert proof.verify(settings).ok
    assert proof.verify_file(mirror).ok


def test_redacted_url_keeps_the_host():
    assert onboarding.redact_credentials(f"https://user:{PROOF_SECRET}@host/x") == "https://***@host/x"
    assert onboarding.redact_credentials("https://host/x") == "https://host/x"
