"""benchmark/learning_curves.py on a real tiny PPO run: the table holds the run's own numbers and a random policy
measured on the run's evaluation levels; bad input is refused with one line."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, read_scalars
from test_ppo_procgen_smoke import TINY, run_ppo

TOOL = os.path.join(REPO, "benchmark", "learning_curves.py")


def run_tool(*flags, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *flags], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("curves")
    result = run_ppo(*TINY, "--pool", "flatten", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, sorted(glob.glob(str(cwd / "runs" / "bossfight__*")))


def test_table_and_png_hold_the_runs_numbers_and_the_random_policy(runs):
    cwd, run_dirs = runs
    result = run_tool(*run_dirs, "--out", str(cwd / "tiny"), "--random-episodes", "4", "--window", "2", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.getsize(cwd / "tiny_learning.png") > 10_000
    rows = (cwd / "tiny_learning.md").read_text().splitlines()[2:]
    assert len(rows) == 1
    for row, run_dir in zip(rows, run_dirs):
        scalars = read_scalars(run_dir)
        with open(os.path.join(run_dir, "config.json")) as f:
            pool = json.load(f)["pool"]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[0] == f"--pool {pool}, seed 1" and cells[1] == "128" and cells[-1] == "yes"
        assert float(cells[3]) == pytest.approx(scalars["eval/train_levels/return"][-1][1], abs=0.006)
        assert float(cells[4]) == pytest.approx(scalars["eval/test_levels/return"][-1][1], abs=0.006)
        returns = [value for _, value in sorted(scalars["charts/episodic_return"])]
        first, last = (float(part) for part in cells[2].split(" → "))
        assert first == pytest.approx(np.mean(returns[:10]), abs=0.006)
        assert last == pytest.approx(np.mean(returns[-10:]), abs=0.006)
    assert all(np.isfinite(float(part)) for part in rows[0].split("|")[6].split("/"))


def test_a_folder_that_is_not_a_ppo_run_is_refused_with_one_line(runs, tmp_path):
    cwd, run_dirs = runs
    (tmp_path / "config.json").write_text(json.dumps({"env_id": "Breakout"}))
    result = run_tool(run_dirs[0], str(tmp_path), "--out", str(tmp_path / "x"), cwd=cwd)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a ppo_procgen_impoola run" in result.stderr
    assert not glob.glob(str(tmp_path / "x_*"))
