"""`cicd bench`: the benchmarks of the source tree (tests/bench), each beside its baseline."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from cicd.cli.context import JSON_OPTION

SOURCE_TREE = Path(__file__).resolve().parents[2]  # cicd/cli/bench.py -> the checkout's root


@click.command()
@JSON_OPTION
@click.option("--quick", is_flag=True, help="Fewer incidents and kills: a smoke run, not figures to quote.")
def bench(as_json, quick):
    """Benchmarks, each figure beside its baseline measured in the same run (takes minutes).

    \b
    chain         the healing chain on the simulated fleet vs bare Celery chains of the same hops
    recover_real  SIGKILL a real replica: time until healthy (probes alone, and exits watched)
    fanout        one probe cycle over 1,000 and 10,000 simulated apps
    footprint     resident memory of the whole stack, idle and under load
    policy        one policy decision, in-process
    zero_downtime requests sent and failed on a stable URL during deploy, scale,
                  restart and a crash, beside a replica's own port in the crash

    It starts its own stacks in a temporary directory; a stack you run is not touched.
    """
    root = SOURCE_TREE
    if not (root / "tests" / "bench" / "__main__.py").exists():
        raise click.ClickException(f"the benchmarks live in the source tree (tests/bench), not found under {root}")
    argv = [sys.executable, "-m", "tests.bench"] + (["--json"] if as_json else []) + (["--quick"] if quick else [])
    sys.exit(subprocess.run(argv, cwd=root).returncode)
