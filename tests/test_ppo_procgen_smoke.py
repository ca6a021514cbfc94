"""ppo_procgen_impoola.py run for real on CPU with a tiny budget; checks what it wrote."""

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import SCRIPTS, read_image_tags, read_scalars

SCRIPT = "ppo_procgen_impoola.py"
# Bossfight: random play ends an episode in ~45 steps, so evaluations stay short. Width 1, 4 envs x
# 16 steps, 2 iterations: a periodic evaluation, diagnostics and a checkpoint at step 64.
TINY = ["--env-id", "bossfight", "--width", "1", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--total-timesteps", "128", "--eval-every", "64", "--eval-episodes", "2",
        "--final-eval-episodes", "2", "--eval-num-envs", "2", "--save-every", "64", "--diag-every", "64",
        "--diag-batch-size", "8", "--runs-dir", "runs"]
REQUIRED_TAGS = [
    "charts/SPS", "charts/learning_rate", "losses/value_loss", "losses/policy_loss", "losses/entropy",
    "losses/old_approx_kl", "losses/approx_kl", "losses/clipfrac", "losses/explained_variance",
    "eval/train_levels/return", "eval/train_levels/normalized_score", "eval/test_levels/return",
    "eval/test_levels/normalized_score", "diag/dormant_fraction/encoder", "diag/dormant_fraction/bottleneck",
    "diag/dormant_fraction/head", "diag/feature_norm", "diag/params/encoder", "diag/params/bottleneck",
    "diag/params/head",
]


def run_ppo(*flags, cwd, timeout=600):
    """conftest.run_script with one OpenMP thread: on 2 shared, busy cores two threads spin against
    each other and a tiny run takes 4x longer."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, SCRIPT), *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def finished_run(tmp_path_factory, *flags):
    cwd = tmp_path_factory.mktemp("ppo")
    result = run_ppo(*TINY, *flags, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(str(cwd / "runs" / "bossfight__ppo_procgen_impoola__1__*"))
    return {"cwd": cwd, "run_dir": run_dir, "result": result, "scalars": read_scalars(run_dir)}


@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    return finished_run(tmp_path_factory, "--capture-video")


@pytest.fixture(scope="module")
def run128(tmp_path_factory):
    return finished_run(tmp_path_factory, "--resolution", "128")


def check_run(run, resolution):
    scalars, run_dir = run["scalars"], run["run_dir"]
    missing = [tag for tag in REQUIRED_TAGS if tag not in scalars]
    assert not missing
    assert "images/saliency" in read_image_tags(run_dir)
    assert [step for step, _ in scalars["charts/SPS"]] == [64, 128]
    assert [step for step, _ in scalars["eval/test_levels/return"]] == [64, 128]  # periodic, then final
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["resolution"] == resolution and config["pool"] == "avg" and config["num_levels"] == 200
    for name in ("step_000000000064.pt", "step_000000000128.pt"):
        checkpoint = torch.load(os.path.join(run_dir, "checkpoints", name), weights_only=True)
        assert checkpoint["script"] == SCRIPT and checkpoint["global_step"] == int(name[5:17])
        expected_keys = {"rng", "model", "optimizer", "reward_normalizer", "args", "env_states", "next_done", "episodes"}
        assert expected_keys <= set(checkpoint)
        assert len(checkpoint["env_states"]) == 4 and checkpoint["env_states"][0][8:17] == b"bossfight"
    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    assert final["global_step"] == 128 and final["args"]["resolution"] == resolution
    # the first dense layer's input is the pooled channel vector: 32 * width, at any resolution
    assert final["model"]["bottleneck.dense.0.weight"].shape == (256, 32)
    assert final["model"]["encoder.0.weight"].shape == (16, 3, 3, 3)
    # not a terminal: no bar, one progress line at the end (and one every 30 s before it)
    assert "progress: step 128/128 (100.0 %)" in run["result"].stdout


def test_smoke_64_writes_tags_config_and_checkpoints(run64):
    check_run(run64, 64)


def test_smoke_128_writes_tags_config_and_checkpoints(run128):
    check_run(run128, 128)
    assert run128["result"].stderr == ""  # native frames: nothing to warn about


def test_parameters_logged_once_at_step_0_and_printed(run64):
    side_independent = {"encoder": 97_600, "bottleneck": 32 * 256 + 256, "head": 256 * 15 + 15 + 256 + 1}
    for part, count in side_independent.items():
        assert run64["scalars"][f"diag/params/{part}"] == [(0, count)]
    assert "parameters: encoder 97,600, bottleneck 8,448, head 4,112" in run64["result"].stdout


def test_learning_rate_rescaled_by_two_over_width(run64):
    assert all(math.isclose(value, 3.5e-4 * 2 / 1, rel_tol=1e-6) for _, value in run64["scalars"]["charts/learning_rate"])


def test_evaluation_video_written(run64):
    videos = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run64["run_dir"], "videos", "*.gif")))
    assert videos == ["test_levels_step_000000000064.gif", "test_levels_step_000000000128.gif",
                      "train_levels_step_000000000064.gif", "train_levels_step_000000000128.gif"]


def test_a_stopped_and_resumed_run_equals_a_straight_one(run64, tmp_path_factory):
    """The 128-step run resumed to 192 steps against one run of 192 steps: the same losses and weights,
    because the checkpoint holds the games mid-episode, the normaliser's returns and every RNG."""
    longer = [flag if flag != "128" else "192" for flag in TINY]  # --total-timesteps 192: one more iteration
    resumed_cwd = tmp_path_factory.mktemp("resumed")
    shutil.copytree(run64["cwd"] / "runs", resumed_cwd / "runs")
    (run_dir,) = glob.glob(str(resumed_cwd / "runs" / "*"))
    # --resume auto would start a new run: --total-timesteps 192 is another training configuration
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000128.pt")
    resumed = run_ppo(*longer, "--capture-video", "--resume", checkpoint, cwd=resumed_cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 128" in resumed.stdout
    assert glob.glob(str(resumed_cwd / "runs" / "*")) == [run_dir]  # the same run folder
    straight_cwd = tmp_path_factory.mktemp("straight")
    straight = run_ppo(*longer, "--capture-video", cwd=straight_cwd)
    assert straight.returncode == 0, straight.stderr[-3000:]
    (straight_dir,) = glob.glob(str(straight_cwd / "runs" / "*"))
    scalars, expected = read_scalars(run_dir), read_scalars(straight_dir)
    assert [step for step, _ in scalars["charts/SPS"]] == [64, 128, 192]
    assert scalars["diag/params/encoder"] == [(0, 97_600)]  # not logged again by the resumed run
    for tag in ("losses/value_loss", "losses/policy_loss", "losses/approx_kl", "eval/test_levels/return"):
        assert scalars[tag] == expected[tag], tag
    final, final_expected = (torch.load(os.path.join(d, "final.pt"), weights_only=True) for d in (run_dir, straight_dir))
    assert final["global_step"] == 192
    assert all(torch.equal(value, final_expected["model"][name]) for name, value in final["model"].items())
    assert final["env_states"] == final_expected["env_states"]
    returns, returns_expected = (f["reward_normalizer"]["discounted_return"] for f in (final, final_expected))
    assert torch.equal(returns, returns_expected)


def test_resume_refuses_another_architecture(run64, tmp_path):
    checkpoint = os.path.join(run64["run_dir"], "checkpoints", "step_000000000064.pt")
    result = run_ppo(*TINY, "--pool", "flatten", "--resume", checkpoint, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--pool" in result.stderr


def test_non_finite_loss_stops_with_last_good_checkpoint(tmp_path):
    result = run_ppo(*TINY, "--learning-rate", "1e30", "--eval-every", "0", "--final-eval-episodes", "0", cwd=tmp_path)
    assert result.returncode == 1 and "non-finite" in result.stderr
    (path,) = glob.glob(str(tmp_path / "runs" / "*" / "checkpoints" / "*.pt"))
    checkpoint = torch.load(path, weights_only=True)
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())
    assert not glob.glob(str(tmp_path / "runs" / "*" / "final.pt"))


BAD_INPUTS = {
    "unknown game": (["--env-id", "BigfishEasy-v0"], "--env-id"),
    "unknown pool": (["--pool", "mean"], "--pool"),
    "unknown mode": (["--distribution-mode", "extreme"], "--distribution-mode"),
    "zero resolution": (["--resolution", "0"], "--resolution"),
    "negative resolution": (["--resolution", "-5"], "--resolution"),
    "resolution beyond the renderer": (["--resolution", "100000"], "--resolution"),
    "rollout larger than memory": (["--resolution", "4096", "--num-envs", "64", "--num-steps", "256",
                                    "--total-timesteps", "10000000"], "--resolution"),
    "minibatches not dividing the batch": (["--num-minibatches", "7"], "--num-minibatches"),
    "budget below one rollout": (["--total-timesteps", "10"], "--total-timesteps"),
    "micro-batches not dividing the minibatch": (["--micro-batch-size", "3"], "--micro-batch-size 3 must divide"),
    "negative micro-batch size": (["--micro-batch-size", "-1"], "--micro-batch-size"),
    "zero width": (["--width", "0"], "--width"),
    "negative start level": (["--start-level", "-1"], "--start-level"),
    "negative number of levels": (["--num-levels", "-1"], "--num-levels"),
    "levels beyond procgen's seeds": (["--start-level", "2147483600", "--num-levels", "200"], "--start-level"),
    "seed beyond procgen's seeds": (["--seed", "2147483647"], "--seed"),
    "negative torch threads": (["--torch-threads", "-1"], "--torch-threads"),
    "missing checkpoint": (["--resume", "nowhere.pt"], "--resume"),
    "checkpoint of another script": (["--resume", "other.pt"], "dqn_atari_gap.py"),
    "checkpoint with the old layer names": (["--resume", "old.pt"], "was written by an older"),  # format 1: no Bottleneck
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_before_any_work(case, tmp_path, monkeypatch, capsys):
    """main() in this process (a subprocess per case costs a torch import each); the real exit path
    is checked once below."""
    import ppo_procgen_impoola as ppo

    torch.save({"script": "dqn_atari_gap.py", "args": {}}, tmp_path / "other.pt")
    tiny_architecture = {"env_id": "bossfight", "pool": "avg", "width": 1, "dense_scale": 1, "resolution": 64, "num_envs": 4,
                         "distribution_mode": "easy"}  # a checkpoint of the script before agent.dense became agent.bottleneck
    torch.save({"script": SCRIPT, "args": tiny_architecture, "global_step": 64, "env_states": [],
                "model": {"dense.0.weight": torch.zeros(256, 32)}}, tmp_path / "old.pt")
    flags, named = BAD_INPUTS[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [SCRIPT, *TINY, *flags])
    with pytest.raises(SystemExit) as exit_info:
        ppo.main()
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and named in stderr
    assert not os.path.exists(tmp_path / "runs")


def test_full_distribution_training_with_num_levels_0(tmp_path):
    result = run_ppo(*TINY, "--num-levels", "0", "--total-timesteps", "64", "--eval-every", "0", "--final-eval-episodes", "0",
                     "--diag-every", "0", "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "progress:" not in result.stdout
    (config,) = glob.glob(str(tmp_path / "runs" / "*" / "config.json"))
    assert json.load(open(config))["num_levels"] == 0


def test_track_without_wandb_exits_2(tmp_path):
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    result = run_ppo(*TINY, "--track", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--track" in result.stderr
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.slow
def test_compile_run_on_cpu(tmp_path):
    result = run_ppo(*TINY, "--compile", "--eval-every", "0", "--diag-every", "0", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (final,) = glob.glob(str(tmp_path / "runs" / "*" / "final.pt"))
    assert torch.load(final, weights_only=True)["global_step"] == 128
