"""Sparse training in dqn_atari_gap.py and rainbow_atari_gap.py (one shared text, test_skeleton.SHARED): each mask rule
against a slow reference on hand-made tensors (JaxPruner's top-k, ERK, the polynomial schedule and its update times,
RigL's cosine drop fraction, drop and grow, Adam's moments), the masks in the learner step, and tiny real runs of
prune, static and RigL that end at exactly their target sparsity, resume with their masks and refuse another."""

import glob
import math
import os
import shutil
import sys

import pytest
import torch

import dqn_atari_gap as dqn
import rainbow_atari_gap as rainbow
import utils
from conftest import read_scalars, run_script


def slow_topk(scores: list, sparsity: float) -> list:
    """Keep the max(1, round(n (1 - sparsity))) largest scores, a tie to the lower index (JaxPruner's stable argsort)."""
    kept = max(1, round(len(scores) * (1 - sparsity)))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [i in order[:kept] for i in range(len(scores))]


# JaxPruner's top-k mask
@pytest.mark.parametrize("scores,sparsity", [
    ([3.0, 1.0, 2.0, 2.0, 2.0, 0.0], 0.5),  # three 2s for two places: the lower indices win
    ([1.0, 1.0, 1.0, 1.0], 0.5),  # all tied
    ([0.5, 0.1, 0.7, 0.2, 0.9, 0.3, 0.8, 0.4, 0.6, 0.0], 0.75),  # 10 x 0.25 = 2.5 rounds half to even: 2 kept
    ([0.5, 0.1, 0.7, 0.2, 0.9, 0.3, 0.8, 0.4, 0.6, 0.0], 0.45),  # 5.5 rounds to 6
    ([0.2, 0.4, 0.1], 0.99),  # round(0.03) = 0: one weight is always kept
])
def test_topk_mask_keeps_the_largest_scores_ties_to_the_lower_index(scores, sparsity):
    mask = rainbow.topk_mask(torch.tensor(scores), sparsity)
    assert mask.dtype == torch.bool and mask.tolist() == slow_topk(scores, sparsity)


def test_topk_mask_keeps_the_shape_of_a_conv_kernel():
    scores = torch.arange(24.0).flip(0).reshape(2, 3, 2, 2)
    mask = rainbow.topk_mask(scores, 0.75)
    assert mask.shape == scores.shape and mask.flatten().tolist() == [True] * 6 + [False] * 18


# Erdős-Rényi-Kernel sparsities (JaxPruner's, with its redistribution)
def slow_erk(shapes: dict, sparsity: float) -> dict:
    """Try the j tensors of largest (sum / prod) ratio dense, j = 0, 1, ...: the first j at which every other
    tensor's density epsilon x ratio stays <= 1, with the kept total of JaxPruner's (n - floor(s n) per tensor)."""
    ratio = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
    size = {name: math.prod(shape) for name, shape in shapes.items()}
    levels = sorted(set(ratio.values()), reverse=True)
    for dense_levels in range(len(levels)):
        dense = {name for name in shapes if ratio[name] in levels[:dense_levels]}
        sparse = [name for name in shapes if name not in dense]
        budget = sum(size[n] - math.floor(sparsity * size[n]) for n in sparse) - sum(math.floor(sparsity * size[n])
                                                                                     for n in dense)
        epsilon = budget / sum(ratio[n] * size[n] for n in sparse)
        if all(epsilon * ratio[n] <= 1 for n in sparse):
            return {name: 0.0 if name in dense else 1 - epsilon * ratio[name] for name in shapes}


def test_erk_density_is_proportional_to_the_shape_ratio_and_keeps_the_uniform_total():
    shapes = {"conv": (8, 4, 3, 3), "dense": (64, 128), "out": (6, 64)}
    sparsities = rainbow.erk_sparsities(shapes, 0.9)
    assert sparsities == pytest.approx(slow_erk(shapes, 0.9))
    densities = {name: 1 - s for name, s in sparsities.items()}
    ratio = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items()}
    assert densities["conv"] / densities["dense"] == pytest.approx(ratio["conv"] / ratio["dense"])
    kept = sum(d * math.prod(shapes[name]) for name, d in densities.items())
    assert kept == pytest.approx(sum(math.prod(s) - math.floor(0.9 * math.prod(s)) for s in shapes.values()))


def test_erk_makes_a_tensor_dense_when_its_density_would_pass_one_and_solves_again():
    """By hand: ratios 6/8, 10/36, 150/5000 at sparsity 0.5. First epsilon 2522 / 166 makes `a` denser than 1;
    then 2514 / 160 makes `c` denser than 1; then epsilon = (2500 - 4 - 18) / 150 = 16.52, `b` keeps 0.4956."""
    shapes = {"a": (4, 2), "b": (100, 50), "c": (3, 3, 2, 2)}
    sparsities = rainbow.erk_sparsities(shapes, 0.5)
    assert sparsities["a"] == 0.0 and sparsities["c"] == 0.0
    assert sparsities["b"] == pytest.approx(1 - 0.03 * 2478 / 150) == pytest.approx(0.5044)
    assert sparsities == pytest.approx(slow_erk(shapes, 0.5))


# The pruning schedule and the times of mask updates
def slow_pruning_sparsity(target, update, start, end):
    """Zhu & Gupta 2017, s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (n dt))^3 with s_i = 0, t_0 = start, n dt = end - start,
    evaluated at t + 1 (JaxPruner's offset) and held at s_i before start and at s_f after end."""
    t = update + 1
    if t <= start:
        return 0.0
    if t >= end:
        return target
    return target + (0 - target) * (1 - (t - start) / (end - start)) ** 3


@pytest.mark.parametrize("update", [0, 8, 9, 10, 11, 14, 18, 19, 20, 30])
def test_pruning_sparsity_is_zhu_and_gupta_with_jaxprunerss_plus_one(update):
    assert rainbow.pruning_sparsity(0.9, update, 10, 20) == pytest.approx(slow_pruning_sparsity(0.9, update, 10, 20))


def test_pruning_sparsity_values_by_hand():
    assert rainbow.pruning_sparsity(0.9, 9, 10, 20) == 0.0  # the update before the start: progress 0
    assert rainbow.pruning_sparsity(0.9, 10, 10, 20) == pytest.approx(0.9 * (1 - 0.9**3))  # the first: progress 1/10
    assert rainbow.pruning_sparsity(0.9, 14, 10, 20) == pytest.approx(0.9 * (1 - 0.5**3))
    assert rainbow.pruning_sparsity(0.9, 19, 10, 20) == pytest.approx(0.9)  # the "+1": full at end - 1
    assert rainbow.pruning_sparsity(0.8, 5, 7, 7) == 0.8  # start == end: one shot


def test_masks_change_only_at_the_periodic_updates_and_pruning_also_at_its_last():
    updates = range(0, 40)
    assert [t for t in updates if rainbow.is_mask_update("prune", t, 3, 25, 10)] == [10, 20, 25]
    assert [t for t in updates if rainbow.is_mask_update("prune", t, 0, 30, 10)] == [0, 10, 20, 30]
    assert [t for t in updates if rainbow.is_mask_update("rigl", t, 1, 25, 10)] == [10, 20]
    assert not any(rainbow.is_mask_update(method, t, 0, 25, 0) for method in ("none", "static") for t in updates)


def test_pruned_sparsity_is_frozen_between_mask_updates():
    """A run of updates 0..29 that prunes only when is_mask_update says so: the sparsity of each update is that of the
    schedule at the last mask update before it (JaxPruner's PeriodicSchedule with the polynomial)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(20, 10)
    masks = {"weight": torch.ones(10, 20, dtype=torch.bool)}
    sparsities = {"weight": 0.9}
    last_update_sparsity = 0.0
    for update in range(30):
        if rainbow.is_mask_update("prune", update, 4, 22, 5):
            rainbow.prune_masks_(masks, net, sparsities, update, 4, 22)
            last_update_sparsity = slow_pruning_sparsity(0.9, update, 4, 22)
        rainbow.apply_masks(rainbow.masked_pairs(net, masks))
        with torch.no_grad():
            net.weight.add_(0.01 * torch.randn_like(net.weight) * masks["weight"])  # a step moves only the kept weights
        assert (~masks["weight"]).sum().item() == 200 - max(1, round(200 * (1 - last_update_sparsity)))
    assert last_update_sparsity == pytest.approx(0.9)


def test_mask_update_schedule_scales_the_fractions_to_the_updates_made_by_then():
    args = rainbow.Args(total_timesteps=50_000_000, learning_starts=20_000, sparsity_method="prune")
    # 4 % and 80 % of 50M agent steps (8M and 160M of 200M frames), one update per 4 steps after 20k
    assert rainbow.mask_update_schedule(args) == ((2_000_000 - 20_000) // 4, (40_000_000 - 20_000) // 4, 1_000)
    args.sparsity_method = "rigl"
    assert rainbow.mask_update_schedule(args) == (1, (40_000_000 - 20_000) // 4, 5_000)
    args.mask_update_every = 250
    assert rainbow.mask_update_schedule(args)[2] == 250
    args = dqn.Args(total_timesteps=1000, learning_starts=100, train_frequency=1, sparsity_method="prune")
    assert dqn.mask_update_schedule(args) == (0, 700, 1_000)  # 4 % of 1000 lies in the warm-up: from the first update


# RigL
@pytest.mark.parametrize("update,expected", [(0, 0.2), (25, 0.1 * (1 + math.cos(math.pi / 4))), (50, 0.1), (100, 0.0),
                                             (150, 0.0)])
def test_rigl_drop_fraction_is_optax_cosine_decay_to_the_end(update, expected):
    assert rainbow.rigl_drop_fraction(0.2, update, 100) == pytest.approx(expected, abs=1e-12)


def slow_rigl(mask, weight, gradient, drop_fraction):
    """Drop: of the active positions keep the round(active (1 - drop)) of largest |w| (ties: lower index); grow: of the
    rest, the ones of largest |g| until as many are active as before."""
    active = [i for i, m in enumerate(mask) if m]
    keep = round(len(active) * (1 - drop_fraction))
    kept = sorted(active, key=lambda i: (-abs(weight[i]), i))[:keep]
    rest = sorted((i for i in range(len(mask)) if i not in kept), key=lambda i: (-abs(gradient[i]), i))
    chosen = set(kept) | set(rest[:len(active) - keep])
    return [i in chosen for i in range(len(mask))]


def test_rigl_drops_the_smallest_weights_and_grows_where_the_gradient_is_largest():
    mask = [True, True, True, True, False, False, False, False]
    weight = [0.5, -0.1, 0.3, 0.05, 0.0, 0.0, 0.0, 0.0]
    gradient = [0.0, 0.9, 0.0, 0.1, 0.2, 0.8, 0.05, 0.7]
    # keep 2 of 4 by |w| (0 and 2), grow 2 by |g| among the others: 1 (dropped, grown back at once) and 5
    new_mask = rainbow.rigl_mask(torch.tensor(mask), torch.tensor(weight), torch.tensor(gradient), 0.5)
    assert new_mask.tolist() == slow_rigl(mask, weight, gradient, 0.5) == [True, True, True, False, False, True, False,
                                                                          False]


@pytest.mark.parametrize("seed", range(3))
def test_rigl_mask_matches_the_slow_reference_and_keeps_the_density(seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(40, generator=generator) < 0.3
    weight = torch.randn(40, generator=generator) * mask
    gradient = torch.randn(40, generator=generator)
    new_mask = rainbow.rigl_mask(mask, weight, gradient, 0.3)
    assert new_mask.tolist() == slow_rigl(mask.tolist(), weight.tolist(), gradient.tolist(), 0.3)
    assert new_mask.sum() == mask.sum()


def test_rigl_update_resets_the_adam_moments_of_grown_weights_and_zeroes_the_dropped():
    net = torch.nn.Linear(4, 2, bias=False)
    masks = {"weight": torch.tensor([[True, True, True, True], [False, False, False, False]])}
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, -0.1, 0.3, 0.05], [0.0, 0.0, 0.0, 0.0]]))
    optimizer = torch.optim.Adam(net.parameters())
    net.weight.grad = torch.ones(2, 4)
    optimizer.step()  # Adam's moments exist and are nonzero everywhere
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.5, -0.1, 0.3, 0.05], [0.0, 0.0, 0.0, 0.0]]))
    moments = {key: optimizer.state[net.weight][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    net.weight.grad = torch.tensor([[0.0, 0.9, 0.0, 0.1], [0.2, 0.8, 0.05, 0.7]])
    rainbow.rigl_masks_(masks, net, optimizer, 0.5)
    expected = torch.tensor([[True, True, True, False], [False, True, False, False]])
    assert torch.equal(masks["weight"], expected)
    assert net.weight.flatten().tolist() == pytest.approx([0.5, -0.1, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0])  # grown ones at 0
    grown = torch.tensor([[False, False, False, False], [False, True, False, False]])
    for key, before in moments.items():
        after = optimizer.state[net.weight][key]
        assert torch.all(after[grown] == 0) and torch.equal(after[~grown], before[~grown]), key


# The masks: which weights, at initialisation, in the learner step
def tiny_args(module, **flags):
    return module.Args(encoder="nature", resolution=36, dense_scale=1, batch_size=8, **flags)


def test_every_weight_of_more_than_one_dimension_is_masked_biases_never():
    args = tiny_args(rainbow, noisy=True, dueling=True)
    q_network = rainbow.QNetwork(args, 3)
    names = list(rainbow.sparsifiable_weights(q_network, "all"))
    assert names == ["encoder.1.weight", "encoder.4.weight", "encoder.7.weight", "bottleneck.dense.0.weight_mu",
                     "bottleneck.dense.0.weight_sigma", "head.advantage.weight_mu", "head.advantage.weight_sigma",
                     "head.value.weight_mu", "head.value.weight_sigma"]
    assert list(rainbow.sparsifiable_weights(q_network, "bottleneck")) == names[3:]  # the dense part, the head too
    assert list(dqn.sparsifiable_weights(dqn.QNetwork(tiny_args(dqn), 4), "bottleneck")) == [
        "bottleneck.dense.0.weight", "head.weight"]


@pytest.mark.parametrize("method,distribution", [("static", "uniform"), ("rigl", "erk"), ("static", "erk")])
def test_static_and_rigl_start_from_random_masks_of_exactly_each_tensors_sparsity(method, distribution):
    torch.manual_seed(0)
    args = tiny_args(rainbow, sparsity_method=method, sparsity_distribution=distribution, sparsity=0.9)
    q_network = rainbow.QNetwork(args, 3)
    masks, sparsities = rainbow.make_masks(q_network, args)
    weights = rainbow.sparsifiable_weights(q_network, "all")
    assert list(masks) == list(weights)
    for name, mask in masks.items():
        assert mask.sum().item() == max(1, round(mask.numel() * (1 - sparsities[name]))), name
    if distribution == "uniform":
        assert set(sparsities.values()) == {0.9}
    total = sum(mask.numel() for mask in masks.values())
    assert sum(mask.sum().item() for mask in masks.values()) == pytest.approx(0.1 * total, abs=len(masks))


def test_pruning_starts_from_all_ones_and_no_method_has_no_masks():
    args = tiny_args(dqn, sparsity_method="prune")
    masks, _ = dqn.make_masks(dqn.QNetwork(args, 4), args)
    assert all(mask.all() for mask in masks.values())
    args = tiny_args(dqn)
    assert dqn.make_masks(dqn.QNetwork(args, 4), args) == ({}, {})


def filled_dqn_replay(args):
    replay = dqn.make_replay(1, 64, args.resolution, "cpu")
    replay["frames"].random_(0, 255)
    replay["valid"][:] = True
    replay["rewards"].normal_()
    return replay, 60


@pytest.mark.parametrize("method", ["prune", "static"])
def test_the_learner_step_masks_the_weights_after_it_and_static_the_gradients_before_it(method):
    """Static (and RigL): Adam sees masked gradients, so the moments of masked weights stay 0; pruning's gradients
    are dense (JaxPruner's default), so those moments move while the weights are set back to 0 after every step."""
    torch.manual_seed(0)
    args = tiny_args(dqn, sparsity_method=method, sparsity_distribution="uniform")
    q_network, target_network, optimizer = dqn.make_learner(args, 4, "cpu")
    masks, _ = dqn.make_masks(q_network, args)
    if method == "prune":
        for mask in masks.values():
            mask.copy_(dqn.topk_mask(torch.rand(mask.shape), 0.5))
    masked = dqn.masked_pairs(q_network, masks)
    replay, buffer_time = filled_dqn_replay(args)
    for _ in range(2):
        dqn.learner_step(q_network, target_network, optimizer, replay, buffer_time, args, masked)
    for weight, mask in masked:
        assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0)
        moment = optimizer.state[weight]["exp_avg"]
        assert torch.all(moment[~mask] == 0) if method == "static" else torch.any(moment[~mask] != 0)


def test_a_learner_step_without_a_step_leaves_the_dense_gradient_and_the_weights():
    torch.manual_seed(0)
    args = tiny_args(dqn, sparsity_method="rigl")
    q_network, target_network, optimizer = dqn.make_learner(args, 4, "cpu")
    masks, _ = dqn.make_masks(q_network, args)
    masked = dqn.masked_pairs(q_network, masks)
    dqn.apply_masks(masked)
    before = [weight.clone() for weight in q_network.parameters()]
    replay, buffer_time = filled_dqn_replay(args)
    dqn.learner_step(q_network, target_network, optimizer, replay, buffer_time, args, masked, step=False)
    assert all(torch.equal(a, b) for a, b in zip(before, q_network.parameters())) and not optimizer.state
    # the masked positions' gradients too (ERK leaves the small output layer dense)
    assert all(torch.any(weight.grad[~mask] != 0) for weight, mask in masked if not mask.all())


def test_sparsity_diagnostics_count_zero_weights_per_part():
    args = tiny_args(dqn)
    q_network = dqn.QNetwork(args, 4)
    with torch.no_grad():
        q_network.encoder[0].weight[:2] = 0  # 2 x 4 x 8 x 8 = 512 of the encoder's 32 x 4 x 64 + 64 x 32 x 16 + 64 x 64 x 9
        q_network.head.weight[:, :10] = 0  # 40 of 4 x 512
        q_network.head.bias.zero_()  # a bias is not a weight
    tags = utils.sparsity_diagnostics(q_network)
    counts = utils.parameter_counts(q_network)
    assert tags["diag/sparsity/encoder"] == pytest.approx(512 / (32 * 4 * 64 + 64 * 32 * 16 + 64 * 64 * 9))
    assert tags["diag/sparsity/bottleneck"] == 0 and tags["diag/params/bottleneck_effective"] == counts["bottleneck"]
    assert tags["diag/sparsity/head"] == pytest.approx(40 / 2048)
    assert tags["diag/params/encoder_effective"] == counts["encoder"] - 512
    assert tags["diag/params/head_effective"] == counts["head"] - 40


# Tiny real runs: 200 agent steps, one update per step after 50, masks every 10 updates
TINY = ["--env-id", "Breakout", "--num-envs", "1", "--buffer-size", "300", "--learning-starts", "50", "--batch-size", "8",
        "--max-episode-steps", "100", "--eval-episodes", "1", "--eval-every", "0", "--log-every", "100",
        "--train-frequency", "1", "--target-network-frequency", "50", "--encoder", "nature", "--resolution", "36",
        "--dense-scale", "1", "--total-timesteps", "200", "--diag-every", "200", "--save-every", "100",
        "--mask-update-every", "10", "--torch-threads", "1", "--runs-dir", "runs", "--no-progress"]


def sparse_run(tmp_path_factory, script, *flags):
    cwd = tmp_path_factory.mktemp("sparse")
    result = run_script(script, *TINY, *flags, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
    return cwd, run_dir, torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)


def check_ends_at_the_target(run_dir, final, module, args):
    """Every mask holds exactly its tensor's share of the target, the online and target weights are zero outside it, and
    the logged diag/sparsity of each part is the fraction of zero weights final.pt holds."""
    q_network = module.QNetwork(args, 4)  # Breakout's 4 actions
    weights = module.sparsifiable_weights(q_network, args.sparsity_scope)
    shapes = {name: tuple(weight.shape) for name, weight in weights.items()}
    sparsities = ({name: args.sparsity for name in shapes} if args.sparsity_distribution == "uniform" else
                  module.erk_sparsities(shapes, args.sparsity))
    masks = final["sparsity_masks"]
    assert list(masks) == list(shapes)
    for name, mask in masks.items():
        assert mask.sum().item() == max(1, round(mask.numel() * (1 - sparsities[name]))), name
        for network in ("q_network", "target_network"):
            assert torch.all(final[network][name][~mask] == 0), (network, name)
    q_network.load_state_dict(final["q_network"])
    logged = {tag: values[-1] for tag, values in read_scalars(run_dir).items() if "sparsity" in tag or "effective" in tag}
    expected = utils.sparsity_diagnostics(q_network)
    assert {tag: step for tag, (step, _) in logged.items()} == {tag: 200 for tag in expected}
    assert {tag: value for tag, (_, value) in logged.items()} == pytest.approx(expected)
    for part in ("encoder", "bottleneck", "head"):  # no kept weight is zero: the zero weights are the masked ones
        in_part = [name for name, weight in q_network.named_parameters() if weight.ndim > 1
                   and (name.split(".")[0] == part or part == "head" and name.split(".")[0] not in ("encoder", "bottleneck"))]
        masked = sum((~masks[name]).sum().item() for name in in_part if name in masks)
        total = sum(dict(q_network.named_parameters())[name].numel() for name in in_part)
        assert logged[f"diag/sparsity/{part}"][1] == pytest.approx(masked / total), part
    return masks


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """Rainbow, gradual magnitude pruning to 90 % (ERK) from the first update to update 30 (40 % of 200 steps less the
    50-step warm-up), every 10 updates: masks at 0, 10, 20, 30; checkpoints at 100 and 200."""
    return sparse_run(tmp_path_factory, "rainbow_atari_gap.py", "--sparsity-method", "prune", "--sparsity-end", "0.4")


def test_rainbow_pruning_ends_at_exactly_the_target_sparsity(pruned):
    _, run_dir, final = pruned
    args = tiny_args(rainbow, sparsity_method="prune", sparsity_end=0.4)
    assert final["sparse_training"]["mask_updates"] == [0, 30, 10]
    masks = check_ends_at_the_target(run_dir, final, rainbow, args)
    total = sum(mask.numel() for mask in masks.values())
    assert 1 - sum(mask.sum().item() for mask in masks.values()) / total == pytest.approx(0.9, abs=1e-3)


def test_a_resumed_sparse_run_keeps_its_masks(pruned, tmp_path):
    """Pruning ended at update 30, before the checkpoint of step 100: a resumed run that lost its masks would train the
    pruned weights back (the gradients are dense); this one ends at the target still."""
    cwd, run_dir, final = pruned
    shutil.copytree(os.path.join(cwd, "runs"), tmp_path / "runs")
    (copy,) = glob.glob(os.path.join(tmp_path, "runs", "*"))
    os.remove(os.path.join(copy, "final.pt"))
    checkpoint = os.path.join(copy, "checkpoints", "step_000000000100.pt")
    result = run_script("rainbow_atari_gap.py", *TINY, "--sparsity-method", "prune", "--sparsity-end", "0.4", "--resume",
                        checkpoint, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(os.path.join(copy, "final.pt"), weights_only=True)
    assert resumed["global_step"] == 200
    assert all(torch.equal(resumed["sparsity_masks"][name], mask) for name, mask in final["sparsity_masks"].items())
    check_ends_at_the_target(copy, resumed, rainbow, tiny_args(rainbow, sparsity_method="prune", sparsity_end=0.4))


@pytest.mark.parametrize("flags", [["--sparsity-method", "prune", "--sparsity-end", "0.4", "--sparsity", "0.8"],
                                   ["--sparsity-method", "prune", "--sparsity-end", "0.5"], []])
def test_resume_refuses_another_sparse_training(pruned, flags, monkeypatch, capsys):
    """Another sparsity, another schedule (here --sparsity-end), or none: one line, exit 2, before any work."""
    cwd, run_dir, _ = pruned
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000000000100.pt")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["rainbow_atari_gap.py", *TINY, *flags, "--resume", checkpoint])
    with pytest.raises(SystemExit) as exit_info:
        rainbow.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "was trained with sparse training" in err, err


def test_rainbow_static_sparse_holds_its_random_masks_with_masked_gradients(tmp_path_factory):
    _, run_dir, final = sparse_run(tmp_path_factory, "rainbow_atari_gap.py", "--sparsity-method", "static",
                                   "--sparsity-distribution", "uniform", "--sparsity-scope", "bottleneck")
    args = tiny_args(rainbow, sparsity_method="static", sparsity_distribution="uniform", sparsity_scope="bottleneck")
    masks = check_ends_at_the_target(run_dir, final, rainbow, args)
    assert not any(name.startswith("encoder.") for name in masks)
    assert read_scalars(run_dir)["diag/sparsity/encoder"] == [(200, 0.0)]
    state = final["optimizer"]["state"]
    names = [name for name, _ in rainbow.QNetwork(args, 4).named_parameters()]
    for index, name in enumerate(names):
        if name in masks:
            assert torch.all(state[index]["exp_avg"][~masks[name]] == 0), name  # Adam never saw a masked gradient


def test_rainbow_rigl_keeps_the_target_sparsity_of_noisy_weights(tmp_path_factory):
    """RigL every 10 updates from update 10 to 110 (80 % of 200 steps less the warm-up), drop fraction 0.2 cosine-decayed;
    with --noisy, weight_mu and weight_sigma are each masked."""
    _, run_dir, final = sparse_run(tmp_path_factory, "rainbow_atari_gap.py", "--sparsity-method", "rigl", "--noisy")
    assert final["sparse_training"]["mask_updates"] == [1, 110, 10]
    masks = check_ends_at_the_target(run_dir, final, rainbow, tiny_args(rainbow, sparsity_method="rigl", noisy=True))
    assert "head.advantage.weight_sigma" in masks


def test_dqn_rigl_with_a_polyak_target_stays_sparse(tmp_path_factory):
    _, run_dir, final = sparse_run(tmp_path_factory, "dqn_atari_gap.py", "--sparsity-method", "rigl", "--tau", "0.5")
    check_ends_at_the_target(run_dir, final, dqn, tiny_args(dqn, sparsity_method="rigl", tau=0.5))
