"""rainbow_atari_gap.py run for real in a subprocess: what it writes, the DER preset, resume, bad
input, non-finite loss, torch.compile."""

import glob
import json
import os

import pytest
import torch

from conftest import read_image_tags, read_scalars, run_script, target_is_online_after_sync

SCRIPT = "rainbow_atari_gap.py"
TINY = ["--env-id", "Breakout", "--num-envs", "2", "--buffer-size", "400", "--learning-starts", "100",
        "--batch-size", "8", "--max-episode-steps", "150", "--target-network-frequency", "50",
        "--eval-episodes", "2", "--log-every", "100", "--torch-threads", "1", "--runs-dir", "runs"]


def run_folders(cwd):
    return sorted(glob.glob(os.path.join(cwd, "runs", "*")))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One tiny run of 400 steps with the default network (Impala, avg pool, dense x4), evaluation,
    diagnostics and checkpoints every 200 steps."""
    cwd = tmp_path_factory.mktemp("rainbow_smoke")
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "400", "--eval-every", "200", "--diag-every", "200",
                        "--save-every", "200", "--save-buffer", "--capture-video", "--iteration-steps", "200", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_folders(cwd)
    return cwd, run_dir, result


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


def test_tensorboard_has_the_contract_tags(smoke):
    _, run_dir, _ = smoke
    scalars = read_scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
                "losses/loss", "losses/q_values", "eval/return", "eval/normalized_score",
                "diag/dormant_fraction/encoder", "diag/dormant_fraction/bottleneck", "diag/dormant_fraction/head",
                "diag/feature_norm", "diag/params/encoder", "diag/params/bottleneck", "diag/params/head"]:
        assert tag in scalars, tag
    assert [step for step, _ in scalars["eval/return"]] == [200, 400]
    assert scalars["diag/params/bottleneck"] == [(0, 32 * 2048 + 2048)]  # GAP: C x dim weights
    assert "images/saliency" in read_image_tags(run_dir)


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


def test_target_network_is_the_online_network_copied_at_the_last_sync(smoke):
    """Synced every 50 agent steps, after that step's updates: at step 400 (a sync step) the target
    equals the online network, which training moved away from the one saved at step 200."""
    _, run_dir, _ = smoke
    assert target_is_online_after_sync(run_dir) == (True, True)


def test_parameter_counts_are_printed(smoke):
    _, _, result = smoke
    # Impala (16, 32, 32): 592 + 4 x 2,320 + 4,640 + 4 x 9,248 + 9,248 + 4 x 9,248; head 2048 x 4 actions x 51 atoms
    assert "parameters: encoder 97,744, bottleneck 67,584, head 417,996" in result.stdout


def test_checkpoints_load_as_plain_data_with_replay_and_priorities_beside_the_newest(smoke):
    _, run_dir, _ = smoke
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "step_000000000200.pt"), weights_only=True)
    assert checkpoint["script"] == SCRIPT and checkpoint["global_step"] == 200
    assert {"q_network", "target_network", "optimizer", "rng", "args"} <= set(checkpoint) and "replay" not in checkpoint
    saved = torch.load(os.path.join(run_dir, "checkpoints", "replay.pt"), weights_only=True)
    assert saved["global_step"] == 400 and saved["buffer_time"] > 0  # beside the newest checkpoint only
    assert saved["replay"]["frames"].dtype == torch.uint8 and saved["replay"]["frames"].shape == (2, 200, 84, 84)
    # the updates wrote sqrt(cross-entropy) priorities (about 2 for 51 atoms), above the initial 1
    assert saved["replay"]["sum_tree"][1] > 0 and saved["replay"]["max_priority"] > 1.5
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    assert final["global_step"] == 400 and final["update_count"] == (400 - 100) // 4


def test_capture_video_writes_evaluation_gifs(smoke):
    _, run_dir, _ = smoke
    assert len(glob.glob(os.path.join(run_dir, "videos", "*.gif"))) == 2


def test_resume_continues_the_step_count_and_the_replay_in_the_same_folder(smoke):
    cwd, run_dir, _ = smoke
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000400.pt")  # the newest: its replay lies beside it
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "500", "--eval-every", "0", "--diag-every", "0",
                        "--save-every", "500", "--save-buffer", "--resume", checkpoint, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 400" in result.stdout
    assert run_folders(cwd) == [run_dir]
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    # the restored replay is warm: learning goes on at once, one update per 4 agent steps
    assert final["global_step"] == 500 and final["update_count"] == (500 - 100) // 4
    saved = torch.load(os.path.join(run_dir, "checkpoints", "replay.pt"), weights_only=True)  # beside step 500's checkpoint
    assert saved["global_step"] == 500 and saved["buffer_time"] == 200 + 1 + 50  # 2 envs: 200 slots each, a reset, 50 more
    assert [step for step, _ in read_scalars(run_dir)["charts/SPS"]][-1] == 500


def test_resume_refuses_a_checkpoint_of_another_architecture(smoke):
    cwd, run_dir, _ = smoke
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000200.pt")
    result = run_script(SCRIPT, *TINY, "--noisy", "--resume", checkpoint, cwd=cwd)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--noisy" in result.stderr


def test_der_preset_runs_with_its_values_and_the_explicit_overrides(der):
    _, run_dir, _ = der
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert (config["noisy"], config["dueling"], config["double"], config["n_step"], config["train_frequency"]) == (True, True, True, 10, 1)
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


@pytest.mark.parametrize("flags,named", [
    (["--env-id", "Ant"], "--env-id"),  # an EnvPool -v5 id, but MuJoCo
    (["--pool", "mean"], "--pool"),
    (["--preset", "rainbow2"], "--preset"),
    (["--encoder", "nature", "--resolution", "0"], "--resolution"),
    (["--batch-size", "500"], "--batch-size"),
])
def test_bad_input_stops_before_any_work_with_one_line(tmp_path, flags, named):
    result = run_script(SCRIPT, *TINY, *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and named in result.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_resume_refuses_a_checkpoint_of_another_script(tmp_path):
    fake = tmp_path / "dqn.pt"
    torch.save({"script": "dqn_atari_gap.py", "args": {}}, fake)
    result = run_script(SCRIPT, *TINY, "--resume", str(fake), cwd=tmp_path)
    assert result.returncode == 2 and "dqn_atari_gap.py" in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not os.path.exists(tmp_path / "runs")


def test_non_finite_loss_stops_with_a_message_and_a_checkpoint_of_the_last_good_state(tmp_path):
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "2000", "--learning-rate", "1e30", "--encoder", "nature",
                        "--dense-scale", "1", "--eval-every", "0", "--diag-every", "0", "--save-every", "0",
                        "--log-every", "50", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "non-finite loss" in result.stderr
    (run_dir,) = run_folders(tmp_path)
    (saved,) = glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))
    checkpoint = torch.load(saved, weights_only=True)
    assert all(torch.isfinite(p).all() for p in checkpoint["q_network"].values())
    assert not os.path.exists(os.path.join(run_dir, "final.pt"))


@pytest.mark.slow
def test_compile_runs_on_cpu(tmp_path):
    result = run_script(SCRIPT, *TINY, "--compile", "--encoder", "nature", "--dense-scale", "1", "--total-timesteps", "200",
                        "--eval-every", "0", "--diag-every", "0", "--save-every", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(os.path.join(run_folders(tmp_path)[0], "final.pt"), weights_only=True)
    assert final["update_count"] == (200 - 100) // 4 and not any(k.startswith("_orig_mod") for k in final["q_network"])
