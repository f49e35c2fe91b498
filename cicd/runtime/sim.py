"""A simulated fleet: the Runtime interface over apps that exist only in memory, with a fault model.

A fault has a kind (crash, overload, ...), a context the detector can see (is the live release
fresh? how bad is it?) and a cause it cannot see (a bad release or a leak, a broken revision or
a transient error). For each cause, each action has a probability of fixing it, a time it takes
and a disruption it causes. Some faults need context to fix well: a crash right after a release
is the release's fault, and restarting only brings the same bad code back.

Everything random comes from one seeded generator: the same seed and the same calls give the
same outcomes. Time is virtual: actions advance an app's clock by what they would take.
"""
from __future__ import annotations

import contextlib
import random
import shutil
from dataclasses import dataclass, field, replace

from cicd.core.lifecycle import ReleaseStatus
from cicd.core.names import is_app_name
from cicd.runtime.base import ReplicaStatus, Runtime, RuntimeFailure
from cicd.store import sim_states, transaction


@dataclass(frozen=True)
class Effect:
    p_fix: float          # chance the action ends the fault
    seconds: float        # how long the action takes
    disruption_s: float = 0.0   # full-outage seconds the action itself causes


# cause -> action -> Effect. Actions missing for a cause never fix it (and cost their time).
CAUSES: dict[str, dict[str, Effect]] = {
    # crash of a long-stable release
    "process": {"restart_service": Effect(0.95, 3), "scale_workers": Effect(0.80, 5),
                "rollback_deployment": Effect(0.70, 10, 1), "noop": Effect(0.02, 20)},
    "leak": {"restart_service": Effect(0.70, 3), "scale_workers": Effect(0.85, 5),
             "rollback_deployment": Effect(0.60, 10, 1)},
    # crash right after a release: the release is bad, restarts only loop
    "bad_release": {"restart_service": Effect(0.10, 3), "scale_workers": Effect(0.10, 5),
                    "rollback_deployment": Effect(0.97, 8, 1)},
    # overload: more traffic than capacity, or a slow new release
    "traffic": {"scale_workers": Effect(0.95, 6), "restart_service": Effect(0.15, 3, 2),
                "noop": Effect(0.25, 30), "rollback_deployment": Effect(0.05, 10, 1)},
    "regression": {"scale_workers": Effect(0.35, 6), "rollback_deployment": Effect(0.95, 8, 1),
                   "restart_service": Effect(0.10, 3, 2), "noop": Effect(0.05, 30)},
    # a blip that clears by itself: anything "fixes" it, but disruptive actions cost
    "blip": {"noop": Effect(1.0, 0), "restart_service": Effect(1.0, 3, 3), "scale_workers": Effect(1.0, 5),
             "rollback_deployment": Effect(1.0, 10, 5), "retry_deployment": Effect(1.0, 10, 0)},
    "idle": {"scale_workers": Effect(0.98, 4)},
    # a deploy that has not passed its gate yet: slow but fine, or stuck for good
    "slow_start": {"noop": Effect(0.95, 15), "rollback_deployment": Effect(0.97, 4), "retry_deployment": Effect(0.5, 20)},
    "stuck": {"rollback_deployment": Effect(0.97, 4), "retry_deployment": Effect(0.1, 20)},
    # a deploy that failed (the live release serves meanwhile)
    "broken_revision": {"rollback_deployment": Effect(0.97, 3)},
    # not in the fault mix: a crash any restart fixes (the benchmarks' incidents, all alike)
    "glitch": {"restart_service": Effect(1.0, 1)},
    "transient": {"retry_deployment": Effect(0.90, 8), "rollback_deployment": Effect(0.97, 3)},
}

# kind, fresh -> [(weight, cause)]: what causes a fault of this kind, as far as the detector knows.
CAUSE_MIX: dict[tuple[str, bool], list[tuple[float, str]]] = {
    ("crash", False): [(0.9, "process"), (0.1, "leak")],
    ("crash", True): [(1.0, "bad_release")],
    ("overload", False): [(1.0, "traffic")],
    ("overload", True): [(1.0, "regression")],
    ("false_alarm", False): [(1.0, "blip")],
    ("underload", False): [(1.0, "idle")],
    ("slow_deploy", False): [(0.8, "slow_start"), (0.2, "stuck")],
    ("failed_deploy", False): [(0.7, "broken_revision"), (0.3, "transient")],
}

# How much of the app a fault takes away while it lasts (the rest is degraded but serving).
IMPACT = {"crash": {"critical": 1.0, "high": 0.5}, "overload": {"high": 0.5, "medium": 0.3}}

# The mixed fault model: (weight, kind, fresh, severity).
FAULT_MIX: list[tuple[float, str, bool, str]] = [
    (0.22, "crash", False, "high"), (0.08, "crash", False, "critical"),
    (0.10, "crash", True, "high"), (0.05, "crash", True, "critical"),
    (0.15, "overload", False, "medium"), (0.05, "overload", False, "high"),
    (0.025, "overload", True, "medium"), (0.025, "overload", True, "high"),
    (0.15, "false_alarm", False, "low"), (0.05, "underload", False, "low"),
    (0.05, "slow_deploy", False, "medium"), (0.05, "failed_deploy", False, "high"),
]


@dataclass(frozen=True)
class Fault:
    kind: str
    fresh: bool
    severity: str
    cause: str

    @property
    def impact(self) -> float:
        return IMPACT.get(self.kind, {}).get(self.severity, 0.0)


def sample_fault(rng: random.Random, mix=FAULT_MIX) -> Fault:
    _, kind, fresh, severity = _weighted(rng, [(w, (w, k, f, s)) for w, k, f, s in mix])
    cause = _weighted(rng, CAUSE_MIX[(kind, fresh)])
    return Fault(kind, fresh, severity, cause)


def _weighted(rng: random.Random, options):
    total = sum(w for w, _ in options)
    pick = rng.random() * total
    for weight, value in options:
        pick -= weight
        if pick <= 0:
            return value
    return options[-1][1]


def effect_of(cause: str, action: str) -> Effect:
    return CAUSES[cause].get(action, Effect(0.0, 5))


@dataclass
class SimApp:
    spec: dict
    replicas: int
    live: int = 1
    releases: dict = field(default_factory=dict)    # number -> {"status", "ref", "sha"}
    fault: Fault | None = None
    clock_s: float = 0.0                             # virtual time spent on this app's faults
    disruption_s: float = 0.0
    ops: dict = field(default_factory=dict)          # op_key -> fixed? (an action draws its outcome once)
    applied: dict = field(default_factory=dict)      # op_key -> how many times an effect was applied
    calls: int = 0                                   # actions announced, duplicates included

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "fault"}
        out["releases"] = {str(n): r for n, r in self.releases.items()}
        out["fault"] = self.fault.__dict__ if self.fault else None
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "SimApp":
        data = dict(data)
        data["releases"] = {int(n): r for n, r in data["releases"].items()}
        data["fault"] = Fault(**data["fault"]) if data.get("fault") else None
        return cls(**data)


def draw(seed: int, op_key: str) -> float:
    """The outcome's random number for an op: the same in whichever process draws it."""
    return random.Random(f"{seed}/{op_key}").random()


class SimRuntime(Runtime):
    """The fleet in this process's memory: fast, for training, evaluation and replay. The
    SharedSimRuntime below keeps the same fleet in the database for worker processes."""

    def __init__(self, settings=None, seed: int = 0):
        self.settings = settings
        self.seed = seed
        self.rng = random.Random(seed)
        self.fleet: dict[str, SimApp] = {}

    # -- where the fleet lives (overridden by SharedSimRuntime) -------------------------------
    def _load(self, app: str) -> SimApp | None:
        return self.fleet.get(app)

    def _load_all(self, apps: list[str]) -> dict[str, SimApp]:
        return {a: self.fleet[a] for a in apps if a in self.fleet}

    @contextlib.contextmanager
    def _edit(self, app: str):
        sim = self._load(app)
        if sim is None:
            raise RuntimeFailure(f"{app} is not deployed in the simulated fleet")
        yield sim

    def _store(self, app: str, sim: SimApp | None) -> None:
        if sim is None:
            self.fleet.pop(app, None)
        else:
            self.fleet[app] = sim

    def _app(self, app: str) -> SimApp:
        sim = self._load(app)
        if sim is None:
            raise RuntimeFailure(f"{app} is not deployed in the simulated fleet")
        return sim

    # -- apps ----------------------------------------------------------------------------
    def add_app(self, spec: dict) -> SimApp:
        """An app already live at release 1 (the simulation needs no build)."""
        if not is_app_name(spec["name"]):
            raise RuntimeFailure(f"app name {spec['name']!r}: not a valid app name")
        sim = SimApp(spec=spec, replicas=spec["replicas"],
                     releases={1: {"status": ReleaseStatus.LIVE, "ref": "main", "sha": "1" * 40}})
        self._store(spec["name"], sim)
        return sim

    def apps(self) -> list[str]:
        return sorted(self.fleet)

    def replica_count(self, app: str) -> int:
        sim = self._load(app)
        return sim.replicas if sim else 0

    # -- faults ------------------------------------------------------------------------------
    def set_fault(self, app: str, fault: Fault) -> None:
        """Start a fault on an app, with a history: release 1 superseded by release 2, which is
        live (fresh or long-stable); a deploy fault adds release 3 (still starting, or failed)."""
        with self._edit(app) as sim:
            sim.fault, sim.clock_s, sim.disruption_s = fault, 0.0, 0.0
            sim.replicas = sim.spec["replicas"] * (2 if fault.kind == "underload" else 1)
            sim.releases = {1: {"status": ReleaseStatus.SUPERSEDED, "ref": "main", "sha": "1" * 40},
                            2: {"status": ReleaseStatus.LIVE, "ref": "main", "sha": "2" * 40}}
            sim.live = 2
            if fault.kind in ("slow_deploy", "failed_deploy"):
                sim.releases[3] = {"status": ReleaseStatus.STARTING if fault.kind == "slow_deploy"
                                   else ReleaseStatus.FAILED, "ref": "main", "sha": "3" * 40}

    def inject(self, app: str, kind: str, **options) -> dict:
        # A hang and a leak are crashes to the fleet's fault model, as they are to the detector.
        kinds = {"crash": "crash", "hang": "crash", "leak": "crash", "overload": "overload", "false-alarm": "false_alarm"}
        if kind not in kinds:
            raise RuntimeFailure(f"fault kind {kind!r}: must be one of {', '.join(kinds)}")
        fresh = bool(options.get("fresh", False))
        severity = options.get("severity") or {"crash": "high", "overload": "medium", "false_alarm": "low"}[kinds[kind]]
        cause = options.get("cause") or _weighted(self.rng, CAUSE_MIX[(kinds[kind], fresh)])
        self.set_fault(app, Fault(kinds[kind], fresh, severity, cause))
        return {"kind": kind, "cause": cause, "fresh": fresh}

    def fault(self, app: str) -> Fault | None:
        return self._app(app).fault

    def elapsed(self, app: str) -> tuple[float, float]:
        """(virtual seconds spent on the fault so far, seconds of outage the actions caused)."""
        sim = self._app(app)
        return sim.clock_s, sim.disruption_s

    def note_action(self, app: str, action: str, params: dict, op_key: str) -> None:
        """The fault model decides here, once per op key, whether this action fixes the fault."""
        with self._edit(app) as sim:
            sim.calls += 1
            if op_key in sim.ops or sim.fault is None:
                sim.ops.setdefault(op_key, sim.fault is None)
                return
            effect = effect_of(sim.fault.cause, action)
            fixed = draw(self.seed, op_key) < effect.p_fix
            sim.ops[op_key] = fixed
            sim.applied[op_key] = sim.applied.get(op_key, 0) + 1
            sim.clock_s += effect.seconds
            sim.disruption_s += effect.disruption_s
            if fixed:
                if sim.fault.kind == "slow_deploy" and action == "noop":
                    self._go_live(sim, max(sim.releases))  # the deploy only needed time: it passed its gate
                sim.fault = None

    @staticmethod
    def _go_live(sim: SimApp, number: int) -> None:
        for release in sim.releases.values():
            if release["status"] == ReleaseStatus.LIVE:
                release["status"] = ReleaseStatus.SUPERSEDED
        sim.releases[number]["status"], sim.live = ReleaseStatus.LIVE, number

    # -- probes ------------------------------------------------------------------------------
    @staticmethod
    def _statuses(sim: SimApp) -> list[ReplicaStatus]:
        fault = sim.fault
        out = []
        for slot in range(sim.replicas):
            status, utilization = "ok", 0.3
            if fault is not None:
                if fault.kind == "crash" and (slot == 0 or fault.severity == "critical"):
                    status = "down"
                elif fault.kind == "overload":
                    utilization = 0.97 if fault.severity == "high" else 0.85
                elif fault.kind == "false_alarm" and slot == 0:
                    status = "degraded"
                elif fault.kind == "underload":
                    utilization = 0.05
            out.append(ReplicaStatus(slot, pid=None, port=None, alive=status != "down", status=status,
                                     utilization=utilization if status == "ok" else 0.0, capacity=4))
        return out

    def probe(self, apps: list[str]) -> dict[str, list[ReplicaStatus]]:
        fleet = self._load_all(apps)
        return {app: self._statuses(fleet[app]) if app in fleet else [] for app in apps}

    # -- actions through the Runtime interface ---------------------------------------------------
    def restart(self, app: str, slots: list[int], op_key: str) -> dict:
        self._app(app)
        return {"effect": "restarted", "replicas": [{"slot": s} for s in slots], "failed": []}

    def scale(self, app: str, replicas: int, op_key: str) -> dict:
        with self._edit(app) as sim:
            before, sim.replicas = sim.replicas, replicas
        return {"effect": "scaled", "from": before, "to": replicas}

    def release_info(self, app: str, number: int) -> dict | None:
        release = self._app(app).releases.get(number)
        return {**release, "release": number} if release else None

    def request_deploy(self, app, request_id, kind, ref, sha, reason) -> None:
        """The deploy agent's part: the release lives if the fault model said the action fixes it."""
        with self._edit(app) as sim:
            number = max(sim.releases) + 1
            fixed = sim.ops.get(request_id, False)
            for release in sim.releases.values():
                if fixed and release["status"] == ReleaseStatus.LIVE:
                    release["status"] = ReleaseStatus.SUPERSEDED
            sim.releases[number] = {"status": ReleaseStatus.FAILED, "ref": ref, "sha": sha or "3" * 40,
                                    "request_id": request_id}
            if fixed:
                self._go_live(sim, number)

    def release_history(self, app: str) -> list[dict]:
        """Every release of the app, newest first, as release_info."""
        releases = self._app(app).releases
        return [{**releases[number], "release": number} for number in sorted(releases, reverse=True)]

    def release_of_request(self, app: str, request_id: str) -> dict | None:
        """The release a deploy request made (what the verifier waits on), as release_info."""
        for number, release in self._app(app).releases.items():
            if release.get("request_id") == request_id:
                return {**release, "release": number}
        return None

    def cancel_release(self, app: str, number: int, why: str) -> bool:
        with self._edit(app) as sim:
            release = sim.releases.get(number)
            if release is None or release["status"] != ReleaseStatus.STARTING:
                return False
            release["status"] = ReleaseStatus.FAILED
            return True

    # -- the rest of the interface: releases exist only as records here --------------------------
    def stage_release(self, spec: dict, number: int, source_dir, progress=None) -> dict:
        if self._load(spec["name"]) is None:
            self.add_app(spec)
        with self._edit(spec["name"]) as sim:
            sim.releases[number] = {"status": ReleaseStatus.STARTING, "ref": "main", "sha": None}
        shutil.rmtree(source_dir, ignore_errors=True)  # nothing to run: the code is not needed
        return {"release": number, "slots": list(range(spec["replicas"]))}

    def probe_release(self, app: str, number: int) -> list[ReplicaStatus]:
        sim = self._app(app)
        if number not in sim.releases:
            return []
        return [ReplicaStatus(s, None, None, True, "ok", 0.0, 4) for s in range(sim.spec["replicas"])]

    def activate_release(self, app: str, number: int) -> dict:
        with self._edit(app) as sim:
            for release in sim.releases.values():
                if release["status"] == ReleaseStatus.LIVE:
                    release["status"] = ReleaseStatus.SUPERSEDED
            sim.releases[number]["status"], sim.live = ReleaseStatus.LIVE, number
            return {"release": number, "replicas": sim.replicas, "stopped": sim.replicas}

    def discard_release(self, app: str, number: int) -> dict:
        with self._edit(app) as sim:
            sim.releases[number]["status"] = ReleaseStatus.FAILED
        return {"release": number, "stopped": 0}

    def stop_load(self, app: str) -> bool:
        with self._edit(app) as sim:
            if sim.fault and sim.fault.kind == "overload" and sim.fault.cause == "traffic":
                sim.fault = None
                return True
        return False

    def stop_app(self, app: str) -> int:
        sim = self._load(app)
        self._store(app, None)
        return sim.replicas if sim else 0


    def remove_app(self, app: str) -> int:
        # The simulated fleet holds nothing of a stopped app.
        return self.stop_app(app)


class SharedSimRuntime(SimRuntime):
    """The simulated fleet in a database of its own (var/ENV/sim-fleet.db), so every worker
    process sees one fleet (`CICD_RUNTIME=sim`): what the chaos tests and the benchmarks run the
    real agents against. Its own file, not the environment's database: the agents call the
    runtime inside their own transactions, and one SQLite file has one write lock."""

    def __init__(self, settings, seed: int = 0):
        super().__init__(settings, seed)
        self.fleet_settings = replace(settings, database_url_override=f"sqlite:///{settings.env_dir / 'sim-fleet.db'}")

    def _load(self, app: str) -> SimApp | None:
        with transaction(self.fleet_settings, readonly=True) as conn:
            state = sim_states.state_of(conn, self.settings.env, app)
        return SimApp.from_dict(state) if state is not None else None

    def _load_all(self, apps: list[str]) -> dict[str, SimApp]:
        with transaction(self.fleet_settings, readonly=True) as conn:
            states = sim_states.states_of(conn, self.settings.env, apps)
        return {app: SimApp.from_dict(state) for app, state in states.items()}

    @contextlib.contextmanager
    def _edit(self, app: str):
        # One transaction (on SQLite: the write lock) around read, change and write back.
        env = self.settings.env
        with transaction(self.fleet_settings) as conn:
            state = sim_states.state_for_update(conn, env, app)
            if state is None:
                raise RuntimeFailure(f"{app} is not deployed in the simulated fleet")
            sim = SimApp.from_dict(state)
            yield sim
            sim_states.save(conn, env, app, sim.to_dict())

    def _store(self, app: str, sim: SimApp | None) -> None:
        env = self.settings.env
        with transaction(self.fleet_settings) as conn:
            exists = sim_states.state_for_update(conn, env, app) is not None
            if sim is None:
                if exists:
                    sim_states.remove(conn, env, app)
            elif exists:
                sim_states.save(conn, env, app, sim.to_dict())
            else:
                sim_states.add(conn, env, app, sim.to_dict())

    def apps(self) -> list[str]:
        with transaction(self.fleet_settings, readonly=True) as conn:
            return sorted(sim_states.app_names(conn, self.settings.env))
