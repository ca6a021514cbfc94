"""utils.py: dormant fraction, saliency, Grad-CAM, RNG state, checkpoints, run folders, score tables."""
import dataclasses
import glob
import json
import os
import random
import shutil
import subprocess
import sys

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


def slow_grad_cam(encoder, head, frames, step=1e-6):
    """Grad-CAM one image, one channel, one feature at a time: alpha_k = mean over (i, j) of the central finite
    difference of Q(s, a*) in A[k, i, j]; cam = ReLU(sum_k alpha_k A^k); min-max, an OpenCV-style bilinear resize
    (source = (destination + 0.5) x in / out - 0.5, clamped at the edges) and min-max again, as pytorch-grad-cam."""
    images = []
    for frame in frames:
        with torch.no_grad():
            feature_map = encoder(frame[None])[0].numpy()
        channels, height, width = feature_map.shape

        def q(values):
            return head(torch.from_numpy(values)[None])[0].detach().numpy()

        greedy = int(np.argmax(q(feature_map)))
        alpha = []
        for k in range(channels):
            slopes = []
            for i in range(height):
                for j in range(width):
                    up, down = feature_map.copy(), feature_map.copy()
                    up[k, i, j] += step
                    down[k, i, j] -= step
                    slopes.append((q(up)[greedy] - q(down)[greedy]) / (2 * step))
            alpha.append(sum(slopes) / len(slopes))
        cam = np.zeros((height, width))
        for k in range(channels):
            cam += alpha[k] * feature_map[k]
        cam = np.maximum(cam, 0)
        cam = (cam - cam.min()) / (cam.max() - cam.min() + 1e-7)
        out_h, out_w = frame.shape[-2:]
        resized = np.zeros((out_h, out_w))
        for y in range(out_h):
            for x in range(out_w):
                sy = max((y + 0.5) * height / out_h - 0.5, 0.0)
                sx = max((x + 0.5) * width / out_w - 0.5, 0.0)
                y0, x0 = min(int(sy), height - 1), min(int(sx), width - 1)
                y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
                wy, wx = sy - y0, sx - x0
                resized[y, x] = ((1 - wy) * ((1 - wx) * cam[y0, x0] + wx * cam[y0, x1])
                                 + wy * ((1 - wx) * cam[y1, x0] + wx * cam[y1, x1]))
        images.append((resized - resized.min()) / (resized.max() - resized.min() + 1e-7))
    return np.stack(images)[:, None]


def tiny_q_network():
    """A hand-made Q-network: conv encoder 2 x 9 x 9 -> 3 x 4 x 4 (its ReLU last), flatten -> 5 -> ReLU -> 4 actions."""
    torch.manual_seed(2)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2), torch.nn.ReLU()).double()
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4)).double()
    return encoder, head


def test_grad_cam_matches_a_per_channel_finite_difference_reference():
    encoder, head = tiny_q_network()
    frames = torch.rand(3, 2, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    greedy = head(encoder(frames)).argmax(dim=1)
    assert greedy.tolist() == [1, 1, 0]  # each image is explained for its own greedy action
    images = utils.grad_cam(encoder, head, frames)
    assert images.shape == (3, 1, 9, 9)
    np.testing.assert_allclose(images.numpy(), slow_grad_cam(encoder, head, frames), atol=1e-6)
    assert images.amin(dim=(1, 2, 3)).tolist() == [0.0] * 3
    assert images.amax(dim=(1, 2, 3)).tolist() == pytest.approx([1.0] * 3)  # no image all zero: a test of every one


def test_grad_cam_touches_no_parameter_gradient():
    encoder, head = tiny_q_network()
    utils.grad_cam(encoder, head, torch.rand(2, 2, 9, 9, dtype=torch.float64))
    assert all(p.grad is None for p in [*encoder.parameters(), *head.parameters()])


def test_grad_cam_of_a_map_that_only_lowers_q_is_zero_not_nan():
    """Every alpha_k < 0 on a non-negative map: ReLU leaves nothing, and the image is all zeros."""
    encoder, _ = tiny_q_network()
    images = utils.grad_cam(encoder, lambda feature_map: -feature_map.sum(dim=(2, 3)), torch.rand(2, 2, 9, 9).double())
    assert images.abs().max().item() == 0.0


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    utils.seed_everything(3, False)
    path = str(tmp_path / "c" / "state.pt")
    utils.save_checkpoint(path, {"rng": utils.rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(1)
    utils.set_rng_state(torch.load(path, weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert not os.path.exists(path + ".tmp")


@dataclasses.dataclass
class FakeArgs:
    runs_dir: str = "runs"
    track: bool = False
    env_id: str = "game"
    exp_name: str = "exp"
    seed: int = 1
    resume: str = ""
    pool: str = "avg"
    width: int = 2
    learning_rate: float = 1e-3
    eval_every: int = 100
    total_timesteps: int = 32
    keep_checkpoints: int = 3
    progress: bool = False


def args_like(tmp_path, **overrides):
    return FakeArgs(**dict(dict(runs_dir=str(tmp_path)), **overrides))


def make_run(tmp_path, name, steps=(), final=False, **config):
    """A run folder as a script leaves it: config.json, checkpoints of `steps`, maybe final.pt."""
    run_dir = tmp_path / name
    (run_dir / "checkpoints").mkdir(parents=True)
    utils.write_json(str(run_dir / "config.json"), dataclasses.asdict(args_like(tmp_path, **config)))
    for step in steps:
        utils.save_checkpoint(utils.checkpoint_path(str(run_dir), step), {"global_step": step})
    if final:
        utils.save_checkpoint(str(run_dir / "final.pt"), {"global_step": max(steps, default=0)})
    return str(run_dir)


def test_load_checkpoint_refuses_other_script_and_other_network(tmp_path, capsys):
    path = str(tmp_path / "c.pt")
    utils.save_checkpoint(path, {"script": "a.py", "format": utils.CHECKPOINT_FORMAT, "args": {"pool": "avg", "width": 2},
                                 "global_step": 0})
    assert utils.load_checkpoint(path, "a.py", args_like(tmp_path), ["pool", "width"])["script"] == "a.py"
    with pytest.raises(SystemExit) as exit_info:
        utils.load_checkpoint(path, "b.py", args_like(tmp_path), ["pool"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        utils.load_checkpoint(path, "a.py", args_like(tmp_path, pool="flatten"), ["pool", "width"])
    assert exit_info.value.code == 2
    assert "--pool" in capsys.readouterr().err.strip().splitlines()[-1]


def test_load_checkpoint_refuses_an_older_format_with_one_line(tmp_path, capsys):
    path = str(tmp_path / "c.pt")
    utils.save_checkpoint(path, {"script": "a.py", "args": {"pool": "avg"}, "global_step": 0})  # before formats: 1
    with pytest.raises(SystemExit) as exit_info:
        utils.load_checkpoint(path, "a.py", args_like(tmp_path), ["pool"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "checkpoint format 1" in err


def test_load_checkpoint_without_its_arguments_exits_2_with_one_line(tmp_path, capsys):
    path = str(tmp_path / "c.pt")
    utils.save_checkpoint(path, {"script": "a.py", "global_step": 3})
    with pytest.raises(SystemExit) as exit_info:
        utils.load_checkpoint(path, "a.py", args_like(tmp_path), ["pool"])
    assert exit_info.value.code == 2 and "lacks the resolved arguments" in capsys.readouterr().err


def test_resume_auto_finds_latest_checkpoint_else_starts_fresh(tmp_path):
    args = args_like(tmp_path, resume="auto")
    run_dir, checkpoint = utils.resolve_run(args)
    assert checkpoint is None and args.resume == ""
    assert os.path.basename(run_dir).startswith("game__exp__1__")
    old = make_run(tmp_path, "game__exp__1__100", steps=(5, 10))
    run_dir, checkpoint = utils.resolve_run(args_like(tmp_path, resume="auto"))
    assert run_dir == old and checkpoint.endswith("step_000000000010.pt")


def test_resume_auto_continues_only_a_run_of_the_same_training_configuration(tmp_path):
    same = make_run(tmp_path, "game__exp__1__100", steps=(5,))
    make_run(tmp_path, "game__exp__1__200", steps=(5,), learning_rate=3e-4)  # newer, another experiment
    assert utils.resolve_run(args_like(tmp_path, resume="auto"))[0] == same
    # a bookkeeping flag (evaluation interval) does not make another experiment
    assert utils.resolve_run(args_like(tmp_path, resume="auto", eval_every=7))[0] == same
    run_dir, checkpoint = utils.resolve_run(args_like(tmp_path, resume="auto", learning_rate=5e-5))
    assert checkpoint is None and run_dir not in (same, str(tmp_path / "game__exp__1__200"))


def test_a_run_from_before_a_flag_existed_resumes_at_that_flags_default(tmp_path):
    run = make_run(tmp_path, "game__exp__1__100", steps=(5,))
    config = json.load(open(os.path.join(run, "config.json")))
    del config["width"]  # written by a script that had no --width yet
    utils.write_json(os.path.join(run, "config.json"), config)
    assert utils.resolve_run(args_like(tmp_path, resume="auto")) == (run, utils.checkpoint_path(run, 5))
    assert utils.resolve_run(args_like(tmp_path, resume="auto", width=3))[1] is None  # another value: not that run
    old = utils.checkpoint_payload("x.py", args_like(tmp_path), 5)
    del old["args"]["width"]
    utils.save_checkpoint(utils.checkpoint_path(run, 5), old)
    assert utils.load_checkpoint(utils.checkpoint_path(run, 5), "x.py", args_like(tmp_path), ("width",))["global_step"] == 5
    with pytest.raises(SystemExit):
        utils.load_checkpoint(utils.checkpoint_path(run, 5), "x.py", args_like(tmp_path, width=3), ("width",))


def test_resume_auto_reuses_a_folder_a_kill_left_without_checkpoint(tmp_path):
    orphan = make_run(tmp_path, "game__exp__1__100")
    make_run(tmp_path, "game__exp__1__50", steps=(5,), final=False, learning_rate=3e-4)
    make_run(tmp_path, "game__exp__1__60", steps=(5,), final=True, pool="flatten")
    assert utils.resolve_run(args_like(tmp_path, resume="auto")) == (orphan, None)


def test_resume_auto_of_a_finished_run_says_so_and_exits_0_without_touching_it(tmp_path, capsys):
    older = make_run(tmp_path, "game__exp__1__100", steps=(5,))  # an older, unfinished run of the same configuration
    finished = make_run(tmp_path, "game__exp__1__150", steps=(5, 10), final=True)
    make_run(tmp_path, "game__exp__1__200", steps=(5,), learning_rate=3e-4)  # newer, another experiment
    before = sorted((path, os.path.getmtime(path)) for path in glob.glob(str(tmp_path / "**"), recursive=True))
    with pytest.raises(SystemExit) as exit_info:
        utils.resolve_run(args_like(tmp_path, resume="auto"))
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"--resume auto: {finished} has finished (final.pt); nothing to train"
    assert sorted((path, os.path.getmtime(path)) for path in glob.glob(str(tmp_path / "**"), recursive=True)) == before
    assert utils.resolve_run(args_like(tmp_path, resume="auto", learning_rate=3e-4))[1].endswith("step_000000000005.pt")
    assert older


@pytest.mark.parametrize("exp_name", ["a/b", "a__b", ""])
def test_an_experiment_name_that_cannot_name_a_run_folder_exits_2_with_one_line(exp_name, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        utils.resolve_run(args_like(tmp_path, exp_name=exp_name))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"--exp-name {exp_name!r}" in err
    assert os.listdir(tmp_path) == []


def test_resume_auto_handles_glob_characters_in_the_experiment_name(tmp_path):
    run = make_run(tmp_path, "game__exp[1]__1__100", steps=(5,), exp_name="exp[1]")
    assert utils.resolve_run(args_like(tmp_path, resume="auto", exp_name="exp[1]")) == (run, utils.latest_checkpoint(run))


def test_resume_path_continues_in_the_run_folder_the_checkpoint_records(tmp_path):
    run = make_run(tmp_path, "game__exp__1__100", steps=(5,), final=True)
    for path in (utils.checkpoint_path(run, 5), os.path.join(run, "final.pt")):
        assert utils.resolve_run(args_like(tmp_path, resume=path)) == (run, path)
    moved = tmp_path / "elsewhere" / "game__exp__1__100"
    shutil.copytree(run, moved)  # a run folder moved as a whole continues where it now is
    path = os.path.join(moved, "final.pt")
    assert utils.resolve_run(args_like(tmp_path, resume=path)) == (str(moved), path)


def test_a_copied_checkpoint_starts_a_new_run_folder(tmp_path):
    run = make_run(tmp_path, "game__exp__1__100", steps=(5,))
    copied = str(tmp_path / "x.pt")
    shutil.copy(utils.checkpoint_path(run, 5), copied)
    run_dir, checkpoint = utils.resolve_run(args_like(tmp_path / "runs", resume=copied))
    assert checkpoint == copied and os.path.dirname(run_dir) == str(tmp_path / "runs")
    assert os.path.basename(run_dir).startswith("game__exp__1__")


def test_one_process_per_run_folder(tmp_path):
    run_dir = str(tmp_path / "game__exp__1__100")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time; sys.path.insert(0, {os.path.dirname(utils.__file__)!r}); import utils, dataclasses
@dataclasses.dataclass
class A:
    runs_dir: str = {str(tmp_path)!r}
    track: bool = False
utils.start_run(A(), {run_dir!r}); print("locked", flush=True); time.sleep(30)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    second = subprocess.run([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {os.path.dirname(utils.__file__)!r}); import utils, dataclasses
@dataclasses.dataclass
class A:
    runs_dir: str = {str(tmp_path)!r}
    track: bool = False
utils.start_run(A(), {run_dir!r})
"""], capture_output=True, text=True, timeout=60)
    holder.kill(), holder.wait()
    assert second.returncode == 2 and second.stderr.count("\n") == 1 and "in use by another process" in second.stderr
    utils.start_run(args_like(tmp_path), run_dir).close()  # a killed holder leaves no stale lock
    utils._run_lock.close()


def test_start_run_removes_what_a_killed_process_left(tmp_path):
    run_dir = make_run(tmp_path, "game__exp__1__100", steps=(5,))
    for leftover in ("config.json.tmp", "checkpoints/step_000000000010.pt.tmp"):
        open(os.path.join(run_dir, leftover), "w").close()
    utils.start_run(args_like(tmp_path), run_dir, purge_step=5).close()
    utils._run_lock.close()
    assert not glob.glob(os.path.join(run_dir, "**", "*.tmp"), recursive=True)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_000000000005.pt"]


def test_a_runs_dir_that_cannot_hold_folders_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        utils.start_run(args_like(tmp_path / "file"), str(tmp_path / "file" / "game__exp__1__1"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--runs-dir" in err


def test_periodic_checkpoints_keep_the_newest_and_one_replay_beside_the_newest(tmp_path):
    run_dir = make_run(tmp_path, "game__exp__1__100")
    for step in (10, 20, 30, 40):
        utils.save_periodic_checkpoint(run_dir, step, {"global_step": step}, keep=3, replay={"replay": torch.full((2,), step)})
    names = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert names == ["replay.pt", "step_000000000020.pt", "step_000000000030.pt", "step_000000000040.pt"]
    newest = utils.load_replay(utils.checkpoint_path(run_dir, 40), 40)
    assert torch.equal(newest["replay"], torch.full((2,), 40)) and set(newest) == {"replay"}
    assert utils.load_replay(utils.checkpoint_path(run_dir, 30), 30) is None  # an older checkpoint has no replay
    assert utils.load_replay(str(tmp_path / "copied.pt"), 40) is None  # nor one copied out of its run folder


def test_finite_flag_looks_at_weights_and_optimiser_moments():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    assert utils.finite_flag(model, optimizer, torch.zeros(2)) == 1
    optimizer.state[model.weight]["exp_avg_sq"][0, 0] = float("nan")
    assert utils.finite_flag(model, optimizer) == 0
    assert utils.finite_flag(model, torch.tensor([float("inf")])) == 0


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


@pytest.mark.parametrize("previous,step,every,expected", [
    (0, 4, 4, True), (3, 4, 4, True), (4, 7, 4, False), (7, 9, 4, True), (0, 100, 0, False), (5, 13, 4, True),
])
def test_crossed_is_true_when_a_multiple_of_the_interval_lies_in_the_step(previous, step, every, expected):
    slow = every > 0 and any(k % every == 0 for k in range(previous + 1, step + 1))
    assert utils.crossed(previous, step, every) == slow == expected


def test_checkpoint_payload_holds_what_every_checkpoint_needs_and_the_scripts_state():
    payload = utils.checkpoint_payload("x.py", FakeArgs(), 12, model={"w": torch.ones(1)})
    assert (payload["script"], payload["global_step"], payload["args"]["seed"]) == ("x.py", 12, 1)
    assert set(payload["rng"]) >= {"python", "numpy", "torch"} and torch.equal(payload["model"]["w"], torch.ones(1))


def test_stop_if_nonfinite_writes_the_last_good_state_and_exits_1(tmp_path, capsys):
    class Writer:
        closed = False

        def close(self):
            self.closed = True

    writer, run_dir = Writer(), str(tmp_path / "run")
    utils.stop_if_nonfinite(True, None, run_dir, 10, writer)  # finite: nothing happens
    assert not writer.closed and not os.path.exists(run_dir)
    last_good = utils.checkpoint_payload("x.py", FakeArgs(), 8)
    with pytest.raises(SystemExit) as stop:
        utils.stop_if_nonfinite(False, last_good, run_dir, 10, writer)
    assert stop.value.code == 1 and writer.closed
    saved = torch.load(utils.checkpoint_path(run_dir, 8), weights_only=True)
    assert saved["global_step"] == 8
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite" in err and "step_000000000008.pt" in err


def test_stop_if_nonfinite_before_any_good_state_writes_nothing(tmp_path, capsys):
    class Writer:
        def close(self):
            pass

    with pytest.raises(SystemExit):
        utils.stop_if_nonfinite(False, None, str(tmp_path / "run"), 3, Writer())
    assert not os.path.exists(tmp_path / "run") and "no checkpoint was written" in capsys.readouterr().err


def test_run_keeps_a_fresh_run_and_its_resume_in_one_folder(tmp_path, capsys):
    from conftest import read_scalars

    args = args_like(tmp_path)
    run = utils.Run(args, "x.py", utils.RUN_NEUTRAL_FLAGS, ("pool",))
    assert (run.checkpoint, run.step) == (None, 0) and run.dir.startswith(utils.run_prefix(args))
    run.open("cpu", replay="1 GiB")
    assert os.path.isfile(os.path.join(run.dir, "config.json")) and "run_dir = " + run.dir in capsys.readouterr().out
    run.log_parameter_counts({"encoder": 3, "bottleneck": 4})  # a fresh run logs them
    run.start_clock(0)
    run.log(8, {"charts/SPS": run.sps(8)})
    run.keep_good(utils.checkpoint_payload("x.py", args, 8))
    run.check_finite(True, 8)  # finite: nothing happens
    run.save(8, utils.checkpoint_payload("x.py", args, 8))
    run.progress.close()
    run.finish(utils.checkpoint_payload("x.py", args, 16))
    assert torch.load(os.path.join(run.dir, "final.pt"), weights_only=True)["global_step"] == 16
    assert set(read_scalars(run.dir)) == {"charts/SPS", "diag/params/encoder", "diag/params/bottleneck"}
    assert capsys.readouterr().out.endswith(f"done: {run.dir}\n")

    utils._run_lock.close()  # as when the first process ends
    checkpoint_file = utils.checkpoint_path(run.dir, 8)
    resumed = utils.Run(args_like(tmp_path, resume=checkpoint_file), "x.py", utils.RUN_NEUTRAL_FLAGS, ("pool",))
    assert (resumed.dir, resumed.checkpoint_file, resumed.step) == (run.dir, checkpoint_file, 8)
    resumed.open("cpu")
    resumed.keep_good(resumed.checkpoint)
    os.remove(checkpoint_file)
    with pytest.raises(SystemExit) as stop:
        resumed.check_finite(False, 12)  # not finite: the last good state is written back, exit 1
    assert stop.value.code == 1 and torch.load(checkpoint_file, weights_only=True)["global_step"] == 8


def test_log_scalars_writes_every_tag_and_prints_one_line(tmp_path, capsys):
    from conftest import read_scalars
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    utils.log_scalars(writer, 64, {"charts/SPS": 123.456, "losses/td_loss": 0.012345})
    writer.close()
    assert capsys.readouterr().out == "step 64: SPS 123.5, td_loss 0.01235\n"
    scalars = read_scalars(str(tmp_path))
    assert scalars["charts/SPS"] == [(64, pytest.approx(123.456))] and scalars["losses/td_loss"][0][0] == 64


def test_progress_off_the_terminal_prints_a_plain_line_per_interval(capsys, monkeypatch):
    clock = iter([0.0, 10.0, 31.0, 31.5, 62.0])
    monkeypatch.setattr(utils.time, "time", lambda: next(clock))
    progress = utils.Progress(total=1000, step=0, enabled=True, interval=30.0)  # pytest's stderr is not a terminal
    progress.update(100)  # t = 10: within the interval, nothing
    progress.update(300, episodic_return=7.5)  # t = 31: a line
    progress.update()  # t = 31.5: nothing
    progress.close()  # t = 62: the last line
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["progress: step 300/1,000 (30.0 %), SPS 9.7, 0:01:12 left, latest return 7.5",
                     "progress: step 300/1,000 (30.0 %), SPS 4.8, 0:02:25 left, latest return 7.5"]


def test_progress_disabled_prints_nothing(capsys):
    progress = utils.Progress(total=10, step=0, enabled=False, interval=0.0)
    progress.update(5, episodic_return=1.0)
    progress.close()
    assert capsys.readouterr().out == ""


def test_configure_cuda_leaves_a_cpu_run_as_it_was():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    args = dataclasses.make_dataclass("A", [("tf32", bool, True), ("cudnn_benchmark", bool, True),
                                            ("torch_deterministic", bool, False)])()
    utils.configure_cuda(args, torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) == before


def test_training_device_is_cuda_only_when_available_and_asked(monkeypatch):
    flags = dataclasses.make_dataclass("A", [("cuda", bool, True)])
    asked, refused = flags(), flags(cuda=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (utils.training_device(asked).type, utils.training_device(refused).type) == ("cuda", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert utils.training_device(asked).type == "cpu"


def test_mixed_precision_is_bf16_autocast_only_when_asked_and_serves_many_entries():
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    plain = utils.mixed_precision(torch.device("cpu"), False)
    with plain:
        assert layer(x).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    ctx = utils.mixed_precision(torch.device("cpu"), True)
    for _ in range(2):  # one object, entered again and again, leaves autocast off after each
        with ctx:
            assert layer(x).dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        assert not torch.is_autocast_enabled("cpu") and layer(x).dtype == torch.float32


def test_within_calls_the_function_inside_the_context_and_returns_its_result():
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    forward = utils.within(utils.mixed_precision(torch.device("cpu"), True), layer)
    out = forward(x)
    assert out.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    assert torch.allclose(out.float(), layer(x), atol=0.05)
    assert torch.equal(utils.within(utils.mixed_precision(torch.device("cpu"), False), layer)(x), layer(x))
