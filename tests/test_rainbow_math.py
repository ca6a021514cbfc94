"""Rainbow's math against slow, independent references written as plain Python loops."""

import math
import sys

import numpy as np
import pytest
import torch

import rainbow_atari_gap as rainbow


# C51 projection
def slow_projection(next_probs, returns, discounts, v_min, v_max):
    """Bellemare et al. 2017, Algorithm 1, atom by atom."""
    batch, num_atoms = len(next_probs), len(next_probs[0])
    delta = (v_max - v_min) / (num_atoms - 1)
    support = [v_min + j * delta for j in range(num_atoms)]
    projected = [[0.0] * num_atoms for _ in range(batch)]
    for b in range(batch):
        for j in range(num_atoms):
            atom = min(max(returns[b] + discounts[b] * support[j], v_min), v_max)
            position = (atom - v_min) / delta
            lower, upper = math.floor(position), math.ceil(position)
            if lower == upper:
                projected[b][lower] += next_probs[b][j]
            else:
                projected[b][lower] += next_probs[b][j] * (upper - position)
                projected[b][upper] += next_probs[b][j] * (position - lower)
    return projected


def project(next_probs, returns, discounts, v_min=-10.0, v_max=10.0):
    support = torch.linspace(v_min, v_max, next_probs.shape[1], dtype=torch.float64)
    return rainbow.project_distribution(next_probs, returns, discounts, support)


def test_projection_matches_slow_reference_on_random_targets():
    generator = torch.Generator().manual_seed(0)
    next_probs = torch.rand(6, 51, generator=generator, dtype=torch.float64).softmax(1)
    returns = torch.randn(6, generator=generator, dtype=torch.float64) * 3
    discounts = torch.tensor([0.99, 0.97, 0.5, 0.0, 0.99**3, 1.0], dtype=torch.float64)
    expected = slow_projection(next_probs.tolist(), returns.tolist(), discounts.tolist(), -10.0, 10.0)
    assert torch.allclose(project(next_probs, returns, discounts), torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_projection_keeps_atoms_that_land_exactly_on_atoms_including_the_edges():
    next_probs = torch.rand(1, 11, dtype=torch.float64).softmax(1)
    # reward 0, discount 1: every atom, v_min and v_max included, maps onto itself
    projected = project(next_probs, torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(projected, next_probs, atol=1e-12)
    # reward = one atom spacing: shift up by one atom, the top atom's mass stays at v_max
    shifted = project(next_probs, torch.full((1,), 2.0, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    expected = slow_projection(next_probs.tolist(), [2.0], [1.0], -10.0, 10.0)
    assert torch.allclose(shifted, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert shifted[0, -1].item() == pytest.approx((next_probs[0, -1] + next_probs[0, -2]).item())


def test_projection_clamps_targets_beyond_the_support():
    next_probs = torch.rand(2, 51, dtype=torch.float64).softmax(1)
    projected = project(next_probs, torch.tensor([100.0, -100.0], dtype=torch.float64),
                        torch.full((2,), 0.99, dtype=torch.float64))
    expected = slow_projection(next_probs.tolist(), [100.0, -100.0], [0.99, 0.99], -10.0, 10.0)
    assert torch.allclose(projected, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert projected[0, -1].item() == pytest.approx(1.0) and projected[1, 0].item() == pytest.approx(1.0)


def kernel_projection(next_probs, returns, discounts, support):
    """Dopamine's form, independent of floor/ceil: p_i = sum_j clip(1 - |clip(Tz_j) - z_i| / delta, 0, 1) q_j."""
    delta = (support[-1] - support[0]) / (len(support) - 1)
    target_atoms = (returns[:, None] + discounts[:, None] * support[None, :]).clamp(support[0].item(), support[-1].item())
    kernel = (1 - (target_atoms[:, None, :] - support[None, :, None]).abs() / delta).clamp(0, 1)
    return (kernel * next_probs[:, None, :]).sum(2)


@pytest.mark.parametrize("v_min, v_max, num_atoms", [(-5.0, 100.0, 51), (-10.0, 25.0, 31), (0.0, 1.0, 7)])
def test_projection_in_float32_stays_inside_supports_whose_spacing_rounds(v_min, v_max, num_atoms):
    """In float32 (v - v_min) / delta can land just past the last atom; the mass must stay on the support."""
    support = torch.linspace(v_min, v_max, num_atoms)
    next_probs = torch.rand(4, num_atoms, generator=torch.Generator().manual_seed(1)).softmax(1)
    returns = torch.tensor([200.0, v_max, v_min - 1, (v_min + v_max) / 3])
    discounts = torch.tensor([0.99, 1.0, 0.0, 0.97])
    projected = rainbow.project_distribution(next_probs, returns, discounts, support)
    assert torch.allclose(projected, kernel_projection(next_probs, returns, discounts, support), atol=1e-5)
    assert torch.allclose(projected.sum(1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deterministic_projection_equals_the_scatter_add_projection(dtype):
    """--torch-deterministic sums one-hot masks instead of scatter_add_ (atomic adds on CUDA): same numbers."""
    generator = torch.Generator().manual_seed(3)
    support = torch.linspace(-10.0, 10.0, 51, dtype=dtype)
    next_probs = torch.rand(64, 51, generator=generator, dtype=dtype).softmax(1)
    returns = torch.randn(64, generator=generator, dtype=dtype) * 6
    returns[:4] = torch.tensor([0.0, 2.0, 100.0, -100.0], dtype=dtype)  # on atoms, and clamped at both edges
    discounts = torch.rand(64, generator=generator, dtype=dtype)
    discounts[:4] = torch.tensor([1.0, 1.0, 0.99, 0.0], dtype=dtype)
    scattered = rainbow.project_distribution(next_probs, returns, discounts, support)
    dense = rainbow.project_distribution(next_probs, returns, discounts, support, deterministic=True)
    assert torch.allclose(dense, scattered, atol=1e-6 if dtype == torch.float32 else 1e-13, rtol=0)
    assert torch.allclose(dense, kernel_projection(next_probs, returns, discounts, support), atol=1e-5)


def test_projection_of_a_terminal_transition_is_the_reward_alone():
    next_probs = torch.rand(1, 51, dtype=torch.float64).softmax(1)
    projected = project(next_probs, torch.tensor([1.3], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    expected = slow_projection(next_probs.tolist(), [1.3], [0.0], -10.0, 10.0)
    assert torch.allclose(projected, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    # all mass between the atoms 1.2 and 1.6 (spacing 0.4), split 3:1
    assert projected[0, 28].item() == pytest.approx(0.75) and projected[0, 29].item() == pytest.approx(0.25)
    assert projected.sum().item() == pytest.approx(1.0)


# n-step returns
def slow_n_step(rewards, terminated, truncated, gamma):
    out = []
    for r, term, trunc in zip(rewards, terminated, truncated):
        total, steps, discount = 0.0, len(r), gamma ** len(r)
        for i in range(len(r)):
            total += gamma**i * r[i]
            if term[i]:
                steps, discount = i + 1, 0.0
                break
            if trunc[i]:
                steps, discount = i + 1, gamma ** (i + 1)
                break
        out.append((total, discount, steps))
    return out


def test_n_step_returns_stop_at_episode_ends():
    rewards = torch.tensor([[1.0, 1, 1], [1, -1, 1], [0, 1, 1], [1, 1, 1], [1, 0, 1], [1, 1, 1]])
    terminated = torch.tensor([[0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    returns, steps, discounts = rainbow.n_step_returns(rewards, terminated, truncated, 0.9)
    expected = slow_n_step(rewards.tolist(), terminated.tolist(), truncated.tolist(), 0.9)
    assert torch.allclose(returns, torch.tensor([e[0] for e in expected]), atol=1e-6)
    assert torch.allclose(discounts, torch.tensor([e[1] for e in expected]), atol=1e-6)
    assert steps.tolist() == [e[2] for e in expected]


def test_n_step_returns_random_windows_match_slow_reference():
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randint(-1, 2, (200, 10), generator=generator).float()
    terminated = torch.rand(200, 10, generator=generator) < 0.1
    truncated = torch.rand(200, 10, generator=generator) < 0.05
    returns, steps, discounts = rainbow.n_step_returns(rewards, terminated, truncated, 0.99)
    expected = slow_n_step(rewards.tolist(), terminated.tolist(), truncated.tolist(), 0.99)
    assert np.allclose(returns.numpy(), [e[0] for e in expected], atol=1e-5)
    assert np.allclose(discounts.numpy(), [e[1] for e in expected], atol=1e-6)
    assert steps.tolist() == [e[2] for e in expected]


# Sum tree
def make_tree(priorities):
    leaves = 1 << max(1, math.ceil(math.log2(len(priorities))))
    tree = torch.zeros(2 * leaves, dtype=torch.float64)
    rainbow.sum_tree_update(tree, torch.arange(len(priorities)), torch.tensor(priorities, dtype=torch.float64))
    return tree


def test_sum_tree_nodes_are_sums_of_their_children_after_updates():
    tree = make_tree([1.0, 2.0, 0.0, 3.0, 4.0, 0.5, 0.0, 2.5, 1.5, 7.0])
    # a batch with duplicates (a transition sampled twice gets the same new priority) and a zero
    rainbow.sum_tree_update(tree, torch.tensor([3, 9, 3, 0]), torch.tensor([0.25, 1.0, 0.25, 0.0], dtype=torch.float64))
    leaves = [1.0, 2.0, 0.0, 3.0, 4.0, 0.5, 0.0, 2.5, 1.5, 7.0]
    leaves[3], leaves[9], leaves[0] = 0.25, 1.0, 0.0
    half = tree.numel() // 2
    assert tree[half:half + 10].tolist() == leaves and tree[half + 10:].sum() == 0
    assert tree[1].item() == pytest.approx(sum(leaves))
    for node in range(1, half):
        assert tree[node].item() == pytest.approx(tree[2 * node].item() + tree[2 * node + 1].item())


def slow_retrieve(priorities, target):
    running = 0.0
    for i, p in enumerate(priorities):
        if p > 0 and running <= target < running + p:
            return i
        running += p
    return max(i for i, p in enumerate(priorities) if p > 0)


def test_sum_tree_prefix_sum_retrieval_matches_a_linear_scan():
    priorities = [1.0, 2.0, 0.0, 3.0, 4.0, 0.5, 0.0, 2.5, 1.5, 0.0]
    tree = make_tree(priorities)
    targets = [0.0, 0.99, 1.0, 2.999, 3.0, 5.9, 6.0, 9.99, 10.0, 10.49, 10.5, 12.9, 13.0, 14.49, 14.5 - 1e-12]
    leaves = rainbow.sum_tree_retrieve(tree, torch.tensor(targets, dtype=torch.float64))
    assert leaves.tolist() == [slow_retrieve(priorities, t) for t in targets]


def test_prioritised_sampling_frequencies_follow_priorities():
    torch.manual_seed(0)
    priorities = [1.0, 2.0, 0.0, 3.0, 4.0, 0.5, 0.0, 2.5, 1.5, 5.5]
    tree = make_tree(priorities)
    counts = np.zeros(len(priorities))
    for _ in range(2000):
        leaves, sampled = rainbow.sum_tree_sample(tree, 32)
        counts += np.bincount(leaves.numpy(), minlength=len(priorities))[: len(priorities)]
        assert torch.equal(sampled, torch.tensor(priorities, dtype=torch.float64)[leaves])
    expected = np.array(priorities) / sum(priorities)
    assert counts[2] == 0 and counts[6] == 0  # zero priority is never sampled
    assert np.abs(counts / counts.sum() - expected).max() < 0.005


def test_importance_weights_are_inverse_sqrt_probabilities_over_their_maximum():
    probabilities = torch.tensor([0.1, 0.4, 0.05, 0.25, 0.2])
    weights = rainbow.importance_weights(probabilities, 0.5)
    raw = [1 / math.sqrt(p + 1e-10) for p in probabilities.tolist()]
    assert weights.tolist() == pytest.approx([w / max(raw) for w in raw], rel=1e-6)
    assert weights.max().item() == pytest.approx(1.0)


# Epsilon schedule
def dopamine_linearly_decaying_epsilon(decay_period, step, warmup_steps, epsilon):
    """Dopamine's dqn_agent.linearly_decaying_epsilon, an independent formulation."""
    steps_left = decay_period + warmup_steps - step
    bonus = (1.0 - epsilon) * steps_left / decay_period
    bonus = min(max(bonus, 0.0), 1.0 - epsilon)
    return epsilon + bonus


def test_epsilon_schedule_after_warm_up_matches_dopamine():
    for step in [20_000, 20_001, 100_000, 269_999, 270_000, 270_001, 1_000_000]:
        ours = rainbow.linear_schedule(1.0, 0.01, 250_000, step - 20_000)
        assert ours == pytest.approx(dopamine_linearly_decaying_epsilon(250_000, step, 20_000, 0.01), abs=1e-12)


# NoisyNet layer
def test_noisy_linear_noise_is_factorised_with_zero_mean_and_variance_2_over_pi():
    torch.manual_seed(0)
    layer = rainbow.NoisyLinear(6, 5, std_init=0.5)
    with torch.no_grad():
        layer.weight_mu.zero_(), layer.weight_sigma.fill_(1.0), layer.bias_mu.zero_(), layer.bias_sigma.zero_()
    noises = []
    for _ in range(4000):
        with torch.no_grad():
            noise = layer(torch.eye(6)).T  # row i, column j: the weight noise of output i, input j
        singular_values = torch.linalg.svdvals(noise)
        assert singular_values[1] <= 1e-5 * max(singular_values[0].item(), 1e-6)  # rank one: f(eps_out) f(eps_in)^T
        noises.append(noise)
    noises = torch.stack(noises)
    # f(x) = sign(x) sqrt(|x|) for x ~ N(0, 1): E f = 0, E f^2 = E|x| = sqrt(2/pi), so the product has variance 2/pi
    assert noises.mean().abs().item() < 0.02
    assert noises.var().item() == pytest.approx(2 / math.pi, rel=0.05)


def test_noisy_linear_initialisation_and_bias_noise():
    torch.manual_seed(1)
    layer = rainbow.NoisyLinear(16, 3, std_init=0.5)
    assert layer.weight_mu.abs().max().item() <= 1 / 4 and layer.weight_sigma.unique().tolist() == [pytest.approx(0.5 / 4)]
    with torch.no_grad():
        layer.weight_sigma.zero_()
        outputs = torch.stack([layer(torch.zeros(1, 16))[0] - layer.bias_mu for _ in range(4000)])
    assert outputs.mean(0).abs().max().item() < 0.01  # bias noise sigma_b * f(eps_out): mean 0
    assert outputs.var(0).tolist() == pytest.approx([(0.5 / 4) ** 2 * math.sqrt(2 / math.pi)] * 3, rel=0.1)


def test_noisy_linear_is_deterministic_mean_layer_in_eval_mode():
    layer = rainbow.NoisyLinear(8, 4, std_init=0.5).eval()
    x = torch.randn(3, 8)
    first, second = layer(x), layer(x)
    assert torch.equal(first, second)
    assert torch.allclose(first, x @ layer.weight_mu.T + layer.bias_mu)
    assert not torch.equal(layer.train()(x), layer(x))  # training mode draws fresh noise every call


# Network shapes and the preset
def network_args(**overrides):
    return rainbow.Args(**overrides)


@pytest.mark.parametrize("encoder,pool,resolution", [("impala", "avg", 84), ("impala", "flatten", 84), ("nature", "max", 84),
                                                     ("nature", "flatten", 100), ("impala", "flatten", 120)])
def test_network_outputs_logits_per_action_and_atom_and_sizes_the_bottleneck(encoder, pool, resolution):
    args = network_args(encoder=encoder, pool=pool, resolution=resolution, dense_scale=1, dueling=True, noisy=True)
    network = rainbow.QNetwork(args, num_actions=6)
    logits = network(torch.randint(0, 256, (2, 4, resolution, resolution), dtype=torch.uint8))
    assert logits.shape == (2, 6, 51)
    encoded = network.encoder(torch.zeros(1, 4, resolution, resolution))
    assert (encoded.shape[1], encoded.shape[-1]) == rainbow.feature_map_shape(network.encoder, 4, resolution)
    assert encoded.shape[-1] == math.ceil(resolution / 8)  # SAME padding (strides 4, 2, 1) and Impala's pools alike
    joined = encoded[0].numel() if pool == "flatten" else encoded.shape[1]
    assert network.bottleneck.dense[0].weight_mu.shape == (512, joined)


def flax_std(kind, weight):
    """The standard deviation of Dopamine's Flax initialisers, fan_in = in x kernel area, fan_out = out x kernel area."""
    fan_in, fan_out = weight[0].numel(), weight.shape[0] * weight[0, 0].numel()
    if kind == "xavier_uniform":
        return math.sqrt(2 / (fan_in + fan_out))
    if kind == "variance_scaling_1/sqrt3":
        return math.sqrt((1 / math.sqrt(3)) / fan_in)
    return math.sqrt(1 / fan_in)  # lecun_normal


def expected_init(args, name):
    """Which Dopamine initialiser (dopamine/jax/networks.py) each of our layers gets, by its name."""
    full = args.noisy or args.dueling
    plain = "xavier_uniform" if full else "variance_scaling_1/sqrt3"
    if name.startswith("encoder") and args.encoder == "impala":
        return "lecun_normal" if ".conv" in name else "xavier_uniform"  # Stack: the stage conv, then residual convs
    return plain


@pytest.mark.parametrize("flags", [dict(encoder="impala", pool="avg", dense_scale=4),
                                   dict(encoder="nature", pool="flatten", dense_scale=1),
                                   dict(encoder="nature", pool="flatten", dense_scale=1, dueling=True, double=True),
                                   dict(encoder="impala", pool="flatten", dense_scale=1, dueling=True)])
def test_dopamine_init_gives_each_layer_the_std_of_dopamines_initialiser_and_zero_biases(flags):
    torch.manual_seed(0)
    args = network_args(**flags)
    network = rainbow.QNetwork(args, num_actions=18)
    rainbow.dopamine_init(network, args)
    layers = [(name, module) for name, module in network.named_modules()
              if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == (3 if args.encoder == "nature" else 15) + 1 + (2 if args.dueling else 1)
    for name, module in layers:
        kind = expected_init(args, name)
        weight = module.weight.detach().double()
        assert weight.std().item() == pytest.approx(flax_std(kind, weight), rel=0.12), (name, kind)
        assert weight.mean().abs().item() < 0.2 * flax_std(kind, weight), name
        if kind == "lecun_normal":  # truncated at 2 standard deviations of the underlying normal
            assert weight.abs().max().item() <= 2 * flax_std(kind, weight) / 0.87962566103423978 + 1e-6
        else:
            assert weight.abs().max().item() <= math.sqrt(3) * flax_std(kind, weight) + 1e-6, "uniform: within sqrt(3) std"
        assert torch.count_nonzero(module.bias) == 0, name


def test_dopamine_init_leaves_noisy_layers_as_dopamines_noisy_network():
    torch.manual_seed(0)
    args = network_args(encoder="nature", pool="flatten", dense_scale=1, noisy=True, dueling=True)
    network = rainbow.QNetwork(args, num_actions=4)
    rainbow.dopamine_init(network, args)
    dense = network.bottleneck.dense[0]
    fan_in = dense.weight_mu.shape[1]
    assert dense.weight_mu.abs().max().item() <= 1 / math.sqrt(fan_in)  # mu ~ U(+-1/sqrt(fan_in))
    assert dense.weight_sigma.unique().tolist() == [pytest.approx(0.1 / math.sqrt(fan_in))]
    conv = network.encoder[1]
    assert conv.weight.std().item() == pytest.approx(flax_std("xavier_uniform", conv.weight), rel=0.12)


def same_pads(side, kernel, stride):
    """(before, after) zeros SamePad2d puts on each axis, read off a padded image of ones."""
    padded = rainbow.SamePad2d(kernel, stride)(torch.ones(1, 1, side, side))[0, 0]
    rows, cols = padded.amax(dim=1), padded.amax(dim=0)  # which rows / columns hold the image
    before, after = int(rows.argmax()), int(rows.flip(0).argmax())  # the zeros before the first one, after the last
    assert torch.equal(rows, cols), "both axes alike"
    return before, after


def test_nature_encoder_pads_same_as_dopamine_84_to_11x11x64():
    """Dopamine's Flax Nature CNN pads SAME: 84 -> 21 -> 11 -> 11, so flatten joins 7,744 features."""
    pads = [same_pads(side, kernel, stride) for side, kernel, stride in ((84, 8, 4), (21, 4, 2), (11, 3, 1))]
    assert pads == [(2, 2), (1, 2), (1, 1)]
    network = rainbow.QNetwork(network_args(encoder="nature", pool="flatten", resolution=84, dense_scale=1), num_actions=4)
    assert network.encoder(torch.zeros(1, 4, 84, 84)).shape == (1, 64, 11, 11)
    assert rainbow.feature_map_shape(network.encoder, 4, 84) == (64, 11)
    assert network.bottleneck.dense[0].weight.shape == (512, 7744)


@pytest.mark.parametrize("side,kernel,stride", [(7, 3, 2), (10, 4, 4), (1, 8, 4), (5, 1, 1)])
def test_same_padding_gives_ceil_side_over_stride_with_the_odd_pixel_after(side, kernel, stride):
    before, after = same_pads(side, kernel, stride)
    total = max((math.ceil(side / stride) - 1) * stride + kernel - side, 0)
    assert (before, after) == (total // 2, total - total // 2)
    conv = torch.nn.Conv2d(1, 1, kernel, stride=stride)
    assert conv(rainbow.SamePad2d(kernel, stride)(torch.zeros(1, 1, side, side))).shape[-1] == math.ceil(side / stride)


def parse(monkeypatch, *flags):
    monkeypatch.setattr(sys, "argv", ["rainbow_atari_gap.py", *flags])
    return rainbow.parse_args()


def test_der_preset_sets_every_der_value(monkeypatch):
    args = parse(monkeypatch, "--preset", "der")
    # DER.gin's network is Dopamine's FullRainbowNetwork: Nature CNN, flatten, one noisy Dense(512)
    assert (args.encoder, args.pool, args.dense_scale, args.width, args.iteration_steps) == ("nature", "flatten", 1, 1, 10_000)
    assert (args.noisy, args.dueling, args.double, args.n_step) == (True, True, True, 10)
    assert (args.learning_starts, args.train_frequency) == (1600, 1)
    assert (args.target_network_frequency, args.learning_rate, args.adam_eps) == (2000, 1e-4, 1.5e-4)
    assert (args.repeat_action_probability, args.episodic_life) == (0.0, True)
    assert (args.total_timesteps, args.eval_episodes) == (100_000, 100)
    assert (args.noisy_std, args.buffer_size) == (0.1, 100_000)  # Dopamine's NoisyNetwork sigma 0.1 / sqrt(fan_in)
    default = parse(monkeypatch)
    assert (default.noisy, default.n_step) == (False, 3)
    assert (default.learning_rate, default.repeat_action_probability) == (6.25e-5, 0.25)
    assert (default.encoder, default.pool, default.dense_scale) == ("impala", "avg", 4)  # the GAP paper's network


def test_explicit_flags_override_the_preset(monkeypatch):
    args = parse(monkeypatch, "--preset", "der", "--n-step", "5", "--no-noisy", "--learning-rate", "3e-4")
    assert (args.n_step, args.noisy, args.learning_rate) == (5, False, 3e-4)
    assert (args.dueling, args.learning_starts) == (True, 1600)


# The loss and the dueling head
class TableNetwork(torch.nn.Module):
    """A stand-in network: observation i (its first pixel) -> a fixed logits table row."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, obs):
        return self.table[obs[:, 0, 0, 0].long()]


def slow_rainbow_loss(online_table, target_table, batch, support, double):
    support = support.tolist()
    losses = []
    for i in range(len(batch["actions"])):
        next_index = int(batch["next_observations"][i, 0, 0, 0])
        target_probs = target_table[next_index].softmax(-1)
        chooser = online_table[next_index].softmax(-1) if double else target_probs
        expected = [sum(p * z for p, z in zip(row.tolist(), support)) for row in chooser]
        next_action = max(range(len(expected)), key=lambda a: expected[a])
        target = slow_projection([target_probs[next_action].tolist()], [batch["returns"][i].item()],
                                 [batch["bootstrap_discount"][i].item()], support[0], support[-1])[0]
        log_probs = online_table[int(batch["observations"][i, 0, 0, 0]), batch["actions"][i]].log_softmax(-1).tolist()
        losses.append(-sum(t * lp for t, lp in zip(target, log_probs)))
    return losses


@pytest.mark.parametrize("double", [False, True])
def test_rainbow_loss_is_the_cross_entropy_to_the_projected_target(double):
    generator = torch.Generator().manual_seed(5)
    online, target = torch.randn(4, 3, 11, generator=generator) * 2, torch.randn(4, 3, 11, generator=generator) * 2
    support = torch.linspace(-10, 10, 11)
    batch = {
        "observations": torch.tensor([0, 1, 2, 3, 1]).view(5, 1, 1, 1).expand(5, 4, 2, 2),
        "next_observations": torch.tensor([1, 2, 3, 0, 0]).view(5, 1, 1, 1).expand(5, 4, 2, 2),
        "actions": torch.tensor([0, 2, 1, 1, 0]),
        "returns": torch.tensor([0.0, 1.0, -2.5, 0.7, 30.0]),
        "bootstrap_discount": torch.tensor([0.99, 0.0, 0.97, 0.5, 0.99]),
    }
    losses, logits = rainbow.rainbow_loss(TableNetwork(online), TableNetwork(target), batch, support, double)
    assert losses.tolist() == pytest.approx(slow_rainbow_loss(online, target, batch, support, double), rel=1e-4)
    assert logits.shape == (5, 3, 11)


def table_replay(priorities, rewards, terminated):
    """A one-environment replay of 1 x 1 frames whose pixel is the slot's index into a TableNetwork, every slot
    valid, with these leaf priorities: what learner_step samples from."""
    capacity = len(priorities)
    replay = rainbow.make_replay(1, capacity, 1, "cpu")
    replay["frames"][0, :, 0, 0] = torch.arange(capacity, dtype=torch.uint8)
    replay["rewards"][0] = torch.tensor(rewards)
    replay["terminated"][0] = torch.tensor(terminated)
    replay["actions"][0] = torch.arange(capacity) % 3
    replay["valid"][:] = True
    rainbow.sum_tree_update(replay["sum_tree"], torch.arange(capacity), torch.tensor(priorities, dtype=torch.float64))
    return replay


def test_learner_step_weights_the_loss_and_writes_sqrt_loss_priorities():
    """Dopamine's step on a prioritised batch: loss = mean(w_i CE_i), w_i = p_i^-0.5 / max with p_i the sampling
    probability (priority / total); leaf i gets sqrt(CE_i + 1e-10); the running max priority grows to the largest
    of them (and never shrinks); the mean Q is that of the online network on the batch, before the step."""
    generator = torch.Generator().manual_seed(2)
    online, target = torch.randn(8, 3, 11, generator=generator) * 3, torch.randn(8, 3, 11, generator=generator)
    support = torch.linspace(-10, 10, 11)
    leaf_priorities = [1.0, 0.0, 2.0, 0.5, 3.0, 0.0, 1.5, 0.0]  # slot 7's window runs past the newest step: priority 0
    replay = table_replay(leaf_priorities, [0.0, 1.0, -2.5, 0.7, 1.0, 0.0, 2.0, 0.0], [0, 0, 1, 0, 0, 1, 0, 0])
    args = network_args(double=False, priority_exponent=0.5, importance_exponent=0.5, batch_size=4, n_step=1,
                        frame_stack=1, gamma=0.9)
    torch.manual_seed(7)
    batch = rainbow.sample_batch(replay, args.batch_size, args.n_step, args.frame_stack, args.gamma)
    leaves = batch["leaves"].tolist()
    assert all(leaf_priorities[leaf] > 0 for leaf in leaves)
    probabilities = [leaf_priorities[leaf] / sum(leaf_priorities) for leaf in leaves]
    assert batch["probabilities"].tolist() == pytest.approx(probabilities, rel=1e-6)
    expected_losses = slow_rainbow_loss(online, target, batch, support, double=False)
    weights = [(1 / p) ** 0.5 for p in probabilities]
    expected_loss = sum(w / max(weights) * l for w, l in zip(weights, expected_losses)) / len(leaves)
    expected_q = [sum(p * z for p, z in zip(online[leaf].softmax(-1)[a].tolist(), support.tolist()))
                  for leaf in leaves for a in range(3)]
    q_network = TableNetwork(online)
    optimizer = torch.optim.SGD(q_network.parameters(), lr=0.1)
    torch.manual_seed(7)  # the same draws: learner_step samples the batch above
    loss, mean_q = rainbow.learner_step(q_network, TableNetwork(target), optimizer, replay, support, args)
    assert not loss.requires_grad and not mean_q.requires_grad
    assert loss.item() == pytest.approx(expected_loss, rel=1e-4)
    assert mean_q.item() == pytest.approx(sum(expected_q) / len(expected_q), rel=1e-4)
    tree_leaves = replay["sum_tree"][8:].tolist()
    new_priorities = {leaf: math.sqrt(l + 1e-10) for leaf, l in zip(leaves, expected_losses)}
    assert [tree_leaves[leaf] for leaf in new_priorities] == pytest.approx(list(new_priorities.values()), rel=1e-4)
    assert [tree_leaves[i] for i in range(8) if i not in new_priorities] == [leaf_priorities[i] for i in range(8)
                                                                               if i not in new_priorities]
    assert replay["sum_tree"][1].item() == pytest.approx(sum(tree_leaves), rel=1e-9)
    assert replay["max_priority"].item() == pytest.approx(max(1.0, *new_priorities.values()), rel=1e-4)
    assert not torch.equal(q_network.table.detach(), online)  # the step moved the weights


def test_double_and_plain_targets_differ_when_the_networks_disagree():
    support = torch.linspace(-10, 10, 11)
    online, target = torch.zeros(1, 2, 11), torch.zeros(1, 2, 11)
    online[0, 1, -1] = 10.0  # the online network prefers action 1
    online[0, 0] = torch.linspace(-1.0, 1.0, 11)  # the distribution whose cross-entropy is measured
    target[0, 0, -1] = 10.0  # the target network prefers action 0
    target[0, 1, 0] = 10.0
    batch = {"observations": torch.zeros(1, 4, 1, 1), "next_observations": torch.zeros(1, 4, 1, 1),
             "actions": torch.tensor([0]), "returns": torch.zeros(1), "bootstrap_discount": torch.ones(1)}
    plain, _ = rainbow.rainbow_loss(TableNetwork(online), TableNetwork(target), batch, support, double=False)
    double, _ = rainbow.rainbow_loss(TableNetwork(online), TableNetwork(target), batch, support, double=True)
    assert plain.item() == pytest.approx(slow_rainbow_loss(online, target, batch, support, False)[0], rel=1e-5)
    assert double.item() == pytest.approx(slow_rainbow_loss(online, target, batch, support, True)[0], rel=1e-5)
    assert double.item() != pytest.approx(plain.item())


def test_dueling_head_adds_value_to_mean_centred_advantages_per_atom():
    args = network_args(dueling=True, num_atoms=5)
    head = rainbow.C51Head(8, 3, args)
    hidden = torch.randn(2, 8)
    advantage = head.advantage(hidden).view(2, 3, 5).tolist()
    value = head.value(hidden).view(2, 5).tolist()
    expected = [[[value[b][z] + advantage[b][a][z] - sum(advantage[b][k][z] for k in range(3)) / 3 for z in range(5)]
                 for a in range(3)] for b in range(2)]
    assert head(hidden).tolist() == [[pytest.approx(row, abs=1e-6) for row in actions] for actions in expected]
