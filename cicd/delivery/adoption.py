"""`cicd adopt`: containers cicd-heal did not start, brought under its watch and its healing.

Docker does not restart a container its own health check marks unhealthy (moby/moby#28400); an
adopted container is: its health status, exits and resource use become signals, and the restart
that heals it goes through the same gates, budgets, approvals and proof log as any other action.
What cicd-heal does to an adopted container is restart it in place, nothing more (see
DockerRuntime's adopted section): no deploy, no scale, never a stop or a removal.
"""
from __future__ import annotations

import re

from cicd.delivery.onboarding import Refusal, check_name, export_spec
from cicd.runtime.base import RuntimeFailure

HEALTH_PATH = re.compile(r"/[A-Za-z0-9._~/?=&%-]{0,199}")
ADOPT_LABEL = "cicd.heal"   # `cicd adopt --labelled`: every running container with cicd.heal=true


def check_port(port) -> list[Refusal]:
    if port is None:
        return []
    if not isinstance(port, int) or not 1 <= port <= 65535:
        return [Refusal("port", "range", f"must be a TCP port 1-65535, got {port!r}")]
    return []


def check_health_path(path) -> list[Refusal]:
    if path is None:
        return []
    if not isinstance(path, str) or not HEALTH_PATH.fullmatch(path):
        return [Refusal("health_path", "pattern", "must start with / and hold only URL path and query characters "
                        "(at most 200)")]
    return []


def spec_of(settings, app: str, found: list[dict], port: int | None, health_path: str | None) -> dict:
    count = len(found)
    limits = {record["memory_limit_mb"] for record in found}
    return {"name": app, "env": settings.env, "runtime": "adopted", "repo": "docker:" + ",".join(r["name"] for r in found),
            "adopted": [r["name"] for r in found], "image": found[0]["image"],
            # An HTTP check when the container serves on a host port; else the container's own
            # HEALTHCHECK; else only whether it runs.
            "port": port, "health_path": (health_path or "/") if port else None,
            "probe": "http" if port else ("docker health check" if all(r["health_check"] for r in found) else "running"),
            "replicas": count, "min_replicas": count, "max_replicas": count,
            # Its own limit, if it has one: a container without is never restarted for its memory.
            "memory_limit_mb": limits.pop() if len(limits) == 1 else 0}


def adopt(settings, runtime, app: str, containers: list[str], port: int | None = None,
          health_path: str | None = None) -> dict:
    """Bring `containers` under watch as app `app`; {"ok", "spec"} or {"ok": False, "refusals"}.
    Every adoption and refusal is in the proof log."""
    from cicd.store import App, get_app, proof, session_scope
    env = settings.env
    request = {"name": str(app)[:40], "containers": [str(c)[:80] for c in containers], "port": port,
               "health_path": health_path}
    refusals = check_name(app) + check_port(port) + check_health_path(health_path)
    if not containers:
        refusals.append(Refusal("containers", "required", "name at least one running container (or use --labelled)"))
    if settings.runtime != "docker":
        refusals.append(Refusal("runtime", "docker", f"{env} runs apps on the {settings.runtime} runtime: adopting "
                                f"containers needs CICD_RUNTIME=docker for {env} (`CICD_RUNTIME=docker cicd up`)"))
    found = []
    if not refusals:
        try:
            found = runtime.adoptable(containers)
        except RuntimeFailure as exc:
            refusals.append(Refusal("containers", "running", str(exc)))
    with session_scope(settings) as session:
        if not refusals and get_app(session, env, app) is not None:
            refusals.append(Refusal("name", "unique", f"an app named {app!r} is already onboarded in {env}"))
        if refusals:
            proof.append(session, env, "ADOPTION_REFUSED", app=request["name"],
                         payload={**request, "refusals": [r.to_dict() for r in refusals]})
            return {"ok": False, "refusals": [r.to_dict() for r in refusals]}
        spec = spec_of(settings, app, found, port, health_path)
        # The runtime's record first: a registry row whose containers are not recorded would be
        # probed as an app with no replicas; a record without a row is not probed at all.
        runtime.adopt(app, spec, found, port, spec["health_path"])
        session.add(App(env=env, name=app, runtime="adopted", repo=spec["repo"], spec=spec))
        proof.append(session, env, "APP_ADOPTED", app=app,
                     payload={**request, "spec": spec, "container_ids": [r["container"] for r in found]})
    export_spec(settings, spec)
    return {"ok": True, "spec": spec}


def labelled(runtime) -> dict[str, dict]:
    """The running containers labelled cicd.heal=true, grouped by app: {app: {"containers", "port",
    "health_path"}}; the app is the label cicd.heal.app, else the container's name; cicd.heal.port
    and cicd.heal.path give the HTTP check."""
    groups: dict[str, dict] = {}
    for container in runtime.docker.containers.list(filters={"label": f"{ADOPT_LABEL}=true"}):
        labels = container.labels
        app = labels.get(f"{ADOPT_LABEL}.app") or container.name
        port = labels.get(f"{ADOPT_LABEL}.port")
        group = groups.setdefault(app, {"containers": [], "port": int(port) if port and port.isdigit() else None,
                                        "health_path": labels.get(f"{ADOPT_LABEL}.path")})
        group["containers"].append(container.name)
    return groups
