"""The learning tests' toy tasks speak their back ends' interfaces: the same types, shapes, info keys and
auto-reset steps as real EnvPool Atari / DeepMind Control and procgen_hd, and rewards that pay the cue's action."""

import numpy as np
import procgen_hd
import pytest

import dqn_atari_gap as dqn
import sac_dmc_gap as sac
import toy_envs


def structure(value):
    """Type, dtype and shape of an env output, recursively (dict keys included)."""
    if isinstance(value, dict):
        return {key: structure(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return tuple(structure(item) for item in value)
    array = np.asarray(value)
    return (array.dtype.str, array.shape)


def atari_pair(monkeypatch, **overrides):
    """DQN's own make_env, once with EnvPool and once with the toy task injected."""
    args = dqn.Args(env_id="Breakout", resolution=36, **overrides)
    real = dqn.make_env(args, 2, seed=3)
    monkeypatch.setattr(dqn.envpool, "make", toy_envs.make)
    return real, dqn.make_env(args, 2, seed=3)


def test_toy_atari_outputs_have_envpool_atari_types_shapes_and_info_keys(monkeypatch):
    real, toy = atari_pair(monkeypatch)
    assert structure(toy.reset()) == structure(real.reset())
    actions = np.array([1, 2])
    assert structure(toy.step(actions)) == structure(real.step(actions))
    toy.send(actions), real.send(actions)
    assert structure(toy.recv()) == structure(real.recv())
    assert toy.action_space == real.action_space and toy.observation_space == real.observation_space


@pytest.mark.parametrize("max_episode_steps, ends", [(100, ("life", "game")), (5, ("life", "time"))])
def test_toy_atari_auto_reset_steps_are_envpools(monkeypatch, max_episode_steps, ends):
    """After a lost life: elapsed_step kept, the stack shifted by the next life's first frame; after a game over or
    the time limit: elapsed_step 0 and the stack filled with the first frame; every auto-reset step pays nothing."""
    _, toy = atari_pair(monkeypatch, max_episode_steps=max_episode_steps)
    obs, info = toy.reset()
    assert all((obs[i] == obs[i, 0]).all() for i in range(2))
    seen = {"life": 0, "game": 0, "time": 0}
    for _ in range(60):
        obs, rewards, terminated, truncated, info = toy.step(np.array([3, 2]))
        if not (terminated.any() or truncated.any()):
            continue
        after = toy.step(np.array([0, 0]))
        for i in np.flatnonzero(terminated | truncated):
            assert after[1][i] == 0 and after[4]["reward"][i] == 0 and not after[2][i] and not after[3][i]
            if truncated[i] or info["terminated"][i]:
                seen["time" if truncated[i] else "game"] += 1
                assert after[4]["elapsed_step"][i] == 0 and (after[0][i] == after[0][i, 0]).all()
            else:
                seen["life"] += 1
                assert after[4]["elapsed_step"][i] == info["elapsed_step"][i] and (after[0][i, :-1] == obs[i, 1:]).all()
    assert all(seen[end] >= 2 for end in ends), seen


def test_toy_atari_pays_the_cues_action_two_steps_after_the_cue(monkeypatch):
    _, toy = atari_pair(monkeypatch)
    toy.reset()
    cues = toy.cue.copy()
    paying = np.array([toy_envs.ATARI_PAYING_ACTION[cue] for cue in cues])
    for step, actions in enumerate((paying, 3 - paying, 3 - paying)):  # only the cue step's action counts
        _, rewards, terminated, _, info = toy.step(actions)
        assert (rewards == (step == 2)).all() and (info["reward"] == toy_envs.ATARI_REWARD * (step == 2)).all()
        assert (terminated == (step == 2)).all() and not info["terminated"].any()
    toy.step(np.zeros(2, int))  # the auto-reset step: the next life
    wrong = np.array([toy_envs.ATARI_PAYING_ACTION[1 - cue] for cue in toy.cue])
    assert sum(toy.step(actions)[1].sum() for actions in (wrong, wrong, wrong)) == 0


def test_toy_reach_has_envpool_dmc_types_shapes_and_its_stale_auto_reset_reward(monkeypatch, tmp_path):
    sac.make_egl_visible()
    args = sac.Args(env_id="cartpole-swingup", resolution=24, action_repeat=100)  # 10 agent steps per episode
    real_pixels, real_twin = sac.make_env(args, 2, 5, sac.cheap_visuals_assets(str(tmp_path)))
    monkeypatch.setattr(sac.envpool, "make", toy_envs.make)
    toy_pixels, toy_twin = sac.make_env(args, 2, 5)
    for real, toy in ((real_pixels, toy_pixels), (real_twin, toy_twin)):
        assert structure(toy.reset()[1]) == structure(real.reset()[1])
        assert toy.action_space == real.action_space
    assert toy_pixels.observation_space == real_pixels.observation_space
    assert structure(toy_pixels.reset()[0]) == structure(real_pixels.reset()[0])
    actions = np.full((2, 1), 0.5)
    for _ in range(10):
        toy_step = toy_pixels.step(actions)
        assert structure(toy_step) == structure(real_pixels.step(actions))
    assert toy_step[3].all() and (toy_step[4]["elapsed_step"] == 10).all()
    reset_step = toy_pixels.step(actions)
    assert (reset_step[4]["elapsed_step"] == 0).all() and (reset_step[1] == toy_step[1]).all()  # EnvPool's stale reward
    assert (reset_step[0][:, :3] == reset_step[0][:, 3:6]).all(), "a new episode's stack repeats its first frame"


def test_toy_reach_twin_sums_the_rewards_of_the_pixel_envs_control_steps(monkeypatch):
    monkeypatch.setattr(sac.envpool, "make", toy_envs.make)
    args = sac.Args(env_id="cartpole-swingup", resolution=24, action_repeat=4)
    env = sac.make_env(args, 3, 11)
    sac.reset_env(env)
    rng = np.random.default_rng(0)
    for _ in range(20):  # receive_step raises when the pixel env and its twin diverge
        actions = rng.uniform(-1, 1, (3, 1))
        _, rewards, *_ = sac.step_env(env, actions, 4)
        assert (0 <= rewards).all() and (rewards <= 4).all()


def test_toy_reach_pays_only_near_the_target_drawn_in_red():
    env = toy_envs.make("CartpoleSwingup-v1", env_type="gymnasium", num_envs=1, seed=0, from_pixels=True,
                        render_width=24, render_height=24, frame_skip=1, max_episode_steps=1000, frame_stack=1)
    obs, _ = env.reset()
    target_column = int(np.flatnonzero(obs[0, 0, 0])[0])
    assert target_column == env.column(env.target)[0]
    far = np.abs(env.target - env.point)[0] > 0.5
    toward = lambda: np.clip((env.target - env.point) / toy_envs.REACH_SPEED, -1, 1).reshape(1, 1)  # noqa: E731
    rewards = [env.step(toward())[1][0] for _ in range(300)]
    assert rewards[-1] == 1.0 and (rewards[0] < 1.0 or not far)


def test_toy_procgen_outputs_have_procgen_hds_types_shapes_and_info_keys():
    real = procgen_hd.ProcgenHDEnv("bigfish", 2, 64, num_levels=5, seed=1)
    toy = toy_envs.ToyProcgen("bigfish", 2, 64, num_levels=5, seed=1)
    assert structure(toy.reset()) == structure(real.reset())
    actions = np.array([4, 10])
    assert structure(toy.step(actions)) == structure(real.step(actions))
    toy.step_async(actions), real.step_async(actions)
    assert structure(toy.step_wait()) == structure(real.step_wait())
    assert toy.num_actions == real.num_actions and all(isinstance(state, bytes) for state in toy.get_state())
    real.close()


def test_toy_procgen_resets_in_the_step_that_pays_the_last_round():
    env = toy_envs.ToyProcgen("bigfish", 4, 32, num_levels=3, start_level=100, seed=2)
    env.reset()
    total = np.zeros(4)
    for _ in range(toy_envs.PROCGEN_ROUNDS):
        paying = np.array([toy_envs.PROCGEN_PAYING_ACTION[env.cue(i)] for i in range(4)])
        for step, actions in enumerate((paying, np.zeros(4, int), np.zeros(4, int))):
            levels = env.level.copy()
            _, rewards, done, info = env.step(actions)
            total += rewards
    assert done.all() and (total == toy_envs.PROCGEN_ROUNDS * toy_envs.PROCGEN_REWARD).all()
    assert (info["prev_level_seed"] == levels).all() and info["prev_level_complete"].all()
    assert ((100 <= env.level) & (env.level < 103)).all() and (env.phase == 0).all()
