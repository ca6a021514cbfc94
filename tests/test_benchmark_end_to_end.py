"""A sweep of two real tiny runs of ppo_procgen_impoola.py (flatten vs avg, BigFish: the random
policy's episodes end within ~100 steps, so the final evaluations are quick), skipped on a
rerun, then analysed: the analysis' own normalisation agrees with the score the script logged."""
import contextlib
import glob
import io
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import analyze  # noqa: E402
import sweep  # noqa: E402
import utils  # noqa: E402
from conftest import read_scalars  # noqa: E402

TINY_PPO = {"num-envs": 2, "num-steps": 8, "num-minibatches": 2, "total-timesteps": 16, "eval-episodes": 2,
            "final-eval-episodes": 2, "eval-num-envs": 2, "diag-batch-size": 8, "width": 1}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    grid = root / "tiny_ppo.json"
    grid.write_text(json.dumps({"script": "ppo_procgen_impoola.py", "fixed": TINY_PPO,
                                "vary": {"env-id": ["bigfish"], "seed": [1], "pool": ["flatten", "avg"]}}))
    runs_dir = str(root / "runs")
    outputs = []
    for _ in range(2):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            status = sweep.main(["--grid", str(grid), "--runs-dir", runs_dir, "--jobs", "2"])
        outputs.append((status, out.getvalue()))
    return runs_dir, outputs[0], outputs[1]


def test_sweep_of_two_tiny_runs_finishes_both(swept):
    runs_dir, (status, out), _ = swept
    logs = "".join(open(path).read() for path in glob.glob(os.path.join(runs_dir, "sweep_logs", "*.log")))
    assert status == 0 and "2 runs; 0 finished (skipped), 0 to resume, 2 new" in out, out + logs
    assert "2 runs done, 0 failed" in out, out + logs
    folders = sorted(d for d in os.listdir(runs_dir) if d.startswith("bigfish__"))
    assert [d.split("__")[1] for d in folders] == ["ppo_procgen_impoola-pool_avg", "ppo_procgen_impoola-pool_flatten"]
    for folder in folders:
        config = json.load(open(os.path.join(runs_dir, folder, "config.json")))
        assert config["total_timesteps"] == 16 and config["exp_name"] == folder.split("__")[1]
        assert os.path.isfile(os.path.join(runs_dir, folder, "final.pt"))


def test_rerun_skips_the_finished_runs(swept):
    runs_dir, _, (status, out) = swept
    assert status == 0 and "2 runs; 2 finished (skipped), 0 to resume, 0 new" in out and "0 runs done" in out
    assert len([d for d in os.listdir(runs_dir) if d.startswith("bigfish__")]) == 2  # no new folder


@pytest.fixture(scope="module")
def analysed(swept, tmp_path_factory):
    runs_dir, _, _ = swept
    out = str(tmp_path_factory.mktemp("analysis"))
    return runs_dir, out, analyze.analyze(runs_dir, out, reps=200, curve_reps=50)


def test_analysis_of_real_runs_groups_them_by_pool_without_warnings(analysed):
    _, _, results = analysed
    assert results["warnings"] == []
    assert results["partitions"]["ppo_procgen_impoola"]["group_keys"] == ["pool"]


def test_analysis_of_real_runs_agrees_with_the_scripts_logged_normalised_scores(analysed):
    runs_dir, _, _ = analysed
    for run_dir in analyze.find_run_dirs(runs_dir):
        run = analyze.load_run(run_dir, 10)
        logged = read_scalars(run_dir)
        for split in ("train_levels", "test_levels"):
            raw = logged[f"eval/{split}/return"][-1][1]
            assert run["final"][split]["score"] == pytest.approx(utils.procgen_normalized_score("bigfish", "easy", raw))
            assert run["final"][split]["score"] == pytest.approx(logged[f"eval/{split}/normalized_score"][-1][1],
                                                                 abs=1e-5)


def test_analysis_parameter_count_is_the_scripts_logged_one(analysed):
    runs_dir, _, _ = analysed
    for run_dir in analyze.find_run_dirs(runs_dir):
        logged = read_scalars(run_dir)
        parts = ("encoder", "bottleneck", "head")
        assert analyze.load_run(run_dir, 10)["parameters"] == sum(logged[f"diag/params/{part}"][0][1] for part in parts)


def test_analysis_of_real_runs_writes_a_row_per_pool_and_the_parameter_plot(analysed):
    _, out, _ = analysed
    summary = open(os.path.join(out, "summary.md")).read()
    assert "| pool=avg | 1 | 1 |" in summary and "| pool=flatten | 1 | 1 |" in summary
    assert os.path.isfile(os.path.join(out, "ppo_procgen_impoola_test_levels_score_vs_parameters.png"))
