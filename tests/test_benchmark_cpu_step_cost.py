"""benchmark/cpu_step_cost.py: two real runs of different length give a positive cost per training step and the
projected hours follow from it; bad input is refused by argparse (exit 2) before any run."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

TOOL = os.path.join(REPO, "benchmark", "cpu_step_cost.py")
DQN_TINY = ["--env-id", "Breakout", "--resolution", "36", "--learning-starts", "50", "--buffer-size", "400",
            "--eval-episodes", "1", "--max-episode-steps", "100", "--diag-every", "0"]


def run_tool(*flags):
    return subprocess.run([sys.executable, TOOL, *flags], capture_output=True, text=True, timeout=600)


def test_the_cost_per_step_is_the_difference_of_the_two_runs_and_projects_hours():
    result = run_tool("dqn_atari_gap", "--short", "100", "--long", "300", "--project", "1000000", "--", *DQN_TINY)
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"([\d.]+) s CPU for 100 steps, ([\d.]+) s for 300: ([\d.]+) ms per training step, "
                      r"([\d.]+) steps/s on one core; 1,000,000 steps: ([\d.]+) h", result.stdout)
    assert found, result.stdout
    short, long, per_step_ms, rate, hours = (float(value) for value in found.groups())
    assert long > short > 0
    assert per_step_ms == pytest.approx((long - short) / 200 * 1000, abs=0.6)  # the seconds are printed to 0.1
    assert rate == pytest.approx(1000 / per_step_ms, abs=0.1 + rate * 0.02)
    assert hours == pytest.approx(1_000_000 * per_step_ms / 1000 / 3600, abs=0.1)


def test_a_short_run_not_shorter_than_the_long_one_is_refused():
    result = run_tool("dqn_atari_gap", "--short", "300", "--long", "300", "--", *DQN_TINY)
    assert result.returncode == 2 and "0 < --short < --long" in result.stderr


def test_an_unknown_script_is_refused():
    result = run_tool("no_such_script", "--short", "1", "--long", "2")
    assert result.returncode == 2 and "no script" in result.stderr
