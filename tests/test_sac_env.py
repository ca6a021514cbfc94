"""The DMC pixel environment of sac_dmc_gap.py: DrQ's action repeat (summed rewards, 1000/k agent steps)
against the definition, frame stacking, time limits and EnvPool's auto-reset step. Rendered with the
test-only cheap visuals at a small size so that it runs in seconds on a CPU."""

import ctypes
from types import SimpleNamespace

import envpool
import numpy as np
import pytest

import sac_dmc_gap as sac


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    sac.make_egl_visible()
    return sac.cheap_visuals_assets(str(tmp_path_factory.mktemp("assets")))


def test_egl_is_visible_to_mujoco_after_the_loader_fix(base_path):
    assert hasattr(ctypes.CDLL(None), "eglGetProcAddress")
    sac.make_egl_visible()  # a second call is a no-op


def test_every_task_is_an_envpool_dmc_task_and_drq_action_repeats_are_the_defaults():
    assert {task_id for task_id, _, _ in sac.DMC_TASKS.values()} <= set(envpool.list_all_envs())
    drq = {"cartpole-swingup": 8, "reacher-easy": 4, "cheetah-run": 4, "ball_in_cup-catch": 4, "finger-spin": 2,
           "walker-walk": 2}
    assert {env_id: sac.DMC_TASKS[env_id][1] for env_id in drq} == drq


def test_action_repeat_sums_control_rewards_renders_the_last_frame_and_ends_after_1000_over_k_steps(base_path):
    """Reference: DrQ's definition, one control step (EnvPool frame_skip 1) at a time, rewards summed."""
    args = SimpleNamespace(env_id="cartpole-swingup", resolution=24, action_repeat=8, frame_stack=3)
    num_envs, k, seed = 2, 8, 5
    env = sac.make_env(args, num_envs, seed, base_path)
    reference = envpool.make("CartpoleSwingup-v1", env_type="gymnasium", num_envs=num_envs, seed=seed, base_path=base_path,
                             from_pixels=True, render_width=24, render_height=24, render_camera_id=0, frame_skip=1,
                             max_episode_steps=1000)
    obs = sac.reset_env(env)
    reference_obs, _ = reference.reset()
    assert obs.shape == (num_envs, 9, 24, 24) and obs.dtype == np.uint8
    # a reset repeats the first frame
    assert np.array_equal(obs[:, :3], obs[:, 3:6]) and np.array_equal(obs[:, 3:6], obs[:, 6:])
    assert np.array_equal(obs[:, 6:], reference_obs)
    rng = np.random.default_rng(0)
    for step in range(1, 1000 // k + 1):
        actions = rng.uniform(-1, 1, (num_envs, 1))
        next_obs, rewards, terminated, truncated, auto_reset = sac.step_env(env, actions, k)
        summed = np.zeros(num_envs)
        for _ in range(k):
            reference_obs, reward, _, reference_truncated, _ = reference.step(actions)
            summed += reward
        assert rewards == pytest.approx(summed, rel=1e-5, abs=1e-6)
        assert np.array_equal(next_obs[:, 6:], reference_obs)  # the frame after the k-th control step
        assert np.array_equal(next_obs[:, :6], obs[:, 3:])  # the stack shifts by one agent step, oldest first
        assert not terminated.any() and not auto_reset.any()
        assert truncated.all() == (step == 1000 // k) == reference_truncated.all()  # DrQ: 125 agent steps
        obs = next_obs
    # EnvPool's auto-reset step: action ignored, no reward, the new episode's first frame repeated
    next_obs, rewards, terminated, truncated, auto_reset = sac.step_env(env, np.zeros((num_envs, 1)), k)
    reference_obs = reference.step(np.zeros((num_envs, 1)))[0]
    assert auto_reset.all() and not (terminated | truncated).any() and (rewards == 0).all()
    assert np.array_equal(next_obs[:, 6:], reference_obs) and np.array_equal(next_obs[:, :3], next_obs[:, 6:])
    # and the next episode goes on in step with the reference
    actions = rng.uniform(-1, 1, (num_envs, 1))
    rewards = sac.step_env(env, actions, k)[1]
    assert rewards == pytest.approx(sum(reference.step(actions)[1] for _ in range(k)), rel=1e-5, abs=1e-6)


def test_a_reward_twin_out_of_step_with_the_pixel_env_is_detected(base_path):
    args = SimpleNamespace(env_id="cheetah-run", resolution=16, action_repeat=4, frame_stack=3)
    pixel_env, _ = sac.make_env(args, 1, 1, base_path)
    _, other_twin = sac.make_env(args, 1, 2, base_path)  # another seed: another initial state
    env = (pixel_env, other_twin)
    sac.reset_env(env)
    with pytest.raises(RuntimeError, match="diverged"):
        for _ in range(5):
            sac.step_env(env, np.full((1, 6), 0.5), 4)


def test_cheap_visuals_change_only_the_pictures_not_the_physics(base_path):
    args = SimpleNamespace(env_id="cheetah-run", resolution=32, action_repeat=4, frame_stack=3)
    standard, cheap = sac.make_env(args, 1, 7), sac.make_env(args, 1, 7, base_path)
    standard_obs, cheap_obs = sac.reset_env(standard), sac.reset_env(cheap)
    actions = np.full((1, 6), 0.3)
    for _ in range(3):
        standard_obs, standard_reward = sac.step_env(standard, actions, 4)[:2]
        cheap_obs, cheap_reward = sac.step_env(cheap, actions, 4)[:2]
        assert standard_reward == pytest.approx(cheap_reward)
    assert not np.array_equal(standard_obs, cheap_obs)  # shadows and anti-aliasing are gone
    assert np.abs(standard_obs.astype(float) - cheap_obs.astype(float)).mean() < 40  # the same scene
