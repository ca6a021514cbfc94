"""The checkpoint a non-finite stop leaves is finite in every script, even when the optimiser breaks the
weights at the very last step before a check (its loss was still finite). main() runs in this process
with Adam's step patched: a first run counts the steps taken before each check, a second one breaks
the weights at the last step before the second check."""

import glob
import importlib
import math
import os
import sys

import pytest
import torch

import utils

REAL_STEP, REAL_CHECK = torch.optim.Adam.step, utils.finite_flag
RUNS = {
    "ppo_procgen_impoola": ["--env-id", "bossfight", "--width", "1", "--num-envs", "2", "--num-steps", "8",
                            "--num-minibatches", "2", "--update-epochs", "1", "--total-timesteps", "64", "--eval-every", "0",
                            "--final-eval-episodes", "0", "--save-every", "0", "--diag-every", "0"],
    "dqn_atari_gap": ["--env-id", "Breakout", "--buffer-size", "400", "--learning-starts", "40", "--batch-size", "8",
                      "--total-timesteps", "200", "--log-every", "40", "--eval-every", "0", "--save-every", "0",
                      "--diag-every", "0", "--eval-episodes", "1", "--max-episode-steps", "150"],
    "rainbow_atari_gap": ["--env-id", "Breakout", "--buffer-size", "400", "--learning-starts", "40", "--batch-size", "8",
                          "--total-timesteps", "200", "--log-every", "40", "--eval-every", "0", "--save-every", "0",
                          "--diag-every", "0", "--eval-episodes", "1", "--max-episode-steps", "150"],
    "sac_dmc_gap": ["--env-id", "cartpole-swingup", "--resolution", "24", "--cheap-visuals-for-tests", "--batch-size", "8",
                    "--hidden-dim", "32", "--buffer-size", "200", "--learning-starts", "20", "--total-timesteps", "100",
                    "--log-every", "20", "--eval-every", "0", "--save-every", "0", "--diag-every", "0",
                    "--eval-episodes", "1"],
}


def run_main(script, tmp_path, monkeypatch, break_at=None):
    """Run the script's main() on a tiny budget; returns the number of Adam steps taken before each check."""
    module = importlib.import_module(script)
    calls, at_checks = [0], []
    tmp_path.mkdir()

    def step(self, *args, **kwargs):
        result = REAL_STEP(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == break_at:
            with torch.no_grad():
                for group in self.param_groups:
                    for parameter in group["params"]:
                        parameter.fill_(math.nan)
        return result

    def check(*parts):
        at_checks.append(calls[0])
        return REAL_CHECK(*parts)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    monkeypatch.setattr(utils, "finite_flag", check)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script + ".py", *RUNS[script], "--runs-dir", "runs", "--torch-threads", "1"])
    module.main()
    return at_checks


@pytest.mark.parametrize("script", sorted(RUNS))
def test_weights_broken_at_the_last_step_before_a_check_never_reach_the_last_good_checkpoint(script, tmp_path, monkeypatch):
    at_checks = run_main(script, tmp_path / "count", monkeypatch)
    steps_before_second_check = [n for n in at_checks if n > 0][1]
    with pytest.raises(SystemExit) as exit_info:
        run_main(script, tmp_path / "broken", monkeypatch, break_at=steps_before_second_check)
    assert exit_info.value.code == 1
    (path,) = glob.glob(str(tmp_path / "broken" / "runs" / "*" / "checkpoints" / "*.pt"))
    checkpoint = torch.load(path, weights_only=True)
    networks = [value for key, value in checkpoint.items() if isinstance(value, dict) and key not in ("args", "rng")]
    assert networks and all(torch.isfinite(t).all() for n in networks for t in utils.floating_tensors(n))

