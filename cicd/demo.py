"""`cicd demo`: onboard demo-api in stage, deploy it, then break it three ways and watch it heal.

A crash (-> restart_service), an overload (-> scale_workers), a false alarm (-> noop): each is
injected for real, detected by the probes, decided, gated, executed and verified by the agents,
and the demo only reports what the proof log and the probes confirm.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

from . import faults, proof, reports
from .config import Settings
from .runtime.base import Runtime

DEMO_APP = "demo-api"
DEMO_REPO = "https://github.com/cicd-heal/demo-api.git"


class Agents(Protocol):
    def onboard(self, name: str, repo: str, runtime: str) -> dict: ...
    def deploy(self, app: str, reason: str) -> None: ...
    def scale(self, app: str, replicas: int) -> dict: ...


@dataclass(frozen=True)
class Scenario:
    label: str
    fault: str
    expected_action: str


SCENARIOS = (Scenario("A", "crash", "restart_service"), Scenario("B", "overload", "scale_workers"),
             Scenario("C", "false-alarm", "noop"))


@dataclass
class ScenarioResult:
    scenario: Scenario
    incident: dict | None = None
    time_to_recover_s: float | None = None
    error: str = ""
    timeline: list = field(default_factory=list)

    @property
    def action(self) -> str | None:
        return self.incident.get("action") if self.incident else None

    @property
    def passed(self) -> bool:
        return bool(self.incident and self.incident["status"] == "stable"
                    and self.action == self.scenario.expected_action and not self.error)


class DemoFailed(RuntimeError):
    pass


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def deploy_demo_app(settings: Settings, runtime: Runtime, agents: Agents, say) -> dict:
    known = {row["app"]: row for row in reports.apps(settings, runtime)}
    before = (reports.latest_release(settings, DEMO_APP) or {}).get("release", 0)
    if DEMO_APP in known and known[DEMO_APP]["replicas"]:
        say(f"{DEMO_APP} is already onboarded and running in {settings.env}: reusing it")
    else:
        if DEMO_APP in known:
            agents.deploy(DEMO_APP, "demo: onboarded earlier, not running")  # e.g. after `cicd down --apps`
            say(f"{DEMO_APP} is onboarded but not running: redeploying it")
        else:
            result = agents.onboard(DEMO_APP, DEMO_REPO, "backend")
            if not result["ok"]:
                raise DemoFailed("onboarding refused: " + "; ".join(f"{r['field']}: {r['message']}"
                                                                    for r in result["refusals"]))
            say(f"onboarded {DEMO_APP} (backend) from its template; spec exported to "
                f"{settings.registry_dir / (DEMO_APP + '.json')}")
        release = reports.wait_for_release(settings, DEMO_APP, before, 90)
        if release is None or release["status"] != "live":
            raise DemoFailed(f"deploy of {DEMO_APP} failed: {release['detail'] if release else 'timed out after 90 s'}")
        say(f"deployed release {release['release']}: {release['detail']} "
            f"({reports.seconds_between(release['started_at'], release['finished_at'])} s)")
    wait_until(lambda: reports.steady(settings, runtime, DEMO_APP), 60, f"{DEMO_APP} to be healthy")
    return next(row for row in reports.apps(settings, runtime) if row["app"] == DEMO_APP)


def scale_and_settle(settings: Settings, runtime: Runtime, agents: Agents, replicas: int, say) -> None:
    result = agents.scale(DEMO_APP, replicas)
    if not result.get("ok"):
        raise DemoFailed(f"scaling {DEMO_APP} to {replicas} failed: {result.get('error')}")
    wait_until(lambda: reports.steady(settings, runtime, DEMO_APP), 60, f"{DEMO_APP} to settle at {replicas} replicas")
    say(f"scaled {DEMO_APP} {result['from']} -> {result['to']} replicas")


def run_scenario(settings: Settings, runtime: Runtime, scenario: Scenario, timeout_s: float, say) -> ScenarioResult:
    result = ScenarioResult(scenario)
    wait_until(lambda: reports.steady(settings, runtime, DEMO_APP), 60, f"{DEMO_APP} to be steady")
    injected = faults.inject(settings, runtime, DEMO_APP, scenario.fault, duration=60.0)
    say(f"[{scenario.label}] injected {scenario.fault}: " +
        ", ".join(f"{k}={v}" for k, v in injected.items() if k not in ("injected_at", "seq")))
    result.incident = reports.follow(settings, DEMO_APP, injected["seq"], timeout_s, on_record=result.timeline.append)
    if result.incident is None:
        result.error = f"no incident ended within {timeout_s:.0f} s"
        return result
    stable = [r for r in result.timeline if r["event_name"] == "SYSTEM_STABLE"]
    if stable:
        result.time_to_recover_s = reports.seconds_between(injected["injected_at"], stable[-1]["ts"])
    say(f"[{scenario.label}] {result.incident['kind']} -> {result.action} -> {result.incident['status']}"
        + (f" in {result.time_to_recover_s:.2f} s" if result.time_to_recover_s is not None else ""))
    return result


def run(settings: Settings, runtime: Runtime, agents: Agents, say=print, scenario_timeout_s: float = 90.0) -> int:
    started = time.monotonic()
    first_seq = proof.head_seq(settings) + 1
    results: list[ScenarioResult] = []
    failure = ""
    try:
        app = deploy_demo_app(settings, runtime, agents, say)
        spec_replicas = app["replicas"]
        # Normal operations first: a scale-up and back, as an operator would do.
        scale_and_settle(settings, runtime, agents, spec_replicas + 1, say)
        scale_and_settle(settings, runtime, agents, spec_replicas, say)
        for scenario in SCENARIOS:
            result = run_scenario(settings, runtime, scenario, scenario_timeout_s, say)
            results.append(result)
            if scenario.fault == "overload":
                runtime.stop_load(DEMO_APP)
                if runtime.replica_count(DEMO_APP) != spec_replicas:
                    wait_until(lambda: reports.steady(settings, runtime, DEMO_APP), 60, f"{DEMO_APP} to settle")
                    scale_and_settle(settings, runtime, agents, spec_replicas, say)
    except DemoFailed as exc:
        failure = str(exc)
    verdict = proof.verify(settings)
    records = proof.records_since(settings, first_seq - 1)
    summary(settings, results, records, verdict, time.monotonic() - started, failure, say)
    ok = not failure and len(results) == len(SCENARIOS) and all(r.passed for r in results) and verdict.ok
    say("Status: DEMO COMPLETE" if ok else "Status: DEMO FAILED")
    say(f"The stack is still running (`cicd status`). Stop it with `cicd down`; add --apps to stop {DEMO_APP} too.")
    return 0 if ok else 1


def summary(settings, results, records, verdict, seconds, failure, say) -> None:
    line = "=" * 72
    say(line)
    say(f"cicd-heal demo summary (environment: {settings.env})")
    say(line)
    passed = sum(1 for r in results if r.passed)
    say(f"Scenarios executed: {passed}/{len(SCENARIOS)} recovered as expected")
    for r in results:
        ttr = f"{r.time_to_recover_s:6.2f} s" if r.time_to_recover_s is not None else "     -  "
        mark = "ok " if r.passed else "FAILED"
        expect = "" if r.passed else f" (expected {r.scenario.expected_action}{'; ' + r.error if r.error else ''})"
        say(f"  {r.scenario.label}  {r.scenario.fault:<12} -> {str(r.action):<16} time to recover {ttr}  "
            f"{mark} {r.incident['id'] if r.incident else ''}{expect}")
    if failure:
        say(f"Stopped early: {failure}")
    say(f"Proof events this run ({len(records)}):")
    counts = Counter(r["event_name"] for r in records)
    for name, n in sorted(counts.items()):
        say(f"  {name:<30} {n}")
    say(f"Proof log: {settings.proof_mirror_path}")
    say(f"Proof verify: {verdict.describe()}")
    say(f"Total duration: {seconds:.1f} s")
