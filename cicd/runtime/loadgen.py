"""Real traffic for `cicd inject overload`: N clients calling /work on the app's live replicas.

Run as its own process (standard library only). It re-reads the runtime's state file every half
second, so replicas added by a scale-up start taking their share of the load, which is what
makes scaling really bring utilization down.
"""
import argparse
import http.client
import itertools
import json
import signal
import threading
import time


def live_ports(state_path):
    try:
        with open(state_path) as fh:
            state = json.load(fh)
        return sorted(r["port"] for r in state.get("replicas", {}).values() if r.get("port"))
    except (OSError, ValueError, KeyError, TypeError):
        return []


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", required=True, help="the app's runtime state.json")
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--work-ms", type=float, default=100.0)
    parser.add_argument("--duration", type=float, default=30.0)
    args = parser.parse_args()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ports = live_ports(args.state)
    counter = itertools.count()

    def client():
        while not stop.is_set():
            current = ports
            if not current:
                stop.wait(0.1)
                continue
            port = current[next(counter) % len(current)]
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", f"/work?ms={args.work_ms}", headers={"Connection": "close"})
                conn.getresponse().read()
                conn.close()
            except OSError:
                stop.wait(0.05)  # a replica that is down or restarting; try the next one

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.duration
    while not stop.is_set() and time.monotonic() < deadline:
        stop.wait(0.5)
        ports = live_ports(args.state) or ports
    stop.set()


if __name__ == "__main__":
    main()
