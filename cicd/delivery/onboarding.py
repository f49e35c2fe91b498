"""Onboarding: strictly validated input -> an AppSpec generated from a per-runtime template.

Nothing in the spec is guessed or taken from the user beyond name, repo and runtime: the
template says how to build, start and probe the app. Every refusal names the field and the rule,
and all of them are reported at once so the operator fixes everything in one go.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from cicd.config import ENVIRONMENTS, HOST_NAME
from cicd.core.names import NAME_MAX, NAME_MIN, NAME_PATTERN
from cicd.errors import CicdError

REPO_MAX = 500
# Characters a shell would interpret, plus quotes and escapes: none has a place in a repo URL.
SHELL_METACHARACTERS = set(";|&$`<>()\\'\"{}*?!~^[]")

# Resident memory a replica may use (it and what it starts). The probes restart a replica that
# comes close (see cicd.signals.probes), before the kernel's OOM killer takes it at a worse time.
DEFAULT_MEMORY_LIMIT_MB = 512
MEMORY_LIMIT_RANGE_MB = (32, 65536)

# Per-runtime templates. "{python}" is the interpreter running the runtime and "{port}" the port
# given to a replica; each is substituted as a whole argument, never through a shell.
TEMPLATES: dict[str, dict] = {
    "backend": {
        "port": 8000,
        "build": ["{python}", "-m", "compileall", "-q", "."],
        "start": ["{python}", "server.py", "--port", "{port}", "--role", "backend"],
        "health_path": "/health",
        "replicas": 2, "min_replicas": 1, "max_replicas": 6,
        "health_deadline_s": 30,
        "memory_limit_mb": DEFAULT_MEMORY_LIMIT_MB,
    },
    "frontend": {
        "port": 3000,
        "build": ["{python}", "-m", "compileall", "-q", "."],
        "start": ["{python}", "server.py", "--port", "{port}", "--role", "frontend"],
        "health_path": "/health",
        "replicas": 2, "min_replicas": 1, "max_replicas": 4,
        "health_deadline_s": 30,
        "memory_limit_mb": DEFAULT_MEMORY_LIMIT_MB,
    },
    "fullstack": {
        "port": 8080,
        "build": ["{python}", "-m", "compileall", "-q", "."],
        "start": ["{python}", "server.py", "--port", "{port}", "--role", "fullstack"],
        "health_path": "/health",
        "replicas": 2, "min_replicas": 1, "max_replicas": 6,
        "health_deadline_s": 45,
        "memory_limit_mb": DEFAULT_MEMORY_LIMIT_MB,
    },
}
RUNTIMES = tuple(TEMPLATES)


@dataclass(frozen=True)
class Refusal:
    field: str
    rule: str
    message: str

    def to_dict(self) -> dict:
        return {"field": self.field, "rule": self.rule, "message": self.message}


class OnboardingRefused(CicdError, ValueError):
    def __init__(self, refusals: list[Refusal]):
        super().__init__("; ".join(f"{r.field}: {r.message}" for r in refusals))
        self.refusals = refusals


def check_name(name) -> list[Refusal]:
    if not isinstance(name, str):
        return [Refusal("name", "type", "must be a string")]
    if not NAME_MIN <= len(name) <= NAME_MAX:
        return [Refusal("name", "length", f"must be {NAME_MIN}-{NAME_MAX} characters, got {len(name)}")]
    if not NAME_PATTERN.fullmatch(name):
        return [Refusal("name", "pattern", "must be lowercase letters a-z, digits and single hyphens, "
                        "starting and ending with a letter or digit")]
    return []


def check_repo(repo) -> list[Refusal]:
    if not isinstance(repo, str):
        return [Refusal("repo", "type", "must be a string")]
    if len(repo) > REPO_MAX:
        return [Refusal("repo", "length", f"must be at most {REPO_MAX} characters")]
    refusals = []
    if any(ch.isspace() for ch in repo) or any(unicodedata.category(ch).startswith("C") for ch in repo):
        refusals.append(Refusal("repo", "whitespace", "must not contain whitespace or control characters"))
    if not repo.isascii():
        refusals.append(Refusal("repo", "ascii", "must be plain ASCII (write international host names in punycode)"))
    bad = sorted(set(repo) & SHELL_METACHARACTERS)
    if bad:
        refusals.append(Refusal("repo", "shell-metacharacters",
                                f"must not contain shell metacharacters (found {' '.join(bad)})"))
    try:
        parts = urlsplit(repo)
        port = parts.port
    except ValueError as exc:
        return refusals + [Refusal("repo", "url", f"is not a valid URL ({exc})")]
    if parts.scheme not in ("http", "https"):
        refusals.append(Refusal("repo", "scheme", "must be an http:// or https:// URL, not "
                                + (f"{parts.scheme}://" if parts.scheme else "a bare path")))
    if "@" in repo:
        # Anywhere, not only in the host part: "user:pa/ss@host" parses as a path with an "@".
        refusals.append(Refusal("repo", "credentials", "must not carry credentials (user:password@); "
                                "give access through the deploy agent's configuration instead"))
    elif not parts.hostname or not re.fullmatch(r"[A-Za-z0-9.-]+", parts.hostname) or ".." in parts.hostname:
        refusals.append(Refusal("repo", "host", "must name a host, like https://git.example.com/team/app.git"))
    if port == 0:
        refusals.append(Refusal("repo", "port", "must not use port 0"))
    if ".." in unquote(parts.path).split("/"):
        refusals.append(Refusal("repo", "path", "must not contain '..' path segments"))
    return refusals


def check_runtime(runtime) -> list[Refusal]:
    if runtime not in RUNTIMES:
        return [Refusal("runtime", "enum", f"must be one of {', '.join(RUNTIMES)}")]
    return []


def check_env(env) -> list[Refusal]:
    if env not in ENVIRONMENTS:
        return [Refusal("env", "enum", f"must be one of {', '.join(ENVIRONMENTS)}")]
    if env == "prod":
        return [Refusal("env", "no-direct-prod", "onboarding straight into prod is refused: onboard into "
                        "stage, then promote to prod with approval")]
    return []


def check_memory_limit(value) -> list[Refusal]:
    low, high = MEMORY_LIMIT_RANGE_MB
    if not isinstance(value, int) or isinstance(value, bool):
        return [Refusal("memory_limit_mb", "type", f"must be a whole number of megabytes, not {type(value).__name__}")]
    if not low <= value <= high:
        return [Refusal("memory_limit_mb", "range", f"must be {low}-{high} (MB), got {value}")]
    return []


def memory_limit_mb(spec: dict) -> int:
    """The spec's memory limit per replica; a spec written before there was one gets the default.
    A bad value is refused naming the field (OnboardingRefused), never silently replaced."""
    value = spec.get("memory_limit_mb", DEFAULT_MEMORY_LIMIT_MB)
    refusals = check_memory_limit(value)
    if refusals:
        raise OnboardingRefused(refusals)
    return value


def check_host(host) -> list[Refusal]:
    """Where the app is placed: "" (the control plane's machine) or a host agent's name."""
    if host in ("", None):
        return []
    if not isinstance(host, str) or not HOST_NAME.fullmatch(host):
        return [Refusal("host", "format", "must be a host agent's name: 1-32 lowercase letters, digits and "
                                          "hyphens, starting and ending with a letter or digit")]
    return []


def validate(name, repo, runtime, env, host=None) -> list[Refusal]:
    """Every rule that the input breaks; an empty list means it may be onboarded."""
    return check_name(name) + check_repo(repo) + check_runtime(runtime) + check_env(env) + check_host(host)


def generate_spec(name: str, repo: str, runtime: str, env: str, host: str | None = None) -> dict:
    """The AppSpec: the template for the runtime, with the app's identity, and its host if it is
    placed on one (its runtime actions then go to that host's agent). Nothing else."""
    template = json.loads(json.dumps(TEMPLATES[runtime]))  # a deep copy that stays plain JSON
    return {"name": name, "env": env, "runtime": runtime, "repo": repo, **({"host": host} if host else {}),
            **template}


def _loggable(value) -> str:
    """What the proof log keeps of raw input: a bounded string, whatever was sent, without NUL
    (PostgreSQL's text cannot hold it; U+FFFD shows where one was)."""
    return (value if isinstance(value, str) else repr(value))[:200].replace("\x00", "\ufffd")


def redact_credentials(url: str) -> str:
    """A refused URL may carry a password: the proof log keeps the URL without it.

    Everything from "//" to the last "@" goes, since a password may itself hold "@" or "/".
    """
    return re.sub(r"//.*@", "//***@", url, flags=re.DOTALL)


def register(settings, name, repo, runtime, host=None) -> dict:
    """Validate, generate the spec, store it and export it; returns {"ok", "spec" | "refusals"}.

    Proof events and the registry row commit in one transaction, so a refusal is always logged
    and an accepted app is never half-registered.
    """
    from cicd.store import proof
    from cicd.store import App, get_app, session_scope

    env = settings.env
    # Redact first, then bound: a cut could otherwise drop the "@" that marks the password.
    request = {"name": _loggable(name), "runtime": _loggable(runtime),
               "repo": _loggable(redact_credentials(repo) if isinstance(repo, str) else repo),
               **({"host": _loggable(host)} if host else {})}
    with session_scope(settings) as session:
        proof.append(session, env, "ONBOARDING_STARTED", app=request["name"][:40], payload=request)
        refusals = validate(name, repo, runtime, env, host)
        if not refusals and get_app(session, env, name) is not None:
            refusals = [Refusal("name", "unique", f"an app named {name!r} is already onboarded in {env}")]
        if refusals:
            proof.append(session, env, "ONBOARDING_REFUSED", app=request["name"][:40],
                         payload={"refusals": [r.to_dict() for r in refusals]})
            return {"ok": False, "refusals": [r.to_dict() for r in refusals]}
        proof.append(session, env, "ONBOARDING_VALIDATION_PASSED", app=name, payload=request)
        spec = generate_spec(name, repo, runtime, env, host)
        session.add(App(env=env, name=name, runtime=runtime, repo=repo, spec=spec))
        proof.append(session, env, "SPEC_GENERATED", app=name, payload={"template": runtime, "spec": spec})
        proof.append(session, env, "DEPLOYMENT_TRIGGERED", app=name, payload={"reason": "onboarded"})
    export_spec(settings, spec)
    return {"ok": True, "spec": spec}


def register_promoted(settings, approval: dict) -> dict:
    """A granted promotion: the app enters this environment with the spec it had where it came from.

    The same rules as onboarding apply except the one promotion exists for (no direct prod).
    Returns {"ok", "spec", "sha"} or {"ok": False, "refusals"}; the caller deploys the sha.
    """
    from cicd.store import proof
    from cicd.store import App, get_app, session_scope

    env, payload = settings.env, approval["payload"]
    spec = {**payload["spec"], "env": env}
    refusals = check_name(spec.get("name")) + check_repo(spec.get("repo")) + check_runtime(spec.get("runtime"))
    with session_scope(settings) as session:
        request = {"name": spec.get("name"), "repo": spec.get("repo"), "runtime": spec.get("runtime"),
                   "promoted_from": payload["from"], "approval": approval["id"]}
        existing = get_app(session, env, spec["name"]) if not refusals else None
        if existing is None:
            proof.append(session, env, "ONBOARDING_STARTED", app=spec["name"], payload=request)
            if refusals:
                proof.append(session, env, "ONBOARDING_REFUSED", app=spec["name"],
                             payload={"refusals": [r.to_dict() for r in refusals]})
                return {"ok": False, "refusals": [r.to_dict() for r in refusals]}
            proof.append(session, env, "ONBOARDING_VALIDATION_PASSED", app=spec["name"], payload=request)
            session.add(App(env=env, name=spec["name"], runtime=spec["runtime"], repo=spec["repo"], spec=spec))
            proof.append(session, env, "SPEC_GENERATED", app=spec["name"],
                         payload={"template": spec["runtime"], "spec": spec, "promoted_from": payload["from"]})
        proof.append(session, env, "PROMOTED", app=spec["name"],
                     payload={"from": payload["from"], "release": payload["release"], "sha": payload["sha"],
                              "approval": approval["id"], "approved_by": approval["decided_by"]})
        proof.append(session, env, "DEPLOYMENT_TRIGGERED", app=spec["name"],
                     payload={"reason": f"promotion {approval['id']}", "sha": payload["sha"]})
    export_spec(settings, spec)
    return {"ok": True, "spec": spec, "sha": payload["sha"], "ref": payload["ref"]}


def export_spec(settings, spec: dict) -> None:
    """apps/registry/ENV/NAME.json, written whole (temp file + rename) so readers never see half."""
    directory = settings.registry_dir
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{spec['name']}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    tmp.replace(target)
