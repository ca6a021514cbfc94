"""rainbow_atari_gap.py run for real in a subprocess, what only it does (the rest: test_atari_smoke.py): Dopamine's
iteration return, its epsilon schedule, the priorities in the saved replay, the DER preset."""

import json
import os

import pytest
import torch

from conftest import read_scalars, run_script
from test_atari_smoke import TINY, run_folders, smoke_run

SCRIPT = "rainbow_atari_gap.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The shared smoke run: the default network (Impala, avg pool, dense x4), --iteration-steps 200."""
    return smoke_run(tmp_path_factory, "rainbow")


@pytest.fixture(scope="module")
def der(tmp_path_factory):
    """`--preset der` for 300 steps, one env, with some of its values overridden by flags; its own network."""
    cwd = tmp_path_factory.mktemp("rainbow_der")
    result = run_script(SCRIPT, "--preset", "der", "--env-id", "Pong", "--num-envs", "1", "--buffer-size", "400",
                        "--learning-starts", "150", "--batch-size", "8", "--max-episode-steps", "100",
                        "--total-timesteps", "300", "--eval-episodes", "1", "--eval-every", "0", "--diag-every", "300",
                        "--save-every", "300", "--log-every", "100",
                        "--torch-threads", "1", "--runs-dir", "runs", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_folders(cwd)
    return cwd, run_dir, result


def test_config_json_holds_every_resolved_argument(smoke):
    _, run_dir, _ = smoke
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["preset"] == "rainbow" and config["n_step"] == 3 and config["num_atoms"] == 51
    assert (config["noisy"], config["dueling"], config["double"]) == (False, False, False)
    assert (config["encoder"], config["pool"], config["dense_scale"]) == ("impala", "avg", 4)
    assert (config["repeat_action_probability"], config["episodic_life"], config["learning_rate"]) == (0.25, False, 6.25e-5)
    assert config["exp_name"] == "rainbow_atari_gap" and config["batch_size"] == 8
    assert os.path.basename(run_dir).startswith("Breakout__rainbow_atari_gap__1__")


def test_iteration_return_is_the_mean_return_of_the_games_that_ended_in_each_iteration(smoke):
    """Dopamine's reported statistic (its train_average_return per iteration), here with --iteration-steps 200."""
    _, run_dir, _ = smoke
    scalars = read_scalars(run_dir)
    games = scalars["charts/episodic_return"]
    expected = {}
    for end in (200, 400):
        ended = [value for step, value in games if end - 200 < step <= end]
        if ended:
            expected[end] = sum(ended) / len(ended)
    assert expected, "the smoke run ends some games"
    logged = dict(scalars.get("charts/iteration_return", []))
    assert logged.keys() == expected.keys()
    assert all(logged[end] == pytest.approx(expected[end], rel=1e-6) for end in expected)


def test_epsilon_is_one_until_learning_starts_then_decays(smoke):
    _, run_dir, _ = smoke
    epsilon = dict(read_scalars(run_dir)["charts/epsilon"])
    assert epsilon[100] == 1.0
    assert epsilon[400] == pytest.approx(1.0 - 0.99 * (398 - 100) / 250_000)


def test_the_saved_replay_holds_the_priorities_the_updates_wrote(smoke):
    _, run_dir, _ = smoke
    saved = torch.load(os.path.join(run_dir, "checkpoints", "replay.pt"), weights_only=True)
    # the updates wrote sqrt(cross-entropy) priorities (about 2 for 51 atoms), above the initial 1
    assert saved["replay"]["sum_tree"][1] > 0 and saved["replay"]["max_priority"] > 1.5
    assert saved["replay"]["sum_tree"].dtype == torch.float64 and saved["replay"]["sum_tree"].numel() == 2 * 512


def test_der_preset_runs_with_its_values_and_the_explicit_overrides(der):
    _, run_dir, _ = der
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert (config["noisy"], config["dueling"], config["double"]) == (True, True, True)
    assert (config["n_step"], config["train_frequency"]) == (10, 1)
    assert (config["target_network_frequency"], config["learning_rate"], config["epsilon_decay_steps"]) == (2000, 1e-4, 2000)
    assert (config["repeat_action_probability"], config["episodic_life"]) == (0.0, True)
    assert (config["learning_starts"], config["eval_episodes"], config["total_timesteps"]) == (150, 1, 300)  # flags win
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    assert final["update_count"] == 300 - 150  # one update per agent step
    assert "weight_sigma" in "".join(final["q_network"])  # noisy layers
    scalars = read_scalars(run_dir)
    assert "losses/loss" in scalars and "eval/return" in scalars and "diag/feature_norm" in scalars
    # NoisyNet explores alone: full Rainbow's zero_epsilon (dopamine/jax/agents/full_rainbow/full_rainbow_agent.py)
    assert [value for _, value in scalars["charts/epsilon"]] == [0.0] * 3
    assert (config["encoder"], config["pool"], config["dense_scale"]) == ("nature", "flatten", 1)  # DER.gin's network
    assert scalars["diag/params/bottleneck"] == [(0, 2 * (7744 * 512 + 512))]  # one noisy Dense(512): mu and sigma


def test_an_unknown_preset_stops_before_any_work_with_one_line(tmp_path):
    result = run_script(SCRIPT, *TINY, "--preset", "rainbow2", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "--preset" in result.stderr
    assert not os.path.exists(tmp_path / "runs")
