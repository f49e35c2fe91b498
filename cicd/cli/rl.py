"""The recovery policy: `cicd rl train|eval|show`, and `cicd replay` (today's policy on recorded history)."""
from __future__ import annotations

import time
from pathlib import Path

import click

from cicd.cli import terminal
from cicd.cli.context import JSON_OPTION, Invocation, echo_json, env_option, pass_invocation


@click.group(name="rl")
def rl_group():
    """The recovery policy: train it on the simulated fleet, evaluate it, look at it."""


@rl_group.command(name="train")
@click.option("--episodes", default=10_000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--seed", default=1, show_default=True, type=int)
@env_option(default="dev", show_default=True,
            help="Whose Q-table to train (stage and prod use what is trained here when it is theirs).")
@click.option("--continue", "keep", is_flag=True, help="Start from the environment's current table, not the priors.")
@pass_invocation
def rl_train(invocation: Invocation, episodes, seed, keep):
    """Q-learning on the simulated fleet's mixed fault model; stores the table in the environment.

    Each episode is one incident healed through the same shield, gates and catalogue as the
    agents use. Deterministic for a given seed (from the priors). Saves the learning curve for
    `cicd rl eval`'s plot.
    """
    from cicd.healing import learning
    settings = invocation.settings
    started = time.monotonic()
    with terminal.progress(f"training {episodes} episodes", total=episodes) as underway:
        stored = learning.train_and_store(settings, episodes, seed, keep,
                                          progress=lambda done, total: underway.update(done))
    training = stored.training
    final = training.curve[-1]
    click.echo(f"trained {episodes} episodes (seed {seed}) in {time.monotonic() - started:.1f} s; "
               f"{stored.states_written} state-actions written to {settings.env}")
    click.echo(f"validation: downtime per incident {final['downtime_per_incident']:.2f} s "
               f"(playbook {training.playbook_downtime:.2f} s), success rate {final['success_rate']:.4f}")
    click.echo(f"greedy policy unchanged since episode {training.converged_at}" if training.converged_at
               else "greedy policy still changing at the last validation: train longer")
    click.echo(f"learning curve: {stored.curve_path}")


@rl_group.command(name="eval")
@click.option("--episodes", default=2000, show_default=True, type=click.IntRange(1, 10_000_000))
@click.option("--seed", default=2, show_default=True, type=int, help="Use one the training did not (held out).")
@env_option(default="dev", show_default=True, help=None)
@JSON_OPTION
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Where to write the PNG (default: var/ENV/rl/eval.png).")
@pass_invocation
def rl_eval(invocation: Invocation, episodes, seed, as_json, plot_path):
    """The learned policy beside the playbook, random and an oracle, on the same faults.

    Success rate, mean actions per incident, mean time to recover, total downtime, and each
    as a ratio to the playbook; writes the learning curve and the comparison as a PNG.
    """
    from cicd.healing import learning
    settings = invocation.settings
    env = settings.env
    result = learning.evaluate(settings, learning.current_table(settings), episodes, seed)
    path = learning.plot(settings, result, plot_path or learning.rl_dir(settings) / "eval.png")
    result["plot"] = str(path)
    if as_json:
        echo_json(result)
        return
    rows = [{"policy": name, **{k: v for k, v in row.items() if k != "ratio_to_playbook"},
             "downtime_vs_playbook": row["ratio_to_playbook"]["downtime_s"]}
            for name, row in result["policies"].items()]
    click.echo(f"{episodes} incidents from the mixed fault model, seed {seed}, policy of {env}:")
    terminal.print_table(rows, [("policy", "policy"), ("success_rate", "success"), ("mean_actions", "actions/incident"),
                                ("mean_time_to_recover_s", "mean ttr s"), ("downtime_s", "downtime s"),
                                ("downtime_vs_playbook", "vs playbook")])
    click.echo(f"learned mean actions / oracle's: {result['policies']['learned']['actions_vs_oracle']}")
    click.echo(f"plot: {path}")


@rl_group.command(name="show")
@env_option(default="dev", show_default=True, help=None)
@JSON_OPTION
@pass_invocation
def rl_show(invocation: Invocation, as_json):
    """The Q-table: every state the detector produces, its Q-values and its greedy action.

    Values marked * were learned; the others are the priors.
    """
    from cicd.web import api
    settings = invocation.settings
    env = settings.env
    policy_table = api.policy_table(settings)
    rows = [{"state": s["state"], "greedy": s["greedy"],
             **{a: f"{q:+.3f}{'*' if a in s['learned'] else ''}" for a, q in s["q"].items()}}
            for s in policy_table["states"]]
    if as_json:
        echo_json({"env": env, "mode": settings.policy_mode, "states": rows})
        return
    click.echo(f"policy of {env} (mode {settings.policy_mode}); * = learned")
    terminal.print_table(rows, [("state", "state"), ("greedy", "greedy")] + [(a, a) for a in policy_table["actions"]])


@click.command()
@click.argument("trace", type=click.Path(exists=True, dir_okay=False))
@env_option()
@click.option("--seed", default=0, show_default=True, type=int, help="For the hidden causes the record does not hold.")
@JSON_OPTION
@pass_invocation
def replay(invocation: Invocation, trace, seed, as_json):
    """What-if on real history: heal a recorded trace's incidents again, on the simulated fleet.

    TRACE is what `cicd proof export --format csv|jsonl` writes. Each recorded incident is healed
    by today's policy of ENV through the same shield, gates and catalogue, and shown beside what
    happened then. (A sample: examples/traces/stage-demo.csv.)
    """
    from cicd.healing import learning
    from cicd.healing import replay as replay_module
    settings = invocation.settings
    recorded = replay_module.incidents(replay_module.read_trace(Path(trace)))
    if not recorded:
        raise click.ClickException(f"{trace} holds no INCIDENT_DETECTED records to replay")
    results = replay_module.replay(settings, learning.current_table(settings), recorded, seed)
    if as_json:
        echo_json(results)
        return
    rows = [{"incident": r["incident_id"], "kind": r["kind"] + (" (fresh)" if r["fresh"] else ""),
             "then": " -> ".join(r["recorded"]["actions"]) + f" = {r['recorded']['outcome']}",
             "then_s": r["recorded"]["seconds"],
             "now": " -> ".join(r["replayed"]["actions"]) + f" = {r['replayed']['outcome']}",
             "now_s": r["replayed"]["seconds"]} for r in results]
    terminal.print_table(rows, [("incident", "incident"), ("kind", "kind"), ("then", "recorded"), ("then_s", "seconds"),
                                ("now", f"replayed ({settings.env} policy, simulated)"), ("now_s", "sim seconds")])
    same = sum(1 for r in results if r["recorded"]["actions"][:1] == r["replayed"]["actions"][:1])
    click.echo(f"{len(results)} incidents; the first action is the same in {same}; "
               f"replayed outcomes: {sum(r['replayed']['outcome'] == 'stable' for r in results)} stable")
