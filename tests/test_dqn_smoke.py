"""dqn_atari_gap.py run for real in a subprocess: what it writes, resume, bad input, non-finite loss."""

import glob
import json
import os

import pytest
import torch

from conftest import read_image_tags, read_scalars, run_script, target_is_online_after_sync

SCRIPT = "dqn_atari_gap.py"
TINY = ["--env-id", "Breakout", "--num-envs", "2", "--buffer-size", "400", "--learning-starts", "100",
        "--batch-size", "8", "--max-episode-steps", "150", "--target-network-frequency", "50",
        "--eval-episodes", "2", "--log-every", "100", "--torch-threads", "1", "--runs-dir", "runs"]


def run_folders(cwd):
    return sorted(glob.glob(os.path.join(cwd, "runs", "*")))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One tiny run of 400 steps with evaluation, diagnostics and checkpoints every 200 steps."""
    cwd = tmp_path_factory.mktemp("dqn_smoke")
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "400", "--eval-every", "200", "--diag-every", "200",
                        "--save-every", "200", "--n-step", "3", "--double", "--save-buffer", "--capture-video", cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_folders(cwd)
    return cwd, run_dir, result


def test_config_json_holds_every_resolved_argument(smoke):
    _, run_dir, _ = smoke
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["env_id"] == "Breakout" and config["n_step"] == 3 and config["double"] is True
    assert config["pool"] == "avg" and config["encoder"] == "nature" and config["exp_name"] == "dqn_atari_gap"
    assert os.path.basename(run_dir).startswith("Breakout__dqn_atari_gap__1__")


def test_tensorboard_has_the_contract_tags(smoke):
    _, run_dir, _ = smoke
    scalars = read_scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate",
                "losses/td_loss", "losses/q_values", "eval/return", "eval/normalized_score",
                "diag/dormant_fraction/encoder", "diag/dormant_fraction/bottleneck", "diag/dormant_fraction/head",
                "diag/feature_norm", "diag/params/encoder", "diag/params/bottleneck", "diag/params/head"]:
        assert tag in scalars, tag
    assert [step for step, _ in scalars["eval/return"]] == [200, 400]
    assert scalars["diag/params/bottleneck"] == [(0, 64 * 512 + 512)]
    assert "images/saliency" in read_image_tags(run_dir)


def test_target_network_is_the_online_network_copied_at_the_last_sync(smoke):
    """Synced every 50 agent steps, after that step's updates: at step 400 (a sync step) the target
    equals the online network, which training moved away from the one saved at step 200."""
    _, run_dir, _ = smoke
    assert target_is_online_after_sync(run_dir) == (True, True)


def test_parameter_counts_are_printed(smoke):
    _, _, result = smoke
    assert "parameters: encoder 77,984, bottleneck 33,280, head 2,052" in result.stdout


def test_checkpoints_load_as_plain_data_with_the_replay_beside_the_newest(smoke):
    _, run_dir, _ = smoke
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert names == ["replay.pt", "step_000000000200.pt", "step_000000000400.pt"]
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "step_000000000200.pt"), weights_only=True)
    assert checkpoint["script"] == SCRIPT and checkpoint["global_step"] == 200
    assert {"q_network", "target_network", "optimizer", "rng", "args"} <= set(checkpoint) and "replay" not in checkpoint
    saved = torch.load(os.path.join(run_dir, "checkpoints", "replay.pt"), weights_only=True)
    assert saved["global_step"] == 400 and saved["buffer_time"] > 0  # beside the newest checkpoint only
    assert saved["replay"]["frames"].dtype == torch.uint8 and saved["replay"]["frames"].shape == (2, 200, 84, 84)
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    assert final["global_step"] == 400 and final["update_count"] == (400 - 100) // 4


def test_capture_video_writes_evaluation_gifs(smoke):
    _, run_dir, _ = smoke
    assert len(glob.glob(os.path.join(run_dir, "videos", "*.gif"))) == 2


def test_resume_continues_the_step_count_and_the_replay_in_the_same_folder(smoke):
    cwd, run_dir, _ = smoke
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000400.pt")  # the newest: its replay lies beside it
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "600", "--eval-every", "0", "--diag-every", "0",
                        "--save-every", "200", "--n-step", "3", "--double", "--save-buffer", "--resume", checkpoint, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 400" in result.stdout
    assert run_folders(cwd) == [run_dir]
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    assert final["global_step"] == 600 and final["update_count"] == (600 - 100) // 4
    sps_steps = [step for step, _ in read_scalars(run_dir)["charts/SPS"]]
    assert max(sps_steps) == 600 and 300 in sps_steps


def test_resume_refuses_a_checkpoint_of_another_architecture(smoke):
    cwd, run_dir, _ = smoke
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000200.pt")
    result = run_script(SCRIPT, *TINY, "--pool", "flatten", "--resume", checkpoint, cwd=cwd)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--pool" in result.stderr


@pytest.mark.parametrize("flags,named", [
    (["--env-id", "NoSuchGame"], "--env-id"),
    (["--env-id", "Ant"], "--env-id"),
    (["--pool", "mean"], "--pool"),
    (["--encoder", "resnet"], "--encoder"),
    (["--resolution", "0"], "--resolution"),
    (["--resolution", "32"], "--resolution"),
    (["--batch-size", "500"], "--batch-size"),
    (["--learning-starts", "4"], "--learning-starts"),
])
def test_bad_input_stops_before_any_work_with_one_line(tmp_path, flags, named):
    result = run_script(SCRIPT, *TINY, *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and named in result.stderr
    assert not os.path.exists(tmp_path / "runs")


def test_non_finite_loss_stops_with_a_message_and_a_checkpoint_of_the_last_good_state(tmp_path):
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "2000", "--learning-rate", "1e30", "--eval-every", "0",
                        "--diag-every", "0", "--save-every", "0", "--log-every", "50", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "non-finite TD loss" in result.stderr
    (run_dir,) = run_folders(tmp_path)
    (saved,) = glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))
    checkpoint = torch.load(saved, weights_only=True)
    assert all(torch.isfinite(p).all() for p in checkpoint["q_network"].values())
    assert not os.path.exists(os.path.join(run_dir, "final.pt"))


def test_compile_runs_on_cpu(tmp_path):
    result = run_script(SCRIPT, *TINY, "--total-timesteps", "140", "--learning-starts", "120", "--eval-every", "0",
                        "--diag-every", "0", "--save-every", "0", "--eval-episodes", "1", "--max-episode-steps", "30",
                        "--compile", "--double", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_folders(tmp_path)
    assert torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)["update_count"] == (140 - 120) // 4
