"""utils.py: dormant fraction, saliency, RNG state, checkpoints, run folders, score tables."""
import os
import random
import types

import numpy as np
import pytest
import torch

import utils


def slow_dormant_fraction(layers, threshold):
    dormant = total = 0
    for layer in layers:  # layer: nested lists [batch][neuron] or [batch][channel][h][w]
        array = np.abs(np.asarray(layer, dtype=np.float64))
        n = array.shape[1]
        scores = [array[:, i].mean() for i in range(n)]
        layer_mean = sum(scores) / n
        for score in scores:
            total += 1
            dormant += score / layer_mean <= threshold
    return dormant / total


def test_dormant_fraction_dense_layer_by_hand():
    # neuron scores 1, 2, 0, 1 -> layer mean 1 -> normalised 1, 2, 0, 1; with tau 0.025 one is dormant
    layer = torch.tensor([[1.0, 2.0, 0.0, -1.0], [-1.0, 2.0, 0.0, 1.0]])
    assert utils.dormant_fraction([layer], 0.025) == 0.25
    assert utils.dormant_fraction([layer], 1.0) == 0.75


def test_dormant_fraction_conv_channels_average_over_batch_and_space():
    conv = torch.zeros(2, 3, 2, 2)
    conv[:, 0] = 1.0          # score 1
    conv[0, 1, 0, 0] = 0.08   # score 0.01
    conv[:, 2] = -2.0         # score 2
    layers = [conv, torch.randn(5, 7)]
    for threshold in (0.0, 0.025, 0.1, 0.5):
        expected = slow_dormant_fraction([layer.tolist() for layer in layers], threshold)
        assert utils.dormant_fraction(layers, threshold) == pytest.approx(expected)


def test_dormant_fraction_dead_layer_is_all_dormant():
    assert utils.dormant_fraction([torch.zeros(4, 6)], 0.0) == 1.0


def test_saliency_image_clips_at_99th_percentile_and_scales_to_unit_range():
    gradient = torch.zeros(1, 3, 10, 10)
    gradient[0, 0] = torch.arange(100.0).view(10, 10)
    gradient[0, 2, 0, 0] = -1000.0  # channels combine by max of |grad|; this outlier is clipped
    image = utils.saliency_image(gradient)
    assert image.shape == (1, 1, 10, 10)
    flat = np.abs(gradient.numpy()).max(axis=1).ravel()
    ceiling = np.quantile(flat, 0.99)
    expected = np.minimum(flat, ceiling)
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(image.numpy().ravel(), expected, atol=1e-4)


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    utils.seed_everything(3, False)
    path = str(tmp_path / "c" / "state.pt")
    utils.save_checkpoint(path, {"rng": utils.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    utils.set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert not os.path.exists(path + ".tmp")


def args_like(tmp_path, **overrides):
    fields = dict(runs_dir=str(tmp_path), env_id="game", exp_name="exp", seed=1, resume="", pool="avg", width=2)
    fields.update(overrides)
    return types.SimpleNamespace(**fields)


def test_load_checkpoint_refuses_other_script_and_other_network(tmp_path, capsys):
    path = str(tmp_path / "c.pt")
    utils.save_checkpoint(path, {"script": "a.py", "args": {"pool": "avg", "width": 2}})
    assert utils.load_checkpoint(path, "a.py", args_like(tmp_path), ["pool", "width"])["script"] == "a.py"
    with pytest.raises(SystemExit) as exit_info:
        utils.load_checkpoint(path, "b.py", args_like(tmp_path), ["pool"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        utils.load_checkpoint(path, "a.py", args_like(tmp_path, pool="flatten"), ["pool", "width"])
    assert exit_info.value.code == 2
    assert "--pool" in capsys.readouterr().err.strip().splitlines()[-1]


def test_resume_auto_finds_latest_checkpoint_else_starts_fresh(tmp_path):
    args = args_like(tmp_path, resume="auto")
    run_dir, checkpoint = utils.resolve_run(args)
    assert checkpoint is None and args.resume == ""
    assert os.path.basename(run_dir).startswith("game__exp__1__")
    old = tmp_path / "game__exp__1__100" / "checkpoints"
    old.mkdir(parents=True)
    for step in (5, 10):
        (old / f"step_{step:012d}.pt").write_bytes(b"")
    run_dir, checkpoint = utils.resolve_run(args_like(tmp_path, resume="auto"))
    assert run_dir == str(tmp_path / "game__exp__1__100")
    assert checkpoint.endswith("step_000000000010.pt")


def test_score_normalisation_tables():
    assert utils.procgen_normalized_score("bigfish", "easy", 40) == 1.0
    assert utils.procgen_normalized_score("starpilot", "hard", 1.5) == 0.0
    assert utils.atari_human_normalized_score("Pong", 14.6) == pytest.approx(1.0)
    assert utils.atari_human_normalized_score("Breakout", 1.7) == 0.0
    assert utils.atari_human_normalized_score("NotAGame", 1.0) is None
    assert len(utils.PROCGEN_SCORE_RANGES) == 16


def test_save_video_writes_a_readable_gif(tmp_path):
    from PIL import Image

    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    path = str(tmp_path / "videos" / "eval.gif")
    utils.save_video(path, frames)
    with Image.open(path) as image:
        assert image.n_frames == 5 and image.size == (16, 16)
    assert os.listdir(tmp_path / "videos") == ["eval.gif"]


def test_free_memory_on_cpu_is_the_available_ram():
    free = utils.free_memory_bytes(torch.device("cpu"))
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < free <= total
