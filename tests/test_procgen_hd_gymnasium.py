"""procgen_hd on Gymnasium 1.x: the registered ids, the native vector env's API (spaces, dtypes, SAME_STEP autoreset,
seeding, infos), Gymnasium's own check_env on the single env, and a plain CleanRL-style PPO loop on the vector env.
In-process envs draw 64 x 64 as the rest of the suite does; other sizes run in their own process (one size each)."""

import re
import subprocess
import sys

import gymnasium as gym
import numpy as np
import procgen_hd  # noqa: F401  (registers procgen_hd/<game>-v0)
import pytest
import torch
from gymnasium.utils.env_checker import check_env, data_equivalence
from gymnasium.vector import AutoresetMode


def make_vec(num_envs=4, **kwargs):
    return gym.make_vec("procgen_hd/bigfish-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                        **dict(dict(num_levels=20, resolution=64), **kwargs))


def test_make_vec_at_128_gives_the_native_batched_env():
    code = """
import gymnasium as gym, procgen_hd
envs = gym.make_vec("procgen_hd/bigfish-v0", num_envs=64, vectorization_mode="vector_entry_point", resolution=128)
obs, info = envs.reset(seed=0)
print(type(envs).__name__, obs.shape, obs.dtype, envs.single_observation_space.shape, envs.single_action_space)
env = gym.make("procgen_hd/bigfish-v0", resolution=128)
print(type(env.unwrapped).__name__, env.reset(seed=0)[0].shape)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ProcgenHDVectorEnv (64, 128, 128, 3) uint8 (128, 128, 3) Discrete(15)",
                                          "ProcgenHDGymEnv (128, 128, 3)"]


def test_every_game_is_registered():
    assert all(f"procgen_hd/{game}-v0" in gym.registry for game in procgen_hd.GAMES)


def test_single_env_passes_gymnasiums_check_env():
    env = gym.make("procgen_hd/coinrun-v0", render_mode="rgb_array")
    check_env(env.unwrapped)  # spaces, reset seeding, step determinism, fresh data per call, render, close twice
    env.close()


def test_vector_env_declares_procgens_same_step_autoreset_and_batched_spaces():
    envs = make_vec()
    assert isinstance(envs, gym.vector.VectorEnv) and envs.metadata["autoreset_mode"] == AutoresetMode.SAME_STEP
    assert envs.single_observation_space == gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
    assert envs.observation_space == gym.vector.utils.batch_space(envs.single_observation_space, 4)
    assert envs.action_space == gym.spaces.MultiDiscrete([15] * 4)
    envs.close()


def test_vector_step_returns_gymnasiums_five_arrays_with_procgens_infos():
    envs = make_vec()
    obs, infos = envs.reset(seed=1)
    assert envs.observation_space.contains(obs)
    obs, rewards, terminations, truncations, infos = envs.step(envs.action_space.sample())
    assert envs.observation_space.contains(obs) and obs.dtype == np.uint8
    assert rewards.shape == (4,) and rewards.dtype == np.float32
    assert terminations.dtype == bool and truncations.dtype == bool and not truncations.any()
    assert sorted(infos) == ["_level_seed", "_prev_level_complete", "_prev_level_seed",
                             "level_seed", "prev_level_complete", "prev_level_seed"]
    assert infos["prev_level_complete"].dtype == bool and all(0 <= s < 20 for s in infos["level_seed"])
    envs.close()


def test_vector_env_returns_new_arrays_on_every_call():
    envs = make_vec()
    first, first_info = envs.reset(seed=2)
    kept = first.copy()
    envs.step(np.zeros(4, dtype=np.int64))
    assert np.array_equal(first, kept)  # the step did not write into the frames the user holds
    assert not np.shares_memory(first, envs.step(np.zeros(4, dtype=np.int64))[0])
    envs.close()


def test_vector_reset_with_the_same_seed_replays_the_same_games():
    envs = make_vec()
    actions = np.random.default_rng(0).integers(0, 15, (60, 4))
    runs = []
    for _ in range(2):
        obs, info = envs.reset(seed=11)
        runs.append([obs, info] + [envs.step(action) for action in actions])
    assert data_equivalence(runs[0], runs[1])
    assert not np.array_equal(envs.reset(seed=12)[0], runs[0][0])
    envs.close()


def test_channels_first_gives_the_same_pixels_channel_first():
    last, first = make_vec(), make_vec(channels_first=True)
    assert first.single_observation_space.shape == (3, 64, 64)
    assert np.array_equal(last.reset(seed=3)[0].transpose(0, 3, 1, 2), first.reset(seed=3)[0])
    last.close(), first.close()


def test_record_episode_statistics_counts_procgens_same_step_episode_ends():
    """Gymnasium's own wrapper, told SAME_STEP, adds up each episode's rewards exactly as procgen ended it."""
    envs = gym.wrappers.vector.RecordEpisodeStatistics(make_vec())
    envs.reset(seed=4)
    rng, returns, ours, recorded = np.random.default_rng(1), np.zeros(4), [], []
    for _ in range(600):
        _, rewards, terminations, _, infos = envs.step(rng.integers(0, 15, 4))
        returns += rewards
        ours += returns[terminations].tolist()
        returns[terminations] = 0
        if "episode" in infos:
            recorded += infos["episode"]["r"][infos["_episode"]].tolist()
    assert len(ours) >= 8 and np.allclose(sorted(ours), sorted(recorded))
    envs.close()


def test_single_env_reset_after_an_episode_end_shows_the_level_procgen_already_started():
    env = gym.make("procgen_hd/bigfish-v0", num_levels=50).unwrapped
    env.reset(seed=5)
    rng = np.random.default_rng(2)
    for _ in range(2000):
        obs, reward, terminated, truncated, info = env.step(int(rng.integers(0, 15)))
        if terminated:
            break
    assert terminated and not truncated
    next_obs, next_info = env.reset()
    assert np.array_equal(next_obs, obs) and next_info["level_seed"] == info["level_seed"]
    env.close()


def test_sync_vectorization_of_the_single_env_works_too():
    envs = gym.make_vec("procgen_hd/bigfish-v0", num_envs=2, vectorization_mode="sync")
    obs, _ = envs.reset(seed=6)
    assert obs.shape == (2, 64, 64, 3) and envs.step(np.array([1, 2]))[0].shape == (2, 64, 64, 3)
    envs.close()


@pytest.mark.parametrize("call,message", [
    ("envs.reset(seed=[1, 2, 3, 4])", "seed [1, 2, 3, 4]: procgen seeds all its envs from one integer"),
    ("envs.reset(options={'level': 3})", "reset options ['level'] are not offered"),
    ("make_vec(render_mode='human')", "render_mode 'human' is not offered; choose None or 'rgb_array'"),
    ("make_vec(game='pong')", "game 'pong' is not a Procgen game"),
])
def test_gymnasium_misuse_is_refused_with_one_line(call, message):
    envs = make_vec()
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        eval(call)
    assert "\n" not in str(error.value)
    envs.close()


# A plain PPO loop (CleanRL's ppo_procgen, shrunk) that knows nothing of procgen_hd but the id
def test_a_cleanrl_style_ppo_loop_trains_on_the_vector_env(one_torch_thread):
    num_envs, num_steps, num_updates, gamma, gae_lambda, clip = 8, 32, 3, 0.99, 0.95, 0.2
    envs = gym.wrappers.vector.RecordEpisodeStatistics(gym.make_vec(
        "procgen_hd/bigfish-v0", num_envs=num_envs, vectorization_mode="vector_entry_point", resolution=64, num_levels=10))
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 15 * 15, 64), torch.nn.ReLU())
    actor, critic = torch.nn.Linear(64, envs.single_action_space.n), torch.nn.Linear(64, 1)
    params = [*trunk.parameters(), *actor.parameters(), *critic.parameters()]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=2.5e-4)

    def policy(obs):
        hidden = trunk(torch.as_tensor(obs).permute(0, 3, 1, 2).float() / 255.0)
        return torch.distributions.Categorical(logits=actor(hidden)), critic(hidden).squeeze(-1)

    obs_buf = torch.zeros((num_steps, num_envs, 64, 64, 3), dtype=torch.uint8)
    actions, logprobs, rewards, dones, values = (torch.zeros((num_steps, num_envs)) for _ in range(5))
    next_obs, _ = envs.reset(seed=0)
    next_done, losses, episodes = torch.zeros(num_envs), [], 0
    for _ in range(num_updates):
        for step in range(num_steps):
            obs_buf[step], dones[step] = torch.as_tensor(next_obs), next_done
            with torch.no_grad():
                dist, value = policy(next_obs)
                action = dist.sample()
            actions[step], logprobs[step], values[step] = action, dist.log_prob(action), value
            next_obs, reward, terminations, truncations, infos = envs.step(action.numpy())
            rewards[step], next_done = torch.as_tensor(reward), torch.as_tensor(terminations | truncations).float()
            episodes += int(infos.get("_episode", np.zeros(1, bool)).sum())
        with torch.no_grad():  # bootstrap value if not done
            advantages, last = torch.zeros_like(rewards), 0
            next_value = policy(next_obs)[1]
            for t in reversed(range(num_steps)):
                not_done = 1.0 - (next_done if t == num_steps - 1 else dones[t + 1])
                following = next_value if t == num_steps - 1 else values[t + 1]
                delta = rewards[t] + gamma * following * not_done - values[t]
                advantages[t] = last = delta + gamma * gae_lambda * not_done * last
            returns = advantages + values
        for _ in range(2):  # optimizing the policy and value network
            for batch in torch.randperm(num_steps * num_envs).split(64):
                dist, value = policy(obs_buf.flatten(0, 1)[batch])
                ratio = (dist.log_prob(actions.flatten()[batch]) - logprobs.flatten()[batch]).exp()
                adv = advantages.flatten()[batch]
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean()
                loss = pg_loss + 0.5 * ((value - returns.flatten()[batch]) ** 2).mean() - 0.01 * dist.entropy().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    envs.close()
    assert np.isfinite(losses).all() and len(losses) == num_updates * 2 * 4
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert episodes >= 1  # bigfish's random episodes end within the 96 steps per env
