"""`cicd demo`: real apps, deployed from real git revisions, broken on purpose, healed, proven.

Scenarios (`--scenario`):
  classic         demo-api: crash -> restart, overload -> scale out, false alarm -> noop
  slow-deploy     a revision that starts slowly: detected while its gate runs, handled
  failed-deploy   a revision that does not build: the live release serves throughout, and the
                  incident is recovered by retry or rollback
  overloaded-env  three apps hot at once: each scaled out, then scaled back in when load falls

Every fault is injected for real, detected by probes (or the deploy agent), decided, gated,
executed and verified by the agents; the summary reports only what the proof log confirms.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

from cicd.stack import cluster
from cicd.delivery import faults
from cicd.store import proof, reports
from cicd.config import Settings
from cicd.core.events import iso, utcnow
from cicd.core.lifecycle import IncidentStatus, ReleaseStatus
from cicd.runtime.base import Runtime

DEMO_APP = "demo-api"
OVERLOAD_APPS = (("demo-api", "backend"), ("demo-web", "frontend"), ("demo-jobs", "fullstack"))
SCENARIO_NAMES = ("classic", "slow-deploy", "failed-deploy", "overloaded-env")


class Agents(Protocol):
    def onboard(self, name: str, repo: str, runtime: str) -> dict: ...
    def deploy(self, app: str, ref: str = "HEAD", reason: str = "") -> str: ...
    def scale(self, app: str, replicas: int) -> dict: ...


@dataclass(frozen=True)
class Step:
    label: str
    app: str
    fault: str
    expected: tuple[str, ...]      # the action(s) that may end the incident
    kind: str                      # the incident kind it must be classified as


@dataclass
class StepResult:
    step: Step
    incident: dict | None = None
    time_to_recover_s: float | None = None
    error: str = ""
    timeline: list = field(default_factory=list)

    @property
    def action(self) -> str | None:
        return self.incident.get("action") if self.incident else None

    @property
    def actions(self) -> list[str]:
        return [r["payload"]["action"] for r in self.timeline if r["event_name"] == "RL_DECISION"]

    @property
    def passed(self) -> bool:
        return bool(self.incident and self.incident["status"] == IncidentStatus.STABLE
                    and self.incident["kind"] == self.step.kind
                    and self.action in self.step.expected and not self.error)


class DemoFailed(RuntimeError):
    pass


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


class ServingWatch:
    """Probes an app in the background: was there ever a probe without a healthy replica?"""

    def __init__(self, runtime: Runtime, app: str, interval_s: float = 0.2):
        self.runtime, self.app, self.interval_s = runtime, app, interval_s
        self.probes = self.dark = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self.probes += 1
            if not any(s.healthy for s in self.runtime.probe([self.app])[self.app]):
                self.dark += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Demo:
    def __init__(self, settings: Settings, runtime: Runtime, agents: Agents, say=print, timeout_s: float = 90.0):
        self.settings, self.runtime, self.agents, self.say, self.timeout_s = settings, runtime, agents, say, timeout_s
        self.notes: list[str] = []

    # -- set-up ------------------------------------------------------------------------------
    def ensure_app(self, name: str, runtime_kind: str) -> dict:
        """Onboarded and live, deployed from the example git server; reuses what is there."""
        settings = self.settings
        git_url = cluster.example_git_server(settings, [name])
        known = {row["app"]: row for row in reports.apps(settings, self.runtime)}
        before = (reports.latest_release(settings, name) or {}).get("release", 0)
        live = reports.latest_release(settings, name, status=ReleaseStatus.LIVE)
        if name in known and known[name]["replicas"] and live and live["ref"] == "HEAD":
            self.say(f"{name} is already onboarded and running in {settings.env}: reusing it")
        else:
            if name in known:
                self.agents.deploy(name, "HEAD", "demo: back to the default branch")
                self.say(f"{name} is onboarded but not running its default branch: deploying HEAD")
            else:
                result = self.agents.onboard(name, f"{git_url}/{name}.git", runtime_kind)
                if not result["ok"]:
                    raise DemoFailed("onboarding refused: " + "; ".join(f"{r['field']}: {r['message']}"
                                                                        for r in result["refusals"]))
                self.say(f"onboarded {name} ({runtime_kind}) from {git_url}/{name}.git; spec exported to "
                         f"{settings.registry_dir / (name + '.json')}")
            release = reports.wait_for_release(settings, name, before, 120)
            if release is None or release["status"] != ReleaseStatus.LIVE:
                raise DemoFailed(f"deploy of {name} failed: {release['detail'] if release else 'timed out after 120 s'}")
            self.say(f"deployed {name} release {release['release']}: {release['detail']} "
                     f"({reports.seconds_between(release['started_at'], release['finished_at'])} s)")
        self.wait_steady(name)
        return next(row for row in reports.apps(settings, self.runtime) if row["app"] == name)

    def wait_steady(self, app: str, timeout_s: float = 60) -> None:
        wait_until(lambda: reports.steady(self.settings, self.runtime, app), timeout_s, f"{app} to be steady")

    def scale(self, app: str, replicas: int) -> None:
        result = self.agents.scale(app, replicas)
        if not result.get("ok"):
            raise DemoFailed(f"scaling {app} to {replicas} failed: {result.get('error')}")
        self.wait_steady(app)
        self.say(f"scaled {app} {result['from']} -> {result['to']} replicas")

    # -- one fault, followed to its end ------------------------------------------------------------
    def inject(self, step: Step) -> tuple[dict, StepResult]:
        self.wait_steady(step.app)
        injected = faults.inject(self.settings, self.runtime, step.app, step.fault,
                                 request_deploy=lambda app, ref, reason: self.agents.deploy(app, ref, reason),
                                 duration=60.0)
        self.say(f"[{step.label}] injected {step.fault} into {step.app}: " +
                 ", ".join(f"{k}={v}" for k, v in injected.items() if k not in ("injected_at", "seq", "watch_after_seq", "kind")))
        return injected, StepResult(step)

    def follow(self, injected: dict, result: StepResult) -> StepResult:
        step = result.step
        result.incident = reports.follow(self.settings, step.app, injected["watch_after_seq"], self.timeout_s,
                                         on_record=result.timeline.append)
        if result.incident is None:
            result.error = f"no incident ended within {self.timeout_s:.0f} s"
            return result
        stable = [r for r in result.timeline if r["event_name"] == "SYSTEM_STABLE"]
        if stable:
            result.time_to_recover_s = reports.seconds_between(injected["injected_at"], stable[-1]["ts"])
        self.say(f"[{step.label}] {step.app}: {result.incident['kind']} -> {' -> '.join(result.actions) or '-'} -> "
                 f"{result.incident['status']}"
                 + (f" in {result.time_to_recover_s:.2f} s" if result.time_to_recover_s is not None else ""))
        return result

    def run_step(self, step: Step) -> StepResult:
        injected, result = self.inject(step)
        return self.follow(injected, result)

    # -- scenarios ---------------------------------------------------------------------------
    def classic(self) -> list[StepResult]:
        spec_replicas = self.ensure_app(DEMO_APP, "backend")["replicas"]
        # Normal operations first: a scale-up and back, as an operator would do.
        self.scale(DEMO_APP, spec_replicas + 1)
        self.scale(DEMO_APP, spec_replicas)
        results = [self.run_step(Step("A", DEMO_APP, "crash", ("restart_service",), "crash"))]
        results.append(self.run_step(Step("B", DEMO_APP, "overload", ("scale_workers",), "overload")))
        self.runtime.stop_load(DEMO_APP)
        if self.runtime.replica_count(DEMO_APP) != spec_replicas:
            self.wait_steady(DEMO_APP)
            self.scale(DEMO_APP, spec_replicas)
        results.append(self.run_step(Step("C", DEMO_APP, "false-alarm", ("noop",), "false_alarm")))
        return results

    def slow_deploy(self) -> list[StepResult]:
        self.ensure_app(DEMO_APP, "backend")
        with ServingWatch(self.runtime, DEMO_APP) as watch:
            result = self.run_step(Step("S", DEMO_APP, "slow-deploy", ("noop", "rollback_deployment"), "slow_deploy"))
        self.note_serving(watch, result)
        self.ensure_app(DEMO_APP, "backend")  # leave it on its default branch, not the slow revision
        return [result]

    def failed_deploy(self) -> list[StepResult]:
        self.ensure_app(DEMO_APP, "backend")
        serving = reports.latest_release(self.settings, DEMO_APP)
        with ServingWatch(self.runtime, DEMO_APP) as watch:
            result = self.run_step(Step("F", DEMO_APP, "failed-deploy",
                                        ("rollback_deployment", "retry_deployment", "noop"), "failed_deploy"))
        self.note_serving(watch, result)
        self.notes.append(f"release serving before: {serving['release']}; after: "
                          f"{(reports.latest_release(self.settings, DEMO_APP, status='live') or {}).get('release')}")
        return [result]

    def note_serving(self, watch: ServingWatch, result: StepResult) -> None:
        self.notes.append(f"{watch.app} served throughout: {watch.probes - watch.dark}/{watch.probes} probes "
                          f"found a healthy replica")
        if watch.dark:
            result.error = f"{watch.dark} probes found no healthy replica"

    def overloaded_env(self) -> list[StepResult]:
        for name, runtime_kind in OVERLOAD_APPS:
            self.ensure_app(name, runtime_kind)
        started = [self.inject(Step(f"O{i + 1}", name, "overload", ("scale_workers",), "overload"))
                   for i, (name, _) in enumerate(OVERLOAD_APPS)]
        results = [self.follow(injected, result) for injected, result in started]
        peak = {name: self.runtime.replica_count(name) for name, _ in OVERLOAD_APPS}
        self.say("load falls: " + ", ".join(f"{name} at {n} replicas" for name, n in peak.items()))
        seqs = {name: proof.head_seq(self.settings) for name, _ in OVERLOAD_APPS}
        stopped_at = iso(utcnow())
        for name, _ in OVERLOAD_APPS:
            self.runtime.stop_load(name)
        for i, (name, _) in enumerate(OVERLOAD_APPS):
            result = StepResult(Step(f"U{i + 1}", name, "load stops", ("scale_workers",), "underload"))
            results.append(self.follow({"watch_after_seq": seqs[name], "injected_at": stopped_at}, result))
        self.notes.append("replicas: " + ", ".join(f"{name} {peak[name]} -> {self.runtime.replica_count(name)}"
                                                   for name, _ in OVERLOAD_APPS))
        return results

    def run(self, scenario: str = "classic") -> int:
        started = time.monotonic()
        first_seq = proof.head_seq(self.settings) + 1
        results: list[StepResult] = []
        failure = ""
        try:
            results = {"classic": self.classic, "slow-deploy": self.slow_deploy, "failed-deploy": self.failed_deploy,
                       "overloaded-env": self.overloaded_env}[scenario]()
        except DemoFailed as exc:
            failure = str(exc)
        verdict = proof.verify(self.settings)
        records = proof.records_since(self.settings, first_seq - 1)
        self.summary(scenario, results, records, verdict, time.monotonic() - started, failure)
        ok = not failure and results and all(r.passed for r in results) and verdict.ok
        self.say("Status: DEMO COMPLETE" if ok else "Status: DEMO FAILED")
        self.say("The stack is still running (`cicd status`). Stop it with `cicd down`; add --apps to stop "
                 "the demo apps too.")
        return 0 if ok else 1

    def summary(self, scenario, results, records, verdict, seconds, failure) -> None:
        line = "=" * 78
        self.say(line)
        self.say(f"cicd-heal demo summary (scenario: {scenario}, environment: {self.settings.env}, "
                 f"DEMO_MODE {'on' if self.settings.demo_mode else 'off'})")
        self.say(line)
        passed = sum(1 for r in results if r.passed)
        self.say(f"Scenarios executed: {passed}/{len(results)} recovered as expected")
        for r in results:
            ttr = f"{r.time_to_recover_s:6.2f} s" if r.time_to_recover_s is not None else "     -  "
            why = "" if r.passed else f" (expected {' or '.join(r.step.expected)}{'; ' + r.error if r.error else ''})"
            self.say(f"  {r.step.label:<3} {r.step.app:<10} {r.step.fault:<14} -> {str(r.action):<20} "
                     f"time to recover {ttr}  {'ok' if r.passed else 'FAILED'} "
                     f"{r.incident['id'] if r.incident else ''}{why}")
        for note in self.notes:
            self.say(f"  {note}")
        if failure:
            self.say(f"Stopped early: {failure}")
        self.say(f"Proof events this run ({len(records)}):")
        for name, n in sorted(Counter(r["event_name"] for r in records).items()):
            self.say(f"  {name:<30} {n}")
        self.say(f"Proof log: {self.settings.proof_mirror_path}")
        self.say(f"Proof verify: {verdict.describe()}")
        self.say(f"Total duration: {seconds:.1f} s")


def run(settings: Settings, runtime: Runtime, agents: Agents, say=print, scenario: str = "classic",
        scenario_timeout_s: float = 90.0) -> int:
    return Demo(settings, runtime, agents, say, scenario_timeout_s).run(scenario)
