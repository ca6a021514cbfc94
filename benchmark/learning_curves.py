"""Learning curves of PPO runs beside a uniformly random policy on the same evaluation levels: one PNG and one
Markdown table, read from the run folders' events (what benchmark/results/*learning* shows).

    python benchmark/learning_curves.py RUN_DIR [RUN_DIR ...] --out benchmark/results/NAME --random-episodes 200

The random policy plays each run's own evaluation (ppo_procgen_impoola.make_envs and evaluate, the same level
sets and seeds as the run's final evaluation) with uniform logits. PPO runs only (their config.json has
`distribution_mode`); `benchmark/analyze.py` does the normalised scores and IQM of any script.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cleanrl_pool"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import utils  # noqa: E402
from analyze import read_event_scalars  # noqa: E402

LEVEL_SETS = ("train_levels", "test_levels")
fail = utils.fail


def read_run(run_dir: str) -> dict:
    """config.json and the scalars of a finished PPO run folder, or exit 2 with one line."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        fail(f"{run_dir}: no readable config.json ({type(error).__name__})")
    if "distribution_mode" not in config:
        fail(f"{run_dir}: not a ppo_procgen_impoola run (its config.json has no distribution_mode)")
    scalars = read_event_scalars(run_dir)
    if "charts/episodic_return" not in scalars or "eval/test_levels/return" not in scalars:
        fail(f"{run_dir}: no training returns or no test-level evaluation in its events")
    finished = os.path.isfile(os.path.join(run_dir, "final.pt"))
    return {"dir": run_dir, "config": config, "scalars": scalars, "finished": finished}


def random_policy_returns(config: dict, episodes: int) -> dict:
    """{level set: (mean, std, episodes)} of uniform actions in the run's own final evaluation."""
    import ppo_procgen_impoola as ppo
    import torch

    args = ppo.Args(**{key: value for key, value in config.items() if key in ppo.Args.__dataclass_fields__})
    uniform = lambda obs: (torch.zeros(len(obs), ppo.procgen_hd.NUM_ACTIONS), None)  # noqa: E731  (logits, value)
    results = {}
    for level_set, num_levels, seed in (("train_levels", args.num_levels, args.seed + 100_000),
                                        ("test_levels", 0, args.seed + 200_000)):  # as the run's log_evaluation
        envs = ppo.make_envs(args, args.eval_num_envs, num_levels, seed)
        returns, _ = ppo.evaluate(uniform, envs, episodes, seed, torch.device("cpu"))
        envs.close()
        results[level_set] = (float(returns.mean()), float(returns.std()), len(returns))
    return results


def label(run: dict) -> str:
    config = run["config"]
    return f"--pool {config['pool']}, seed {config['seed']}"


def moving_average(values, window: int):
    kernel = np.ones(min(window, len(values))) / min(window, len(values))
    return np.convolve(values, kernel, mode="valid")


def plot(path: str, runs: list, random: dict, window: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = runs[0]["config"]
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for run in runs:
        steps, values = run["scalars"]["charts/episodic_return"]
        smooth = moving_average(values, window)
        line, = axis.plot(steps[len(steps) - len(smooth):], smooth,
                          label=f"{label(run)}: training (mean of {window} iterations)")
        for level_set, marker in zip(LEVEL_SETS, ("o", "*")):
            eval_steps, eval_values = run["scalars"][f"eval/{level_set}/return"]
            axis.plot(eval_steps, eval_values, marker, markersize=9, color=line.get_color(),
                      label=f"{label(run)}: evaluation, {level_set.replace('_', ' ')}")
    for level_set, style in zip(LEVEL_SETS, (":", "--")):
        mean, _, episodes = random[level_set]
        axis.axhline(mean, linestyle=style, color="grey",
                     label=f"random policy, {level_set.replace('_', ' ')} ({episodes} episodes)")
    axis.set(xlabel="environment steps", ylabel="episodic return",
             title=f"PPO on Procgen-HD {config['env_id']} ({config['distribution_mode']}, {config['resolution']}x"
                   f"{config['resolution']}, width {config['width']}), 2-core CPU")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(runs: list, random: dict) -> list:
    lines = ["| run | steps | training return, first → last 10 iterations | eval train levels | eval test levels | "
             "random policy train / test | SPS | final.pt |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        scalars = run["scalars"]
        _, returns = scalars["charts/episodic_return"]
        evals = {level_set: scalars[f"eval/{level_set}/return"][1][-1] for level_set in LEVEL_SETS}
        lines.append(f"| {label(run)} | {int(scalars['charts/episodic_return'][0][-1]):,} | {returns[:10].mean():.2f} → "
                     f"{returns[-10:].mean():.2f} | {evals['train_levels']:.2f} | {evals['test_levels']:.2f} | "
                     f"{random['train_levels'][0]:.2f} / {random['test_levels'][0]:.2f} | "
                     f"{scalars['charts/SPS'][1][-1]:.1f} | {'yes' if run['finished'] else 'no'} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="PPO run folders (one game, resolution and evaluation set-up)")
    parser.add_argument("--out", required=True, help="path prefix of the outputs: PREFIX_learning.png, PREFIX_learning.md")
    parser.add_argument("--random-episodes", type=int, default=200, help="episodes of the random policy per level set")
    parser.add_argument("--window", type=int, default=10, help="iterations per point of the smoothed training curve")
    args = parser.parse_args(argv)
    if args.random_episodes < 1 or args.window < 1:
        fail("--random-episodes and --window must be at least 1")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"--out {args.out!r}: its folder does not exist")
    runs = [read_run(run_dir) for run_dir in args.runs]
    keys = ("env_id", "distribution_mode", "resolution", "num_levels", "seed", "eval_num_envs")
    if len({tuple(run["config"][key] for key in keys) for run in runs}) > 1:
        fail(f"the runs differ in {', '.join(keys)}: draw one evaluation set-up at a time")
    random = random_policy_returns(runs[0]["config"], args.random_episodes)
    plot(args.out + "_learning.png", runs, random, args.window)
    with open(args.out + "_learning.md", "w") as f:
        f.write("\n".join(table(runs, random)) + "\n")
    print("\n".join(table(runs, random)))
    print(f"wrote {args.out}_learning.png and {args.out}_learning.md")


if __name__ == "__main__":
    main()
