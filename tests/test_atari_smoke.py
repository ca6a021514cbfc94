"""dqn_atari_gap.py and rainbow_atari_gap.py run for real in a subprocess, for what they share: TensorBoard tags,
parameter counts, checkpoints with the replay beside the newest, videos, resume, bad input, checkpoints of another
network or script, the non-finite stop and torch.compile. What only one script does: test_dqn_smoke.py and
test_rainbow_smoke.py, on the same smoke runs (`smoke_run`)."""

import glob
import importlib.util
import json
import os
import shutil
import types

import pytest
import torch

from conftest import read_images, read_scalars, run_script, target_is_online_after_sync

TINY = ["--env-id", "Breakout", "--num-envs", "2", "--buffer-size", "400", "--learning-starts", "100",
        "--batch-size", "8", "--max-episode-steps", "150", "--target-network-frequency", "50",
        "--eval-episodes", "2", "--log-every", "100", "--torch-threads", "1", "--runs-dir", "runs"]
SMOKE = ["--total-timesteps", "400", "--eval-every", "200", "--diag-every", "200", "--save-every", "200", "--save-buffer",
         "--capture-video"]
SCRIPTS = {
    "dqn": dict(
        script="dqn_atari_gap.py", smoke=["--n-step", "3", "--double"], loss_tag="losses/td_loss",
        bottleneck=64 * 512 + 512,  # the Nature CNN's 64 channels, globally average-pooled, x 512 (+ bias)
        counts="parameters: encoder 77,984, bottleneck 33,280, head 2,052", other_architecture=["--pool", "flatten"],
        small_network=[], other_script="rainbow_atari_gap.py",
    ),
    "rainbow": dict(
        script="rainbow_atari_gap.py", smoke=["--iteration-steps", "200"], loss_tag="losses/loss",
        bottleneck=32 * 2048 + 2048,  # GAP: C x dim weights
        # Impala (16, 32, 32): 592 + 4 x 2,320 + 4,640 + 4 x 9,248 + 9,248 + 4 x 9,248; head 2048 x 4 actions x 51 atoms
        counts="parameters: encoder 97,744, bottleneck 67,584, head 417,996", other_architecture=["--noisy"],
        small_network=["--encoder", "nature", "--dense-scale", "1"], other_script="dqn_atari_gap.py",
    ),
}


def run_folders(cwd):
    return sorted(glob.glob(os.path.join(cwd, "runs", "*")))


def smoke_run(tmp_path_factory, name):
    """The script's smoke run, once per test session for every file that asks: 400 steps of 2 envs with evaluation,
    diagnostics and checkpoints every 200 steps. Returns (cwd, run_dir, result); tests only read it."""
    cwd = tmp_path_factory.getbasetemp() / f"{name}_smoke"
    if not (cwd / "result.json").exists():
        cwd.mkdir(exist_ok=True)
        result = run_script(SCRIPTS[name]["script"], *TINY, *SMOKE, *SCRIPTS[name]["smoke"], cwd=cwd)
        (cwd / "result.json").write_text(json.dumps(
            {"returncode": result.returncode, "stdout": result.stdout, "stderr": result.stderr}))
    result = types.SimpleNamespace(**json.loads((cwd / "result.json").read_text()))
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_folders(cwd)
    return cwd, run_dir, result


@pytest.fixture(scope="module", params=sorted(SCRIPTS))
def smoke(request, tmp_path_factory):
    return (request.param, *smoke_run(tmp_path_factory, request.param))


def test_tensorboard_has_the_contract_tags(smoke):
    name, _, run_dir, _ = smoke
    scalars = read_scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/learning_rate", "charts/epsilon",
                SCRIPTS[name]["loss_tag"], "losses/q_values", "eval/return", "eval/normalized_score",
                "diag/dormant_fraction/encoder", "diag/dormant_fraction/bottleneck", "diag/dormant_fraction/head",
                "diag/feature_norm", "diag/params/encoder", "diag/params/bottleneck", "diag/params/head"]:
        assert tag in scalars, tag
    assert [step for step, _ in scalars["eval/return"]] == [200, 400]
    assert [step for step, _ in scalars["diag/feature_norm"]] == [200, 400]
    assert scalars["diag/params/bottleneck"] == [(0, SCRIPTS[name]["bottleneck"])]
    images = read_images(run_dir)
    assert [step for step, _, _ in images["images/saliency"]] == [200, 400]
    assert images["images/grad_cam"] == images["images/saliency"]  # at every diagnostics step, resized to the frames


def test_target_network_is_the_online_network_copied_at_the_last_sync(smoke):
    """Synced every 50 agent steps, after that step's updates: at step 400 (a sync step) the target
    equals the online network, which training moved away from the one saved at step 200."""
    _, _, run_dir, _ = smoke
    assert target_is_online_after_sync(run_dir) == (True, True)


def test_parameter_counts_are_printed(smoke):
    name, _, _, result = smoke
    assert SCRIPTS[name]["counts"] in result.stdout


def test_checkpoints_load_as_plain_data_with_the_replay_beside_the_newest(smoke):
    name, _, run_dir, _ = smoke
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert names == ["replay.pt", "step_000000000200.pt", "step_000000000400.pt"]
    checkpoint = torch.load(os.path.join(run_dir, "checkpoints", "step_000000000200.pt"), weights_only=True)
    assert checkpoint["script"] == SCRIPTS[name]["script"] and checkpoint["global_step"] == 200
    assert {"q_network", "target_network", "optimizer", "rng", "args"} <= set(checkpoint) and "replay" not in checkpoint
    saved = torch.load(os.path.join(run_dir, "checkpoints", "replay.pt"), weights_only=True)
    assert saved["global_step"] == 400 and saved["buffer_time"] == 200  # beside the newest checkpoint only
    assert saved["replay"]["frames"].dtype == torch.uint8 and saved["replay"]["frames"].shape == (2, 200, 84, 84)
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    assert final["global_step"] == 400 and final["update_count"] == (400 - 100) // 4


def test_capture_video_writes_evaluation_gifs(smoke):
    _, _, run_dir, _ = smoke
    videos = sorted(os.path.basename(path) for path in glob.glob(os.path.join(run_dir, "videos", "*.gif")))
    assert videos == ["eval_step_000000000200.gif", "eval_step_000000000400.gif"]


def test_resume_continues_the_step_count_and_the_replay_in_the_same_folder(smoke, tmp_path):
    name, cwd, run_dir, _ = smoke
    shutil.copytree(os.path.join(cwd, "runs"), tmp_path / "runs")  # a run folder moved as a whole continues where it is
    (run_dir,) = run_folders(tmp_path)
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000400.pt")  # the newest: its replay lies beside it
    result = run_script(SCRIPTS[name]["script"], *TINY, *SCRIPTS[name]["smoke"], "--total-timesteps", "600",
                        "--eval-every", "0", "--diag-every", "0", "--save-every", "200", "--save-buffer",
                        "--resume", checkpoint, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at step 400" in result.stdout
    assert run_folders(tmp_path) == [run_dir]
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    # the restored replay is warm: learning goes on at once, one update per 4 agent steps
    assert final["global_step"] == 600 and final["update_count"] == (600 - 100) // 4
    saved = torch.load(os.path.join(run_dir, "checkpoints", "replay.pt"), weights_only=True)  # beside step 600's checkpoint
    assert saved["global_step"] == 600 and saved["buffer_time"] == 200 + 1 + 100  # 200 slots each, a reset, 100 more
    sps_steps = [step for step, _ in read_scalars(run_dir)["charts/SPS"]]
    assert sps_steps[-1] == 600 and max(sps_steps) == 600 and 300 in sps_steps  # the first run's events are kept
    # TensorBoard reads the folder as a whole and drops what the resume's purge step covers: the first run's points
    # up to its checkpoint's step stay (those at 400 were logged before the checkpoint was saved)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = EventAccumulator(run_dir)
    tensorboard.Reload()
    assert [event.step for event in tensorboard.Scalars("charts/SPS")] == [100, 200, 300, 400, 500, 600]


def test_resume_refuses_a_checkpoint_of_another_architecture(smoke):
    name, cwd, run_dir, _ = smoke
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000200.pt")
    result = run_script(SCRIPTS[name]["script"], *TINY, *SCRIPTS[name]["other_architecture"], "--resume", checkpoint,
                        cwd=cwd)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and SCRIPTS[name]["other_architecture"][0] in result.stderr


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_resume_refuses_a_checkpoint_of_another_script(name, tmp_path):
    fake = tmp_path / "other.pt"
    torch.save({"script": SCRIPTS[name]["other_script"], "args": {}}, fake)
    result = run_script(SCRIPTS[name]["script"], *TINY, "--resume", str(fake), cwd=tmp_path)
    assert result.returncode == 2 and SCRIPTS[name]["other_script"] in result.stderr
    assert result.stderr.strip().count("\n") == 0 and not os.path.exists(tmp_path / "runs")


BAD_INPUT = [
    (["--env-id", "NoSuchGame"], "--env-id"),
    (["--env-id", "Ant"], "--env-id"),  # an EnvPool -v5 id, but MuJoCo
    (["--pool", "mean"], "--pool"),
    (["--encoder", "resnet"], "--encoder"),
    (["--resolution", "0"], "--resolution"),
    (["--encoder", "nature", "--resolution", "0"], "--resolution"),
    (["--batch-size", "500"], "--batch-size"),
    (["--learning-starts", "4"], "--learning-starts"),
    (["--buffer-size", "100000000000"], "--buffer-size"),  # 700 TB of frames: more than the free memory
    pytest.param(["--track"], "--track", marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None,
                                                                  reason="wandb is installed")),
]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
@pytest.mark.parametrize("flags,named", BAD_INPUT)
def test_bad_input_stops_before_any_work_with_one_line(name, tmp_path, flags, named):
    result = run_script(SCRIPTS[name]["script"], *TINY, *flags, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and named in result.stderr
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_non_finite_loss_stops_with_a_message_and_a_checkpoint_of_the_last_good_state(name, tmp_path):
    result = run_script(SCRIPTS[name]["script"], *TINY, *SCRIPTS[name]["small_network"], "--total-timesteps", "2000",
                        "--learning-rate", "1e30", "--eval-every", "0", "--diag-every", "0", "--save-every", "0",
                        "--log-every", "50", cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "error: non-finite loss" in result.stderr
    (run_dir,) = run_folders(tmp_path)
    (saved,) = glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))
    checkpoint = torch.load(saved, weights_only=True)
    assert all(torch.isfinite(p).all() for p in checkpoint["q_network"].values())
    assert not os.path.exists(os.path.join(run_dir, "final.pt"))


@pytest.mark.parametrize("name,flags,updates", [
    ("dqn", ["--total-timesteps", "140", "--learning-starts", "120", "--eval-episodes", "1", "--max-episode-steps", "30",
             "--double"], (140 - 120) // 4),
    pytest.param("rainbow", ["--encoder", "nature", "--dense-scale", "1", "--total-timesteps", "200"], (200 - 100) // 4,
                 marks=pytest.mark.slow),
])
def test_compile_runs_on_cpu(name, flags, updates, tmp_path):
    result = run_script(SCRIPTS[name]["script"], *TINY, "--compile", "--eval-every", "0", "--diag-every", "0",
                        "--save-every", "0", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = run_folders(tmp_path)
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    assert final["update_count"] == updates and not any(key.startswith("_orig_mod") for key in final["q_network"])
