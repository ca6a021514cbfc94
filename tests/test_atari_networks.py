"""The GAP comparison's networks in dqn_atari_gap.py and rainbow_atari_gap.py (issue 21): SoftMoE and the tokenised
join against slow per-token / per-slot loops, parameter counts against their formulas under every join, LayerNorm's
place, weight decay's wiring, deeper encoders and dense stacks, the refused combinations."""

import math
import sys

import pytest
import torch

from conftest import read_scalars, run_script
import dqn_atari_gap as dqn
import rainbow_atari_gap as rainbow
import utils

SCRIPTS = {"dqn": dqn, "rainbow": rainbow}


# SoftMoE and the tokenised join against slow references
def slow_expert(expert, vector):
    """Dense(d -> h) -> ReLU -> Dense(h -> d) on one token, unit by unit (the first layer plain or NoisyNet's means)."""
    first, last = expert[0], expert[2]
    weight = (first.weight if isinstance(first, torch.nn.Linear) else first.weight_mu).detach()
    bias = (first.bias if isinstance(first, torch.nn.Linear) else first.bias_mu).detach()
    hidden = [max(0.0, float(bias[j]) + sum(float(weight[j, i]) * vector[i] for i in range(len(vector))))
              for j in range(weight.shape[0])]
    last_weight, last_bias = last.weight.detach(), last.bias.detach()
    return [float(last_bias[k]) + sum(float(last_weight[k, j]) * hidden[j] for j in range(len(hidden)))
            for k in range(last_weight.shape[0])]


def slow_tokens(feature_map):
    """The H x W tokens of C dims of one (C, H, W) map, row by row: token i * W + j is the pixel (i, j)."""
    channels, height, width = feature_map.shape
    return [[float(feature_map[c, i, j]) for c in range(channels)] for i in range(height) for j in range(width)]


def slow_soft_moe(feature_map, phi, experts):
    """Dopamine's SoftMoE (labs/moes/architectures/softmoe.py) on one map with plain loops: logits[m][e][q] = x_m . phi[:, e,
    q]; dispatch: softmax over the tokens m; combine: softmax over all slots (e, q); slot input = sum_m dispatch x_m;
    slot output = expert e of it; token output = sum over slots of combine x slot output; flattened token by token."""
    tokens = slow_tokens(feature_map)
    dims, num_experts, slots = phi.shape
    logits = [[[sum(token[d] * float(phi[d, e, q]) for d in range(dims)) for q in range(slots)] for e in range(num_experts)]
              for token in tokens]
    exp = [[[math.exp(value) for value in row] for row in token] for token in logits]
    dispatch = [[[exp[m][e][q] / sum(exp[k][e][q] for k in range(len(tokens))) for q in range(slots)]
                 for e in range(num_experts)] for m in range(len(tokens))]
    combine = [[[exp[m][e][q] / sum(sum(row) for row in exp[m]) for q in range(slots)] for e in range(num_experts)]
               for m in range(len(tokens))]
    outputs = {}
    for e in range(num_experts):
        for q in range(slots):
            slot_input = [sum(dispatch[m][e][q] * tokens[m][d] for m in range(len(tokens))) for d in range(dims)]
            outputs[e, q] = slow_expert(experts[e], slot_input)
    return [sum(combine[m][e][q] * outputs[e, q][d] for e in range(num_experts) for q in range(slots))
            for m in range(len(tokens)) for d in range(dims)]


def small_block(routed, num_experts, noisy=False, dims=3, hidden=5, height=2, width=3):
    """A SoftMoE on a 2 x 3 map of 3 channels with small experts (hidden 5), in float64 and evaluation mode."""
    first = (lambda: rainbow.NoisyLinear(dims, hidden, 0.1)) if noisy else (lambda: torch.nn.Linear(dims, hidden))
    experts = [torch.nn.Sequential(first(), torch.nn.ReLU(), torch.nn.Linear(hidden, dims)) for _ in range(num_experts)]
    block = rainbow.SoftMoE(dims, height * width, experts, routed).double().eval()
    if routed:  # phi large enough that the routing is far from uniform
        torch.nn.init.normal_(block.phi, std=1.0)
    return block


@pytest.mark.parametrize("num_experts,noisy", [(1, False), (2, True), (4, False)])
def test_soft_moe_matches_a_slow_per_token_per_slot_loop(num_experts, noisy):
    torch.manual_seed(0)
    block = small_block(True, num_experts, noisy)
    assert block.phi.shape == (3, num_experts, math.ceil(6 / num_experts))  # 4 experts: 2 slots each, 8 slots > 6 tokens
    feature_map = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    got = block(feature_map.flatten(1))  # what Bottleneck's flatten join hands it
    for b in range(2):
        expected = slow_soft_moe(feature_map[b], block.phi.detach(), block.experts)
        assert got[b].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_tokens_join_maps_every_token_through_the_one_expert():
    torch.manual_seed(0)
    block = small_block(False, 1)
    assert block.phi is None
    feature_map = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    got = block(feature_map.flatten(1))
    for b in range(2):
        expected = [value for token in slow_tokens(feature_map[b]) for value in slow_expert(block.experts[0], token)]
        assert got[b].tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("script,pool", [("rainbow", "softmoe"), ("rainbow", "tokens"), ("dqn", "softmoe"), ("dqn", "tokens")])
def test_token_joins_read_the_encoders_map_as_h_times_w_tokens_and_feed_the_head_all_of_them(script, pool):
    module = SCRIPTS[script]
    args = module.Args(encoder="impala", resolution=20, pool=pool, dense_scale=1, num_experts=2 if pool == "softmoe" else 1)
    q_network = module.QNetwork(args, 4)
    (block,) = q_network.bottleneck.dense
    assert isinstance(block, module.SoftMoE) and q_network.bottleneck.pool == "flatten"
    assert (block.token_dim, block.num_tokens, len(block.experts)) == (32, 9, args.num_experts)  # 20 -> 3 x 3 x 32
    assert block.phi is None if pool == "tokens" else block.phi.shape == (32, 2, 5)
    assert q_network(torch.zeros(2, 4, 20, 20, dtype=torch.uint8)).shape[:2] == (2, 4)
    head = q_network.head.advantage if script == "rainbow" else q_network.head
    assert head.weight.shape[1] == 9 * 32


def test_soft_moe_phi_starts_as_flax_lecun_normal_over_experts_times_token_dims():
    torch.manual_seed(0)
    phi = rainbow.SoftMoE(64, 121, [torch.nn.Identity(), torch.nn.Identity()], routed=True).phi.detach().double()
    assert phi.shape == (64, 2, 61)  # p = ceil(121 / 2)
    std = 1 / math.sqrt(2 * 64)  # variance 1 / fan_in, fan_in = experts x token dims (jax's fans of a 3-D kernel)
    assert phi.std().item() == pytest.approx(std, rel=0.05) and abs(phi.mean().item()) < 0.05 * std
    assert phi.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-9  # cut at 2 std of the underlying normal


def test_dopamine_init_gives_the_experts_xavier_uniform_and_the_head_its_usual_initialiser():
    torch.manual_seed(0)
    args = rainbow.Args(pool="softmoe", num_experts=2, dense_scale=1)
    q_network = rainbow.QNetwork(args, 18)
    rainbow.dopamine_init(q_network, args)
    for expert in q_network.bottleneck.dense[0].experts:
        for layer in (expert[0], expert[2]):
            fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert layer.weight.abs().max().item() <= bound and layer.weight.abs().max().item() > 0.95 * bound
            assert torch.count_nonzero(layer.bias) == 0
    head = q_network.head.advantage.weight  # plain Rainbow: variance_scaling(1/sqrt(3), fan_in, uniform)
    assert head.abs().max().item() <= math.sqrt(3 / math.sqrt(3) / head.shape[1]) + 1e-9


# Parameter counts: every join, with and without NoisyNet, deeper encoders and dense stacks
def linear_count(inputs, outputs, noisy=False):
    return (inputs * outputs + outputs) * (2 if noisy else 1)  # NoisyNet: mu and sigma of weight and bias


def impala_count(in_channels, width, blocks):
    total, channels = 0, in_channels
    for out_channels in (16 * width, 32 * width, 32 * width):
        total += linear_count(channels * 9, out_channels) + blocks * 2 * linear_count(out_channels * 9, out_channels)
        channels = out_channels
    return total


def expected_counts(pool, channels, side, dense, actions, noisy=False, dueling=False, atoms=1, experts=1, layers=1,
                    layer_norm=False):
    """(bottleneck, head) by hand: the join's first layer (or the SoftMoE block: phi d x n x ceil(m / n) + per expert
    Dense(d -> h) and Dense(h -> d), the first NoisyNet with --noisy), then the extra dense layers, then the head."""
    tokens = side * side
    if pool in ("softmoe", "tokens"):
        phi = channels * experts * math.ceil(tokens / experts) if pool == "softmoe" else 0
        bottleneck = phi + experts * (linear_count(channels, dense, noisy) + linear_count(dense, channels))
        features = tokens * channels
    else:
        joined = channels * tokens if pool == "flatten" else channels
        bottleneck, features = linear_count(joined, dense, noisy) + (2 * dense if layer_norm else 0), dense
    for _ in range(layers - 1):
        bottleneck += linear_count(features, dense, noisy) + (2 * dense if layer_norm else 0)
        features = dense
    head = linear_count(features, actions * atoms, noisy) + (linear_count(features, atoms, noisy) if dueling else 0)
    return bottleneck, head


@pytest.mark.parametrize("pool", ["flatten", "avg", "max", "softmoe", "tokens"])
@pytest.mark.parametrize("noisy", [False, True])
def test_rainbow_parameter_counts_follow_the_formula_under_every_join(pool, noisy):
    args = rainbow.Args(pool=pool, noisy=noisy, dueling=noisy, resolution=36, dense_scale=2,
                        num_experts=3 if pool == "softmoe" else 1)
    counts = utils.parameter_counts(rainbow.QNetwork(args, 6))
    bottleneck, head = expected_counts(pool, 32, 5, 1024, 6, noisy, dueling=noisy, atoms=51, experts=args.num_experts)
    assert counts == {"encoder": impala_count(4, 1, 2), "bottleneck": bottleneck, "head": head}


@pytest.mark.parametrize("pool", ["flatten", "avg", "max", "softmoe", "tokens"])
def test_dqn_parameter_counts_follow_the_formula_under_every_join(pool):
    args = dqn.Args(pool=pool, dense_scale=2, num_experts=2 if pool == "softmoe" else 1)
    counts = utils.parameter_counts(dqn.QNetwork(args, 6))
    nature = linear_count(4 * 64, 32) + linear_count(32 * 16, 64) + linear_count(64 * 9, 64)
    bottleneck, head = expected_counts(pool, 64, 7, 1024, 6, experts=args.num_experts)  # VALID Nature CNN: 7 x 7 x 64
    assert counts == {"encoder": nature, "bottleneck": bottleneck, "head": head}


def test_soft_moe_1_at_84_and_dense_scale_4_is_gap_methods_worked_example():
    """GAP_METHODS §1.4: 84 x 84, Impala x1, one expert, h = 2048: phi 3,872 + 65,536 + 2,048 + 65,536 + 32 (without
    Dopamine's `scalar`, used only with its normalisation), the head reading 3,872 features."""
    counts = utils.parameter_counts(rainbow.QNetwork(rainbow.Args(pool="softmoe"), 4))
    assert counts["bottleneck"] == 137_025 - 1 and counts["head"] == 3872 * 4 * 51 + 4 * 51


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("blocks", [0, 1, 4])
def test_encoder_blocks_add_residual_blocks_to_every_impala_stage(script, blocks):
    module = SCRIPTS[script]
    q_network = module.QNetwork(module.Args(encoder="impala", encoder_blocks=blocks, resolution=36), 4)
    assert utils.parameter_counts(q_network)["encoder"] == impala_count(4, 1, blocks)
    assert sum(isinstance(layer, module.ResidualBlock) for layer in q_network.encoder) == 3 * blocks
    assert q_network.encoder(torch.zeros(1, 4, 36, 36)).shape == (1, 32, 5, 5)


@pytest.mark.parametrize("script,pool", [("rainbow", "avg"), ("rainbow", "softmoe"), ("dqn", "flatten"), ("dqn", "tokens")])
def test_dense_layers_stack_hidden_layers_of_512_times_dense_scale(script, pool):
    module = SCRIPTS[script]
    args = module.Args(encoder="impala", pool=pool, dense_layers=3, dense_scale=1, resolution=36)
    counts = utils.parameter_counts(module.QNetwork(args, 5))
    atoms = 51 if script == "rainbow" else 1
    assert (counts["bottleneck"], counts["head"]) == expected_counts(pool, 32, 5, 512, 5, atoms=atoms, layers=3)


# LayerNorm and weight decay
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_layer_norm_sits_between_every_hidden_dense_layer_and_its_relu(script):
    torch.manual_seed(0)
    module = SCRIPTS[script]
    q_network = module.QNetwork(module.Args(pool="avg", layer_norm=True, dense_layers=2, dense_scale=1), 4).double()
    layers = list(q_network.bottleneck.dense)
    assert [type(layer) for layer in layers] == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.ReLU] * 2
    assert all(layer.normalized_shape == (512,) for layer in layers[1::3])
    for layer in layers[1::3]:  # not the initial scale 1, bias 0, so that the check sees them
        torch.nn.init.normal_(layer.weight), torch.nn.init.normal_(layer.bias)
    pooled = torch.randn(3, layers[0].in_features, dtype=torch.float64)
    hidden = pooled
    for dense, norm in ((layers[0], layers[1]), (layers[3], layers[4])):  # (x - mean) / sqrt(var + 1e-5) * scale + bias
        x = hidden @ dense.weight.T + dense.bias
        normed = (x - x.mean(1, keepdim=True)) / (x.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        hidden = (normed * norm.weight + norm.bias).clamp(min=0)
    assert torch.allclose(q_network.bottleneck.dense(pooled), hidden)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("weight_decay", [0.0, 1e-5])
def test_weight_decay_is_adams_coupled_l2_on_every_parameter(script, weight_decay):
    module = SCRIPTS[script]
    q_network, _, optimizer = module.make_learner(module.Args(weight_decay=weight_decay, resolution=36), 4, "cpu")
    assert type(optimizer) is torch.optim.Adam  # coupled: gradient + weight_decay x weight before Adam (not AdamW)
    (group,) = optimizer.param_groups
    assert group["weight_decay"] == weight_decay and not group["decoupled_weight_decay"]
    assert [id(p) for p in group["params"]] == [id(p) for p in q_network.parameters()]


def test_adam_with_weight_decay_steps_as_adam_on_the_gradient_plus_decay_times_weight():
    """What ReDo's optax.chain(add_decayed_weights(wd), adam) computes (GAP_METHODS §5), on a hand-made tensor."""
    weight, gradient = torch.tensor([0.5, -2.0, 3.0]), torch.tensor([0.1, 0.0, -0.5])
    coupled = torch.nn.Parameter(weight.clone())
    optimizer = torch.optim.Adam([coupled], lr=0.01, eps=1e-8, weight_decay=0.1)
    coupled.grad = gradient.clone()
    optimizer.step()
    decayed = gradient + 0.1 * weight  # Adam's first step: -lr m / (sqrt(v) + eps) with bias-corrected m = g, v = g^2
    assert torch.allclose(coupled.detach(), weight - 0.01 * decayed / (decayed.abs() + 1e-8))


# Bad combinations: one line, exit 2, before any work
@pytest.mark.parametrize("script,flags,message", [
    ("rainbow", ["--encoder", "nature", "--encoder-blocks", "3"], "--encoder-blocks 3 needs --encoder impala"),
    ("dqn", ["--encoder-blocks", "4"], "--encoder-blocks 4 needs --encoder impala"),
    ("rainbow", ["--num-experts", "4"], "--num-experts 4 needs --pool softmoe"),
    ("dqn", ["--pool", "tokens", "--num-experts", "2"], "--num-experts 2 needs --pool softmoe"),
    ("rainbow", ["--pool", "softmoe", "--layer-norm"], "--layer-norm is for the dense layers of --pool flatten|avg|max"),
    ("dqn", ["--pool", "tokens", "--layer-norm"], "--layer-norm is for the dense layers of --pool flatten|avg|max"),
    ("rainbow", ["--pool", "moe"], "--pool"), ("dqn", ["--dense-layers", "0"], "--dense-layers 0 is outside [1, inf)"),
    ("rainbow", ["--num-experts", "0"], "--num-experts 0 is outside [1, inf)"),
    ("dqn", ["--weight-decay", "-1"], "--weight-decay -1.0 is outside [0, inf)"),
    ("rainbow", ["--encoder-blocks", "-1"], "--encoder-blocks -1 is outside [0, inf)"),
])
def test_bad_network_flags_exit_2_with_one_line_before_any_work(script, flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{SCRIPTS[script].__name__}.py", "--runs-dir", "runs", *flags])
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_network_flag_is_an_architecture_flag(script):
    assert {"pool", "num_experts", "encoder_blocks", "dense_layers", "layer_norm"} <= set(SCRIPTS[script].ARCHITECTURE_FLAGS)


@pytest.mark.parametrize("script,pool", [("rainbow", "softmoe"), ("dqn", "tokens")])
def test_feature_norm_under_a_token_join_is_the_norm_of_the_flattened_map_it_reads(script, pool):
    torch.manual_seed(0)
    module = SCRIPTS[script]
    q_network = module.QNetwork(module.Args(encoder="impala", pool=pool, resolution=20, dense_scale=1), 4).eval()
    obs = torch.randint(0, 256, (5, 4, 20, 20), dtype=torch.uint8)
    diagnostics = utils.network_diagnostics(q_network, obs, 0.025)
    with torch.no_grad():
        feature_map = q_network.encoder(obs.float() / 255.0)
    assert diagnostics["diag/feature_norm"] == pytest.approx(feature_map.flatten(1).norm(dim=1).mean().item(), rel=1e-5)
    assert all(0.0 <= diagnostics[f"diag/dormant_fraction/{part}"] <= 1.0 for part in ("encoder", "bottleneck", "head"))


# Tiny real runs: each new flag trains for real and logs the bottleneck its formula gives
TINY_RUN = ["--env-id", "Breakout", "--num-envs", "2", "--resolution", "36", "--buffer-size", "300",
            "--learning-starts", "100", "--batch-size", "8", "--max-episode-steps", "50", "--target-network-frequency", "50",
            "--dense-scale", "1", "--total-timesteps", "200", "--eval-every", "0", "--eval-episodes", "1",
            "--diag-every", "200", "--save-every", "0", "--log-every", "100", "--diag-batch-size", "16",
            "--torch-threads", "1", "--runs-dir", "runs"]
# name: (script, flags, (bottleneck, head) by the formula at 36 x 36 (Impala 5 x 5 x 32), 4 Breakout actions)
RUNS = {
    "rainbow_softmoe": ("rainbow_atari_gap.py", ["--pool", "softmoe", "--num-experts", "2", "--noisy", "--dueling"],
                        expected_counts("softmoe", 32, 5, 512, 4, noisy=True, dueling=True, atoms=51, experts=2)),
    "rainbow_tokens": ("rainbow_atari_gap.py", ["--pool", "tokens", "--dense-layers", "2"],
                       expected_counts("tokens", 32, 5, 512, 4, atoms=51, layers=2)),
    "rainbow_layer_norm": ("rainbow_atari_gap.py", ["--pool", "flatten", "--layer-norm", "--encoder-blocks", "4",
                                                    "--weight-decay", "1e-5"],
                           expected_counts("flatten", 32, 5, 512, 4, atoms=51, layer_norm=True)),
    "dqn_softmoe": ("dqn_atari_gap.py", ["--encoder", "impala", "--pool", "softmoe"],
                    expected_counts("softmoe", 32, 5, 512, 4)),
}


SLOW_RUNS = ("rainbow_layer_norm", "rainbow_tokens")  # about 25 s each on 2 loaded cores: the default suite runs two


@pytest.fixture(scope="module", params=[pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_RUNS else [])
                                        for name in sorted(RUNS)])
def tiny_run(request, tmp_path_factory):
    script, flags, counts = RUNS[request.param]
    cwd = tmp_path_factory.mktemp(request.param)
    result = run_script(script, *TINY_RUN, *flags, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (cwd / "runs").iterdir()
    return request.param, cwd, run_dir, counts


def test_each_network_flag_trains_and_logs_its_bottleneck_and_diagnostics(tiny_run):
    name, _, run_dir, (bottleneck, head) = tiny_run
    scalars = read_scalars(str(run_dir))
    assert scalars["diag/params/bottleneck"] == [(0, bottleneck)] and scalars["diag/params/head"] == [(0, head)]
    encoder_blocks = 4 if name == "rainbow_layer_norm" else 2
    assert scalars["diag/params/encoder"] == [(0, impala_count(4, 1, encoder_blocks))]
    for tag in ("diag/dormant_fraction/bottleneck", "diag/feature_norm", "losses/q_values"):
        assert [step for step, _ in scalars[tag]][-1] == 200, tag
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert final["optimizer"]["param_groups"][0]["weight_decay"] == (1e-5 if name == "rainbow_layer_norm" else 0.0)


@pytest.mark.parametrize("tiny_run", ["rainbow_softmoe"], indirect=True)
def test_a_resume_with_another_network_flag_is_refused_with_one_line(tiny_run):
    name, cwd, run_dir, _ = tiny_run
    result = run_script(RUNS[name][0], *TINY_RUN, "--pool", "softmoe", "--noisy", "--dueling", "--total-timesteps", "300",
                        "--resume", str(run_dir / "final.pt"), cwd=cwd)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
    assert "was trained with --num-experts 2, this run asks for 1" in result.stderr


# Impala's max-pool pads as Flax's SAME (Dopamine), not PyTorch's symmetric padding
def slow_same_max_pool(image, kernel=3, stride=2):
    """Flax / TensorFlow SAME by hand on one (H, W) list of lists: out side ceil(side / stride), total padding
    (out - 1) stride + kernel - side, before = total // 2; each window's max over the pixels inside the image."""
    side = len(image)
    out = -(-side // stride)
    before = max((out - 1) * stride + kernel - side, 0) // 2
    return [[max(image[r][c] for r in range(i * stride - before, i * stride - before + kernel) if 0 <= r < side
                 for c in range(j * stride - before, j * stride - before + kernel) if 0 <= c < side)
             for j in range(out)] for i in range(out)]


def test_same_max_pool_at_4x4_is_flax_same_and_differs_from_pytorchs_symmetric_padding():
    image = torch.tensor([[1.0, 9.0, 2.0, 3.0],
                          [4.0, 5.0, 6.0, 7.0],
                          [8.0, 0.0, 1.0, 2.0],
                          [3.0, 4.0, 5.0, 6.0]])
    # windows rows/cols {0, 1, 2} and {2, 3} (0 before, 1 after), worked by hand
    expected = [[9.0, 7.0],
                [8.0, 6.0]]
    assert rainbow.SameMaxPool2d(3, 2)(image[None, None])[0, 0].tolist() == expected == slow_same_max_pool(image.tolist())
    symmetric = torch.nn.MaxPool2d(3, stride=2, padding=1)(image[None, None])[0, 0].tolist()
    assert symmetric == [[9.0, 9.0], [8.0, 7.0]]  # PyTorch's windows {-1, 0, 1} and {1, 2, 3}


@pytest.mark.parametrize("side", [5, 6, 7, 21, 42, 84])
def test_same_max_pool_matches_the_slow_reference_with_negative_inputs(side):
    torch.manual_seed(side)
    images = -torch.rand(2, 3, side, side) - 0.5  # all below 0: a zero padding would win every border window
    pooled = dqn.SameMaxPool2d(3, 2)(images)
    assert pooled.shape == (2, 3, -(-side // 2), -(-side // 2))
    for b in range(2):
        for c in range(3):
            assert pooled[b, c].tolist() == slow_same_max_pool(images[b, c].tolist())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_impala_feature_maps_go_84_42_21_11_through_flax_same_pools(script):
    module = SCRIPTS[script]
    encoder = module.impala_encoder(4, 1, 2)
    sides = []
    pools = [layer for layer in encoder if isinstance(layer, module.SameMaxPool2d)]
    hooks = [pool.register_forward_hook(lambda _, inputs, output: sides.append((inputs[0].shape[-1], output.shape[-1])))
             for pool in pools]
    encoder(torch.zeros(1, 4, 84, 84))
    for hook in hooks:
        hook.remove()
    assert sides == [(84, 42), (42, 21), (21, 11)]
