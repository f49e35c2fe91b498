"""Real traffic for `cicd inject overload`: a closed loop of clients through the app's stable URL.

Run as its own process (standard library only: it runs with -I -S). Each client requests PATH,
waits for the answer, and asks again. One more client, the sampler, asks each replica for the
app's health path on its own port, as the probes do, and measures what the detector judges: the
latency as a share of the probe timeout, or the utilization the app reports there (the sample
service does), whichever is more.

The number of clients is found, not computed: it ramps up (`next_clients`) until that measured
load sits in a band just over the overload threshold, then holds for --duration. Holding a client
count (not a request rate) is what lets a scale-out heal: the same clients spread over more
replicas, so each queues less. Whether the app overloads depends on how it queues, not on how fast
this machine is. If even --max-clients cannot overload it, the report says so.

Without --url (no proxy running) the clients call the replicas' ports directly, re-read from the
runtime's state file (--state) every half second, so replicas a scale-up adds take their share
too. A scale during the ramp ends the ramp: the state file says so.

The outcome of the ramp goes to --report (JSON, written once the ramp ends); what it sees goes to
stdout (the app's logs/load.log).
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import signal
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

# A step's measure starts this long after its client count changed: longer than the sample
# service's 2 s utilization window and two probe intervals, so it sees the new count only.
SETTLE_S = 2.5
SAMPLES_PER_STEP = 9   # sampler answers per step (one at a time: at most ~probe timeout each)
MAX_STEPS = 12
GROWTH = 2.0           # at most double per step: from below saturation a bigger jump could overshoot
                       # far past the probe timeout, and probes that time out look like a hang
LOG_EVERY_S = 2.0


def band(threshold: float) -> tuple[float, float]:
    """The measured load to hold, (low, high): over the threshold by a tenth of the headroom, and
    well under the probe timeout (a replica's queue, so each probe's latency, varies by about a
    request's service time), so a probe seldom times out; and after a scale from 2 to 3 replicas
    the same clients measure about two thirds of it, under the threshold."""
    headroom = 1.0 - threshold
    return threshold + 0.1 * headroom, threshold + 0.4 * headroom


def next_clients(tried: dict[int, float], clients: int, low: float, high: float,
                 max_clients: int) -> tuple[int, bool]:
    """The ramp: (clients for the next step, whether to hold it), from the load measured with each
    client count tried so far (tried[clients] is the latest). Under saturation the load grows
    about in proportion to the clients, so the step is proportional, at most GROWTH times."""
    load = tried[clients]
    if low <= load <= high:
        return clients, True
    if load < low and clients >= max_clients:
        return clients, True  # could not overload it: the caller reports that
    target = (low + high) / 2
    proposed = round(clients * target / max(load, 0.01))
    if load < low:
        proposed = min(max_clients, max(clients + 1, min(proposed, round(clients * GROWTH))))
    else:
        proposed = max(1, min(clients - 1, proposed))
    if proposed in tried or len(tried) >= MAX_STEPS:
        # Between two counts, one under the band and one over it: hold the one over (if its probes
        # do not time out), nearest the band's middle.
        over = [c for c in tried if low <= tried[c] < 1.0]
        return min(over or tried, key=lambda c: (abs(tried[c] - target), c)), True
    return proposed, False


def sample_load(latency_ms: float, utilization: float, probe_timeout_s: float) -> float:
    """One health answer as the detector judges it (loop.replica_load, without the CPU share, which
    this process cannot see): the most of reported utilization and latency over the timeout."""
    return max(utilization, latency_ms / (probe_timeout_s * 1000.0))


def reported_utilization(body: bytes) -> float:
    try:
        data = json.loads(body)
        return float(data.get("utilization", 0.0)) if isinstance(data, dict) else 0.0
    except (ValueError, TypeError, AttributeError):
        return 0.0


def live_ports(state_path: str) -> list[int]:
    try:
        with open(state_path) as fh:
            state = json.load(fh)
        return sorted(r["port"] for r in state.get("replicas", {}).values() if r.get("port"))
    except (OSError, ValueError, KeyError, TypeError):
        return []


class Targets:
    """Where requests go: the clients' to the stable URL, or (no proxy) to each live replica in
    turn; the sampler's always to each replica in turn, as the probes go."""

    def __init__(self, url: str | None, state_path: str | None):
        self.url = urlsplit(url) if url else None
        self.state_path = state_path
        self.ports = live_ports(state_path) if state_path else []
        self.counter = itertools.count()

    def refresh(self) -> None:
        if self.state_path:
            self.ports = live_ports(self.state_path) or self.ports

    def replicas(self) -> int:
        return len(live_ports(self.state_path)) if self.state_path else 0

    def replica(self) -> tuple[str, int] | None:
        ports = self.ports
        return ("127.0.0.1", ports[next(self.counter) % len(ports)]) if ports else None

    def next(self) -> tuple[str, int] | None:
        if self.url:
            return self.url.hostname, self.url.port or 80
        return self.replica()


def timed_request(target: tuple[str, int], path: str, timeout_s: float) -> tuple[int, bytes, float, float]:
    """(status, body, started, ms) of one GET; status 0 when no answer came (refused, reset, timed out)."""
    started = time.monotonic()
    try:
        status, body = request(target, path, timeout_s)
    except (OSError, http.client.HTTPException):
        status, body = 0, b""
    return status, body, started, (time.monotonic() - started) * 1000


def request(target: tuple[str, int], path: str, timeout_s: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(target[0], target[1], timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read(4096)
    finally:
        conn.close()


class Load:
    def __init__(self, args):
        self.args = args
        self.targets = Targets(args.url, args.state)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.wanted = 0           # clients numbered below this run; the others wait or end
        self.threads: list[threading.Thread] = []
        self.latencies: list[tuple[float, float]] = []   # (started, ms) of load requests answered < 500
        self.samples: list[tuple[float, float, float]] = []  # (started, ms, load) of health answers
        self.errors = 0
        self.scaled = False
        self.partial: tuple[float | None, float | None] = (None, None)

    def client(self, number: int) -> None:
        while not self.stop.is_set():
            if number >= self.wanted:
                self.stop.wait(0.1)
                continue
            target = self.targets.next()
            if target is None:
                self.stop.wait(0.1)
                continue
            status, _, started, ms = timed_request(target, self.args.path, self.args.request_timeout)
            if status and status < 500:
                with self.lock:
                    self.latencies.append((started, ms))
            else:
                with self.lock:
                    self.errors += 1
                self.stop.wait(0.05)  # down, restarting or refusing: no spinning

    def sampler(self) -> None:
        # On the replicas' own ports, on a new connection each time, as the probes ask: a server
        # may serve the proxy's kept-alive connections before a new one (Node does), so what the
        # proxy's clients see can be well under what the detector sees.
        while not self.stop.is_set():
            target = self.targets.replica() if self.args.state else self.targets.next()
            if target is None:
                self.stop.wait(0.1)
                continue
            status, body, started, ms = timed_request(target, self.args.probe_path, self.args.request_timeout)
            if status:  # an answer, even an error: its latency is what a probe would see
                load = sample_load(ms, reported_utilization(body), self.args.probe_timeout)
                with self.lock:
                    self.samples.append((started, ms, load))
            self.stop.wait(0.05)

    def set_clients(self, count: int) -> None:
        self.wanted = count
        while len(self.threads) < count:
            thread = threading.Thread(target=self.client, args=(len(self.threads),), daemon=True)
            self.threads.append(thread)
            thread.start()

    def since(self, start: float) -> tuple[list[float], list[float]]:
        """(load request latencies in ms, health sample loads) of requests started after start."""
        with self.lock:
            return ([ms for at, ms in self.latencies if at >= start],
                    [load for at, _, load in self.samples if at >= start])

    def measure_step(self, deadline: float, replicas: int) -> tuple[float, float] | None:
        """(median sampled load, p50 ms of the load) of the current count, once it settled; None
        past the deadline, or once the app was scaled (then the ramp's work is done)."""
        began = time.monotonic()
        start = began + self.args.settle
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.stop.wait(0.1)
            self.targets.refresh()
            if self.targets.replicas() != replicas:
                self.scaled = True
                latencies, loads = self.since(began)  # what this count did before the scale
                self.partial = (statistics.median(loads) if loads else None,
                                statistics.median(latencies) if latencies else None)
                return None
            latencies, loads = self.since(start)
            if len(loads) >= SAMPLES_PER_STEP:
                return statistics.median(loads), statistics.median(latencies) if latencies else 0.0
        return None

    def ramp(self) -> dict:
        low, high = band(self.args.threshold)
        clients = max(1, min(self.args.start_clients, self.args.max_clients))
        tried: dict[int, float] = {}
        p50: dict[int, float] = {}
        deadline = time.monotonic() + self.args.ramp_timeout
        # A scale-out during the ramp (the detector saw the overload before the ramp was done) ends
        # it: ramping on would chase the healing, and overload the bigger app too.
        replicas = self.targets.replicas()
        while True:
            self.set_clients(clients)
            measured = self.measure_step(deadline, replicas)
            if measured is None:
                if self.scaled:  # this count overloaded it: held, the scale-out is to relieve it
                    tried[clients], p50[clients] = self.partial
                    print(f"ramp: scaled from {replicas} replicas at {clients} clients", flush=True)
                break
            tried[clients], p50[clients] = measured
            print(f"ramp: {clients} clients: load {tried[clients]:.2f} (band {low:.2f}-{high:.2f}), "
                  f"p50 {p50[clients]:.0f} ms on {self.args.path}", flush=True)
            following, hold = next_clients(tried, clients, low, high, self.args.max_clients)
            if hold:
                clients = following
                break
            clients = following
        self.set_clients(clients)
        load = tried.get(clients)
        report = {"clients": clients, "load": round(load, 3) if load is not None else None,
                  "p50_ms": round(p50[clients], 1) if p50.get(clients) is not None else None, "steps": len(tried),
                  "overloaded": self.scaled or (load is not None and load > self.args.threshold),
                  "scaled_during_ramp": self.scaled}
        if not report["overloaded"]:
            seen = (f"p50 {report['p50_ms']:.0f} ms, load {load:.2f}" if load is not None
                    else f"no health answer within {self.args.ramp_timeout:.0f} s")
            report["why"] = f"could not overload it with {clients} clients: {seen} (threshold {self.args.threshold})"
        return report

    def hold(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        logged = time.monotonic()
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.stop.wait(0.5)
            self.targets.refresh()
            if time.monotonic() - logged >= LOG_EVERY_S:
                latencies, loads = self.since(logged)
                logged = time.monotonic()
                with self.lock:
                    errors, self.errors = self.errors, 0
                print(f"hold: {self.wanted} clients: p50 {statistics.median(latencies) if latencies else 0:.0f} ms "
                      f"on {self.args.path}, load {statistics.median(loads) if loads else 0:.2f}, "
                      f"{len(latencies)} answered, {errors} failed", flush=True)
                with self.lock:  # keep only what the next line needs
                    self.latencies = [x for x in self.latencies if x[0] >= logged]
                    self.samples = [x for x in self.samples if x[0] >= logged]


def write_report(path: str, report: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(report, fh)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="the app's stable URL (through the proxy)")
    parser.add_argument("--state", help="the app's runtime state.json: its replicas (requested directly when "
                                        "there is no --url), and how many there are")
    parser.add_argument("--path", default="/", help="what the clients request")
    parser.add_argument("--probe-path", default="/", help="the app's health path, as the probes ask it")
    parser.add_argument("--probe-timeout", type=float, default=0.5, help="the probes' timeout, seconds")
    parser.add_argument("--threshold", type=float, default=0.75, help="the overload threshold, 0..1")
    parser.add_argument("--start-clients", type=int, default=2)
    parser.add_argument("--max-clients", type=int, default=64)
    parser.add_argument("--ramp-timeout", type=float, default=60.0)
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=SETTLE_S, help="seconds a step waits before it measures")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds to hold after the ramp")
    parser.add_argument("--report", help="where the ramp's outcome goes (JSON)")
    args = parser.parse_args(argv)
    if not (args.url or args.state):
        parser.error("--url or --state: one is needed")

    load = Load(args)
    signal.signal(signal.SIGTERM, lambda *_: load.stop.set())
    threading.Thread(target=load.sampler, daemon=True).start()
    report = load.ramp()
    print(("holding" if report["overloaded"] else report["why"] + "; holding anyway") +
          f": {report['clients']} clients for {args.duration:.0f} s", flush=True)
    if args.report:
        write_report(args.report, report)
    load.hold(args.duration)
    load.stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
