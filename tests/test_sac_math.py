"""SAC / DrQ pieces of sac_dmc_gap.py against slow, independent references on small hand-made data."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sac_dmc_gap as sac


def test_soft_q_target_bootstraps_through_time_limits_but_not_through_terminals():
    rewards = torch.tensor([1.0, 0.5, -2.0, 0.0])
    terminated = torch.tensor([0.0, 1.0, 0.0, 1.0])  # a time limit is stored as not terminated
    next_q1 = torch.tensor([3.0, 4.0, -1.0, 2.0])
    next_q2 = torch.tensor([2.5, 5.0, -3.0, 1.0])
    next_log_prob = torch.tensor([-1.0, 0.3, 2.0, -0.5])
    alpha, gamma = 0.2, 0.9
    target = sac.soft_q_target(rewards, terminated, next_q1, next_q2, next_log_prob, alpha, gamma)
    expected = []
    for r, done, q1, q2, log_prob in zip(rewards.tolist(), terminated.tolist(), next_q1.tolist(), next_q2.tolist(),
                                         next_log_prob.tolist()):
        soft_value = min(q1, q2) - alpha * log_prob
        expected.append(r if done else r + gamma * soft_value)
    assert target.tolist() == pytest.approx(expected)
    assert target[0].item() == pytest.approx(1.0 + 0.9 * (2.5 + 0.2))  # bootstrapped
    assert target[1].item() == pytest.approx(0.5)  # terminal: the reward alone


def test_temperature_loss_value_and_gradient_raise_alpha_when_entropy_is_below_target():
    log_alpha = torch.tensor(math.log(0.3), requires_grad=True)
    log_prob = torch.tensor([1.5, 2.0, 0.5], requires_grad=True)  # entropy estimate -4/3 < target -1
    target_entropy = -1.0
    loss = sac.temperature_loss(log_alpha, log_prob, target_entropy)
    loss.backward()
    terms = [0.3 * (-lp - target_entropy) for lp in (1.5, 2.0, 0.5)]
    assert loss.item() == pytest.approx(sum(terms) / 3)
    # d/d log_alpha of exp(log_alpha) * c = alpha * c, with c < 0 here
    assert log_alpha.grad.item() == pytest.approx(sum(terms) / 3)
    assert log_alpha.grad.item() < 0  # gradient descent raises alpha
    assert log_prob.grad is None or torch.all(log_prob.grad == 0)  # the policy is not trained by this loss


def normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_squashed_gaussian_log_prob_matches_a_numeric_density_of_tanh_of_a_gaussian():
    mean = torch.tensor([[0.3, -1.2, 0.0]], dtype=torch.float64)
    log_std = torch.tensor([[-0.5, 0.4, -2.0]], dtype=torch.float64)
    pre_tanh = torch.tensor([[0.1, -2.5, 0.05]], dtype=torch.float64)
    log_prob = sac.squashed_gaussian_log_prob(pre_tanh, mean, log_std).item()
    # slow reference: the density of a = tanh(u) by a finite difference of its CDF, dimensions independent
    expected, h = 0.0, 1e-6
    for a_u, mu, ls in zip(pre_tanh[0].tolist(), mean[0].tolist(), log_std[0].tolist()):
        a, std = math.tanh(a_u), math.exp(ls)
        probability = normal_cdf((math.atanh(a + h) - mu) / std) - normal_cdf((math.atanh(a - h) - mu) / std)
        expected += math.log(probability / (2 * h))
    assert log_prob == pytest.approx(expected, rel=1e-5)


def test_squashed_gaussian_log_prob_matches_change_of_variables_by_hand_and_stays_finite_when_saturated():
    torch.manual_seed(0)
    mean, log_std = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64) * 0.5
    pre_tanh = mean + log_std.exp() * torch.randn(5, 2, dtype=torch.float64)
    gaussian = torch.distributions.Normal(mean, log_std.exp()).log_prob(pre_tanh)
    by_hand = (gaussian - torch.log(1 - torch.tanh(pre_tanh) ** 2)).sum(1)
    assert torch.allclose(sac.squashed_gaussian_log_prob(pre_tanh, mean, log_std), by_hand)
    saturated = sac.squashed_gaussian_log_prob(torch.tensor([[30.0]]), torch.tensor([[30.0]]), torch.tensor([[0.0]]))
    assert torch.isfinite(saturated).all()  # the naive log(1 - tanh^2) would be log(0) here


def test_sample_action_is_in_the_open_box_and_its_log_prob_is_the_squashed_density():
    torch.manual_seed(1)
    mean, log_std = torch.zeros(1000, 2), torch.zeros(1000, 2)
    actions, log_prob = sac.sample_action(mean, log_std)
    assert actions.abs().max() <= 1.0
    pre_tanh = torch.atanh(actions.double().clamp(-1 + 1e-12, 1 - 1e-12))
    ok = actions.abs().max(dim=1).values < 0.999  # atanh is ill-conditioned near the edges
    by_hand = (torch.distributions.Normal(0.0, 1.0).log_prob(pre_tanh) - torch.log(1 - actions.double() ** 2)).sum(1)
    assert torch.allclose(log_prob.double()[ok], by_hand[ok], atol=1e-3)


def test_actor_log_std_stays_within_drq_bounds():
    actor = sac.Actor("avg", 8, 6, 16, 3, (-10.0, 2.0))
    mean, log_std = actor(torch.randn(64, 8, 3, 3) * 1e4)
    assert log_std.min() >= -10.0 and log_std.max() <= 2.0
    assert mean.shape == log_std.shape == (64, 3)


def test_random_shift_is_an_integer_shift_with_replicate_padding():
    torch.manual_seed(2)
    pad = 4
    obs = torch.randint(0, 256, (24, 6, 12, 12), dtype=torch.uint8)
    shifted = sac.random_shift(obs, pad)
    assert shifted.shape == obs.shape and shifted.dtype == torch.uint8
    found = set()
    for image, result in zip(obs.numpy(), shifted.numpy()):
        padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="edge")  # slow reference: pad, then crop
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if np.array_equal(padded[:, dy:dy + 12, dx:dx + 12], result)]
        assert len(matches) == 1  # one shift for all channels of the image, inside [-pad, pad]^2
        found.add(matches[0])
    assert len(found) > 5  # shifts differ between images


def test_replay_rebuilds_the_next_stack_from_the_stored_newest_frame_and_wraps_around():
    capacity, frames = 4, torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2)
    replay = sac.make_replay(capacity, (9, 2, 2), 1, "cpu")
    stack = lambda t: torch.cat([frames[max(t - 2, 0)], frames[max(t - 1, 0)], frames[t]])  # oldest first
    position, transitions = 0, []
    for t in range(6):  # o_t -> o_{t+1}, written one at a time; the first two are overwritten
        obs, next_obs = stack(t)[None], stack(t + 1)[None]
        position = sac.add_transitions(replay, position, obs, torch.tensor([[float(t)]]), torch.tensor([float(t)]),
                                       next_obs, torch.tensor([0.0]))
        transitions.append((obs[0], next_obs[0], float(t)))
    assert position == 6 % capacity
    batch = sac.sample_batch(replay, capacity, 64, views=1, pad=4)
    by_reward = {reward: (obs, next_obs) for obs, next_obs, reward in transitions[-capacity:]}
    assert set(batch["rewards"].tolist()) <= set(by_reward)
    for obs, next_obs, reward, action in zip(batch["observations"], batch["next_observations"], batch["rewards"],
                                             batch["actions"]):
        assert torch.equal(obs, by_reward[reward.item()][0]) and torch.equal(next_obs, by_reward[reward.item()][1])
        assert action.item() == reward.item()


def test_two_augmented_views_repeat_actions_rewards_and_flags():
    replay = sac.make_replay(8, (9, 20, 20), 2, "cpu")
    obs = torch.randint(0, 256, (8, 9, 20, 20), dtype=torch.uint8)
    sac.add_transitions(replay, 0, obs, torch.randn(8, 2), torch.arange(8.0), obs, torch.zeros(8))
    batch = sac.sample_batch(replay, 8, 5, views=2, pad=4)
    assert batch["observations"].shape == (10, 9, 20, 20)
    assert torch.equal(batch["rewards"][:5], batch["rewards"][5:])
    assert torch.equal(batch["actions"][:5], batch["actions"][5:])


def test_critic_loss_is_drq_sum_over_views_of_both_critics_against_the_view_averaged_target(monkeypatch):
    torch.manual_seed(3)
    monkeypatch.setattr(sac, "sample_action", lambda mean, log_std: (torch.tanh(mean), mean.sum(1) * 0.1))
    encoder = sac.Encoder(9, 1)
    actor, critic = sac.Actor("avg", 32, 4, 8, 1, (-10.0, 2.0)), sac.Critic("avg", 32, 4, 8, 1)
    target_encoder, target_critic = sac.Encoder(9, 1), sac.Critic("avg", 32, 4, 8, 1)
    log_alpha, gamma, batch_size = torch.tensor(math.log(0.1)), 0.99, 3
    views = 2
    batch = {
        "observations": torch.randint(0, 256, (views * batch_size, 9, 16, 16), dtype=torch.uint8),
        "next_observations": torch.randint(0, 256, (views * batch_size, 9, 16, 16), dtype=torch.uint8),
        "actions": torch.rand(batch_size, 1).repeat(views, 1) * 2 - 1,
        "rewards": torch.tensor([1.0, -1.0, 0.5]).repeat(views),
        "terminated": torch.tensor([0.0, 1.0, 0.0]).repeat(views),
    }
    loss, _, _ = sac.critic_loss(encoder, actor, critic, target_encoder, target_critic, log_alpha, batch, views, gamma)
    # slow reference, one transition and one view at a time as DrQ writes it
    with torch.no_grad():
        targets = []
        for i in range(batch_size):
            per_view = []
            for view in range(views):
                next_obs = batch["next_observations"][view * batch_size + i][None]
                mean, _ = actor(encoder(next_obs))
                next_q1, next_q2 = target_critic(target_encoder(next_obs), torch.tanh(mean))
                soft_value = min(next_q1.item(), next_q2.item()) - 0.1 * (mean.sum().item() * 0.1)
                done = batch["terminated"][i].item()
                per_view.append(batch["rewards"][i].item() + (0.0 if done else gamma * soft_value))
            targets.append(sum(per_view) / views)
        expected = 0.0
        for view in range(views):
            observations = batch["observations"][view * batch_size:(view + 1) * batch_size]
            q1, q2 = critic(encoder(observations), batch["actions"][:batch_size])
            expected += sum((a - t) ** 2 for a, t in zip(q1.tolist(), targets)) / batch_size
            expected += sum((a - t) ** 2 for a, t in zip(q2.tolist(), targets)) / batch_size
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_critic_loss_trains_the_encoder_and_critic_but_not_the_targets_actor_or_temperature():
    encoder, target_encoder = sac.Encoder(9, 1), sac.Encoder(9, 1)
    actor, critic = sac.Actor("avg", 32, 4, 8, 1, (-10.0, 2.0)), sac.Critic("avg", 32, 4, 8, 1)
    target_critic = sac.Critic("avg", 32, 4, 8, 1)
    log_alpha = torch.tensor(-1.0, requires_grad=True)
    batch = {"observations": torch.randint(0, 256, (3, 9, 16, 16), dtype=torch.uint8),
             "next_observations": torch.randint(0, 256, (3, 9, 16, 16), dtype=torch.uint8),
             "actions": torch.rand(3, 1) * 2 - 1, "rewards": torch.ones(3), "terminated": torch.zeros(3)}
    loss, _, _ = sac.critic_loss(encoder, actor, critic, target_encoder, target_critic, log_alpha, batch, 1, 0.99)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())  # DrQ: the critic trains the convs
    assert all(p.grad is not None for p in critic.parameters())
    assert all(p.grad is None for network in (target_encoder, target_critic, actor) for p in network.parameters())
    assert log_alpha.grad is None


def test_actor_loss_does_not_reach_the_encoder():
    encoder = sac.Encoder(9, 1)
    features = sac.pooled_size(*sac.feature_map_shape(encoder, 9, 20), "flatten")
    actor, critic = sac.Actor("flatten", features, 4, 8, 2, (-10.0, 2.0)), sac.Critic("flatten", features, 4, 8, 2)
    log_alpha = torch.tensor(0.0, requires_grad=True)
    actor_loss, alpha_loss = sac.actor_and_temperature_losses(
        encoder, actor, critic, log_alpha, torch.randint(0, 256, (4, 9, 20, 20), dtype=torch.uint8), -2.0)
    actor_loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None for p in actor.parameters())
    assert log_alpha.grad is None  # the actor loss uses alpha as a constant
    alpha_loss.backward()
    assert log_alpha.grad is not None


@pytest.mark.parametrize("resolution, side", [(84, 35), (64, 25), (15, 1)])
def test_feature_map_shape_matches_the_convolutions(resolution, side):
    encoder = sac.Encoder(9, 1)
    feature_map = encoder(torch.zeros(1, 9, resolution, resolution, dtype=torch.uint8))
    assert sac.feature_map_shape(encoder, 9, resolution) == (32, side) == (feature_map.shape[1], feature_map.shape[-1])
    assert feature_map.shape[-1] == feature_map.shape[-2]
    assert sac.feature_map_shape(encoder, 9, 14) == (0, 0)  # the 4 VALID convs need 15 pixels


@pytest.mark.parametrize("pool, join_features", [("flatten", 35 * 35 * 64), ("avg", 64), ("max", 64)])
def test_bottleneck_weights_are_hwc_times_dim_for_flatten_and_c_times_dim_for_pooling(pool, join_features):
    encoder = sac.Encoder(9, 2)
    feature_map = encoder(torch.randint(0, 256, (2, 9, 84, 84), dtype=torch.uint8))
    assert feature_map.shape == (2, 64, 35, 35)
    assert sac.pool_features(feature_map, pool).shape == (2, join_features)
    assert sac.pooled_size(*sac.feature_map_shape(encoder, 9, 84), pool) == join_features
    critic = sac.Critic(pool, join_features, 100, 16, 6)
    assert critic.bottleneck.dense[0].weight.numel() == join_features * 100
    assert critic.bottleneck(feature_map).shape == (2, 100)


def test_global_pools_reduce_each_channel_over_space():
    encoder = sac.Encoder(9, 1)
    obs = torch.randint(0, 256, (2, 9, 20, 20), dtype=torch.uint8)
    feature_map = encoder.convs(obs.float() / 255.0)
    assert torch.equal(encoder(obs), feature_map)  # the encoder returns the feature map, the bottleneck pools
    assert torch.allclose(sac.pool_features(feature_map, "avg"), feature_map.mean(dim=(2, 3)))
    assert torch.allclose(sac.pool_features(feature_map, "max"), feature_map.amax(dim=(2, 3)))


# (pool, width, padding, resolution, dense_scale, frame_stack): (encoder, bottleneck, head weights, pooled features),
# recorded from the script before the shared skeleton (issue 10), with --hidden-dim 64 and 6 actions
PARAMETER_COUNTS = {
    ("flatten", 1, "valid", 84, 1, 3): (30368, 3920300, 23950, 39200),  # DrQ: 35x35x32
    ("flatten", 1, "same", 84, 1, 3): (30368, 5645100, 23950, 56448),  # Dopamine: 42x42x32
    ("avg", 2, "valid", 84, 2, 3): (116032, 13400, 33550, 64),
    ("max", 1, "same", 63, 1, 3): (30368, 3500, 23950, 32),
    ("flatten", 1, "valid", 24, 1, 3): (30368, 80300, 23950, 800),
    ("flatten", 1, "same", 24, 1, 3): (30368, 461100, 23950, 4608),
    ("avg", 1, "valid", 15, 1, 1): (28640, 3500, 23950, 32),
    ("flatten", 2, "same", 85, 1, 2): (114304, 11833900, 23950, 118336),
    ("flatten", 1, "valid", 64, 4, 3): (30368, 8001200, 52750, 20000),
}


@pytest.mark.parametrize("config", sorted(PARAMETER_COUNTS))
def test_parameter_counts_per_part_and_pooled_features_stay_as_recorded(config):
    pool, width, padding, resolution, dense_scale, frame_stack = config
    args = SimpleNamespace(pool=pool, width=width, padding=padding, resolution=resolution, dense_scale=dense_scale,
                           feature_dim=50, hidden_dim=64, bound_log_std=True, log_std_min=-10.0, log_std_max=2.0, init="drq")
    with torch.device("meta"):  # shapes only: no compute
        encoder, actor, critic = sac.make_networks(args, 3 * frame_stack, 6, "meta")
    counts = sac.parameter_counts(encoder, actor, critic)
    pooled = sac.pooled_size(*sac.feature_map_shape(encoder, 3 * frame_stack, resolution), pool)
    assert (counts["encoder"], counts["bottleneck"], counts["head"], pooled) == PARAMETER_COUNTS[config]
    assert actor.bottleneck.dense[0].in_features == critic.bottleneck.dense[0].in_features == pooled


def test_same_pad_is_tensorflows_same_padding_with_the_odd_pixel_after():
    """TF / Flax SAME: output ceil(side / stride), total pad (out - 1) * stride + kernel - side, the larger half after."""
    x = torch.randn(1, 2, 84, 85)
    padded = sac.SamePad2d(3, 2)(x)  # height 84: total 1 -> (0, 1); width 85: total 2 -> (1, 1)
    assert torch.equal(padded, torch.nn.functional.pad(x, (1, 1, 0, 1)))
    assert sac.SamePad2d(3, 1)(x).shape == (1, 2, 86, 87)  # stride 1: one pixel each side


def test_soft_update_moves_target_parameters_by_the_update_rate():
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in target.parameters()]
    sac.soft_update([target], [online], 0.01)
    for old, new, source in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(new, 0.99 * old + 0.01 * source)


def test_obs_and_next_obs_get_independent_random_shifts():
    """DrQ augments o_t and o_{t+1} with separate draws: the frames they share come out shifted differently."""
    torch.manual_seed(0)
    replay = sac.make_replay(64, (9, 16, 16), 1, "cpu")
    obs = torch.randint(0, 256, (64, 9, 16, 16), dtype=torch.uint8)
    next_obs = torch.cat([obs[:, 3:], torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)], dim=1)
    sac.add_transitions(replay, 0, obs, torch.zeros(64, 1), torch.arange(64.0), next_obs, torch.zeros(64))
    batch = sac.sample_batch(replay, 64, 256, views=2, pad=4)
    shared_in_obs, shared_in_next = batch["observations"][:, 3:], batch["next_observations"][:, :6]
    same_shift = [torch.equal(a, b) for a, b in zip(shared_in_obs, shared_in_next)]
    assert sum(same_shift) < 0.1 * len(same_shift)  # one chance in 81 per pair when independent
    first_view, second_view = batch["observations"][:256], batch["observations"][256:]
    assert sum(torch.equal(a, b) for a, b in zip(first_view, second_view)) < 0.1 * 256  # views are independent too
    # and unshifted, the shared frames are the same: the difference is the augmentation alone
    plain = sac.sample_batch(replay, 64, 256, views=1, pad=4)
    assert torch.equal(plain["observations"][:, 3:], plain["next_observations"][:, :6])


def test_same_padding_keeps_dopamines_42x42x32_feature_map_at_84():
    """Dopamine's Flax convs pad SAME: 84 -> 42 -> 42 -> 42 -> 42, flatten joins 56,448 features (DrQ's VALID: 39,200)."""
    encoder = sac.Encoder(9, 1, "same")
    feature_map = encoder(torch.zeros(2, 9, 84, 84, dtype=torch.uint8))
    assert sac.pool_features(feature_map, "flatten").shape == (2, 42 * 42 * 32) == (2, 56_448)
    assert sac.feature_map_shape(encoder, 9, 84) == (32, 42) and sac.feature_map_shape(sac.Encoder(9, 1), 9, 84) == (32, 35)
    for resolution in (1, 15, 24, 63, 85):  # one SAME-padded encoder serves every resolution
        feature_map = encoder(torch.zeros(1, 9, resolution, resolution, dtype=torch.uint8))
        side = sac.feature_map_shape(encoder, 9, resolution)[1]
        assert feature_map.shape[-1] == feature_map.shape[-2] == side == math.ceil(resolution / 2)


def test_temperature_loss_on_log_alpha_is_dopamines():
    log_alpha = torch.tensor(0.0, requires_grad=True)  # Dopamine starts at alpha = 1
    log_prob = torch.tensor([1.5, 2.0, 0.5])
    loss = sac.temperature_loss(log_alpha, log_prob, -0.5, "log_alpha")
    loss.backward()
    assert loss.item() == 0.0  # log alpha = 0 times the entropy gap
    assert log_alpha.grad.item() == pytest.approx(sum(-lp + 0.5 for lp in (1.5, 2.0, 0.5)) / 3)


def test_combined_step_applies_half_the_critic_gradient_and_the_actor_gradient_with_a_frozen_critic():
    torch.manual_seed(0)
    encoder = sac.Encoder(9, 1)
    actor, critic = sac.Actor("avg", 32, 4, 8, 2, (-10.0, 2.0)), sac.Critic("avg", 32, 4, 8, 2)
    target_encoder, target_critic = sac.Encoder(9, 1), sac.Critic("avg", 32, 4, 8, 2)
    log_alpha = torch.tensor(0.0, requires_grad=True)
    batch = {"observations": torch.randint(0, 256, (6, 9, 20, 20), dtype=torch.uint8),
             "next_observations": torch.randint(0, 256, (6, 9, 20, 20), dtype=torch.uint8),
             "actions": torch.rand(6, 2) * 2 - 1, "rewards": torch.randn(6), "terminated": torch.zeros(6)}

    def losses():
        qf_loss, _, _ = sac.critic_loss(encoder, actor, critic, target_encoder, target_critic, log_alpha, batch, 1, 0.99)
        torch.manual_seed(1)  # the same actor sample in both computations
        actor_loss, alpha_loss = sac.actor_and_temperature_losses(encoder, actor, critic, log_alpha, batch["observations"],
                                                                  -1.0, "log_alpha")
        return qf_loss, actor_loss, alpha_loss

    critic_params = list(encoder.parameters()) + list(critic.parameters())
    torch.manual_seed(2)
    qf_loss, actor_loss, alpha_loss = losses()
    expected_critic = torch.autograd.grad(0.5 * qf_loss, critic_params)
    expected_actor = torch.autograd.grad(actor_loss, list(actor.parameters()))
    expected_alpha = torch.autograd.grad(alpha_loss, [log_alpha])[0]
    before = [p.detach().clone() for p in critic_params + list(actor.parameters()) + [log_alpha]]
    optimizers = [torch.optim.SGD(params, lr=1.0) for params in (critic_params, list(actor.parameters()), [log_alpha])]
    torch.manual_seed(2)
    sac.combined_step(*losses(), *optimizers)
    after = critic_params + list(actor.parameters()) + [log_alpha]
    for old, new, grad in zip(before, after, [*expected_critic, *expected_actor, expected_alpha]):
        assert torch.allclose(old - new, grad, atol=1e-6)


def test_learner_step_updates_the_actor_temperature_and_targets_on_drqs_schedule():
    """--actor-update-frequency 2 and --target-update-frequency 2: the critic at every update; the actor, the
    temperature and the targets at every second one, each target moved by the update rate towards its network."""
    torch.manual_seed(0)
    encoder, actor, critic = sac.Encoder(9, 1), sac.Actor("avg", 32, 4, 8, 2, (-10.0, 2.0)), sac.Critic("avg", 32, 4, 8, 2)
    log_alpha = torch.tensor(0.0, requires_grad=True)
    parts = {"encoder": encoder, "actor": actor, "critic": critic, "target_encoder": copy.deepcopy(encoder),
             "target_critic": copy.deepcopy(critic),
             "critic_optimizer": torch.optim.Adam([*encoder.parameters(), *critic.parameters()]),
             "actor_optimizer": torch.optim.Adam(actor.parameters()), "alpha_optimizer": torch.optim.Adam([log_alpha])}
    args = SimpleNamespace(gamma=0.99, combined_loss=False, alpha_loss_on="alpha", batch_size=6, actor_update_frequency=2,
                           target_update_frequency=2, tau=0.5, target_entropy_scale=1.0)
    batch = {"observations": torch.randint(0, 256, (6, 9, 20, 20), dtype=torch.uint8),
             "next_observations": torch.randint(0, 256, (6, 9, 20, 20), dtype=torch.uint8),
             "actions": torch.rand(6, 2) * 2 - 1, "rewards": torch.randn(6), "terminated": torch.zeros(6)}
    losses = (sac.critic_loss, sac.actor_and_temperature_losses)
    actor_before = [p.detach().clone() for p in actor.parameters()]
    targets_before = [p.detach().clone() for name in ("target_encoder", "target_critic") for p in parts[name].parameters()]
    critic_before = [p.detach().clone() for p in critic.parameters()]
    assert set(sac.learner_step(parts, log_alpha, batch, 1, losses, args, 1)) == {"qf_loss", "qf1_values", "qf2_values"}
    assert not any(torch.equal(a, b) for a, b in zip(critic_before, critic.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(actor_before, actor.parameters())) and log_alpha.item() == 0.0
    targets = [p for name in ("target_encoder", "target_critic") for p in parts[name].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(targets_before, targets))
    updated = sac.learner_step(parts, log_alpha, batch, 2, losses, args, 1)
    assert set(updated) == {"qf_loss", "qf1_values", "qf2_values", "actor_loss", "alpha_loss"}
    assert not any(torch.equal(a, b) for a, b in zip(actor_before, actor.parameters())) and log_alpha.item() != 0.0
    online = [*encoder.parameters(), *critic.parameters()]
    for old, new, source in zip(targets_before, targets, online):
        assert torch.allclose(new, 0.5 * old + 0.5 * source)


def parse(monkeypatch, *flags):
    monkeypatch.setattr("sys.argv", ["sac_dmc_gap.py", *flags])
    return sac.parse_args()


def test_dopamine_preset_sets_every_value_of_dopamines_sac_from_pixels(monkeypatch):
    """dopamine/labs/sac_from_pixels/sac_pixels.gin and dopamine/jax/agents/sac/sac_agent.py."""
    args = parse(monkeypatch, "--preset", "dopamine")
    assert (args.learning_rate, args.batch_size, args.tau, args.reward_scale, args.action_repeat) == (3e-4, 256, 0.005, 0.1, 4)
    assert (args.augment, args.learning_starts) == (False, 10_000)
    assert (args.actor_update_frequency, args.target_update_frequency) == (1, 1)
    assert (args.init_temperature, args.target_entropy_scale, args.alpha_loss_on) == (1.0, 0.5, "log_alpha")
    assert (args.combined_loss, args.padding, args.hidden_dim, args.feature_dim) == (True, "same", 1024, 50)
    assert (args.frame_stack, args.gamma) == (3, 0.99)
    assert (args.target_next_action, args.bound_log_std, args.init) == ("target_mean", False, "dopamine")
    default = parse(monkeypatch)
    assert (default.preset, default.augment, default.padding, default.combined_loss) == ("drq", True, "valid", False)
    assert (default.target_entropy_scale, default.init_temperature, default.alpha_loss_on) == (1.0, 0.1, "alpha")
    assert (default.actor_update_frequency, default.learning_rate) == (2, 1e-3)
    assert (default.target_next_action, default.bound_log_std, default.init) == ("online_sample", True, "drq")


def test_explicit_flags_override_the_dopamine_preset(monkeypatch):
    args = parse(monkeypatch, "--preset", "dopamine", "--padding", "valid", "--batch-size", "64", "--augment")
    assert (args.padding, args.batch_size, args.augment, args.tau) == ("valid", 64, True, 0.005)


def test_dopamine_target_rates_the_target_actors_mean_action_minus_alpha_times_a_samples_log_prob():
    """sac_agent.py: network_def.apply(target_params, next_state, rng, True) -> the critic at the mean action,
    actor.log_probability of the sampled one, all with the target network's weights."""
    torch.manual_seed(0)
    encoder, target_encoder = sac.Encoder(9, 1), sac.Encoder(9, 1)
    actor, target_actor = sac.Actor("avg", 32, 4, 8, 2, None), sac.Actor("avg", 32, 4, 8, 2, None)
    critic, target_critic = sac.Critic("avg", 32, 4, 8, 2), sac.Critic("avg", 32, 4, 8, 2)
    log_alpha = torch.tensor(math.log(0.5))
    batch = {"observations": torch.randint(0, 256, (5, 9, 20, 20), dtype=torch.uint8),
             "next_observations": torch.randint(0, 256, (5, 9, 20, 20), dtype=torch.uint8),
             "actions": torch.rand(5, 2) * 2 - 1, "rewards": torch.randn(5), "terminated": torch.tensor([0.0, 1, 0, 0, 0])}
    torch.manual_seed(7)
    loss, _, _ = sac.critic_loss(encoder, actor, critic, target_encoder, target_critic, log_alpha, batch, 1, 0.9,
                                 target_actor)
    with torch.no_grad():
        features = target_encoder(batch["next_observations"])
        mean, log_std = target_actor(features)
        torch.manual_seed(7)
        pre_tanh = mean + log_std.exp() * torch.randn_like(mean)
        log_prob = sac.squashed_gaussian_log_prob(pre_tanh, mean, log_std)
        next_q = torch.min(*target_critic(features, torch.tanh(mean)))
        target = batch["rewards"] + 0.9 * (1 - batch["terminated"]) * (next_q - 0.5 * log_prob)
        online_q1, online_q2 = critic(encoder(batch["observations"]), batch["actions"])
    expected = ((online_q1 - target) ** 2).mean() + ((online_q2 - target) ** 2).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.manual_seed(7)
    drq_loss, _, _ = sac.critic_loss(encoder, actor, critic, target_encoder, target_critic, log_alpha, batch, 1, 0.9)
    assert drq_loss.item() != pytest.approx(loss.item())  # DrQ's target uses the online actor's sample


def test_unbounded_actor_returns_the_raw_log_std_as_dopamine():
    actor = sac.Actor("max", 8, 6, 16, 3, None)
    feature_map = torch.randn(4, 8, 5, 5) * 100
    mean, log_std = actor(feature_map)
    raw_mean, raw_log_std = actor.trunk(actor.bottleneck.dense(feature_map.amax(dim=(2, 3)))).chunk(2, dim=1)
    assert torch.equal(mean, raw_mean) and torch.equal(log_std, raw_log_std)


def test_dopamine_init_is_orthogonal_in_the_encoder_and_glorot_uniform_in_the_mlps():
    torch.manual_seed(0)
    encoder = sac.Encoder(9, 1, "same")
    actor, critic = sac.Actor("flatten", 4608, 50, 256, 6, None), sac.Critic("flatten", 4608, 50, 256, 6)
    sac.dopamine_init_weights(encoder, actor, critic)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    for layer in convs + [actor.bottleneck.dense[0], critic.bottleneck.dense[0]]:
        rows = layer.weight.detach().flatten(1)  # out x fan_in, out <= fan_in: orthonormal rows, gain 1 (not DrQ's sqrt 2)
        assert torch.allclose(rows @ rows.T, torch.eye(rows.shape[0]), atol=1e-4)
    for network in (actor.trunk, critic.q1, critic.q2):
        for layer in (m for m in network if isinstance(m, torch.nn.Linear)):
            fan_out, fan_in = layer.weight.shape
            assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.15)
            assert layer.weight.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-6
    layers = [m for network in (encoder, actor, critic) for m in network.modules()
              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(torch.count_nonzero(m.bias) == 0 for m in layers)
