"""The procgen_hd package on the real library: native frames at every resolution, the same game at
every resolution, procgen's level protocol and same-step reset, saved states, and refused options."""

import os
import subprocess
import sys
import tempfile

import envpool
import numpy as np
import procgen_hd
import pytest
import torch
import torch.nn.functional as F

STEPS, NUM_ENVS, FRAME_STEPS = 1000, 8, (0, 37, 250, 600, 999)


def record(resolution: int, path: str):
    """Play fixed random actions at one resolution (the fork draws one size per process) and save what came back."""
    envs = procgen_hd.ProcgenHDEnv("bigfish", NUM_ENVS, resolution, num_levels=50, start_level=3, seed=5)
    obs, info = envs.reset()
    actions = np.random.default_rng(0).integers(0, 15, (STEPS, NUM_ENVS))
    frames, rewards, dones, seeds = [obs], [], [], []
    for step, action in enumerate(actions):
        obs, reward, done, info = envs.step(action)
        rewards.append(reward), dones.append(done), seeds.append(info["prev_level_seed"])
        if step + 1 in FRAME_STEPS:
            frames.append(obs)
    np.savez(path, frames=np.stack(frames), rewards=np.stack(rewards), dones=np.stack(dones), seeds=np.stack(seeds))


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """{resolution: the arrays `record` saved}, each resolution in its own process."""
    folder = tmp_path_factory.mktemp("procgen_hd")
    processes = {r: subprocess.Popen([sys.executable, __file__, str(r), str(folder / f"{r}.npz")]) for r in (64, 128, 192)}
    assert all(process.wait(timeout=300) == 0 for process in processes.values())
    return {r: dict(np.load(folder / f"{r}.npz")) for r in processes}


@pytest.mark.parametrize("game", ["bigfish", "coinrun", "starpilot", "maze", "heist"])
def test_frame_at_64_equals_envpool_procgen_for_the_same_level(game):
    envs = procgen_hd.ProcgenHDEnv(game, 2, 64, num_levels=1, start_level=7)
    reference = envpool.make(f"{game.capitalize()}Easy-v0", env_type="gymnasium", num_envs=2, seed=0,
                             num_levels=1, start_level=7)
    obs, info = envs.reset()
    assert obs.shape == (2, 3, 64, 64) and obs.dtype == np.uint8
    assert np.array_equal(obs, reference.reset()[0])
    assert info["level_seed"].tolist() == [7, 7]
    envs.close()


@pytest.mark.parametrize("resolution", [128, 192])
def test_high_resolution_frame_is_native_not_an_upscale_of_the_64_frame(played, resolution):
    low = torch.from_numpy(played[64]["frames"]).flatten(0, 1).float()
    high = torch.from_numpy(played[resolution]["frames"]).flatten(0, 1).float()
    assert high.shape[-2:] == (resolution, resolution)
    for mode in ("nearest", "bilinear", "bicubic"):
        upscale = F.interpolate(low, size=resolution, mode=mode)
        # measured: 3.2-5.4 (a resize, as EnvPool's render at R, stays below 1 at every pixel)
        assert (upscale - high).abs().mean() > 2, f"the {resolution} frame is a {mode} upscale of the 64 frame"
    downsample = F.interpolate(high, size=64, mode="area")
    assert (downsample - low).abs().mean() < 4  # measured 2.2-2.9: the same scene, the same field of view
    assert (low - low.roll(1, dims=0)).abs().mean() > 20  # while another env's scene is far off


def test_same_seeds_and_actions_give_the_same_game_at_64_and_128(played):
    low, high = played[64], played[128]
    assert low["dones"].sum() >= 20  # random play ends bigfish episodes every ~100 steps: many resets compared
    for key in ("rewards", "dones", "seeds"):
        assert np.array_equal(low[key], high[key]), key
    assert low["rewards"].shape == (STEPS, NUM_ENVS)


def test_episode_end_resets_in_the_same_step():
    envs = procgen_hd.ProcgenHDEnv("bigfish", 4, 64, num_levels=10, seed=2)
    obs, info = envs.reset()
    rng = np.random.default_rng(1)
    for _ in range(600):
        playing = info["level_seed"]
        obs, reward, done, info = envs.step(rng.integers(0, 15, 4))
        assert reward.dtype == np.float32 and done.dtype == bool
        assert np.array_equal(info["prev_level_seed"], playing)  # the step was taken in the level being played
        if done.any():
            break
    assert done.any()
    fresh = procgen_hd.ProcgenHDEnv("bigfish", 4, 64, num_levels=1, start_level=int(info["level_seed"][done][0]))
    assert np.array_equal(obs[done][0], fresh.reset()[0][0])  # the frame after the end is the next level's first


def test_training_levels_stay_in_their_range_test_levels_do_not():
    rng = np.random.default_rng(0)
    seen = {}
    for name, num_levels in (("train", 20), ("test", 0)):
        envs = procgen_hd.ProcgenHDEnv("bigfish", 8, 64, num_levels=num_levels, start_level=100, seed=4)
        _, info = envs.reset()
        seeds = set(info["level_seed"].tolist())
        for _ in range(400):
            _, _, _, info = envs.step(rng.integers(0, 15, 8))
            seeds |= set(info["level_seed"].tolist())
        seen[name] = seeds
        envs.close()
    assert len(seen["train"]) > 10 and all(100 <= seed < 120 for seed in seen["train"])
    assert len(seen["test"]) > 10 and not seen["test"] & set(range(100, 120))


def test_saved_states_restore_the_games_exactly():
    envs = procgen_hd.ProcgenHDEnv("coinrun", 3, 64, num_levels=5, seed=1)
    envs.reset()
    actions = np.random.default_rng(2).integers(0, 15, (80, 3))
    for action in actions[:40]:
        envs.step(action)
    states = envs.get_state()
    after = [envs.step(action) for action in actions[40:]]
    other = procgen_hd.ProcgenHDEnv("coinrun", 3, 64, num_levels=5, seed=9)
    other.reset()
    other.set_state(states)
    for action, (obs, reward, done, info) in zip(actions[40:], after):
        obs2, reward2, done2, info2 = other.step(action)
        assert np.array_equal(obs, obs2) and np.array_equal(reward, reward2) and np.array_equal(done, done2)
        assert np.array_equal(info["level_seed"], info2["level_seed"])


def test_a_state_saved_at_64_restores_the_same_future_at_128():
    """The state holds no frame size: restored into a 128 env it plays on exactly as the game saved at 128 does."""
    code = """
import sys, numpy as np, procgen_hd
resolution = int(sys.argv[1])
actions = np.random.default_rng(4).integers(0, 15, (340, 3))
envs = procgen_hd.ProcgenHDEnv("bigfish", 3, resolution, num_levels=5, seed=1)
envs.reset()
for action in actions[:40]:
    envs.step(action)
saved = envs.get_state()
if resolution == 128:
    other = procgen_hd.ProcgenHDEnv("bigfish", 3, 128, num_levels=5, seed=9)
    other.reset()
    other.set_state([a.tobytes() for a in np.load(sys.argv[2] + "/state64.npz").values()])
def future(env):
    steps = [env.step(action) for action in actions[40:]]
    return [np.stack([s[k] for s in steps]) for k in range(3)] + [np.stack([s[3]["level_seed"] for s in steps])]
np.savez(sys.argv[2] + f"/future{resolution}.npz", *future(envs))
if resolution == 64:
    np.savez(sys.argv[2] + "/state64.npz", *[np.frombuffer(state, np.uint8) for state in saved])
if resolution == 128:
    np.savez(sys.argv[2] + "/restored.npz", *future(other))
"""
    folder = tempfile.mkdtemp()
    for resolution in (64, 128):
        result = subprocess.run([sys.executable, "-c", code, str(resolution), folder], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
    at_64, at_128, restored = (np.load(f"{folder}/{name}.npz") for name in ("future64", "future128", "restored"))
    # (the two sizes' states differ only in drawing floats such as the pixels per cell, which each frame recomputes)
    assert restored["arr_0"].shape == (300, 3, 3, 128, 128) and np.array_equal(restored["arr_0"], at_128["arr_0"])
    assert at_64["arr_2"].any()  # episodes end in the compared stretch
    for key in ("arr_1", "arr_2", "arr_3"):  # rewards, episode ends, level seeds
        assert np.array_equal(restored[key], at_128[key]) and np.array_equal(restored[key], at_64[key])


def test_a_state_of_another_game_is_refused_not_fatal():
    coinrun = procgen_hd.ProcgenHDEnv("coinrun", 1, 64)
    coinrun.reset()
    bigfish = procgen_hd.ProcgenHDEnv("bigfish", 1, 64)
    with pytest.raises(ValueError, match="state 0 is a state of coinrun, not of bigfish"):
        bigfish.set_state(coinrun.get_state())


def test_sequential_levels_continue_the_episode_on_the_next_level_seed():
    """procgen's use_sequential_levels: a completed level is followed by level seed + 997 in the same episode."""
    actions = np.random.default_rng(0).integers(0, 15, (300, 8))
    ends = {}
    for sequential in (False, True):
        envs = procgen_hd.ProcgenHDEnv("maze", 8, 64, num_levels=100, seed=0, use_sequential_levels=sequential)
        _, info = envs.reset()
        for action in actions:  # the same games until the first completed level
            playing = info["level_seed"]
            _, _, done, info = envs.step(action)
            if info["prev_level_complete"].any():
                break
        env = np.flatnonzero(info["prev_level_complete"])[0]
        ends[sequential] = done[env], info["level_seed"][env] - playing[env]
        envs.close()
    assert ends[False][0] and ends[True] == (False, 997)


def test_step_async_then_wait_equals_step():
    actions = np.random.default_rng(3).integers(0, 15, (50, 4))
    a = procgen_hd.ProcgenHDEnv("starpilot", 4, 64, num_levels=3, seed=1)
    b = procgen_hd.ProcgenHDEnv("starpilot", 4, 64, num_levels=3, seed=1, num_threads=0)
    a.reset(), b.reset()
    for action in actions:
        a.step_async(action)
        assert all(np.array_equal(x, y) for x, y in zip(a.step_wait()[:3], b.step(action)[:3]))


def test_visual_options_reach_the_game():
    plain = procgen_hd.ProcgenHDEnv("bigfish", 1, 64, num_levels=1).reset()[0]
    no_background = procgen_hd.ProcgenHDEnv("bigfish", 1, 64, num_levels=1, use_backgrounds=False).reset()[0]
    assert (plain.astype(int) - no_background).any()


@pytest.mark.parametrize("options,message", [
    (dict(game="pong"), "game 'pong' is not a Procgen game"),
    (dict(resolution=0), "resolution 0 cannot be drawn"),
    (dict(resolution=5000), "resolution 5000 cannot be drawn"),
    (dict(distribution_mode="extreme"), "bigfish has no extreme mode"),
    (dict(distribution_mode="medium"), "distribution_mode 'medium' is unknown"),
    (dict(num_levels=-1), "num_levels -1 must be an integer"),
    (dict(start_level=2**31), "start_level 2147483648 must be an integer"),
    (dict(num_envs=0), "num_envs 0 must be an integer"),
    (dict(center_agents=True), "unknown option 'center_agents'"),
])
def test_what_libenv_cannot_make_is_refused_with_one_line(options, message):
    kwargs = dict(dict(game="bigfish", num_envs=2, resolution=64), **options)
    with pytest.raises(ValueError, match=message) as error:
        procgen_hd.ProcgenHDEnv(**kwargs)
    assert "\n" not in str(error.value)


def test_a_second_resolution_in_one_process_is_refused():
    code = """
import procgen_hd
envs = procgen_hd.ProcgenHDEnv("bigfish", 1, 64)
try:
    procgen_hd.ProcgenHDEnv("bigfish", 1, 96)
except ValueError as error:
    print(error)
envs.close()
procgen_hd.ProcgenHDEnv("bigfish", 1, 96).reset()  # once no env draws 64, another size is fine
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "resolution 96: this process already draws 64x64 (Procgen-HD draws one size per process; "
        "close those environments or use another process)", "ok"]


def test_an_env_only_a_reference_cycle_keeps_does_not_block_another_size():
    """An env nothing reaches any more (here a cycle, in a test often an old traceback) is collected before refusing."""
    code = """
import gc
import procgen_hd
gc.disable()
holder = {"envs": procgen_hd.ProcgenHDEnv("bigfish", 1, 64)}
holder["self"] = holder
del holder  # only the cycle refers to the 64x64 envs now
procgen_hd.ProcgenHDEnv("bigfish", 1, 96).reset()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.splitlines() == ["ok"], result.stderr


def test_build_info_names_the_pinned_commit():
    assert procgen_hd.BUILD_INFO["commit"] == "30a146f155f0a7272e9996724b0adb2c90126439"


if __name__ == "__main__":
    record(int(sys.argv[1]), sys.argv[2])
