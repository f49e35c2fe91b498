"""Host agents: one control plane, two machines, made of two network namespaces on this one.

hostA and hostB are network namespaces joined by a veth pair (10.213.0.1/24, 10.213.0.2/24), each
with its own loopback. The control plane (`cicd up`: Redis bound to 10.213.0.1 as well, Caddy,
the six agents, beat) runs inside hostA, and so does the example git server (on 10.213.0.1). Host
B's agent (`cicd host-agent`) runs inside hostB with its own CICD_HOME (its runtime root), the
control plane's broker over the veth, and the control plane's SQLite file as its store (the one
shortcut of one machine: a second machine would have CICD_DATABASE_URL point at PostgreSQL).

Every packet is sent from inside the namespaces, to addresses inside them: this process (in the
machine's own namespace) only runs commands in them (`ip netns exec`), reads the store's file,
reads B's state file and sends signals (a SIGKILL is not traffic).

The sample app is onboarded placed on host B: built and run there, its replicas listening on
10.213.0.2, probed by the monitor on A over the veth. A replica on B is crashed (a real SIGKILL,
through B's agent: `cicd inject crash`) and healed by the chain on A, the restart done by B's
agent. Then B's agent is SIGKILLed, another replica crash is made, and the incident waits (found
by A's network probes, its restart dispatched to B's queue, nothing executed, not escalated)
until B's agent is started again: then it heals, with every incident closed and no action run twice.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from cicd.config import Settings
from cicd.core.events import iso, utcnow
from cicd.delivery import examples
from cicd.runtime import process
from cicd.runtime.local import LocalRuntime
from cicd.store import DeadLetter, Execution, Incident, proof, session_scope
from cicd.store import placements

from .conftest import STACK_ENV


CICD = Path(sys.executable).with_name("cicd")
ADDR_A, ADDR_B = "10.213.0.1", "10.213.0.2"
APP = "hostapp"
HOST = "b"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"cicdprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not available here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    """Two namespaces, a veth pair between them, and what runs inside each."""

    def __init__(self, tmp: Path):
        tag = os.getpid() % 100000
        self.ns_a, self.ns_b = f"cicd-a-{tag}", f"cicd-b-{tag}"
        self.veth_a, self.veth_b = f"cva{tag}", f"cvb{tag}"
        self.home_a, self.home_b = tmp / "host-a", tmp / "host-b"
        self.home_a.mkdir()
        self.home_b.mkdir()
        self.redis_port = 6400 + tag % 1000
        self.agent: subprocess.Popen | None = None
        self.agent_starts = 0
        self.git: subprocess.Popen | None = None

    # -- the network -------------------------------------------------------------------------
    def make_network(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
        _ip("link", "set", self.veth_a, "netns", self.ns_a)
        _ip("link", "set", self.veth_b, "netns", self.ns_b)
        for ns, dev, addr in ((self.ns_a, self.veth_a, ADDR_A), (self.ns_b, self.veth_b, ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")

    def remove_network(self) -> None:
        # Whatever still runs inside (we started all of it) goes first, then the namespaces, and with
        # them the veth pair.
        for ns in (self.ns_a, self.ns_b):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        # A pair that never left this namespace (a setup that failed half-way) goes too.
        _ip("link", "del", self.veth_a, check=False)

    # -- environments ------------------------------------------------------------------------
    def env_a(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CICD_")}
        return {**env, **STACK_ENV, "CICD_HOME": str(self.home_a), "CICD_REDIS_PORT": str(self.redis_port),
                "CICD_REDIS_BIND": ADDR_A}

    def env_b(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CICD_")}
        # The broker's password from its file (never in argv or the URL); the control plane's store.
        return {**env, **STACK_ENV, "CICD_HOME": str(self.home_b),
                "CICD_BROKER_URL": f"redis://{ADDR_A}:{self.redis_port}/0",
                "CICD_BROKER_PASSWORD_FILE": str(self.home_a / "var" / "redis" / "password"),
                "CICD_DATABASE_URL": f"sqlite:///{self.home_a / 'var' / 'stage' / 'cicd.db'}",
                "CICD_HOST_NAME": HOST, "CICD_HOST_ADDRESS": ADDR_B}

    def on_a(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
        out = subprocess.run(["ip", "netns", "exec", self.ns_a, str(CICD), *args], capture_output=True, text=True,
                             timeout=timeout, env=self.env_a())
        if check and out.returncode != 0:
            raise AssertionError(f"cicd {' '.join(args)} (on host A) exited {out.returncode}\n--- stdout\n"
                                 f"{out.stdout}\n--- stderr\n{out.stderr}")
        return out

    @property
    def settings_a(self) -> Settings:
        return Settings(env="stage", home=self.home_a.resolve())

    @property
    def settings_b(self) -> Settings:
        return Settings(env="stage", home=self.home_b.resolve(), host_name=HOST, host_address=ADDR_B)

    # -- host B's agent ----------------------------------------------------------------------
    def start_agent(self) -> None:
        self.agent_starts += 1
        log = self.home_b / f"host-agent-{self.agent_starts}.log"
        # Its own session: the SIGKILL below takes the agent (worker and watcher: one process) and
        # nothing else (the replicas run in sessions of their own, as on any machine).
        self.agent = subprocess.Popen(["ip", "netns", "exec", self.ns_b, str(CICD), "host-agent"],
                                      stdin=subprocess.DEVNULL, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                      env=self.env_b(), start_new_session=True)
        deadline = time.monotonic() + 60
        while " ready." not in log.read_text(errors="replace"):
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"host agent not ready (exit {self.agent.poll()}); its log:\n"
                                     f"{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def kill_agent(self) -> None:
        os.killpg(self.agent.pid, signal.SIGKILL)
        self.agent.wait(timeout=10)

    # -- the example repository, served on host A's address ------------------------------------
    def serve_repo(self) -> str:
        root = self.home_a / "git-hosts"
        examples.make_repo(root, APP)
        port = 8700 + os.getpid() % 1000
        self.git = subprocess.Popen(["ip", "netns", "exec", self.ns_a, sys.executable, "-I", "-m", "http.server",
                                     "--bind", ADDR_A, "--directory", str(root), str(port)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        return f"http://{ADDR_A}:{port}/{APP}.git"


def events(settings: Settings, name: str | None = None, incident_id: str | None = None) -> list[dict]:
    return [r for r in proof.records_since(settings, 0) if (name is None or r["event_name"] == name)
            and (incident_id is None or r["incident_id"] == incident_id)]


def incidents_of(settings: Settings) -> list[Incident]:
    with session_scope(settings, readonly=True) as session:
        rows = session.scalars(select(Incident).where(Incident.env == settings.env, Incident.app == APP)
                               .order_by(Incident.opened_at)).all()
        session.expunge_all()
        return rows


def wait_for(what: str, check, seen, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; last seen: {seen()}")
        time.sleep(0.2)


def placed_replicas(hosts: Hosts) -> list[dict]:
    return placements.placed(hosts.settings_a, [APP]).get(APP, {}).get("replicas", [])


def healthy(hosts: Hosts) -> bool:
    from cicd.store import reports
    from cicd.runtime.hosts import PlacedRuntime
    rows = [r for r in reports.apps(hosts.settings_a, PlacedRuntime(hosts.settings_a)) if r["app"] == APP]
    return bool(rows) and rows[0]["replicas"] > 0 and rows[0]["healthy"] == rows[0]["replicas"] \
        and rows[0]["open_incident"] is None


def test_an_app_on_host_b_is_healed_by_the_control_plane_on_host_a_and_waits_while_b_is_down(tmp_path):
    if (why := _netns_usable()) is not None:
        pytest.skip(why)
    hosts = Hosts(tmp_path)
    try:
        hosts.make_network()
        hosts.on_a("up")
        repo = hosts.serve_repo()
        hosts.start_agent()
        onboarded = hosts.on_a("onboard", APP, "--repo", repo, "--runtime", "backend", "--host", HOST)
        settings = hosts.settings_a

        # Placed on B: built under B's home, listening on B's address, published for A.
        state = json.loads((hosts.home_b / "var" / "stage" / "apps" / APP / "state.json").read_text())
        assert state["live"] == 1 and state["replicas"], state
        assert not (hosts.home_a / "var" / "stage" / "apps" / APP).exists(), "nothing of it runs on A"
        spec = json.loads((hosts.home_a / "apps" / "registry" / "stage" / f"{APP}.json").read_text())
        assert spec["host"] == HOST, spec
        where = placements.placed(settings, [APP])[APP]
        assert (where["host"], where["address"]) == (HOST, ADDR_B), where
        assert [r["port"] for r in where["replicas"]] == [r["port"] for r in state["replicas"].values()]
        wait_for("healthy by A's probes over the network", lambda: healthy(hosts), lambda: placed_replicas(hosts), 30)

        # 1. A crash on B (B's agent makes it: a SIGKILL there), healed by the chain on A.
        crash = hosts.on_a("inject", "crash", APP, "--wait", "--timeout", "60")
        assert "SYSTEM_STABLE" in crash.stdout, crash.stdout
        first = incidents_of(settings)
        assert len(first) == 1 and first[0].status == "stable", [(i.id, i.status, i.resolution) for i in first]
        dispatched = events(settings, "HOST_DISPATCHED", first[0].id)
        executed = events(settings, "ORCH_EXEC", first[0].id)
        assert [r["payload"]["host"] for r in dispatched] == [HOST], dispatched
        assert [r["payload"]["host"] for r in executed] == [HOST], executed
        injected = events(settings, "FAILURE_INJECTED")[-1]
        stable = events(settings, "SYSTEM_STABLE", first[0].id)[-1]
        crash_to_healthy = _seconds(injected["payload"]["at"], stable["ts"])  # as `cicd inject --wait` counts

        # 2. B's agent dies (SIGKILL: its worker and its watcher), then a replica on B crashes.
        hosts.kill_agent()
        replica = next(iter(json.loads((hosts.home_b / "var" / "stage" / "apps" / APP / "state.json")
                                       .read_text())["replicas"].values()))
        before = sorted(r["pid"] for r in placed_replicas(hosts))
        assert process.kill(replica["pid"], replica["ticks"]), replica
        killed_at = time.monotonic()

        def second_incident():
            found = [i for i in incidents_of(settings) if i.id != first[0].id]
            return found[0] if found and events(settings, "HOST_DISPATCHED", found[0].id) else None
        waiting = wait_for("the second crash found by A's network probes and dispatched to B's queue",
                           second_incident, lambda: [(i.id, i.status) for i in incidents_of(settings)], 45)
        # It waits: a few probe cycles and housekeeping rounds later, still open, nothing executed.
        time.sleep(4.0)
        now = next(i for i in incidents_of(settings) if i.id == waiting.id)
        assert now.status == "open", (now.status, now.resolution)
        assert events(settings, "ORCH_EXEC", waiting.id) == []
        assert events(settings, "ESCALATED", waiting.id) == [] and events(settings, "ATTEMPT_FAILED", waiting.id) == []
        with session_scope(settings, readonly=True) as session:
            claim = session.scalar(select(Execution).where(Execution.incident_id == waiting.id))
            assert claim is not None and claim.status == "started", claim and claim.status
        assert not process.is_alive(replica["pid"], replica["ticks"])
        # ...and its restart is in B's queue, where it stays while nobody takes it.
        [host_b] = json.loads(hosts.on_a("status", "--json").stdout)["stack"]["hosts"]
        assert (host_b["host"], host_b["queue"], host_b["alive"], host_b["apps"]) == (HOST, "stage.host.b", False, APP)
        assert host_b["depth"] >= 1, host_b
        while_down = dict(host_b)
        assert sorted(r["pid"] for r in placed_replicas(hosts)) == before, "nothing restarted it meanwhile"
        waited_s = time.monotonic() - killed_at

        # 3. B's agent is back: the waiting restart runs (once), the incident heals.
        back_at = time.monotonic()
        back_ts = iso(utcnow())
        hosts.start_agent()
        wait_for("the waiting incident healed once B's agent is back",
                 lambda: events(settings, "SYSTEM_STABLE", waiting.id),
                 lambda: [r["event_name"] for r in events(settings, incident_id=waiting.id)], 45)
        resume_to_stable = time.monotonic() - back_at
        [host_b] = json.loads(hosts.on_a("status", "--json").stdout)["stack"]["hosts"]
        assert host_b["alive"] is True and host_b["depth"] == 0, host_b
        wait_for("healthy again by A's probes", lambda: healthy(hosts), lambda: placed_replicas(hosts), 30)

        # Nothing lost, nothing twice: every incident closed and stable, one execution per attempt,
        # each a real restart on B (not a replay), no dead letters, the proof chain intact.
        closed = incidents_of(settings)
        assert [i.status for i in closed] == ["stable", "stable"], [(i.id, i.status, i.resolution) for i in closed]
        for incident in closed:
            runs = [r["payload"] for r in events(settings, "ORCH_EXEC", incident.id)]
            assert len(runs) == len({r["attempt"] for r in runs}), runs
            for run in runs:
                assert run["status"] == "done" and run["host"] == HOST, run
                assert run["result"]["effect"] == "restarted" and not run["result"].get("deduplicated"), run
        restarted = {r["slot"]: r["pid"] for r in LocalRuntime(hosts.settings_b).replicas(APP)}
        assert restarted.get(int(replica["slot"])) not in (None, replica["pid"]), (replica, restarted)
        with session_scope(settings, readonly=True) as session:
            dead = session.scalars(select(DeadLetter).where(DeadLetter.env == "stage")).all()
            assert not dead, [(d.task, d.reason) for d in dead]
        assert hosts.on_a("proof", "verify").returncode == 0
        # An operator's scaling of a placed app is its host's too (the command waits for the answer).
        scaled = hosts.on_a("scale", APP, "3")
        assert f"{APP}: 2 -> 3 replicas" in scaled.stdout, scaled.stdout
        assert len(placed_replicas(hosts)) == len(LocalRuntime(hosts.settings_b).replicas(APP)) == 3

        status = hosts.on_a("status").stdout
        first_ts = events(settings, incident_id=waiting.id)[0]["ts"]
        timeline = "\n".join(f"  +{_seconds(first_ts, r['ts']):7.3f} s  {r['event_name']}"
                             for r in events(settings, incident_id=waiting.id))
        figures = {"crash_to_healthy_s": round(crash_to_healthy, 2), "waited_while_b_down_s": round(waited_s, 2),
                   "agent_back_to_stable_s": round(resume_to_stable, 2)}
        print(f"\n{onboarded.stdout}{crash.stdout}\nwhile B's agent was down: {json.dumps(while_down)}\n"
              f"the waiting incident {waiting.id} (B's agent started again at +{_seconds(first_ts, back_ts):.3f} s):\n"
              f"{timeline}\nfigures: {json.dumps(figures)}\n\n{status}")
    finally:
        if hosts.agent is not None and hosts.agent.poll() is None:
            hosts.kill_agent()
        with _suppress():
            hosts.on_a("down", "--apps", check=False, timeout=60)
        with _suppress():
            LocalRuntime(Settings(env="stage", home=hosts.home_b.resolve())).stop_app(APP)
        if hosts.git is not None:
            hosts.git.kill()
        hosts.remove_network()


def _seconds(start: str, end: str) -> float:
    from cicd.core.events import parse_iso
    return (parse_iso(end) - parse_iso(start)).total_seconds()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], Exception)
