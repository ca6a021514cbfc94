"""Unit tests of ppo_procgen_impoola.py's algorithm pieces against slow references on hand-made data."""

import math

import numpy as np
import pytest
import torch

import ppo_procgen_impoola as ppo
import utils


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# GAE
def slow_gae(rewards, values, dones, next_value, next_done, gamma, lam):
    """Plain loops, episode by episode: A_t = sum_k (gamma lam)^k delta_{t+k}, stopping at an episode end."""
    T, N = len(rewards), len(rewards[0])
    values_ext = [list(values[t]) for t in range(T)] + [list(next_value)]
    dones_ext = [list(dones[t]) for t in range(T)] + [list(next_done)]
    advantages = [[0.0] * N for _ in range(T)]
    for n in range(N):
        for t in range(T):
            total, discount = 0.0, 1.0
            for k in range(t, T):
                ends_after_k = dones_ext[k + 1][n]
                delta = rewards[k][n] + gamma * values_ext[k + 1][n] * (1 - ends_after_k) - values_ext[k][n]
                total += discount * delta
                if ends_after_k:
                    break
                discount *= gamma * lam
            advantages[t][n] = total
    return advantages


def test_compute_gae_matches_slow_reference_with_episode_ends():
    generator = torch.Generator().manual_seed(0)
    T, N = 7, 3
    rewards = torch.randn(T, N, generator=generator)
    values = torch.randn(T, N, generator=generator)
    dones = torch.zeros(T, N)
    dones[3, 0] = 1.0  # env 0: an episode ends after step 2
    dones[1, 2] = dones[5, 2] = 1.0  # env 2: two episode ends
    next_value = torch.randn(N, generator=generator)
    next_done = torch.tensor([0.0, 1.0, 0.0])  # env 1's episode ends at the last step
    advantages, returns = ppo.compute_gae(rewards, values, dones, next_value, next_done, 0.9, 0.8)
    expected = slow_gae(rewards.tolist(), values.tolist(), dones.tolist(), next_value.tolist(), next_done.tolist(), 0.9, 0.8)
    assert torch.allclose(advantages, torch.tensor(expected), atol=1e-5)
    assert torch.allclose(returns, advantages + values)


def test_compute_gae_without_episode_ends_is_discounted_td_errors():
    rewards, values = torch.ones(3, 1), torch.zeros(3, 1)
    advantages, _ = ppo.compute_gae(rewards, values, torch.zeros(3, 1), torch.zeros(1), torch.zeros(1), 0.5, 1.0)
    assert advantages[:, 0].tolist() == [1 + 0.5 + 0.25, 1 + 0.5, 1.0]


# The PPO loss and update
def behaviour_batch(agent, size, generator):
    """A minibatch collected by `agent` itself, with random advantages and returns = values + advantages."""
    obs = torch.randint(0, 256, (size, 3, 16, 16), dtype=torch.uint8, generator=generator)
    with torch.no_grad():
        actions, logprobs, _, values = ppo.get_action_and_value(agent, obs)
    advantages = torch.randn(size, generator=generator)
    return {"obs": obs, "actions": actions, "logprobs": logprobs, "values": values, "advantages": advantages,
            "returns": values + advantages}


def test_ppo_loss_at_the_behaviour_policy():
    """Where the data's policy is the current one the ratio is 1: the surrogate is minus the mean of the normalised
    advantages (0), no KL, nothing clipped, and the value loss is half the mean squared advantage."""
    torch.manual_seed(0)
    agent = ppo.Agent(15, 16, "avg", width=1, dense_scale=1)
    minibatch = behaviour_batch(agent, 8, torch.Generator().manual_seed(1))
    raw_advantages = minibatch["advantages"]
    minibatch["advantages"] = (raw_advantages - raw_advantages.mean()) / (raw_advantages.std() + 1e-8)  # as ppo_update
    loss, parts = ppo.ppo_loss(agent, minibatch, 0.2, False, 0.01, 0.5)
    assert set(parts) == {"policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"}
    assert abs(parts["policy_loss"].item()) < 1e-6 and parts["approx_kl"].item() == 0 and parts["clipfrac"].item() == 0
    assert parts["value_loss"].item() == pytest.approx(0.5 * (raw_advantages**2).mean().item(), rel=1e-5)
    expected = parts["policy_loss"] - 0.01 * parts["entropy"] + 0.5 * parts["value_loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert loss.requires_grad and not any(part.requires_grad for part in parts.values())


@pytest.mark.parametrize("target_kl,minibatches,micro_batch_size", [(None, 8, 4), (1e-12, 4, 4), (None, 8, 2), (1e-12, 4, 1)])
def test_ppo_update_means_every_minibatch_and_stops_past_target_kl(target_kl, minibatches, micro_batch_size, monkeypatch):
    """Minibatches of 4 steps, as micro-batches of `micro_batch_size`: ppo_loss once per micro-batch, progress once per
    minibatch, the means over all of them."""
    torch.manual_seed(0)
    agent = ppo.Agent(15, 16, "avg", width=1, dense_scale=1)
    batch = behaviour_batch(agent, 16, torch.Generator().manual_seed(2))
    optimizer = torch.optim.Adam(agent.parameters(), lr=1e-3, eps=1e-5)
    recorded, real_loss, refreshed = [], ppo.ppo_loss, []

    def recording_loss(*args):
        loss, parts = real_loss(*args)
        recorded.append(parts)
        return loss, parts

    monkeypatch.setattr(ppo, "ppo_loss", recording_loss)
    args = ppo.Args(num_minibatches=4, update_epochs=2, target_kl=target_kl)
    means, finite = ppo.ppo_update(agent, agent, optimizer, batch, args, micro_batch_size, lambda: refreshed.append(1))
    assert len(refreshed) == minibatches and len(recorded) == minibatches * 4 // micro_batch_size and bool(finite)
    for name, value in means.items():
        assert value == pytest.approx(np.mean([parts[name].item() for parts in recorded]), rel=1e-5, abs=1e-9), name
    assert set(means) == set(recorded[0])


# Reward normalisation
def slow_normalize_rewards(reward_rows, done_rows, gamma, clip):
    """gym 0.23 NormalizeReward + clip: RunningMeanStd of the discounted return over all envs, in numpy."""
    mean, var, count = 0.0, 1.0, 1e-4
    returns = np.zeros(len(reward_rows[0]))
    out = []
    for reward, done in zip(reward_rows, done_rows):
        returns = returns * gamma + np.array(reward)
        batch_mean, batch_var, batch_count = returns.mean(), returns.var(), len(returns)
        delta, total = batch_mean - mean, count + batch_count
        new_mean = mean + delta * batch_count / total
        var = (var * count + batch_var * batch_count + delta**2 * count * batch_count / total) / total
        mean, count = new_mean, total
        out.append(np.clip(np.array(reward) / np.sqrt(var + 1e-8), -clip, clip))
        returns[np.array(done) > 0] = 0.0
    return np.array(out), (mean, var, count)


def test_normalize_reward_matches_gym_running_return_variance():
    rng = np.random.default_rng(1)
    steps, num_envs = 12, 4
    rewards = rng.normal(0, 3, (steps, num_envs)).round(1)
    dones = (rng.random((steps, num_envs)) < 0.2).astype(float)
    expected, (mean, var, count) = slow_normalize_rewards(rewards, dones, 0.9, 2.0)
    normalizer = ppo.new_reward_normalizer(num_envs, "cpu")
    got = [ppo.normalize_reward(normalizer, torch.tensor(r), torch.tensor(d), 0.9, 2.0) for r, d in zip(rewards, dones)]
    assert np.allclose(torch.stack(got).numpy(), expected, atol=1e-5)
    assert np.allclose([normalizer["mean"].item(), normalizer["var"].item(), normalizer["count"].item()], [mean, var, count])


def test_normalize_reward_clips():
    reward = torch.zeros(1000)
    reward[:2] = torch.tensor([1e6, -1e6])  # about 22 standard deviations of the 1000 returns
    normalizer = ppo.new_reward_normalizer(1000, "cpu")
    scaled = ppo.normalize_reward(normalizer, reward, torch.zeros(1000), 0.99, 10.0)
    assert scaled[:3].tolist() == [10.0, -10.0, 0.0]


# Network
@pytest.mark.parametrize("resolution", [48, 64, 96, 128, 192])
def test_encoder_output_shape_is_ceil_r_over_8(resolution):
    agent = ppo.Agent(15, resolution, "avg", width=1, dense_scale=1)
    obs = torch.randint(0, 256, (2, 3, resolution, resolution), dtype=torch.uint8)
    side = math.ceil(resolution / 8)
    assert agent.encoder(obs.float() / 255).shape == (2, 32, side, side)
    logits, value = agent(obs)
    assert logits.shape == (2, 15) and value.shape == (2,)


def slow_impala_encoder_params(width):
    """Per stage: one 3x3 conv in -> c, then 4 convs c -> c of the two residual blocks."""
    total, in_channels = 0, 3
    for channels in (16 * width, 32 * width, 32 * width):
        total += in_channels * channels * 9 + channels
        total += 4 * (channels * channels * 9 + channels)
        in_channels = channels
    return total


@pytest.mark.parametrize("width,dense_scale", [(1, 1), (2, 2)])
def test_parameter_counts_avg_independent_of_resolution_flatten_grows_with_r_squared(width, dense_scale):
    hidden = 256 * dense_scale
    for resolution in (1, 9, 48, 64, 65, 96, 128, 192):
        avg = utils.parameter_counts(ppo.Agent(15, resolution, "avg", width, dense_scale))
        flat = utils.parameter_counts(ppo.Agent(15, resolution, "flatten", width, dense_scale))
        side = math.ceil(resolution / 8)
        assert avg["encoder"] == flat["encoder"] == slow_impala_encoder_params(width)
        assert avg["bottleneck"] == 32 * width * hidden + hidden
        assert flat["bottleneck"] == 32 * width * side * side * hidden + hidden
        assert avg["head"] == flat["head"] == (hidden * 15 + 15) + (hidden + 1)
    assert utils.parameter_counts(ppo.Agent(15, 64, "max", 1, 1)) == utils.parameter_counts(ppo.Agent(15, 64, "avg", 1, 1))


def test_bottleneck_holds_the_join_and_the_dense_layer():
    agent = ppo.Agent(15, 64, "flatten", width=1, dense_scale=1)
    assert isinstance(agent.bottleneck, ppo.Bottleneck) and agent.bottleneck.pool == "flatten"
    assert agent.bottleneck.dense[0].in_features == ppo.pooled_size(32, 8, "flatten") == 32 * 8 * 8
    assert ppo.feature_map_shape(agent.encoder, 3, 64) == (32, 8)


def test_pool_features_against_numpy():
    feature_map = torch.randn(2, 3, 4, 5)
    array = feature_map.numpy()
    assert np.allclose(ppo.pool_features(feature_map, "flatten").numpy(), array.reshape(2, -1))
    assert np.allclose(ppo.pool_features(feature_map, "avg").numpy(), array.mean(axis=(2, 3)), atol=1e-6)
    assert np.allclose(ppo.pool_features(feature_map, "max").numpy(), array.max(axis=(2, 3)))


def test_heads_initialised_orthogonal_with_paper_scales():
    agent = ppo.Agent(15, 64, "avg", 1, 1)
    actor, critic = agent.actor.weight.detach(), agent.critic.weight.detach()
    assert torch.allclose(actor @ actor.T, 0.01**2 * torch.eye(15), atol=1e-7)  # orthogonal rows, gain 0.01
    assert torch.allclose(critic.norm(), torch.tensor(1.0)) and agent.actor.bias.abs().max() == 0


# Diagnostics
def slow_dormant_fractions(agent, obs, threshold):
    """Each part's layers collected by hand, scores by plain loops over neurons (Sokar et al. 2023)."""
    relu = torch.relu
    with torch.no_grad():
        x, encoder = obs.float() / 255, []
        for stage in range(3):  # Conv, MaxPool, two residual blocks per stage, then the final ReLU
            conv, maxpool, *blocks = agent.encoder[4 * stage : 4 * stage + 4]
            x = maxpool(conv(x))
            for block in blocks:
                before = relu(x)
                inner = relu(block.conv0(before))
                encoder += [before, inner]
                x = x + block.conv1(inner)
        x = relu(x)
        encoder.append(x)
        hidden = relu(agent.bottleneck.dense[0](x.mean(dim=(2, 3))))
        parts = {"encoder": encoder, "bottleneck": [hidden], "head": [agent.actor(hidden), agent.critic(hidden)]}
    fractions = {}
    for part, layers in parts.items():
        dormant = total = 0
        for layer in layers:
            array = layer.numpy()
            scores = [np.abs(array[:, i]).mean() for i in range(array.shape[1])]
            layer_mean = sum(scores) / len(scores)
            dormant += sum(score / (layer_mean + 1e-9) <= threshold for score in scores)
            total += len(scores)
        fractions[f"diag/dormant_fraction/{part}"] = dormant / total
    return fractions


def test_dormant_fraction_is_wired_per_part():
    torch.manual_seed(0)
    agent = ppo.Agent(15, 64, "avg", width=1, dense_scale=1)
    obs = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        agent.encoder[11].conv0.weight[:3] = 0.0  # 3 channels of the last block's inner ReLU go dead
        agent.encoder[11].conv0.bias[:3] = 0.0
        agent.bottleneck.dense[0].weight[:5] = 0.0  # 5 dense units: pre-activation -1, ReLU output 0
        agent.bottleneck.dense[0].bias[:5] = -1.0
        agent.actor.weight[2] = 0.0  # one logit constant 0
    diagnostics = utils.network_diagnostics(agent, obs, 0.025)
    expected = slow_dormant_fractions(agent, obs, 0.025)
    for part in ("encoder", "bottleneck", "head"):
        tag = f"diag/dormant_fraction/{part}"
        assert diagnostics[tag] == pytest.approx(expected[tag])
    # encoder neurons: per stage 2 blocks x 2 ReLUs x c channels, plus the trunk's final ReLU (32 channels)
    assert diagnostics["diag/dormant_fraction/encoder"] * (sum(4 * c for c in (16, 32, 32)) + 32) >= 3
    assert diagnostics["diag/dormant_fraction/bottleneck"] * 256 >= 5
    assert diagnostics["diag/dormant_fraction/head"] * 16 >= 1  # 15 logits + 1 value, one logit dead


def test_feature_norm_is_mean_l2_norm_of_pooled_vector():
    torch.manual_seed(0)
    agent = ppo.Agent(15, 64, "max", width=1, dense_scale=1)
    obs = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        pooled = agent.encoder(obs.float() / 255).amax(dim=(2, 3)).numpy()
    expected = np.mean([math.sqrt(sum(float(x) ** 2 for x in row)) for row in pooled])
    assert utils.network_diagnostics(agent, obs, 0.025)["diag/feature_norm"] == pytest.approx(expected, rel=1e-5)


def test_saliency_grid_shape_and_range():
    agent = ppo.Agent(15, 48, "avg", width=1, dense_scale=1)
    obs = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    grid = ppo.saliency_grid(agent, obs)
    assert grid.shape == (3, 3 * 48, 3 * 48)
    assert grid.min() >= 0 and grid.max() <= 1
    assert torch.allclose(grid[:, :48, :48], obs[0].float() / 255)


def test_compiled_network_matches_eager_on_cpu():
    agent = ppo.Agent(15, 16, "avg", width=1, dense_scale=1)
    obs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        logits, value = torch.compile(agent)(obs)
        expected_logits, expected_value = agent(obs)
    assert torch.allclose(logits, expected_logits, atol=1e-5) and torch.allclose(value, expected_value, atol=1e-5)


# Rollout and evaluation on scripted games with procgen's same-step reset
class FakeProcgen:
    """Env i's episodes last lengths[i] steps; step k of an episode (1-based) pays reward k, and its frame
    shows k in every pixel. The step that ends an episode pays its last reward, says done and returns the
    next episode's first frame (0), as procgen does."""

    def __init__(self, lengths):
        self.lengths = np.array(lengths)
        self.num_envs = len(lengths)
        self.elapsed = np.zeros(self.num_envs, dtype=int)

    def frames(self):
        return np.broadcast_to(self.elapsed[:, None, None, None], (self.num_envs, 3, 8, 8)).astype(np.uint8)

    def reset(self):
        self.elapsed[:] = 0
        return self.frames(), {}

    def step(self, action):
        self.elapsed += 1
        reward = self.elapsed.astype(np.float32)
        done = self.elapsed == self.lengths
        self.elapsed[done] = 0
        return self.frames(), reward, done, {}

    def step_async(self, action):
        self.result = self.step(action)

    def step_wait(self):
        return self.result


def constant_critic(obs):
    """A policy for collect_rollout: uniform actions, value 0.5."""
    return ppo.sample_action(torch.zeros(len(obs), 15)), torch.full((len(obs),), -math.log(15)), torch.full((len(obs),), 0.5)


def test_rollout_keeps_each_episode_to_itself():
    lengths, num_steps, gamma = [3, 5], 11, 0.9
    envs, rollout = FakeProcgen(lengths), ppo.allocate_rollout(num_steps, 2, 8, "cpu")
    normalizer = ppo.new_reward_normalizer(2, "cpu")
    episodes = {"return": np.zeros(2), "length": np.zeros(2, dtype=np.int64)}
    obs, _ = envs.reset()
    calls = []
    next_obs, next_done, returns, episode_lengths = ppo.collect_rollout(
        constant_critic, envs, rollout, torch.from_numpy(obs), torch.zeros(2), normalizer, episodes, gamma, 10.0,
        on_step=lambda steps, episodic_return: calls.append((steps, episodic_return)),
    )
    # the progress callback follows every step: steps so far (both envs), the mean return of the episodes just ended
    assert [steps for steps, _ in calls] == list(range(2, 2 * num_steps + 1, 2))
    assert [(t, r) for t, (_, r) in enumerate(calls, 1) if r is not None] == [(3, 6.0), (5, 15.0), (6, 6.0), (9, 6.0),
                                                                            (10, 15.0)]
    # finished episodes: env 0 three of length 3 (return 1+2+3), env 1 two of length 5 (return 15)
    assert sorted(zip(returns, episode_lengths)) == [(6.0, 3)] * 3 + [(15.0, 5)] * 2
    assert episodes["return"].tolist() == [1 + 2, 1] and episodes["length"].tolist() == [2, 1]  # the ones still running
    # dones[t] marks first frames: obs[t] shows 0 exactly where an episode ended at step t - 1
    first_frames = rollout["obs"][:, :, 0, 0, 0] == 0
    assert torch.equal(rollout["dones"].bool()[1:], first_frames[1:]) and rollout["dones"][0].sum() == 0
    # rewards normalised with the discounted return restarting after each episode's last reward
    raw = np.array([[t % 3 + 1, t % 5 + 1] for t in range(num_steps)], dtype=float)
    ended = np.array([[t % 3 == 2, t % 5 == 4] for t in range(num_steps)], dtype=float)
    expected, _ = slow_normalize_rewards(raw, ended, gamma, 10.0)
    assert np.allclose(rollout["rewards"].numpy(), expected, atol=1e-5)
    assert torch.equal(next_done, torch.from_numpy(ended[-1]).float())
    # GAE as main() calls it: an episode's last step does not bootstrap from the next episode's first value
    advantages, _ = ppo.compute_gae(rollout["rewards"], rollout["values"], rollout["dones"], torch.full((2,), 0.5),
                                    next_done, gamma, 0.95)
    expected_gae = slow_gae(rollout["rewards"].tolist(), rollout["values"].tolist(), rollout["dones"].tolist(),
                            [0.5, 0.5], next_done.tolist(), gamma, 0.95)
    assert torch.allclose(advantages, torch.tensor(expected_gae), atol=1e-5)
    last_steps = ended.astype(bool)
    assert torch.allclose(advantages[last_steps], rollout["rewards"][last_steps] - 0.5)


def test_evaluate_takes_a_fixed_quota_of_whole_episodes_per_env():
    agent = ppo.Agent(15, 8, "avg", width=1, dense_scale=1)
    returns, frames = ppo.evaluate(agent, FakeProcgen([2, 9, 3]), 7, seed=0, device="cpu", record_video=True)
    # quotas 3, 2, 2: a race to 7 episodes would take mostly env 0's short ones; returns 1+2, 1+...+9, 1+2+3
    assert sorted(returns.tolist()) == [3, 3, 3, 6, 6, 45, 45]
    assert len(frames) == 2 and frames[0].shape == (8, 8, 3)  # env 0's first episode
