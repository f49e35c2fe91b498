"""How long one policy decision takes, in-process (benchmark: figures, not assertions).

  python tests/bench/bench_policy.py [--decisions N]

Times, per decision: choosing (Q-table lookup, shield, greedy/epsilon choice), the whole decision
without the database (choose + params + sign), and the orchestrator's gates on it.
"""
from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import numpy as np

from cicd.core import gates, signing
from cicd.healing import policy
from cicd.config import Settings
from cicd.core.events import Decision, iso, utcnow

KEY = b"k" * 32
SPEC = {"replicas": 2, "min_replicas": 1, "max_replicas": 6}


def per_call_us(fn, n: int) -> float:
    fn()  # warm
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main(argv=None, quiet: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    settings = Settings(env="dev")
    table, rng = policy.prior_table(), np.random.default_rng(0)
    incident = SimpleNamespace(id="inc-bench", kind="crash", severity="high", slot=0,
                               signal={"slots": [0], "replicas_total": 2, "utilization": 0.1},
                               context={"rollback_to": 1, "fresh_release": False})
    state = policy.State.of("crash", "high", 1)

    def choose():
        return policy.choose(table, state, "explore", policy.allowed_actions(settings, incident), rng, 0.1)

    def decide():
        action = choose()[0]
        d = Decision(env="dev", incident_id="inc-bench", attempt=1, app="bench-api", action=action,
                     params=policy.action_params(action, incident, SPEC), issued_at=iso(utcnow()), nonce="n",
                     mode="explore")
        return {**d.to_dict(), "signature": signing.sign(d.signed_body(), KEY)}

    signed = decide()
    ctx = gates.GateContext(env="dev", key=KEY, now=utcnow(), current_replicas=2)
    figures = {
        "choose_us": round(per_call_us(choose, args.decisions), 2),
        "decision_us": round(per_call_us(decide, args.decisions // 4), 2),
        "gates_us": round(per_call_us(lambda: gates.evaluate(signed, ctx), args.decisions // 4), 2),
    }
    if quiet:
        pass
    elif args.json:
        print(json.dumps(figures))
    else:
        print(f"policy decision, in-process, {args.decisions} calls (goal: one decision under 100 us)")
        print(f"  choose (table, shield, greedy/epsilon)      {figures['choose_us']:8.2f} us")
        print(f"  decision (choose + params + HMAC signature)  {figures['decision_us']:8.2f} us")
        print(f"  orchestrator gates on a signed decision      {figures['gates_us']:8.2f} us")
    return figures


if __name__ == "__main__":
    main()
