"""Offline analysis of cleanrl_pool run folders: per-game normalised final scores, IQM / median /
mean / optimality gap with 95 % stratified-bootstrap confidence intervals, performance profiles,
learning curves, score-vs-flag and score-vs-parameters plots (PNG), a Markdown summary and a CSV.

    python benchmark/analyze.py runs --out analysis

Every run folder under the root (any depth) that holds config.json and TensorBoard event files
is read with TensorBoard's own record reader. Scores are normalised here from the raw returns and
the run's config (Procgen: min-max by distribution mode; Atari: human-normalised; anything else:
raw), with the tables of cleanrl_pool/utils.py, so every script's runs go through one computation.
A folder that cannot be scored (no config.json, a bad one, unreadable events, unfinished) and a run
without the evaluation its siblings are scored by (a truncated event file) are left out and listed,
with the reason, in summary.md and on stderr.
"""

import argparse
import csv
import glob
import json
import math
import os
import re
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cleanrl_pool"))
import utils  # noqa: E402  (the score tables live there, shared with the scripts)

EVAL_RETURN_TAGS = {  # split -> the raw-return tag the scripts log at each evaluation
    "train_levels": "eval/train_levels/return",
    "test_levels": "eval/test_levels/return",
    "eval": "eval/return",
    # Rainbow / DER: the mean return of the training games of each iteration, the score Dopamine reports
    "iteration": "charts/iteration_return",
}
LOGGED_NORMALIZED_TAGS = {
    "train_levels": "eval/train_levels/normalized_score",
    "test_levels": "eval/test_levels/normalized_score",
    "eval": "eval/normalized_score",
}
PARAMETER_TAGS = ("diag/params/encoder", "diag/params/bottleneck", "diag/params/head")
# The bottleneck's weights: its non-zero ones when sparse training logs them, else all of them (the last value logged)
BOTTLENECK_TAGS = ("diag/params/bottleneck_effective", "diag/params/bottleneck")
# Config keys that say how a run was launched or logged, not what was trained: never a grouping flag.
BOOKKEEPING_KEYS = {
    "env_id", "seed", "exp_name", "runs_dir", "resume", "track", "wandb_project_name", "wandb_entity",
    "cuda", "capture_video", "compile", "save_every", "eval_every", "diag_every", "torch_deterministic",
    "torch_threads", "log_every", "iteration_steps",
}


# Statistics (rliable's definitions, REFERENCE §7)
def iqm(scores):
    """Interquartile mean: mean of the scores after cutting int(n/4) from each end
    (scipy.stats.trim_mean(scores, 0.25), which rliable uses). A float for a 1-D list of scores;
    for a 2-D array (bootstrap resamples, one per row), an array with the IQM of each row."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64), axis=-1)
    cut = int(0.25 * ordered.shape[-1])
    trimmed_mean = ordered[..., cut:ordered.shape[-1] - cut].mean(axis=-1)
    return float(trimmed_mean) if trimmed_mean.ndim == 0 else trimmed_mean


def aggregate_metrics(scores_by_task) -> dict:
    """IQM and optimality gap (γ = 1) over all runs of all tasks; median and mean over tasks of the
    per-task mean score. With the same number of runs per task these are rliable's numbers."""
    pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores_by_task])
    task_means = np.array([np.mean(s) for s in scores_by_task])
    return {
        "IQM": iqm(pooled),
        "median": float(np.median(task_means)),
        "mean": float(np.mean(task_means)),
        "optimality gap": float(1.0 - np.mean(np.minimum(pooled, 1.0))),
    }


def stratified_bootstrap(scores_by_task, reps: int, seed: int):
    """Resample runs with replacement within each task, `reps` times.

    Draws, for each task in order, `rng.integers(0, n_task, size=(reps, n_task))` from
    `np.random.default_rng(seed)`. Returns (pooled resamples (reps, total runs), per-task means
    (reps, tasks))."""
    rng = np.random.default_rng(seed)
    samples = [np.asarray(s, dtype=np.float64)[rng.integers(0, len(s), size=(reps, len(s)))] for s in scores_by_task]
    return np.concatenate(samples, axis=1), np.stack([sample.mean(axis=1) for sample in samples], axis=1)


def bootstrap_metrics(pooled, task_means) -> dict:
    """The metrics of `aggregate_metrics` for every bootstrap resample at once: {name: (reps,)}."""
    return {
        "IQM": iqm(pooled),
        "median": np.median(task_means, axis=1),
        "mean": task_means.mean(axis=1),
        "optimality gap": 1.0 - np.minimum(pooled, 1.0).mean(axis=1),
    }


def percentile_interval(values, confidence: float = 0.95):
    """Percentile-method bootstrap interval (numpy's linear interpolation between order statistics)."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def aggregate_with_intervals(scores_by_task, reps: int, seed: int) -> dict:
    """{metric: (point estimate, CI low, CI high)} with 95 % stratified-bootstrap intervals."""
    point = aggregate_metrics(scores_by_task)
    resampled = bootstrap_metrics(*stratified_bootstrap(scores_by_task, reps, seed))
    return {name: (point[name], *percentile_interval(resampled[name])) for name in point}


def performance_profile(scores_by_task, thresholds, reps: int, seed: int):
    """Fraction of all runs whose score exceeds each threshold (rliable's score distribution),
    with 95 % stratified-bootstrap intervals: (fraction, low, high), each of shape (thresholds,)."""
    pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores_by_task])
    fraction = np.array([np.mean(pooled > tau) for tau in thresholds])
    resampled, _ = stratified_bootstrap(scores_by_task, reps, seed)
    bounds = np.array([percentile_interval(np.mean(resampled > tau, axis=1)) for tau in thresholds])
    return fraction, bounds[:, 0], bounds[:, 1]


# Reading run folders
def read_event_file(path: str):
    """({tag: [(step, value)]}, None) from one event file, read record by record with TensorBoard's own
    reader; a damaged record (a truncated file, a failed checksum, garbage) ends the reading and its
    reason comes back instead of None, with the points read before it. A resumed run's SummaryWriter(purge_step=N)
    opens its file with a session start at step N: that step comes back under the key None."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow

    points, records = defaultdict(list), 0
    try:
        reader = pywrap_tensorflow.PyRecordReader_New(path)
        while True:
            reader.GetNext()
            event = event_pb2.Event.FromString(reader.record())
            records += 1
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                points[None].append((event.step, None))
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    points[value.tag].append((event.step, value.simple_value))
    except errors.OutOfRangeError:  # the end of a complete file
        return points, None
    except (errors.OpError, DecodeError, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).replace(path, "the file")
        return points, f"{os.path.basename(path)} is damaged after {records} events ({reason})"


def read_event_scalars(run_dir: str, problems=None) -> dict:
    """{tag: (steps, values)} from every event file of a run folder, oldest file first. A resumed
    run re-logs the steps after its last checkpoint: points of a later file replace the earlier
    points at or after that file's first step for the same tag, and a file that starts with a purge step
    (a resume from the checkpoint at that step) drops every earlier point at or after it, of every tag, as
    TensorBoard does (what a killed process logged past its last checkpoint). Damage that loses points goes to
    `problems`: the newest file damaged, or an older one with no event readable (an older file
    that ends in a partial record is what a kill leaves before a resume)."""
    merged = {}
    paths = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")), key=event_file_time)
    for index, path in enumerate(paths):
        points_by_tag, damage = read_event_file(path)
        if damage and problems is not None and (index == len(paths) - 1 or not points_by_tag):
            problems.append(damage)
        for purge_step, _ in points_by_tag.pop(None, [])[:1]:
            merged = {tag: [p for p in points if p[0] < purge_step] for tag, points in merged.items()}
        for tag, points in points_by_tag.items():
            first_step = points[0][0]
            merged[tag] = [p for p in merged.get(tag, []) if p[0] < first_step] + points
    return {tag: (np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=np.float64))
            for tag, points in merged.items()}


def event_file_time(path: str):
    """Event files are named events.out.tfevents.{unix time}.{host}...: order by that time."""
    match = re.match(r"events\.out\.tfevents\.(\d+)", os.path.basename(path))
    return (int(match.group(1)) if match else 0, path)


def find_run_dirs(root: str):
    """Every folder under root that holds event files, or config.json under a run folder's name
    ({env_id}__{exp_name}__{seed}__{time}): a run folder, or what is left of one."""
    events = glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)
    configs = [path for path in glob.glob(os.path.join(root, "**", "config.json"), recursive=True)
               if len(os.path.basename(os.path.dirname(path)).split("__")) == 4]
    return sorted({os.path.dirname(path) for path in events + configs})


def read_config(run_dir: str):
    """(config, None), or (None, why the run folder's config.json cannot be used)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return None, "no config.json (every script writes one when it starts)"
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        return None, f"config.json is not readable JSON ({error})"
    if not isinstance(config, dict) or not isinstance(config.get("env_id"), str):
        return None, "config.json is not a JSON object with a string env_id"
    return config, None


def score_normalizer(config: dict):
    """(name of the normalisation, function raw return -> score) for a run's env id and config."""
    env_id = str(config.get("env_id", ""))
    procgen_game = re.sub(r"(easy|hard)?(-v\d+)?$", "", env_id.lower())
    if procgen_game in utils.PROCGEN_SCORE_RANGES:
        mode = str(config.get("distribution_mode", "easy")).lower()
        if mode in utils.PROCGEN_SCORE_RANGES[procgen_game]:
            return f"Procgen min-max ({mode})", lambda r: utils.procgen_normalized_score(procgen_game, mode, r)
    atari_game = re.sub(r"(NoFrameskip)?-v\d+$", "", env_id)
    if atari_game in utils.ATARI_RANDOM_HUMAN:
        return "Atari human-normalised", lambda r: utils.atari_human_normalized_score(atari_game, r)
    return "raw return", lambda r: r


def load_run(run_dir: str, last_episodes: int) -> dict:
    """One run folder -> its config, final scores per split, learning curves and parameter count;
    "skip" says why the folder cannot be scored at all (None when it can)."""
    config, problem = read_config(run_dir)
    if problem:
        return {"dir": run_dir, "skip": problem}
    if not glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        return {"dir": run_dir, "skip": "no TensorBoard event file"}
    damage = []
    scalars = read_event_scalars(run_dir, damage)
    if not scalars and damage:
        return {"dir": run_dir, "skip": "no event readable: " + "; ".join(damage)}
    normalization, normalize = score_normalizer(config)
    is_procgen = normalization.startswith("Procgen")
    run = {
        "dir": run_dir, "skip": None, "config": config, "env_id": config["env_id"], "seed": config.get("seed"),
        "finished": os.path.isfile(os.path.join(run_dir, "final.pt")), "normalization": normalization,
        "final": {}, "curves": {}, "warnings": [f"{run_dir}: {problem}: later points are lost" for problem in damage],
        "parameters": sum(scalars[tag][1][0] for tag in PARAMETER_TAGS) if all(t in scalars for t in PARAMETER_TAGS) else None,
        "bottleneck": next((float(scalars[tag][1][-1]) for tag in BOTTLENECK_TAGS if tag in scalars), None),
    }
    if normalization == "raw return" and "frame_skip" in config:  # an Atari run (DQN, Rainbow) of a game not in the table
        run["warnings"].append(f"{run_dir}: no random/human scores for {run['env_id']!r} in utils.ATARI_RANDOM_HUMAN; "
                               "its raw returns are used, in a partition of their own")
    for split, tag in EVAL_RETURN_TAGS.items():
        if tag in scalars:
            steps, returns = scalars[tag]
            scores = np.array([normalize(r) for r in returns], dtype=np.float64)
            run["curves"][split] = (steps, scores)
            run["final"][split] = {"step": int(steps[-1]), "return": float(returns[-1]), "score": float(scores[-1]),
                                   "source": f"last {tag}", "evaluated": True}
            logged = scalars.get(LOGGED_NORMALIZED_TAGS.get(split, ""))
            agrees = logged is None or math.isclose(logged[1][-1], scores[-1], rel_tol=1e-4, abs_tol=1e-4)
            if normalization != "raw return" and not agrees:
                run["warnings"].append(f"{run_dir}: logged {LOGGED_NORMALIZED_TAGS[split]} {logged[1][-1]:.4f} "
                                       f"differs from the analysis' {scores[-1]:.4f}")
    if not run["final"] and "charts/episodic_return" in scalars:
        # No evaluation logged: the mean of the last training episodes stands in (says so in the output).
        split = "train_levels" if is_procgen else "eval"
        steps, returns = scalars["charts/episodic_return"]
        window = np.array([np.mean(returns[max(0, i + 1 - last_episodes):i + 1]) for i in range(len(returns))])
        scores = np.array([normalize(r) for r in window], dtype=np.float64)
        run["curves"][split] = (steps, scores)
        run["final"][split] = {"step": int(steps[-1]), "return": float(window[-1]), "score": float(scores[-1]),
                               "source": f"mean of last {min(last_episodes, len(returns))} charts/episodic_return",
                               "evaluated": False}
    return run


# Which runs can be scored, and by which statistic
def training_config(run) -> str:
    return json.dumps({key: value for key, value in run["config"].items() if key not in BOOKKEEPING_KEYS}, sort_keys=True)


def drop_incomplete_scores(runs):
    """Score a run by the statistic of its complete siblings or not at all. Within a partition, a split
    that any run scores from an evaluation is dropped from each run without that evaluation (no
    stand-in from training episodes), and a finished run whose last evaluation comes before its
    siblings' (same game and training flags: a truncated event file) is dropped from that split; so is
    a non-finite final score. Returns [(run folder, why)] for what was dropped."""
    reports, non_finite = [], set()
    for members in partition_runs(runs).values():
        for run in members:
            for split, final in list(run["final"].items()):
                if not math.isfinite(final["score"]):
                    reports.append((run["dir"], f"its {final['source']} is {final['return']}: split {split} not scored"))
                    non_finite.add((run["dir"], split))
                    del run["final"][split]
                    del run["curves"][split]
        evaluated = sorted({split for run in members for split, final in run["final"].items() if final["evaluated"]})
        for run in members:
            for split in evaluated:
                final = run["final"].get(split)
                if (final is None or not final["evaluated"]) and (run["dir"], split) not in non_finite:
                    used_instead = f"; its {final['source']} is not used instead" if final else ""
                    why = f"no {EVAL_RETURN_TAGS[split]}, which its siblings are scored by{used_instead}"
                    reports.append((run["dir"], why))
                    run["final"].pop(split, None)
                    run["curves"].pop(split, None)
        last_step = defaultdict(int)  # (split, game, training flags) -> the finished siblings' last evaluation step
        for run in members:
            for split, final in run["final"].items():
                if run["finished"] and final["evaluated"]:
                    key = (split, run["env_id"], training_config(run))
                    last_step[key] = max(last_step[key], final["step"])
        for run in members:
            for split, final in list(run["final"].items()):
                expected = last_step[(split, run["env_id"], training_config(run))]
                if run["finished"] and final["evaluated"] and final["step"] < expected:
                    why = (f"last {EVAL_RETURN_TAGS[split]} at step {final['step']}, its finished siblings' (same game "
                           f"and flags) at {expected}: its events end early (a truncated event file?)")
                    reports.append((run["dir"], why))
                    del run["final"][split]
                    del run["curves"][split]
    return reports


def collect_runs(root, last_episodes=10, include_unfinished=False) -> dict:
    """Every run folder under root, loaded and screened: {"found", "runs" (to score), "unfinished",
    "no_score", "left_out": [(run folder, why it is skipped or not scored completely)]}."""
    run_dirs = find_run_dirs(root)
    loaded = [load_run(run_dir, last_episodes) for run_dir in run_dirs]
    left_out = [(run["dir"], run["skip"]) for run in loaded if run["skip"]]
    runs = [run for run in loaded if not run["skip"]]
    unfinished = [run for run in runs if not run["finished"]]
    if not include_unfinished:
        left_out += [(run["dir"], "unfinished (no final.pt); --include-unfinished uses it") for run in unfinished]
        runs = [run for run in runs if run["finished"]]
    no_score = [run for run in runs if not run["final"]]
    left_out += [(run["dir"], "no return logged (no eval/.../return, charts/iteration_return or charts/episodic_return)")
                 for run in no_score]
    runs = [run for run in runs if run["final"]]
    left_out += drop_incomplete_scores(runs)
    return {"found": len(run_dirs), "runs": [run for run in runs if run["final"]], "unfinished": len(unfinished),
            "no_score": len(no_score), "left_out": sorted(left_out)}


# Grouping runs by the flags that vary
def partition_runs(runs):
    """Runs share a partition when their experiment names share the stem before the first `-` (the
    script, for sweep runs) and their scores the normalisation; a config key that only some of them
    have (a flag added later) reads as None in the others."""
    partitions = defaultdict(list)
    for run in runs:
        partitions[(run["normalization"], str(run["config"].get("exp_name", "runs")).split("-")[0])].append(run)
    named = {}
    for (normalization, stem), members in sorted(partitions.items()):
        name, suffix = stem, 2
        while name in named:
            name, suffix = f"{stem}_{suffix}", suffix + 1
        named[name] = members
    return named


def varied_keys(runs, group_by=None):
    if group_by:
        return list(group_by)
    keys = sorted({key for run in runs for key in run["config"]} - BOOKKEEPING_KEYS)
    values_by_game = defaultdict(lambda: defaultdict(set))
    for run in runs:
        for key in keys:
            values_by_game[key][run["env_id"]].add(json.dumps(run["config"].get(key), sort_keys=True))
    # a key that varies only between games (SAC's per-task action repeat) is part of the game, not a group
    return [key for key in keys if any(len(values) > 1 for values in values_by_game[key].values())]


def group_label(group: tuple) -> str:
    return ", ".join(f"{key}={value}" for key, value in group) or "all runs"


def group_runs(runs, keys):
    """{group (tuple of (key, value)): runs}, groups in sorted order of their values."""
    groups = defaultdict(list)
    for run in runs:
        groups[tuple((key, hashable(run["config"].get(key))) for key in keys)].append(run)
    return dict(sorted(groups.items(), key=lambda item: [sort_value(v) for _, v in item[0]]))


def hashable(value):
    """A config value as a group key: lists and objects (a tuple flag) as their JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def sort_value(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def scores_by_task(runs, split):
    """[(env_id, scores of its runs)] for the runs that have a final score on `split`."""
    by_task = defaultdict(list)
    for run in runs:
        if split in run["final"]:
            by_task[run["env_id"]].append(run["final"][split]["score"])
    return sorted(by_task.items())


def learning_curve(runs, split, points: int, reps: int, seed: int):
    """IQM over all runs vs environment steps at the runs' evaluation steps when all runs share them,
    else with each run's curve linearly interpolated onto a common grid of `points` steps up to the
    shortest run's last evaluation; 95 % stratified-bootstrap intervals."""
    curves = [(run["env_id"], run["curves"][split]) for run in runs if split in run["curves"]]
    if not curves:
        return None
    if all(np.array_equal(steps, curves[0][1][0]) for _, (steps, _) in curves):
        grid = curves[0][1][0]  # every run evaluated at the same steps: no interpolation needed
    else:
        last_step = min(steps[-1] for _, (steps, _) in curves)
        first_step = max(steps[0] for _, (steps, _) in curves)
        grid = np.unique(np.linspace(first_step, last_step, points).round())
    by_task = defaultdict(list)
    for env_id, (steps, scores) in curves:
        by_task[env_id].append(np.interp(grid, steps, scores))
    tasks = [np.array(rows) for _, rows in sorted(by_task.items())]  # (runs of a task, grid points)
    value, low, high = [], [], []
    for i in range(len(grid)):
        at_step = [rows[:, i] for rows in tasks]
        value.append(iqm(np.concatenate(at_step)))
        resampled, _ = stratified_bootstrap(at_step, reps, seed)
        low_i, high_i = percentile_interval(iqm(resampled))
        low.append(low_i)
        high.append(high_i)
    return grid, np.array(value), np.array(low), np.array(high)


# Plots (matplotlib, Agg: no display needed)
def new_figure(width=6.4, height=4.2, columns=1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, columns, figsize=(width * columns, height), squeeze=False)
    return plt, figure, axes[0]


def save_figure(plt, figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def score_axis_label(normalization: str) -> str:
    return "raw return" if normalization == "raw return" else f"normalised score: {normalization}"


def plot_learning_curves(path, title, normalization, curves):
    plt, figure, (axis,) = new_figure()
    for label, (steps, value, low, high) in curves.items():
        axis.plot(steps, value, marker="o" if len(steps) < 10 else None, label=label)
        axis.fill_between(steps, low, high, alpha=0.2)
    axis.set(xlabel="environment steps", ylabel=f"IQM {score_axis_label(normalization)}", title=title)
    axis.legend(fontsize=7)
    save_figure(plt, figure, path)


def plot_performance_profiles(path, title, normalization, thresholds, profiles):
    plt, figure, (axis,) = new_figure()
    for label, (fraction, low, high) in profiles.items():
        axis.plot(thresholds, fraction, label=label)
        axis.fill_between(thresholds, low, high, alpha=0.2)
    axis.set(xlabel=f"{score_axis_label(normalization)} τ", ylabel="fraction of runs with score > τ", title=title,
             ylim=(0, 1.02))
    axis.legend(fontsize=7)
    save_figure(plt, figure, path)


def plot_aggregates(path, title, aggregates):
    names = ["IQM", "median", "mean", "optimality gap"]
    plt, figure, axes = new_figure(width=3.2, height=0.9 + 0.35 * len(aggregates), columns=4)
    labels = list(aggregates)
    for axis, name in zip(axes, names):
        for row, label in enumerate(labels):
            point, low, high = aggregates[label][name]
            axis.plot([low, high], [row, row], linewidth=6, alpha=0.5)
            axis.plot([point], [row], "k|", markersize=12)
        axis.set_yticks(range(len(labels)), labels if axis is axes[0] else [""] * len(labels), fontsize=7)
        axis.set_title(name)
    figure.suptitle(title, fontsize=9)
    save_figure(plt, figure, path)


def plot_score_vs(path, title, normalization, xlabel, series, log_x=False):
    """series: {label: [(x, (IQM, low, high)), ...]} -> IQM with 95 % interval bars against x."""
    plt, figure, (axis,) = new_figure()
    for label, points in series.items():
        points = sorted(points)
        xs = [x for x, _ in points]
        ys = np.array([v[0] for _, v in points])
        errors = np.array([[v[0] - v[1], v[2] - v[0]] for _, v in points]).T
        axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
    if log_x:
        axis.set_xscale("log")
    axis.set(xlabel=xlabel, ylabel=f"IQM {score_axis_label(normalization)}", title=title)
    axis.legend(fontsize=7)
    save_figure(plt, figure, path)


def plot_score_vs_bottleneck(path, title, normalization, points):
    """points: {method: [(bottleneck parameters, final score), ...]} -> one dot per run, a colour per method, log x."""
    plt, figure, (axis,) = new_figure()
    colours = plt.get_cmap("tab20" if len(points) <= 20 else "turbo").resampled(max(len(points), 2))
    for index, (label, xy) in enumerate(points.items()):
        axis.scatter([x for x, _ in xy], [y for _, y in xy], s=16, alpha=0.8, color=colours(index), label=label)
    axis.set_xscale("log")
    axis.set(xlabel="bottleneck parameters (non-zero ones when sparse)", ylabel=f"final {score_axis_label(normalization)}",
             title=title)
    axis.legend(fontsize=6)
    save_figure(plt, figure, path)


# The summary: every number the outputs show, computed once
def summarize(collected, reps=50_000, curve_reps=2_000, seed=0, group_by=None, curve_points=50) -> dict:
    """The numbers of `collect_runs`' answer, as data (nothing is written): {"partitions": {name:
    {"normalization", "group_keys", "runs", "splits": {split: see summarize_split}}}, "warnings",
    "left_out"}. A group is a tuple of (config key, value)."""
    runs = collected["runs"]
    summary = {"partitions": {}, "warnings": [w for run in runs for w in run["warnings"]], "left_out": collected["left_out"]}
    for name, members in partition_runs(runs).items():
        keys = varied_keys(members, group_by)
        groups = group_runs(members, keys)
        normalization = members[0]["normalization"]
        splits = [split for split in EVAL_RETURN_TAGS if any(split in run["final"] for run in members)]
        summary["partitions"][name] = {
            "normalization": normalization, "group_keys": keys, "runs": members,
            "splits": {split: summarize_split(groups, split, normalization, reps, curve_reps, seed, curve_points)
                       for split in splits},
        }
    return summary


def summarize_split(groups, split, normalization, reps, curve_reps, seed, curve_points) -> dict:
    """One split of one partition, per group that scores it: "per_game" [(env_id, final scores)],
    "aggregates" {metric: (point, CI low, CI high)}, "profiles" (thresholds, {group: profile}),
    "curves" (learning curve or None), "parameters" (median parameter count of its runs, or None) and "bottleneck"
    [(bottleneck parameters, final score)] of each run that logged its count (BOTTLENECK_TAGS)."""
    per_group = {group: scores_by_task(members, split) for group, members in groups.items()}
    per_group = {group: tasks for group, tasks in per_group.items() if tasks}
    aggregates = {group: aggregate_with_intervals([s for _, s in tasks], reps, seed) for group, tasks in per_group.items()}
    if normalization == "raw return":  # the gap to a score of 1 means nothing for raw returns (DMC)
        for metrics in aggregates.values():
            metrics["optimality gap"] = (math.nan, math.nan, math.nan)
    all_scores = np.concatenate([s for tasks in per_group.values() for _, s in tasks])
    high = max(1.0, float(all_scores.max())) if normalization != "raw return" else float(all_scores.max())
    low = min(0.0, float(all_scores.min()))
    thresholds = np.linspace(low, high, 101)
    profiles = {group: performance_profile([s for _, s in tasks], thresholds, reps, seed)
                for group, tasks in per_group.items()}
    parameters = {group: [run["parameters"] for run in groups[group] if run["parameters"] is not None] for group in per_group}
    bottleneck = {group: [(run["bottleneck"], run["final"][split]["score"]) for run in groups[group]
                          if split in run["final"] and run["bottleneck"] is not None] for group in per_group}
    return {
        "aggregates": aggregates, "per_game": per_group, "profiles": (thresholds, profiles),
        "curves": {group: learning_curve(groups[group], split, curve_points, curve_reps, seed) for group in per_group},
        "parameters": {group: float(np.median(counts)) if counts else None for group, counts in parameters.items()},
        "bottleneck": {group: points for group, points in bottleneck.items() if points},
    }


# The outputs: PNGs, summary.md and scores.csv, from the summary
METRICS = ("IQM", "median", "mean", "optimality gap")
CSV_HEADER = ["partition", "group", "env_id", "seed", "split", "step", "return", "score", "normalization", "source",
              "parameters", "bottleneck_parameters", "finished", "run_dir"]


def format_interval(value):
    point, low, high = value
    return "–" if math.isnan(point) else f"{point:.3f} [{low:.3f}, {high:.3f}]"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def per_game_cell(scores):
    if scores is None:
        return "–"
    return f"{np.mean(scores):.3f} ± {np.std(scores):.3f} ({len(scores)})"


def header_lines(collected, root, reps, curve_reps, seed, last_episodes, include_unfinished) -> list:
    """summary.md's title, what was found and used, and how scores and aggregates are computed."""
    unfinished, no_score, left_out = collected["unfinished"], collected["no_score"], collected["left_out"]
    counts = [f"{collected['found']} run folders found; {len(collected['runs'])} used."]
    if unfinished:
        counts.append(f"{unfinished} unfinished (no final.pt) " + ("included." if include_unfinished else "left out."))
    if no_score:
        counts.append(f"{no_score} without any return logged left out.")
    if left_out:
        counts.append(f"{len(left_out)} skipped or not scored completely: see 'Runs left out'.")
    method = ("Final score of a run = its last evaluation (`eval/.../return`), normalised here from the config "
              "(Procgen min-max by distribution mode, Atari human-normalised, otherwise the raw return); "
              "split `iteration` (Rainbow, DER) = its last `charts/iteration_return`, the mean return of the training "
              "games of the last iteration, which is the score Dopamine and the GAP paper report; "
              f"a run without evaluation falls back to the mean of its last {last_episodes} training episodes "
              "(`charts/episodic_return`), marked in scores.csv, only when none of its partition is evaluated: a run is "
              "scored by its siblings' statistic or left out. Aggregates: IQM and optimality gap (γ = 1) over "
              "all runs, median and mean over per-game means; 95 % stratified-bootstrap percentile intervals "
              f"({reps} resamples, seed {seed}). Learning curves: IQM at each step ({curve_reps} resamples).")
    return [f"# Analysis of `{root}`", "", " ".join(counts), "", method, ""]


def partition_lines(name, partition) -> list:
    """summary.md's section of one partition: its grouping and games, then per split the aggregates
    table and the final score per game."""
    games = sorted({run["env_id"] for run in partition["runs"]})
    lines = [f"## {name} ({partition['normalization']})", "",
             f"Grouped by: {', '.join(partition['group_keys']) or 'nothing varies'}. Games: {', '.join(games)}.", ""]
    for split, data in partition["splits"].items():
        per_group = data["per_game"]
        lines += [f"### {split}: aggregates", ""]
        lines += markdown_table(["group", "runs", "games", "IQM [95% CI]", "median", "mean", "optimality gap"],
                                [[group_label(g), sum(len(s) for _, s in per_group[g]), len(per_group[g])]
                                 + [format_interval(a[m]) for m in METRICS] for g, a in data["aggregates"].items()])
        unequal = [group_label(g) for g, tasks in per_group.items() if len({len(s) for _, s in tasks}) > 1]
        if unequal:
            lines += ["", f"Unequal runs per game in: {'; '.join(unequal)} "
                          "(IQM and optimality gap then weight games by their runs)."]
        split_games = sorted({env for tasks in per_group.values() for env, _ in tasks})
        lines += ["", f"### {split}: final score per game (mean ± sd over runs, n)", ""]
        lines += markdown_table(["game"] + [group_label(g) for g in per_group],
                                [[game] + [per_game_cell(dict(per_group[g]).get(game)) for g in per_group]
                                 for game in split_games])
        lines += [""]
    return lines


def plot_split(prefix, title, partition, data):
    """The PNGs of one split: aggregates, performance profiles, learning curves, and the IQM against
    every numeric grouping flag and, when every group logged them, against the parameter count."""
    normalization, keys, aggregates = partition["normalization"], partition["group_keys"], data["aggregates"]
    thresholds, profiles = data["profiles"]
    per_group = data["per_game"]
    labels = {group: group_label(group) for group in per_group}
    plot_aggregates(prefix + "_aggregates.png", f"{title}: 95% stratified-bootstrap CIs",
                    {labels[g]: a for g, a in aggregates.items()})
    plot_performance_profiles(prefix + "_performance_profile.png", title, normalization, thresholds,
                              {labels[g]: p for g, p in profiles.items()})
    plot_learning_curves(prefix + "_learning_curves.png", title, normalization,
                         {labels[g]: c for g, c in data["curves"].items() if c is not None})
    for key in keys:  # score vs resolution / width / dense scale / any numeric flag
        if all(isinstance(dict(g)[key], (int, float)) and not isinstance(dict(g)[key], bool) for g in per_group):
            series = defaultdict(list)
            for group, aggregate in aggregates.items():
                rest = tuple(item for item in group if item[0] != key)
                series[group_label(rest)].append((dict(group)[key], aggregate["IQM"]))
            plot_score_vs(f"{prefix}_score_vs_{key}.png", title, normalization, key, series)
    parameters = data["parameters"]
    if len(per_group) > 1 and all(count is not None for count in parameters.values()):
        series = defaultdict(list)
        for group, aggregate in aggregates.items():  # one line per pool, as in the papers' figures
            series[f"pool={dict(group)['pool']}" if "pool" in keys else "runs"].append((parameters[group], aggregate["IQM"]))
        plot_score_vs(f"{prefix}_score_vs_parameters.png", title, normalization,
                      "parameters (encoder + bottleneck + head, median over runs)", series, log_x=True)
    if data["bottleneck"]:  # one dot per run against its bottleneck's weights (the non-zero ones under sparse training)
        plot_score_vs_bottleneck(f"{prefix}_score_vs_bottleneck_parameters.png", title, normalization,
                                 {labels[group]: points for group, points in data["bottleneck"].items()})


def score_rows(name, partition) -> list:
    """scores.csv's rows of one partition: one per run and split scored (CSV_HEADER)."""
    keys, rows = partition["group_keys"], []
    for run in partition["runs"]:
        group = group_label(tuple((k, run["config"].get(k)) for k in keys))
        for split, final in run["final"].items():
            rows.append([name, group, run["env_id"], run["seed"], split, final["step"], final["return"], final["score"],
                         partition["normalization"], final["source"], run["parameters"], run["bottleneck"], run["finished"],
                         run["dir"]])
    return rows


def write_outputs(summary, collected, root, out, reps, curve_reps, seed, last_episodes, include_unfinished):
    """Write the summary's PNGs, summary.md and scores.csv to `out`."""
    os.makedirs(out, exist_ok=True)
    lines = header_lines(collected, root, reps, curve_reps, seed, last_episodes, include_unfinished)
    rows = []
    for name, partition in summary["partitions"].items():
        lines += partition_lines(name, partition)
        for split, data in partition["splits"].items():
            plot_split(os.path.join(out, f"{name}_{split}"), f"{name}, {split}", partition, data)
        rows += score_rows(name, partition)
    if summary["left_out"]:
        lines += ["## Runs left out", "", "Skipped, or not scored on every split:", ""]
        lines += [f"- `{run_dir}`: {why}" for run_dir, why in summary["left_out"]] + [""]
    if summary["warnings"]:
        lines += ["## Warnings", ""] + [f"- {warning}" for warning in summary["warnings"]] + [""]
    pngs = sorted(os.path.basename(path) for path in glob.glob(os.path.join(out, "*.png")))
    lines += ["Files: " + ", ".join(pngs) + ", scores.csv.", ""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out, "scores.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)


def analyze(root, out, reps=50_000, curve_reps=2_000, seed=0, last_episodes=10, include_unfinished=False,
            group_by=None, curve_points=50, collected=None):
    """Read every run under `root` (or take `collect_runs`' answer), write the PNGs, summary.md and
    scores.csv to `out`; return the summary (the numbers the outputs show, see `summarize`)."""
    collected = collected or collect_runs(root, last_episodes, include_unfinished)
    summary = summarize(collected, reps, curve_reps, seed, group_by, curve_points)
    write_outputs(summary, collected, root, out, reps, curve_reps, seed, last_episodes, include_unfinished)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder holding run folders (searched recursively)")
    parser.add_argument("--out", default="analysis", help="output folder for the PNGs, summary.md and scores.csv")
    parser.add_argument("--reps", type=int, default=50_000,
                        help="bootstrap resamples for aggregates and profiles (rliable: 50,000)")
    parser.add_argument("--curve-reps", type=int, default=2_000, help="bootstrap resamples per learning-curve point")
    parser.add_argument("--curve-points", type=int, default=50, help="steps at which learning curves are evaluated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--last-episodes", type=int, default=10, help="episodes averaged when a run has no evaluation")
    parser.add_argument("--include-unfinished", action="store_true", help="also use runs without final.pt")
    parser.add_argument("--group-by", default="",
                        help="comma-separated config keys to group by (default: every key that varies)")
    parser.error = utils.fail  # a wrong or unknown flag: one line, exit 2
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        utils.fail(f"RUNS_ROOT {args.root!r} is not a folder")
    for flag in ("reps", "curve_reps", "curve_points", "last_episodes"):
        if not getattr(args, flag) > 0:
            utils.fail(f"--{flag.replace('_', '-')} {getattr(args, flag)!r} must be positive")
    for flag, most in (("reps", 1_000_000), ("curve_reps", 1_000_000), ("curve_points", 10_000)):  # resamples are held at once
        if getattr(args, flag) > most:
            utils.fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at most {most:,}")
    if args.seed < 0:
        utils.fail(f"--seed {args.seed} must be 0 or more (numpy's default_rng)")
    utils.check_writable_folder("out", args.out)
    run_dirs = find_run_dirs(args.root)
    if not run_dirs:
        utils.fail(f"RUNS_ROOT {args.root!r} holds no run folder (config.json + TensorBoard events)")
    group_by = [key.strip().replace("-", "_") for key in args.group_by.split(",") if key.strip()]
    known_keys = {key for run_dir in run_dirs for key in (read_config(run_dir)[0] or {})}
    for key in group_by:
        if key not in known_keys:
            utils.fail(f"--group-by {key!r} is no config key of these runs; "
                       f"they have: {', '.join(sorted(known_keys)) or 'no readable config'}")
    collected = collect_runs(args.root, args.last_episodes, args.include_unfinished)
    if not collected["runs"]:
        utils.fail(f"RUNS_ROOT {args.root!r} holds no run that can be scored: "
                   + "; ".join(f"{os.path.relpath(run_dir, args.root)}: {why}" for run_dir, why in collected["left_out"]))
    results = analyze(args.root, args.out, args.reps, args.curve_reps, args.seed, args.last_episodes,
                      args.include_unfinished, group_by, args.curve_points, collected)
    for run_dir, why in results["left_out"]:
        print(f"left out: {run_dir}: {why}", file=sys.stderr)
    for warning in results["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {os.path.join(args.out, 'summary.md')}")


if __name__ == "__main__":
    main()
