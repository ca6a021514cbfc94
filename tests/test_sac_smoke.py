"""sac_dmc_gap.py run for real on a CPU: a tiny run (cheap test-only visuals, 24x24 frames, two
cartpole episodes) checked for config, TensorBoard tags, checkpoints, video and resume; a non-finite
loss; bad input. One run is shared by the checks (DMC pixel environments are slow to make)."""

import glob
import importlib.util
import json
import os

import pytest
import torch

import utils
from conftest import read_image_tags, read_scalars, run_script

SCRIPT = "sac_dmc_gap.py"
TINY = ["--env-id", "cartpole-swingup", "--resolution", "24", "--cheap-visuals-for-tests", "--batch-size", "16",
        "--hidden-dim", "32", "--eval-episodes", "1", "--torch-threads", "1", "--runs-dir", "runs"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sac_smoke")
    result = run_script(SCRIPT, *TINY, "--pool", "avg", "--total-timesteps", "250", "--learning-starts", "200",
                        "--buffer-size", "400", "--eval-every", "125", "--save-every", "125", "--diag-every", "125",
                        "--log-every", "50", "--capture-video", "--save-buffer", "--reward-scale", "0.5", cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return cwd, run_dir, result


def test_config_json_holds_every_resolved_argument(smoke_run):
    _, run_dir, _ = smoke_run
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert config["env_id"] == "cartpole-swingup" and config["pool"] == "avg" and config["resolution"] == 24
    assert config["action_repeat"] == 8  # DrQ's cartpole value, resolved from 0
    assert config["batch_size"] == 16 and config["cheap_visuals_for_tests"] is True
    assert os.path.basename(run_dir).startswith("cartpole-swingup__sac_dmc_gap__1__")


def test_tensorboard_has_the_contract_tags_on_the_agent_step_axis(smoke_run):
    _, run_dir, _ = smoke_run
    scalars = read_scalars(run_dir)
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
                "losses/qf1_values", "losses/qf2_values", "losses/qf_loss", "losses/actor_loss", "losses/alpha",
                "losses/alpha_loss", "eval/return", "eval/normalized_score", "diag/dormant_fraction/encoder",
                "diag/dormant_fraction/bottleneck", "diag/dormant_fraction/head", "diag/feature_norm", "diag/params/encoder",
                "diag/params/bottleneck", "diag/params/head"):
        assert tag in scalars, tag
    assert [step for step, _ in scalars["charts/episodic_length"]] == [125, 250]
    assert [value for _, value in scalars["charts/episodic_length"]] == [125, 125]  # 1000 control steps / 8
    assert [step for step, _ in scalars["eval/return"]] == [125, 250]
    assert all(0 <= value <= 125 * 8 for _, value in scalars["eval/return"])
    # actor and critic: C x dim + bias + LayerNorm
    assert scalars["diag/params/bottleneck"] == [(0, 2 * (32 * 50 + 50 + 2 * 50))]
    assert "images/saliency" in read_image_tags(run_dir)


def test_checkpoints_final_and_video_are_written_and_load_as_data(smoke_run):
    _, run_dir, _ = smoke_run
    paths = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")))
    assert [os.path.basename(p) for p in paths] == ["step_000000000125.pt", "step_000000000250.pt"]
    checkpoint = torch.load(paths[-1], map_location="cpu", weights_only=True)
    assert checkpoint["script"] == SCRIPT and checkpoint["global_step"] == 250
    assert checkpoint["update_count"] == 51  # one update per agent step, from step 200 to 250 inclusive
    assert "replay" not in checkpoint
    saved = torch.load(os.path.join(run_dir, "checkpoints", "replay.pt"), map_location="cpu", weights_only=True)
    assert saved["global_step"] == 250 and saved["replay"]["observations"].dtype == torch.uint8
    final = torch.load(os.path.join(run_dir, "final.pt"), map_location="cpu", weights_only=True)
    assert final["global_step"] == 250 and "replay" not in final
    # every DMC episode here ended by its time limit: none is stored as terminal, so targets bootstrap through them
    assert saved["replay_size"] == 250 and saved["replay"]["terminated"][:250].sum().item() == 0
    # --reward-scale 0.5: the replay holds half of each logged (raw) episode return
    returns = [value for _, value in read_scalars(run_dir)["charts/episodic_return"]]
    stored = [saved["replay"]["rewards"][:125].sum().item(), saved["replay"]["rewards"][125:250].sum().item()]
    assert stored == pytest.approx([0.5 * r for r in returns], rel=1e-4, abs=1e-3) and max(returns) > 0
    assert {"encoder", "actor", "critic", "target_encoder", "target_critic", "log_alpha", "critic_optimizer",
            "actor_optimizer", "alpha_optimizer", "rng"} <= set(final)
    assert len(glob.glob(os.path.join(run_dir, "videos", "eval_step_*.gif"))) == 2


def test_resume_continues_the_step_count_and_updates_in_the_same_folder(smoke_run):
    cwd, run_dir, _ = smoke_run
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000250.pt")
    result = run_script(SCRIPT, *TINY, "--pool", "avg", "--total-timesteps", "300", "--learning-starts", "200",
                        "--buffer-size", "400", "--eval-every", "0", "--save-every", "50", "--diag-every", "0",
                        "--log-every", "50", "--save-buffer", "--resume", checkpoint, cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"resumed from {checkpoint} at step 250" in result.stdout
    assert glob.glob(os.path.join(cwd, "runs", "*")) == [run_dir]
    resumed = torch.load(os.path.join(run_dir, "checkpoints", "step_000000000300.pt"), map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 300 and resumed["update_count"] == 101  # the stored replay lets updates go on
    saved = torch.load(os.path.join(run_dir, "checkpoints", "replay.pt"), map_location="cpu", weights_only=True)
    assert saved["global_step"] == 300 and saved["replay_size"] == 300
    # only the newest --keep-checkpoints (3) periodic checkpoints stay
    kept = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")))
    assert kept == ["step_000000000125.pt", "step_000000000250.pt", "step_000000000300.pt"]
    sps_steps = [step for step, _ in read_scalars(run_dir)["charts/SPS"]]
    assert max(sps_steps) == 300 and 250 in sps_steps


def test_a_non_finite_loss_stops_the_run_and_leaves_the_last_good_state(tmp_path):
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "100", "--learning-starts", "25", "--buffer-size", "100",
                        "--batch-size", "8", "--log-every", "25", "--eval-every", "0", "--diag-every", "0",
                        "--save-every", "0", "--learning-rate", "1e30", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error: non-finite loss" in result.stderr
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    (path,) = glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt"))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint["script"] == SCRIPT and checkpoint["global_step"] < 100
    assert not os.path.exists(os.path.join(run_dir, "final.pt"))


def test_a_checkpoint_due_between_two_log_intervals_is_checked_finite_before_it_is_written(tmp_path):
    """The check at step 25 passes, the first update breaks the weights, the checkpoint due at step 30 is refused:
    the last good state (step 25) is written instead."""
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "100", "--learning-starts", "25", "--buffer-size", "100",
                        "--batch-size", "8", "--log-every", "25", "--eval-every", "0", "--diag-every", "0",
                        "--save-every", "30", "--learning-rate", "1e30", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "error: non-finite loss" in result.stderr
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    paths = glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt"))
    assert [os.path.basename(path) for path in paths] == ["step_000000000025.pt"]
    checkpoint = torch.load(paths[0], map_location="cpu", weights_only=True)
    networks = [value for key, value in checkpoint.items() if isinstance(value, dict) and key not in ("args", "rng")]
    assert networks and all(torch.isfinite(t).all() for n in networks for t in utils.floating_tensors(n))


@pytest.fixture(scope="module")
def dopamine_run(tmp_path_factory):
    """`--preset dopamine` for one cartpole episode (250 agent steps at its action repeat 4), some values overridden."""
    cwd = tmp_path_factory.mktemp("sac_dopamine")
    result = run_script(SCRIPT, "--preset", "dopamine", *TINY, "--total-timesteps", "250", "--learning-starts", "200",
                        "--buffer-size", "400", "--eval-every", "0", "--save-every", "0", "--diag-every", "250",
                        "--log-every", "50", cwd=cwd)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return run_dir, result


def test_dopamine_preset_runs_with_its_values_and_the_explicit_overrides(dopamine_run):
    run_dir, _ = dopamine_run
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    assert (config["preset"], config["padding"], config["combined_loss"]) == ("dopamine", "same", True)
    assert (config["alpha_loss_on"], config["action_repeat"], config["augment"]) == ("log_alpha", 4, False)
    assert (config["reward_scale"], config["target_entropy_scale"]) == (0.1, 0.5)
    assert (config["learning_starts"], config["batch_size"], config["total_timesteps"]) == (200, 16, 250)  # flags win
    final = torch.load(os.path.join(run_dir, "final.pt"), map_location="cpu", weights_only=True)
    assert final["update_count"] == 51  # one combined update per agent step, from step 200 to 250 inclusive
    assert final["log_alpha"].item() != 0.0 and abs(final["log_alpha"].item()) < 0.1  # alpha starts at 1 and has moved
    assert (config["target_next_action"], config["bound_log_std"], config["init"]) == ("target_mean", False, "dopamine")
    # the target actor follows the actor by tau every step: close to it, not equal
    moved = [(final["target_actor"][name] - value).abs().max().item() for name, value in final["actor"].items()]
    assert 0 < max(moved) < 0.05
    scalars = read_scalars(run_dir)
    assert [step for step, _ in scalars["charts/episodic_length"]] == [250]  # 1000 control steps / 4
    assert scalars["diag/params/encoder"] == [(0, 9 * 32 * 9 + 32 + 3 * (32 * 32 * 9 + 32))]
    # SAME padding: 24 -> 12x12x32 flattened into each Dense(50), actor and critic
    assert scalars["diag/params/bottleneck"] == [(0, 2 * (12 * 12 * 32 * 50 + 50 + 2 * 50))]
    assert len(scalars["losses/actor_loss"]) == len(scalars["losses/qf_loss"])  # the actor learns at every update


@pytest.mark.parametrize("flags, message", [
    (["--env-id", "pong-run"], "--env-id 'pong-run' is not allowed"),
    (["--pool", "mean"], "--pool 'mean' is not allowed"),
    (["--resolution", "14"], "--resolution 14 is too small for --padding valid; use at least 15"),
    (["--resolution", "2049"], "--resolution 2049 is outside [1, 2048]"),
    (["--diag-batch-size", "0"], "--diag-batch-size 0 is outside [1, inf)"),
    (["--action-repeat", "3"], "--action-repeat 3 must divide"),
    (["--batch-size", "1000", "--buffer-size", "100"], "--batch-size 1000 is larger than --buffer-size 100"),
    (["--width", "0"], "--width 0 is outside [1, inf)"),
    (["--preset", "dreamer"], "--preset 'dreamer' is not allowed"),
    (["--padding", "full"], "--padding 'full' is not allowed"),
    (["--alpha-loss-on", "beta"], "--alpha-loss-on 'beta' is not allowed"),
    (["--target-entropy-scale", "inf"], "--target-entropy-scale inf is outside (0, inf)"),
    (["--preset", "dopamine", "--actor-update-frequency", "2"], "--actor-update-frequency 2 must be 1"),
    (["--target-next-action", "mean"], "--target-next-action 'mean' is not allowed"),
    (["--init", "xavier"], "--init 'xavier' is not allowed"),
    pytest.param(["--track"], "--track needs the `wandb` package", marks=pytest.mark.skipif(
        importlib.util.find_spec("wandb") is not None, reason="wandb is installed")),
])
def test_bad_input_exits_2_with_one_line_before_any_work(tmp_path, flags, message):
    result = run_script(SCRIPT, *flags, "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "runs"))


def test_resuming_another_network_or_another_script_is_refused(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000125.pt")
    result = run_script(SCRIPT, *TINY, "--pool", "flatten", "--resume", checkpoint, cwd=tmp_path)
    assert result.returncode == 2 and "--pool 'avg'" in result.stderr and result.stderr.strip().count("\n") == 0
    foreign = os.path.join(tmp_path, "foreign.pt")
    torch.save({"script": "dqn_atari_gap.py", "args": {}}, foreign)
    result = run_script(SCRIPT, *TINY, "--resume", foreign, cwd=tmp_path)
    assert result.returncode == 2 and "dqn_atari_gap.py" in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "runs"))


def test_resuming_a_saved_replay_with_another_buffer_size_is_refused(smoke_run, tmp_path):
    _, run_dir, _ = smoke_run
    checkpoint = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")))[-1]  # the replay lies beside the newest
    result = run_script(SCRIPT, *TINY, "--pool", "avg", "--buffer-size", "500", "--resume", checkpoint, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "--buffer-size 500 differs from the 400 transitions" in result.stderr


@pytest.mark.slow
def test_compile_runs_on_cpu(tmp_path):
    result = run_script(SCRIPT, *TINY, "--compile", "--total-timesteps", "40", "--learning-starts", "30",
                        "--buffer-size", "100", "--batch-size", "8", "--eval-every", "0", "--diag-every", "0",
                        "--save-every", "0", "--log-every", "20", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run_dir,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    assert torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)["update_count"] == 11  # steps 30 to 40 inclusive
