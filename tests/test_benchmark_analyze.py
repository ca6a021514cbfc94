"""benchmark/analyze.py: aggregates and bootstrap intervals against slow references, score
normalisation from the config, final-score rules, grouping, and the command end to end on
synthetic run folders written exactly as the scripts write them (config.json + SummaryWriter)."""
import csv
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import analyze  # noqa: E402


# Synthetic run folders, as utils.start_run + the scripts' SummaryWriter write them
def write_run(root, env_id, seed, config, scalars, finished=True, unix_time=1700000000):
    from torch.utils.tensorboard import SummaryWriter

    exp_name = config.get("exp_name", "ppo_procgen_impoola")
    run_dir = os.path.join(root, f"{env_id}__{exp_name}__{seed}__{unix_time}")
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    full_config = {"env_id": env_id, "seed": seed, "exp_name": exp_name, "runs_dir": root, "resume": "", "cuda": True,
                   "track": False, "capture_video": False, "total_timesteps": 100, "pool": "flatten", "width": 1,
                   "dense_scale": 1, "resolution": 64, "eval_every": 50, "save_every": 50, "diag_every": 50}
    full_config.update(config)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(full_config, f, indent=2, sort_keys=True)
    writer = SummaryWriter(run_dir)
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()
    if finished:
        open(os.path.join(run_dir, "final.pt"), "wb").close()
    return run_dir


PROCGEN_RANGES_EASY = {"bigfish": (1, 40), "starpilot": (2.5, 64), "coinrun": (5, 10)}  # REFERENCE §2, typed by hand
# Normalised final test-level scores of the synthetic Procgen runs, by pool, game, seed.
TEST_SCORES = {
    "avg": {"bigfish": [0.2, 0.5, 0.8], "starpilot": [0.1, 0.3, 0.9], "coinrun": [0.4, 0.6, 1.2]},
    "flatten": {"bigfish": [0.1, 0.1, 0.4], "starpilot": [0.0, 0.2, 0.3], "coinrun": [0.2, 0.5, 0.6]},
}


def procgen_return(game, score):
    low, high = PROCGEN_RANGES_EASY[game]
    return low + score * (high - low)


def write_procgen_sweep(root):
    for pool, games in TEST_SCORES.items():
        for game, scores in games.items():
            for seed, score in enumerate(scores, start=1):
                train = min(score + 0.25, 1.5)
                config = {"pool": pool, "distribution_mode": "easy", "exp_name": f"ppo_procgen_impoola-pool_{pool}"}
                write_run(root, game, seed, config, {
                    "eval/test_levels/return": [(0, procgen_return(game, 0.0)), (50, procgen_return(game, score / 2)),
                                                (100, procgen_return(game, score))],
                    "eval/train_levels/return": [(0, procgen_return(game, 0.0)), (100, procgen_return(game, train))],
                    "eval/test_levels/normalized_score": [(100, score)],
                    "charts/episodic_return": [(10, 1.0), (20, 2.0)],
                    "diag/params/encoder": [(0, 1000.0)],
                    "diag/params/bottleneck": [(0, 4096.0 if pool == "flatten" else 64.0)],
                    "diag/params/head": [(0, 100.0)],
                })


# Statistics against slow, loop-based references
def slow_iqm(values):
    ordered = sorted(values)
    cut = len(ordered) // 4
    middle = ordered[cut:len(ordered) - cut]
    return sum(middle) / len(middle)


def slow_metrics(tasks):
    pooled = [x for scores in tasks for x in scores]
    task_means = [sum(s) / len(s) for s in tasks]
    return {"IQM": slow_iqm(pooled), "median": statistics.median(task_means), "mean": sum(task_means) / len(task_means),
            "optimality gap": 1 - sum(min(x, 1.0) for x in pooled) / len(pooled)}


def slow_percentile(values, q):
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def test_iqm_by_hand():
    assert analyze.iqm([8, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx((3 + 4 + 5 + 6) / 4)  # cut 2 each side of 8
    assert analyze.iqm([1, 2, 3, 4, 5, 6, 7, 8, 9, 100]) == pytest.approx((3 + 4 + 5 + 6 + 7 + 8) / 6)  # cut 2 of 10
    assert analyze.iqm([5, 1, 3]) == pytest.approx(3)  # int(3/4) = 0: nothing cut


def test_iqm_of_a_table_is_the_iqm_of_each_row():
    """The bootstrap's form: one resample per row, as in aggregates and learning curves."""
    rows = [[8, 1, 7, 2, 6, 3, 5, 4], [1, 2, 3, 4, 5, 6, 7, 100], [0.5, 0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.4]]
    np.testing.assert_allclose(analyze.iqm(np.array(rows)), [slow_iqm(row) for row in rows])


def test_aggregate_metrics_by_hand():
    tasks = [[0.2, 0.5, 0.8], [0.1, 0.3, 0.9], [0.4, 0.6, 1.2]]
    metrics = analyze.aggregate_metrics(tasks)
    assert metrics["IQM"] == pytest.approx((0.3 + 0.4 + 0.5 + 0.6 + 0.8) / 5)
    assert metrics["median"] == pytest.approx(0.5)  # task means 0.5, 0.4333, 0.7333
    assert metrics["mean"] == pytest.approx((0.5 + 1.3 / 3 + 2.2 / 3) / 3)
    assert metrics["optimality gap"] == pytest.approx(1 - 4.8 / 9)  # 1.2 counts as 1.0
    assert metrics == pytest.approx(slow_metrics(tasks))


def test_median_and_mean_weight_each_game_equally():
    tasks = [[0.0], [1.0, 1.0, 1.0]]
    metrics = analyze.aggregate_metrics(tasks)
    assert metrics["mean"] == pytest.approx(0.5) and metrics["median"] == pytest.approx(0.5)


def test_bootstrap_intervals_match_loop_reference_with_same_draws():
    tasks = [[0.2, 0.5, 0.8, 0.1], [0.1, 0.3, 0.9], [0.4, 0.6, 1.2, 0.0, 0.7]]
    reps, seed = 300, 7
    intervals = analyze.aggregate_with_intervals(tasks, reps, seed)
    rng = np.random.default_rng(seed)  # the documented draws: per task, integers(0, n, size=(reps, n))
    index_tables = [rng.integers(0, len(s), size=(reps, len(s))) for s in tasks]
    resampled = [slow_metrics([[s[i] for i in table[r]] for s, table in zip(tasks, index_tables)]) for r in range(reps)]
    for name, (point, low, high) in intervals.items():
        values = [metrics[name] for metrics in resampled]
        assert point == pytest.approx(slow_metrics(tasks)[name])
        assert low == pytest.approx(slow_percentile(values, 2.5))
        assert high == pytest.approx(slow_percentile(values, 97.5))


def test_bootstrap_iqm_interval_agrees_with_independent_random_stream():
    tasks = [[0.2, 0.5, 0.8, 0.1, 0.45], [0.1, 0.3, 0.9, 0.35, 0.5], [0.4, 0.6, 1.2, 0.0, 0.7]]
    _, low, high = analyze.aggregate_with_intervals(tasks, 4000, 0)["IQM"]
    stream = random.Random(12345)  # Python's own generator, resampling one run at a time
    values = [slow_iqm([stream.choice(s) for s in tasks for _ in s]) for _ in range(4000)]
    assert low == pytest.approx(slow_percentile(values, 2.5), abs=0.03)
    assert high == pytest.approx(slow_percentile(values, 97.5), abs=0.03)


def test_bootstrap_of_constant_scores_has_zero_width():
    point, low, high = analyze.aggregate_with_intervals([[0.3, 0.3], [0.3]], 100, 0)["IQM"]
    assert point == pytest.approx(0.3) and low == pytest.approx(0.3) and high == pytest.approx(0.3)


def test_performance_profile_is_fraction_of_runs_above_threshold():
    tasks = [[0.1, 0.5], [0.9, 0.3]]
    thresholds = [0.0, 0.2, 0.5, 0.95]
    fraction, low, high = analyze.performance_profile(tasks, thresholds, 200, 3)
    np.testing.assert_allclose(fraction, [4 / 4, 3 / 4, 1 / 4, 0 / 4])  # strictly above: 0.5 is not > 0.5
    assert np.all(low <= fraction + 1e-12) and np.all(fraction <= high + 1e-12)
    assert low[0] == high[0] == 1.0 and low[-1] == high[-1] == 0.0


# Scores of one run
def test_procgen_score_normalised_by_the_configs_distribution_mode(tmp_path):
    run_dir = write_run(str(tmp_path), "bigfish", 1, {"distribution_mode": "hard"},
                        {"eval/test_levels/return": [(100, 10.0)]})
    run = analyze.load_run(run_dir, 10)
    assert run["final"]["test_levels"]["score"] == pytest.approx((10.0 - 0) / (40 - 0))  # bigfish hard: 0, 40


def test_procgen_game_spelled_as_envpool_does_is_normalised(tmp_path):
    run_dir = write_run(str(tmp_path), "BigfishEasy-v0", 1, {"distribution_mode": "easy"},
                        {"eval/test_levels/return": [(100, 10.0)]})
    assert analyze.load_run(run_dir, 10)["final"]["test_levels"]["score"] == pytest.approx((10.0 - 1) / (40 - 1))


def test_atari_score_is_human_normalised(tmp_path):
    atari = write_run(str(tmp_path), "Pong-v5", 1, {"exp_name": "dqn_atari_gap"},
                      {"eval/return": [(50, -20.7), (100, 14.6)]})
    assert analyze.load_run(atari, 10)["final"]["eval"]["score"] == pytest.approx(1.0)  # Pong: random -20.7, human 14.6


def test_dmc_score_stays_the_raw_return(tmp_path):
    dmc = write_run(str(tmp_path), "CheetahRun-v1", 1, {"exp_name": "sac_dmc_gap"}, {"eval/return": [(100, 321.5)]})
    run = analyze.load_run(dmc, 10)
    assert run["normalization"] == "raw return" and run["final"]["eval"]["score"] == pytest.approx(321.5)


def test_final_score_is_last_evaluation(tmp_path):
    run_dir = write_run(str(tmp_path), "Breakout-v5", 1, {}, {"eval/return": [(100, 30.5), (200, 1.7), (300, 16.1)]})
    final = analyze.load_run(run_dir, 10)["final"]["eval"]
    assert final["step"] == 300 and final["return"] == pytest.approx(16.1)
    assert final["score"] == pytest.approx((16.1 - 1.7) / (30.5 - 1.7))


def test_run_without_evaluation_falls_back_to_last_training_episodes(tmp_path):
    returns = [(i * 10, float(i)) for i in range(1, 13)]  # returns 1..12
    run_dir = write_run(str(tmp_path), "CheetahRun-v1", 1, {}, {"charts/episodic_return": returns})
    final = analyze.load_run(run_dir, 4)["final"]["eval"]
    assert final["return"] == pytest.approx((9 + 10 + 11 + 12) / 4) and final["step"] == 120
    assert "last 4 charts/episodic_return" in final["source"]


def test_resumed_run_later_event_file_replaces_overlapping_steps(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = write_run(str(tmp_path), "Pong-v5", 1, {}, {"eval/return": [(100, 1.0), (200, 2.0), (300, 3.0)]}, unix_time=1)
    writer = SummaryWriter(run_dir, filename_suffix=".resumed")  # what a resume from the step-200 checkpoint writes
    for step, value in [(200, 20.0), (300, 30.0), (400, 40.0)]:
        writer.add_scalar("eval/return", value, step)
    writer.close()
    steps, values = analyze.read_event_scalars(run_dir)["eval/return"]
    assert steps.tolist() == [100, 200, 300, 400] and values.tolist() == [1.0, 20.0, 30.0, 40.0]


def test_a_resume_purges_every_tag_a_killed_process_logged_past_its_checkpoint(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = write_run(str(tmp_path), "Pong-v5", 1, {}, {"charts/episodic_return": [(100, 1.0), (200, 2.0), (300, 3.0)],
                                                         "eval/return": [(200, 5.0)]}, unix_time=1)
    writer = SummaryWriter(run_dir, filename_suffix=".resumed", purge_step=200)  # resumed from the step-200 checkpoint
    writer.add_scalar("eval/return", 6.0, 200)  # only the final evaluation: no new training episodes
    writer.close()
    scalars = analyze.read_event_scalars(run_dir)
    assert scalars["charts/episodic_return"][0].tolist() == [100]  # 200 and 300 came after the checkpoint
    assert scalars["eval/return"][1].tolist() == [6.0]


def test_disagreeing_logged_normalized_score_is_reported(tmp_path):
    run_dir = write_run(str(tmp_path), "coinrun", 1, {"distribution_mode": "easy"},
                        {"eval/test_levels/return": [(100, 7.5)], "eval/test_levels/normalized_score": [(100, 0.9)]})
    run = analyze.load_run(run_dir, 10)
    assert run["final"]["test_levels"]["score"] == pytest.approx(0.5)
    assert len(run["warnings"]) == 1 and "0.9000" in run["warnings"][0]


def test_groups_by_flags_that_vary_only(tmp_path):
    for pool in ("flatten", "avg"):
        for width in (1, 2):
            for seed in (1, 2):
                write_run(str(tmp_path), "Pong-v5", seed, {"pool": pool, "width": width, "exp_name": f"x-{pool}{width}"},
                          {"eval/return": [(1, 0.0)]})
    runs = [analyze.load_run(d, 10) for d in analyze.find_run_dirs(str(tmp_path))]
    keys = analyze.varied_keys(runs)
    assert keys == ["pool", "width"]  # seed, exp_name and run_dir are bookkeeping; resolution is the same everywhere
    groups = analyze.group_runs(runs, keys)
    assert list(groups) == [(("pool", "avg"), ("width", 1)), (("pool", "avg"), ("width", 2)),
                            (("pool", "flatten"), ("width", 1)), (("pool", "flatten"), ("width", 2))]
    assert all(len(members) == 2 for members in groups.values())


# The command end to end
@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runs"))
    write_procgen_sweep(root)
    write_run(root, "bigfish", 9, {"pool": "avg", "distribution_mode": "easy", "exp_name": "ppo_procgen_impoola-pool_avg"},
              {"eval/test_levels/return": [(100, 40.0)]}, finished=False)  # unfinished: left out
    out = os.path.join(root, "analysis")
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "analyze.py"), root, "--out", out,
                             "--reps", "2000", "--curve-reps", "200", "--curve-points", "3"],
                            capture_output=True, text=True, timeout=300)
    return result, out


def test_analysis_command_succeeds(analysis):
    result, out = analysis
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(os.path.join(out, "summary.md"))


def test_summary_counts_the_run_folders_found_used_and_left_out(analysis):
    _, out = analysis
    summary = open(os.path.join(out, "summary.md")).read()
    assert "19 run folders found; 18 used. 1 unfinished (no final.pt) left out." in summary


def test_summary_shows_hand_computed_aggregates(analysis):
    _, out = analysis
    summary = open(os.path.join(out, "summary.md")).read()
    row = next(line for line in summary.splitlines() if line.startswith("| pool=avg | 9 | 3 | 0.520 ["))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert [cell.split(" [")[0] for cell in cells[3:]] == [
        f"{0.52:.3f}", "0.500", f"{(0.5 + 1.3 / 3 + 2.2 / 3) / 3:.3f}", f"{1 - 4.8 / 9:.3f}"]
    flatten = slow_metrics(list(TEST_SCORES["flatten"].values()))
    assert f"| pool=flatten | 9 | 3 | {flatten['IQM']:.3f} [" in summary


def test_summary_shows_the_final_score_per_game_as_mean_sd_and_runs(analysis):
    _, out = analysis
    summary = open(os.path.join(out, "summary.md")).read()
    avg, flatten = [0.2, 0.5, 0.8], [0.1, 0.1, 0.4]
    assert f"| bigfish | {np.mean(avg):.3f} ± {np.std(avg):.3f} (3) | {np.mean(flatten):.3f} ±" in summary


def test_summary_has_a_section_per_split(analysis):
    _, out = analysis
    summary = open(os.path.join(out, "summary.md")).read()
    assert "### train_levels: aggregates" in summary and "### test_levels: aggregates" in summary


def test_scores_csv_has_every_finished_run_and_split(analysis):
    _, out = analysis
    rows = list(csv.DictReader(open(os.path.join(out, "scores.csv"))))
    assert len(rows) == 18 * 2


def test_scores_csv_row_holds_the_score_return_source_and_parameters(analysis):
    _, out = analysis
    rows = list(csv.DictReader(open(os.path.join(out, "scores.csv"))))
    row = next(r for r in rows if r["env_id"] == "starpilot" and r["seed"] == "3" and r["split"] == "test_levels"
               and "avg" in r["group"])
    assert float(row["score"]) == pytest.approx(0.9, abs=1e-5)
    assert float(row["return"]) == pytest.approx(2.5 + 0.9 * 61.5, rel=1e-6)
    assert row["source"] == "last eval/test_levels/return" and float(row["parameters"]) == 1164


def test_plots_are_written_as_png(analysis):
    _, out = analysis
    for split in ("train_levels", "test_levels"):
        for kind in ("aggregates", "performance_profile", "learning_curves", "score_vs_parameters"):
            with Image.open(os.path.join(out, f"ppo_procgen_impoola_{split}_{kind}.png")) as image:
                assert image.format == "PNG" and image.size[0] > 300


def test_summary_is_computed_without_writing_and_is_what_analyze_returns(tmp_path):
    write_pong_seeds(str(tmp_path / "runs"), (1, 2, 3), [(300, 0.0), (600, 14.6)])
    collected = analyze.collect_runs(str(tmp_path / "runs"))
    summary = analyze.summarize(collected, reps=50, curve_reps=10)
    assert os.listdir(tmp_path) == ["runs"]
    eval_split = summary["partitions"]["dqn_atari_gap"]["splits"]["eval"]
    assert eval_split["aggregates"][()]["mean"] == (pytest.approx(1.0),) * 3  # Pong 14.6 = the human score
    results = analyze.analyze(str(tmp_path / "runs"), str(tmp_path / "out"), reps=50, curve_reps=10, collected=collected)
    assert results["partitions"]["dqn_atari_gap"]["splits"]["eval"]["aggregates"] == eval_split["aggregates"]
    assert sorted(os.listdir(tmp_path / "out"))[-2:] == ["scores.csv", "summary.md"]


def test_learning_curve_is_iqm_over_runs_at_each_step():
    runs = [{"env_id": game, "curves": {"test_levels": (np.array([0, 50, 100]), np.array([0.0, s / 2, s]))}}
            for game, scores in TEST_SCORES["avg"].items() for s in scores]
    steps, value, low, high = analyze.learning_curve(runs, "test_levels", 3, 100, 0)
    assert steps.tolist() == [0, 50, 100]
    np.testing.assert_allclose(value, [0.0, 0.26, 0.52])
    assert np.all(low <= value + 1e-12) and np.all(value <= high + 1e-12)


def test_empty_root_is_refused_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "analyze.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "holds no run folder" in result.stderr


def test_group_by_overrides_the_automatic_grouping(tmp_path):
    for pool in ("flatten", "avg"):
        for width in (1, 2):
            write_run(str(tmp_path), "Pong-v5", 1, {"pool": pool, "width": width, "exp_name": f"x-{pool}{width}"},
                      {"eval/return": [(1, -20.7 + (14.6 + 20.7) * width / 4)]})
    results = analyze.analyze(str(tmp_path), str(tmp_path / "out"), reps=100, curve_reps=10, group_by=["width"])
    partition = results["partitions"]["x"]
    assert partition["group_keys"] == ["width"]
    per_game = partition["splits"]["eval"]["per_game"]
    assert {group: [list(s) for _, s in tasks] for group, tasks in per_game.items()} == {
        (("width", 1),): [pytest.approx([0.25, 0.25])], (("width", 2),): [pytest.approx([0.5, 0.5])]}


def test_learning_curve_interpolates_runs_evaluated_at_different_steps():
    runs = [{"env_id": "a", "curves": {"eval": (np.array([0, 100]), np.array([0.0, 1.0]))}},
            {"env_id": "a", "curves": {"eval": (np.array([0, 50, 80]), np.array([0.0, 1.0, 1.0]))}}]
    steps, value, _, _ = analyze.learning_curve(runs, "eval", 5, 50, 0)
    assert steps.tolist() == [0, 20, 40, 60, 80]  # up to the shortest run's end
    np.testing.assert_allclose(value, [np.mean([x / 100, min(x / 50, 1.0)]) for x in (0, 20, 40, 60, 80)])  # IQM of 2 = mean


def test_score_vs_plot_for_each_numeric_flag_that_varies(tmp_path):
    for pool in ("flatten", "avg"):
        for resolution in (48, 96):
            config = {"pool": pool, "resolution": resolution, "distribution_mode": "easy", "exp_name": f"p-{pool}{resolution}"}
            write_run(str(tmp_path / "runs"), "bigfish", 1, config, {"eval/test_levels/return": [(1, 20.5)]})
    analyze.analyze(str(tmp_path / "runs"), str(tmp_path / "out"), reps=50, curve_reps=10)
    written = sorted(name for name in os.listdir(tmp_path / "out") if "score_vs" in name)
    assert written == ["p_test_levels_score_vs_resolution.png"]  # pool is not numeric; no params logged here


def test_env_ids_as_the_scripts_write_them_are_normalised(tmp_path):
    """The scripts' config.json holds plain names: `Pong` (Atari, human-normalised), `cheetah-run` (DMC, raw)."""
    write_run(str(tmp_path), "Pong", 1, {"exp_name": "dqn_atari_gap"}, {"eval/return": [(1, -20.7 + 0.5 * (14.6 + 20.7))]})
    write_run(str(tmp_path), "cheetah-run", 1, {"exp_name": "sac_dmc_gap"}, {"eval/return": [(1, 321.0)]})
    results = analyze.analyze(str(tmp_path), str(tmp_path / "out"), reps=50, curve_reps=10)
    assert results["partitions"]["dqn_atari_gap"]["normalization"] == "Atari human-normalised"
    assert results["partitions"]["sac_dmc_gap"]["normalization"] == "raw return"
    pong = results["partitions"]["dqn_atari_gap"]["splits"]["eval"]["per_game"]
    assert [list(s) for _, s in next(iter(pong.values()))] == [pytest.approx([0.5])]


def test_optimality_gap_is_left_out_for_raw_returns(tmp_path):
    """The gap to a normalised score of 1 means nothing for raw DMC returns: '–', not 0.000."""
    for seed, ret in ((1, 300.0), (2, 500.0)):
        write_run(str(tmp_path), "cheetah-run", seed, {"exp_name": "sac_dmc_gap"}, {"eval/return": [(1, ret)]})
    results = analyze.analyze(str(tmp_path), str(tmp_path / "out"), reps=50, curve_reps=10)
    aggregates = next(iter(results["partitions"]["sac_dmc_gap"]["splits"]["eval"]["aggregates"].values()))
    assert math.isnan(aggregates["optimality gap"][0]) and aggregates["mean"][0] == pytest.approx(400.0)
    row = next(line for line in open(tmp_path / "out" / "summary.md").read().splitlines() if line.startswith("| all runs |"))
    assert row.rstrip(" |").endswith("–")


def test_runs_with_and_without_a_later_flag_share_one_partition(tmp_path):
    """A run written before a flag existed (its config lacks the key) joins the same script's other runs."""
    write_run(str(tmp_path), "Pong", 1, {"exp_name": "dqn_atari_gap"}, {"eval/return": [(1, 0.0)]})
    write_run(str(tmp_path), "Pong", 2, {"exp_name": "dqn_atari_gap", "torch_threads": 1}, {"eval/return": [(1, 1.0)]})
    results = analyze.analyze(str(tmp_path), str(tmp_path / "out"), reps=50, curve_reps=10)
    assert list(results["partitions"]) == ["dqn_atari_gap"]
    assert results["partitions"]["dqn_atari_gap"]["group_keys"] == []


def test_unknown_group_by_key_is_refused_with_one_line(tmp_path):
    write_run(str(tmp_path), "Pong", 1, {}, {"eval/return": [(1, 0.0)]})
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "analyze.py"), str(tmp_path),
                             "--group-by", "poool"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--group-by 'poool'" in result.stderr


def test_a_flag_resolved_per_game_is_not_a_group(tmp_path):
    """SAC resolves --action-repeat 0 to DrQ's per-task value: it differs between games, never within one."""
    for env_id, action_repeat in (("cartpole-swingup", 8), ("reacher-easy", 4)):
        for pool in ("flatten", "avg"):
            config = {"exp_name": f"sac_dmc_gap-pool_{pool}", "pool": pool, "action_repeat": action_repeat}
            write_run(str(tmp_path), env_id, 1, config, {"eval/return": [(1, 100.0 if pool == "avg" else 50.0)]})
    results = analyze.analyze(str(tmp_path), str(tmp_path / "out"), reps=50, curve_reps=10)
    partition = results["partitions"]["sac_dmc_gap"]
    assert partition["group_keys"] == ["pool"]
    per_game = partition["splits"]["eval"]["per_game"]
    assert {group: [list(s) for _, s in tasks] for group, tasks in per_game.items()} == {
        (("pool", "avg"),): [[100.0], [100.0]], (("pool", "flatten"),): [[50.0], [50.0]]}


def analyze_tennis_and_cheetah(tmp_path):
    """An Atari game missing from utils.ATARI_RANDOM_HUMAN beside a DMC task (raw returns, no warning)."""
    write_run(str(tmp_path), "Tennis", 1, {"exp_name": "dqn_atari_gap", "frame_skip": 4}, {"eval/return": [(1, -5.0)]})
    write_run(str(tmp_path), "cheetah-run", 1, {"exp_name": "sac_dmc_gap", "action_repeat": 4},
              {"eval/return": [(1, 300.0)]})
    return analyze.analyze(str(tmp_path), str(tmp_path / "out"), reps=50, curve_reps=10)


def test_an_atari_game_without_human_scores_is_scored_on_raw_returns(tmp_path):
    results = analyze_tennis_and_cheetah(tmp_path)
    assert results["partitions"]["dqn_atari_gap"]["normalization"] == "raw return"


def test_an_atari_game_without_human_scores_is_warned_about(tmp_path):
    results = analyze_tennis_and_cheetah(tmp_path)
    assert len(results["warnings"]) == 1 and "no random/human scores for 'Tennis'" in results["warnings"][0]
    assert "## Warnings" in open(tmp_path / "out" / "summary.md").read()


def write_rainbow_run(tmp_path):
    return write_run(str(tmp_path), "Pong", 1, {"exp_name": "rainbow_atari_gap", "iteration_steps": 250_000},
                     {"eval/return": [(500_000, 14.6)],
                      "charts/iteration_return": [(250_000, -20.7), (500_000, -3.05)]})


def test_rainbow_iteration_return_is_scored_as_its_own_split(tmp_path):
    """Dopamine's statistic: the last iteration's mean training return, human-normalised like the evaluation."""
    run = analyze.load_run(write_rainbow_run(tmp_path), 10)
    assert run["final"]["eval"]["score"] == pytest.approx(1.0)
    iteration = run["final"]["iteration"]
    assert iteration["step"] == 500_000 and iteration["return"] == pytest.approx(-3.05)
    assert iteration["score"] == pytest.approx(0.5) and iteration["source"] == "last charts/iteration_return"
    assert run["warnings"] == []


def test_summary_has_the_iteration_split_beside_the_evaluation(tmp_path):
    write_rainbow_run(tmp_path)
    out = tmp_path / "analysis"
    analyze.analyze(str(tmp_path), str(out), reps=200, curve_reps=50)
    summary = (out / "summary.md").read_text()
    assert "### iteration: aggregates" in summary and "### eval: aggregates" in summary


def test_iteration_steps_is_not_a_grouping_flag(tmp_path):
    write_rainbow_run(tmp_path)
    out = tmp_path / "analysis"
    analyze.analyze(str(tmp_path), str(out), reps=200, curve_reps=50)
    assert "iteration_steps" not in (out / "summary.md").read_text().split("Grouped by:")[1].split("\n")[0]


# Runs skipped or not scored completely: reported, never re-scored from another statistic
def run_main(capsys, *argv):
    """analyze.main in this process: (exit status, stdout, stderr)."""
    try:
        status = analyze.main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status or 0, out, err


def cut_event_file(run_dir, nbytes=5):
    """What a kill or a full disk leaves: the run's event file ends inside its last record."""
    (path,) = [os.path.join(run_dir, name) for name in os.listdir(run_dir) if name.startswith("events.out.tfevents.")]
    os.truncate(path, os.path.getsize(path) - nbytes)


def write_pong_seeds(root, seeds, eval_points):
    """Finished Pong runs: training episodes up to step 199, then the evaluations (written last)."""
    episodes = [(step, -20.0) for step in range(20, 200, 20)]
    return [write_run(root, "Pong", seed, {"exp_name": "dqn_atari_gap"},
                      {"charts/episodic_return": episodes, "eval/return": eval_points}) for seed in seeds]


def test_run_whose_truncated_events_lost_its_final_evaluation_is_left_out_not_rescored(tmp_path):
    runs = write_pong_seeds(str(tmp_path), (1, 2, 3), [(600, 14.6)])
    cut_event_file(runs[2])  # its only evaluation is the lost last record; its training episodes remain
    collected = analyze.collect_runs(str(tmp_path))
    assert sorted(run["dir"] for run in collected["runs"]) == runs[:2]
    (left_out,) = collected["left_out"]
    assert left_out[0] == runs[2] and "no eval/return, which its siblings are scored by" in left_out[1]
    assert "mean of last 9 charts/episodic_return is not used instead" in left_out[1]


def test_finished_run_whose_last_evaluation_comes_before_its_siblings_is_left_out(tmp_path):
    runs = write_pong_seeds(str(tmp_path), (1, 2), [(300, 0.0), (600, 14.6)])
    cut_event_file(runs[1])  # loses the step-600 evaluation, keeps the one at 300
    collected = analyze.collect_runs(str(tmp_path))
    assert [run["dir"] for run in collected["runs"]] == runs[:1]
    assert collected["left_out"] == [(runs[1], "last eval/return at step 300, its finished siblings' (same game and flags) "
                                               "at 600: its events end early (a truncated event file?)")]


def test_training_episodes_still_score_a_partition_that_no_run_evaluates(tmp_path):
    for seed in (1, 2):
        write_run(str(tmp_path), "cheetah-run", seed, {"exp_name": "sac_dmc_gap"}, {"charts/episodic_return": [(10, 5.0)]})
    collected = analyze.collect_runs(str(tmp_path))
    assert len(collected["runs"]) == 2 and collected["left_out"] == []


def test_truncated_newest_event_file_is_warned_about_when_the_run_is_still_scored(tmp_path):
    run_dir = write_run(str(tmp_path), "Pong", 1, {"exp_name": "dqn_atari_gap"},
                        {"eval/return": [(600, 14.6)], "charts/SPS": [(600, 100.0)]})
    cut_event_file(run_dir)  # loses the last charts/SPS point only
    run = analyze.load_run(run_dir, 10)
    assert run["final"]["eval"]["step"] == 600 and len(run["warnings"]) == 1
    assert "is damaged after 2 events" in run["warnings"][0]  # the file version and the evaluation
    assert "later points are lost" in run["warnings"][0]


def test_older_event_file_ending_in_a_partial_record_before_a_resume_is_not_warned_about(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = write_run(str(tmp_path), "Pong", 1, {"exp_name": "dqn_atari_gap"}, {"eval/return": [(100, 1.0), (200, 2.0)]})
    cut_event_file(run_dir)  # killed while writing step 200
    writer = SummaryWriter(run_dir, filename_suffix=".resumed")
    writer.add_scalar("eval/return", 3.0, 200)
    writer.close()
    run = analyze.load_run(run_dir, 10)
    assert run["warnings"] == [] and run["curves"]["eval"][0].tolist() == [100, 200]


def test_garbage_event_file_is_reported_as_unreadable(tmp_path):
    good = write_run(str(tmp_path), "Pong", 1, {"exp_name": "dqn_atari_gap"}, {"eval/return": [(600, 14.6)]})
    garbage = os.path.join(str(tmp_path), "Pong__dqn_atari_gap__2__1700000000")
    os.makedirs(garbage)
    shutil.copy(os.path.join(good, "config.json"), garbage)
    with open(os.path.join(garbage, "events.out.tfevents.1700000000.host"), "wb") as f:
        f.write(b"this is not a TensorBoard event file" * 10)
    open(os.path.join(garbage, "final.pt"), "wb").close()
    collected = analyze.collect_runs(str(tmp_path))
    assert [run["dir"] for run in collected["runs"]] == [good]
    assert collected["left_out"][0][0] == garbage
    assert collected["left_out"][0][1].startswith(
        "no event readable: events.out.tfevents.1700000000.host is damaged after 0 events")


def test_run_folder_without_config_json_is_reported(tmp_path):
    good, bare = write_pong_seeds(str(tmp_path), (1, 2), [(600, 14.6)])
    os.remove(os.path.join(bare, "config.json"))
    why = "no config.json (every script writes one when it starts)"
    assert analyze.collect_runs(str(tmp_path))["left_out"] == [(bare, why)]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"seed": 1}'])
def test_bad_config_json_is_reported_without_a_traceback(tmp_path, capsys, text):
    good, bad = write_pong_seeds(str(tmp_path), (1, 2), [(600, 14.6)])
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write(text)
    status, out, err = run_main(capsys, str(tmp_path), "--out", str(tmp_path / "out"), "--reps", "50",
                                "--curve-reps", "10", "--group-by", "pool")
    assert status == 0 and "Traceback" not in err
    assert f"left out: {bad}: config.json is not" in err
    assert f"`{bad}`: config.json is not" in (tmp_path / "out" / "summary.md").read_text()


def test_each_left_out_run_is_listed_in_the_summary(analysis):
    _, out = analysis
    summary = open(os.path.join(out, "summary.md")).read()
    line = next(line for line in summary.splitlines() if "bigfish__ppo_procgen_impoola-pool_avg__9__" in line)
    assert line.startswith("- `") and line.endswith("unfinished (no final.pt); --include-unfinished uses it")
    assert "1 skipped or not scored completely: see 'Runs left out'." in summary


def test_each_left_out_run_is_reported_on_stderr(analysis):
    result, _ = analysis
    assert result.stderr.count("left out: ") == 1


def test_non_finite_final_score_is_left_out(tmp_path):
    write_pong_seeds(str(tmp_path), (1, 2), [(600, 14.6)])
    write_run(str(tmp_path), "Pong", 3, {"exp_name": "dqn_atari_gap"}, {"eval/return": [(600, float("nan"))]})
    collected = analyze.collect_runs(str(tmp_path))
    assert len(collected["runs"]) == 2
    assert [why for _, why in collected["left_out"]] == ["its last eval/return is nan: split eval not scored"]


def test_root_where_no_run_can_be_scored_is_refused_with_one_line(tmp_path, capsys):
    (run_dir,) = write_pong_seeds(str(tmp_path), (1,), [(600, 14.6)])
    os.remove(os.path.join(run_dir, "config.json"))
    status, out, err = run_main(capsys, str(tmp_path), "--out", str(tmp_path / "out"))
    assert status == 2 and err.count("\n") == 1 and "holds no run that can be scored" in err and "no config.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags,named", [
    (["--bogus"], "unrecognized arguments: --bogus"), (["--reps", "a"], "--reps"), (["--reps", "0"], "--reps"),
    (["--seed", "-1"], "--seed"), (["--curve-points", "-3"], "--curve-points"), (["--reps", "2000000"], "at most 1,000,000"),
])
def test_bad_flag_is_refused_with_one_line_before_reading_runs(tmp_path, capsys, monkeypatch, flags, named):
    write_pong_seeds(str(tmp_path), (1,), [(600, 14.6)])
    monkeypatch.setattr(analyze, "collect_runs", lambda *a: pytest.fail("read the runs before checking the flags"))
    status, out, err = run_main(capsys, str(tmp_path), *flags)
    assert status == 2 and err.count("\n") == 1 and named in err


@pytest.mark.parametrize("out", ["taken", "taken/below", ""], ids=["a file", "below a file", "empty"])
def test_out_that_is_a_file_or_empty_is_refused_with_one_line(tmp_path, capsys, out):
    write_pong_seeds(str(tmp_path / "runs"), (1,), [(600, 14.6)])
    (tmp_path / "taken").write_text("")
    out = str(tmp_path / out) if out else ""
    status, _, err = run_main(capsys, str(tmp_path / "runs"), "--out", out)
    assert status == 2 and err.count("\n") == 1 and f"--out {out!r}" in err


def test_root_that_is_a_file_is_refused_with_one_line(tmp_path, capsys):
    (tmp_path / "runs").write_text("")
    status, _, err = run_main(capsys, str(tmp_path / "runs"))
    assert status == 2 and err.count("\n") == 1 and "is not a folder" in err


def test_list_valued_config_key_can_group_runs(tmp_path):
    for seed, channels in ((1, [16, 32]), (2, [32, 64])):
        config = {"exp_name": "dqn_atari_gap", "channels": channels}
        write_run(str(tmp_path), "Pong", seed, config, {"eval/return": [(1, 0.0)]})
    results = analyze.analyze(str(tmp_path), str(tmp_path / "out"), reps=50, curve_reps=10)
    assert list(results["partitions"]["dqn_atari_gap"]["splits"]["eval"]["per_game"]) == [
        (("channels", "[16, 32]"),), (("channels", "[32, 64]"),)]


def test_config_json_outside_a_run_folder_without_events_is_not_a_run(tmp_path):
    (run_dir,) = write_pong_seeds(str(tmp_path), (1,), [(600, 14.6)])
    os.makedirs(tmp_path / "tools")
    (tmp_path / "tools" / "config.json").write_text("{}")  # some other program's config
    os.makedirs(tmp_path / "Pong__dqn_atari_gap__2__1700000001")  # a run folder that died before its first event
    shutil.copy(os.path.join(run_dir, "config.json"), tmp_path / "Pong__dqn_atari_gap__2__1700000001")
    assert analyze.find_run_dirs(str(tmp_path)) == [run_dir, str(tmp_path / "Pong__dqn_atari_gap__2__1700000001")]


# Score against the bottleneck's (effective) parameters: one dot per run, a colour per method
def pong_return(score):
    return -20.7 + score * (14.6 + 20.7)  # Pong's random and human scores (REFERENCE §7)


COMPARISON = {  # method -> (its config, its logged parameter counts, its runs' final scores)
    "flatten": ({"pool": "flatten", "sparsity_method": "none"}, {"diag/params/bottleneck": [(0, 4096.0)]}, [0.2, 0.4]),
    "avg": ({"pool": "avg", "sparsity_method": "none"}, {"diag/params/bottleneck": [(0, 64.0)]}, [0.5, 0.7]),
    "prune": ({"pool": "flatten", "sparsity_method": "prune"},  # 4,096 weights, 10 % of them left at the end
              {"diag/params/bottleneck": [(0, 4096.0)], "diag/params/bottleneck_effective": [(50, 2048.0), (100, 410.0)]},
              [0.3, 0.1]),
}


def write_comparison_runs(root):
    """Rainbow runs of flatten, GAP and flatten + pruning, two seeds each, and a GAP run that logged no parameters."""
    for method, (config, parameters, scores) in COMPARISON.items():
        for seed, score in enumerate(scores, start=1):
            write_run(root, "Pong", seed, {"exp_name": f"rainbow_atari_gap-{method}", **config},
                      {"eval/return": [(100, pong_return(score))], **parameters})
    write_run(root, "Pong", 3, {"exp_name": "rainbow_atari_gap-avg", **COMPARISON["avg"][0]},
              {"eval/return": [(100, pong_return(0.9))]})


def test_bottleneck_count_is_the_last_effective_one_when_logged_else_the_bottleneck(tmp_path):
    write_comparison_runs(str(tmp_path))
    counts = {tuple(os.path.basename(run_dir).split("__")[1:3]): analyze.load_run(run_dir, 10)["bottleneck"]
              for run_dir in analyze.find_run_dirs(str(tmp_path))}
    assert counts == {("rainbow_atari_gap-flatten", "1"): 4096, ("rainbow_atari_gap-flatten", "2"): 4096,
                      ("rainbow_atari_gap-avg", "1"): 64, ("rainbow_atari_gap-avg", "2"): 64,
                      ("rainbow_atari_gap-avg", "3"): None,  # no count logged
                      ("rainbow_atari_gap-prune", "1"): 410, ("rainbow_atari_gap-prune", "2"): 410}  # the last effective


def test_score_vs_bottleneck_is_one_point_per_run_that_logged_its_count_a_colour_per_method(tmp_path, monkeypatch):
    write_comparison_runs(str(tmp_path / "runs"))
    plotted = {}
    plot = analyze.plot_score_vs_bottleneck
    monkeypatch.setattr(analyze, "plot_score_vs_bottleneck", lambda path, title, normalization, points: (
        plotted.update({os.path.basename(path): points}), plot(path, title, normalization, points)))
    results = analyze.analyze(str(tmp_path / "runs"), str(tmp_path / "out"), reps=50, curve_reps=10)
    (name, points), = plotted.items()
    assert name == "rainbow_atari_gap_eval_score_vs_bottleneck_parameters.png"
    assert {label: [(x, round(y, 6)) for x, y in xy] for label, xy in points.items()} == {  # the methods' colours
        "pool=avg, sparsity_method=none": [(64, 0.5), (64, 0.7)],
        "pool=flatten, sparsity_method=none": [(4096, 0.2), (4096, 0.4)],
        "pool=flatten, sparsity_method=prune": [(410, 0.3), (410, 0.1)]}
    avg = (("pool", "avg"), ("sparsity_method", "none"))
    eval_split = results["partitions"]["rainbow_atari_gap"]["splits"]["eval"]
    assert len(dict(eval_split["per_game"][avg])["Pong"]) == 3 and len(eval_split["bottleneck"][avg]) == 2  # scored, no dot
    with Image.open(tmp_path / "out" / "rainbow_atari_gap_eval_score_vs_bottleneck_parameters.png") as image:
        assert image.format == "PNG"


def test_scores_csv_holds_the_bottleneck_count_of_each_run(tmp_path):
    write_comparison_runs(str(tmp_path / "runs"))
    analyze.analyze(str(tmp_path / "runs"), str(tmp_path / "out"), reps=50, curve_reps=10)
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert sorted(row["bottleneck_parameters"] for row in rows if "prune" in row["group"]) == ["410.0", "410.0"]
    assert [row["bottleneck_parameters"] for row in rows if row["seed"] == "3"] == [""]
