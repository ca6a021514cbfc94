"""Rainbow on Atari (EnvPool) with a choice of bottleneck between encoder and dense head.

Dopamine's `rainbow.gin` defaults, the agent of "Mind the GAP" (Sokar & Castro 2025): C51 with 51
atoms, 3-step returns, prioritised replay, Adam 6.25e-5, sticky actions, Impala encoder and a dense
layer x4, plus `--pool flatten|avg|max`, `--encoder nature|impala` and `--dense-scale`, so that
"scaling the dense layer hurts with flatten and helps with global average pooling" can be
reproduced. `--noisy --dueling --double` give full Rainbow; `--preset der` is Data-Efficient
Rainbow on Atari 100k (van Hasselt et al. 2019) exactly as Dopamine's DER.gin (Nature CNN, one noisy
dense layer of 512). Weights start as Dopamine's Flax initialisers (`--init dopamine`). The replay stores each
frame once and rebuilds the 4-frame stacks when it samples them; priorities live in a sum tree;
all of it on the training device.
"""

import argparse
import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import utils

SCRIPT = os.path.basename(__file__)
ARCHITECTURE_FLAGS = ("encoder", "pool", "width", "dense_scale", "resolution", "frame_stack", "env_id", "noisy", "dueling", "num_atoms",
                      "v_min", "v_max")


# Args
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    preset: str = "rainbow"
    """`rainbow` (Dopamine rainbow.gin) or `der` (Data-Efficient Rainbow, Atari 100k); explicit flags override it"""
    seed: int = 1
    """seed of the experiment (python, numpy, torch and the environments)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, train on CUDA when it is available"""
    track: bool = False
    """if toggled, also log to Weights and Biases (needs `wandb` installed)"""
    wandb_project_name: str = "cleanrl_pool"
    """the W&B project name"""
    wandb_entity: str = ""
    """the W&B entity (team); empty for your default"""
    capture_video: bool = False
    """if toggled, save each evaluation's first episode as a GIF under run_dir/videos/"""
    runs_dir: str = "runs"
    """the folder that holds the run folders"""

    env_id: str = "Breakout"
    """the Atari game, a plain name as EnvPool spells it (`Breakout`, `Pong`, `SpaceInvaders`, ...)"""
    total_timesteps: int = 50_000_000
    """total agent steps, summed over environments (Dopamine: 200 iterations x 250k = 200M frames; DER 100k)"""
    num_envs: int = 1
    """parallel EnvPool environments; the replay ratio stays one update per `train_frequency` steps"""
    resolution: int = 84
    """square side of the grey frame EnvPool renders (its `img_height`/`img_width`)"""
    frame_stack: int = 4
    """frames stacked into one observation"""
    frame_skip: int = 4
    """emulator frames per agent step (the last two are max-pooled)"""
    max_episode_steps: int = 27_000
    """agent steps before an episode is truncated (Dopamine: 27,000 = 108k frames, 30 minutes of play)"""
    repeat_action_probability: float = 0.25
    """sticky actions (Machado et al. 2018; Dopamine 0.25, DER 0)"""
    episodic_life: bool = False
    """if toggled, a lost life is terminal for learning (Dopamine no, DER yes); logged returns stay whole games"""

    encoder: str = "impala"
    """the conv trunk: `impala` (Espeholt et al. 2018, the GAP paper's default) or `nature` (Mnih et al. 2015)"""
    pool: str = "avg"
    """what joins the encoder to the dense layer: `flatten`, `avg` (global average pooling) or `max`"""
    width: int = 1
    """multiplies every encoder channel count"""
    dense_scale: int = 4
    """multiplies the width of the dense layer after the bottleneck (512 at x1; the GAP paper's default x4)"""
    num_atoms: int = 51
    """atoms of the C51 return distribution"""
    v_min: float = -10.0
    """the lowest atom"""
    v_max: float = 10.0
    """the highest atom"""
    noisy: bool = False
    """if toggled, the dense layers are NoisyNet layers (factorised Gaussian, Fortunato et al. 2018)"""
    noisy_std: float = 0.1
    """sigma_0 of the noisy layers: initial sigma = noisy_std / sqrt(fan_in) (Dopamine and DER: 0.1; Fortunato et al.: 0.5)"""
    dueling: bool = False
    """if toggled, a dueling head (value + advantage - mean advantage, per atom)"""

    learning_rate: float = 6.25e-5
    """the learning rate of the Adam optimiser"""
    adam_eps: float = 1.5e-4
    """epsilon of the Adam optimiser"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions, summed over environments"""
    gamma: float = 0.99
    """the discount factor"""
    target_network_frequency: int = 8_000
    """agent steps between copies of the online network into the target network"""
    batch_size: int = 32
    """transitions per gradient update"""
    start_e: float = 1.0
    """exploration epsilon when learning starts (it is 1 before)"""
    end_e: float = 0.01
    """exploration epsilon at the end of the schedule; unused with `--noisy`, which explores with epsilon 0 (Dopamine)"""
    epsilon_decay_steps: int = 250_000
    """agent steps after `learning_starts` over which epsilon goes from `start_e` to `end_e` (DER.gin 2,000; unused with `--noisy`)"""
    learning_starts: int = 20_000
    """agent steps of random play before learning starts (Dopamine's min_replay_history)"""
    train_frequency: int = 4
    """agent steps (summed over environments) per gradient update"""
    n_step: int = 3
    """steps of the n-step return"""
    double: bool = False
    """if toggled, the online network picks the next action and the target network rates it (van Hasselt et al. 2016)"""
    priority_exponent: float = 0.5
    """priority = loss ** priority_exponent (Dopamine: the square root of the cross-entropy)"""
    importance_exponent: float = 0.5
    """importance weight = (1 / sampling probability) ** importance_exponent, over the batch maximum"""
    init: str = "dopamine"
    """initial weights: `dopamine` (Dopamine's Flax initialisers, see `dopamine_init`) or `torch` (PyTorch's defaults)"""

    eval_every: int = 250_000
    """agent steps between evaluations (one more runs at the end); 0 evaluates only at the end"""
    eval_episodes: int = 10
    """full-game episodes per evaluation, one per evaluation environment (DER 100)"""
    eval_epsilon: float = 0.001
    """epsilon of the greedy policy at evaluation (Dopamine)"""
    iteration_steps: int = 250_000
    """agent steps per Dopamine iteration; `charts/iteration_return`: mean return of the games ended in each (DER 10k)"""
    save_every: int = 1_000_000
    """agent steps between checkpoints; 0 saves only `final.pt`"""
    save_buffer: bool = True
    """the newest checkpoint's replay and priorities are saved beside it (checkpoints/replay.pt, about buffer_size x
    resolution^2 bytes), so a resumed run does not repeat its warm-up; --no-save-buffer saves disk"""
    keep_checkpoints: int = 3
    """how many of the newest periodic checkpoints stay on disk (older ones are deleted)"""
    resume: str = ""
    """a checkpoint to continue from, or `auto`: the newest of this env id, experiment and seed with the same training
    configuration (else a new run)"""
    diag_every: int = 250_000
    """agent steps between diagnostics (dormant neurons, feature norm, saliency); 0 turns them off"""
    dormant_threshold: float = 0.025
    """a neuron is dormant when its normalised mean activation is at most this (Sokar et al. 2023)"""
    log_every: int = 1000
    """agent steps between logs of losses and SPS (each costs one host sync)"""
    compile: bool = False
    """if toggled, wrap the network in torch.compile"""
    torch_threads: int = 0
    """CPU threads of torch (0: torch's default); 1 is fastest for small networks on a small, shared CPU"""


PRESETS = {
    "rainbow": {},  # the defaults above: Dopamine's rainbow.gin
    "der": dict(  # Dopamine's labs/atari_100k/configs/DER.gin (van Hasselt et al. 2019)
        noisy=True, dueling=True, double=True, n_step=10, learning_starts=1_600, train_frequency=1,
        target_network_frequency=2_000, learning_rate=1e-4, adam_eps=1.5e-4, repeat_action_probability=0.0,
        episodic_life=True, total_timesteps=100_000, eval_episodes=100, iteration_steps=10_000,
        encoder="nature", pool="flatten", dense_scale=1,  # Dopamine's FullRainbowNetwork: Nature CNN, one noisy Dense(512)
        buffer_size=100_000,  # Dopamine's 1M only stands for "keep everything"; 100k is all a 100k-step run fills
        epsilon_decay_steps=2_000,  # used only with --no-noisy: with NoisyNet, Dopamine's epsilon is 0 (zero_epsilon)
    ),
}


def parse_args() -> Args:
    """Read `--preset` first, then parse every flag with that preset's values as the defaults."""
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default="rainbow")
    preset = preset_parser.parse_known_args()[0].preset
    utils.check_choice("preset", preset, tuple(PRESETS))
    return tyro.cli(Args, default=Args(preset=preset, **PRESETS[preset]))


# Environment construction
def atari_game(env_id: str) -> str:
    """`Breakout` or `Breakout-v5` -> `Breakout`."""
    return env_id[: -len("-v5")] if env_id.endswith("-v5") else env_id


def atari_games() -> list:
    """The Atari games EnvPool registers, as plain names (its other `-v5` ids are MuJoCo tasks)."""
    from envpool.registration import registry

    return sorted(name[: -len("-v5")] for name, spec in registry.specs.items() if spec[0] == "envpool.atari" and name.endswith("-v5"))


def make_env(args, num_envs: int, seed: int, for_evaluation: bool = False):
    """EnvPool Atari set to Dopamine's `atari_lib` protocol (Machado et al. 2018), every option explicit.

    Sticky actions, no no-op starts, no fire on reset, the minimal action set, 27k-step episodes;
    rewards are clipped for training (Dopamine clips to [-1, 1]; Atari rewards are integers, so
    that is their sign) and raw for evaluation. `info["reward"]` is always the raw reward and
    `info["terminated"]` the real game over, so full-game returns are measured in both.
    """
    return envpool.make(
        f"{atari_game(args.env_id)}-v5",
        env_type="gymnasium",
        num_envs=num_envs,
        seed=seed,
        img_height=args.resolution,
        img_width=args.resolution,
        gray_scale=True,
        use_inter_area_resize=True,  # Dopamine resizes with cv2.INTER_AREA
        stack_num=args.frame_stack,
        frame_skip=args.frame_skip,
        noop_max=1,  # Dopamine has no no-op starts; EnvPool crashes with 0, 1 is a single no-op frame
        use_fire_reset=False,  # Dopamine never presses FIRE for the agent
        episodic_life=args.episodic_life and not for_evaluation,
        reward_clip=not for_evaluation,
        repeat_action_probability=args.repeat_action_probability,
        full_action_space=False,
        max_episode_steps=args.max_episode_steps,
    )


def finished_games(episode_return, info, truncated):
    """Full-game statistics: add a step's raw rewards (`info["reward"]`, all lives) to the running
    returns and give (return, length) of each game that ended (game over or time limit)."""
    episode_return += info["reward"]
    game_over = info["terminated"].astype(bool) | truncated
    finished = [(episode_return[i], int(info["elapsed_step"][i])) for i in np.flatnonzero(game_over)]
    episode_return[game_over] = 0.0
    return finished


# Network: encoder (nature | impala) -> bottleneck (pool + dense) -> C51 head
NATURE_LAYERS = ((32, 8, 4), (64, 4, 2), (64, 3, 1))  # (channels, kernel, stride), Mnih et al. 2015


def same_padding(side: int, kernel: int, stride: int):
    """TensorFlow / Flax SAME padding of one axis: output ceil(side / stride), the odd pixel after."""
    total = max((math.ceil(side / stride) - 1) * stride + kernel - side, 0)
    return total // 2, total - total // 2


def nature_encoder(in_channels: int, width: int, resolution: int) -> nn.Sequential:
    """Mnih et al. 2015 with SAME padding as Dopamine's Flax network (the GAP paper's): 84x84 ->
    11x11x64 = 7,744 features when flattened (CleanRL's VALID padding gives 7x7x64)."""
    layers, channels, side = [], in_channels, resolution
    for out_channels, kernel, stride in NATURE_LAYERS:
        before, after = same_padding(side, kernel, stride)
        layers += [nn.ZeroPad2d((before, after, before, after)), nn.Conv2d(channels, out_channels * width, kernel, stride=stride), nn.ReLU()]
        channels, side = out_channels * width, math.ceil(side / stride)
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.relu0, self.conv0 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1, self.conv1 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(self.relu1(self.conv0(self.relu0(x))))


def impala_encoder(in_channels: int, width: int) -> nn.Sequential:
    """Espeholt et al. 2018, stages of (16, 32, 32) x width channels: 84x84 -> 11x11x32."""
    layers, channels = [], in_channels
    for out_channels in (16 * width, 32 * width, 32 * width):
        layers += [
            nn.Conv2d(channels, out_channels, 3, padding=1),
            nn.MaxPool2d(3, stride=2, padding=1),
            ResidualBlock(out_channels),
            ResidualBlock(out_channels),
        ]
        channels = out_channels
    return nn.Sequential(*layers, nn.ReLU())


def encoder_output_shape(encoder: str, width: int, resolution: int):
    """(channels, side) of the encoder's feature map."""
    if encoder == "nature":
        return 64 * width, math.ceil(resolution / 8)  # SAME padding: strides 4, 2, 1
    side = resolution
    for _ in range(3):
        side = (side - 1) // 2 + 1  # MaxPool2d(3, stride 2, padding 1)
    return 32 * width, side


def make_pool(pool: str) -> nn.Module:
    """The bottleneck's join: flatten keeps H*W*C features, global pooling keeps C."""
    if pool == "flatten":
        return nn.Flatten()
    if pool == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())


class NoisyLinear(nn.Module):
    """Linear layer with factorised Gaussian noise (Fortunato et al. 2018, eqs. 10-11): weight noise
    f(eps_out) f(eps_in)^T, bias noise f(eps_out), f(x) = sign(x) sqrt(|x|), fresh at every forward
    in training mode; evaluation mode uses the means only."""

    def __init__(self, in_features: int, out_features: int, std_init: float):
        super().__init__()
        bound = 1 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), std_init * bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), std_init * bound))

    def forward(self, x):
        if not self.training:
            return F.linear(x, self.weight_mu, self.bias_mu)
        eps_in = torch.randn(self.weight_mu.shape[1], device=x.device)
        eps_out = torch.randn(self.weight_mu.shape[0], device=x.device)
        eps_in, eps_out = eps_in.sign() * eps_in.abs().sqrt(), eps_out.sign() * eps_out.abs().sqrt()
        weight = self.weight_mu + self.weight_sigma * torch.outer(eps_out, eps_in)
        return F.linear(x, weight, self.bias_mu + self.bias_sigma * eps_out)


def make_linear(in_features: int, out_features: int, args) -> nn.Module:
    """A dense layer, NoisyNet with `--noisy`; `dopamine_init` sets the weights of the plain ones."""
    return NoisyLinear(in_features, out_features, args.noisy_std) if args.noisy else nn.Linear(in_features, out_features)


class C51Head(nn.Module):
    """Logits (B, actions, atoms) of the return distribution; dueling: V + A - mean_a A, per atom
    (Dopamine's full Rainbow)."""

    def __init__(self, dense: int, num_actions: int, args):
        super().__init__()
        self.num_actions, self.num_atoms = num_actions, args.num_atoms
        self.advantage = make_linear(dense, num_actions * args.num_atoms, args)
        self.value = make_linear(dense, args.num_atoms, args) if args.dueling else None

    def forward(self, hidden):
        advantage = self.advantage(hidden).view(-1, self.num_actions, self.num_atoms)
        if self.value is None:
            return advantage
        value = self.value(hidden).view(-1, 1, self.num_atoms)
        return value + advantage - advantage.mean(dim=1, keepdim=True)


class QNetwork(nn.Module):
    """logits(s) = head(bottleneck(encoder(s / 255))); bottleneck = pool + Linear(512 x dense_scale) + ReLU."""

    def __init__(self, args, num_actions: int):
        super().__init__()
        if args.encoder == "nature":
            self.encoder = nature_encoder(args.frame_stack, args.width, args.resolution)
        else:
            self.encoder = impala_encoder(args.frame_stack, args.width)
        channels, side = encoder_output_shape(args.encoder, args.width, args.resolution)
        features = channels * side * side if args.pool == "flatten" else channels
        dense = 512 * args.dense_scale
        self.bottleneck = nn.Sequential(make_pool(args.pool), make_linear(features, dense, args), nn.ReLU())
        self.head = C51Head(dense, num_actions, args)

    def forward(self, obs):
        return self.head(self.bottleneck(self.encoder(obs.float() / 255.0)))


def variance_scaling_(weight, scale: float, distribution: str):
    """Flax's variance_scaling(scale, "fan_in", distribution): variance scale / fan_in, fan_in = in x kernel area.
    `truncated_normal` is cut at 2 standard deviations and rescaled by 0.8796 to keep that variance."""
    std = math.sqrt(scale / weight[0].numel())
    if distribution == "uniform":
        return nn.init.uniform_(weight, -math.sqrt(3) * std, math.sqrt(3) * std)
    std /= 0.87962566103423978
    return nn.init.trunc_normal_(weight, 0.0, std, -2 * std, 2 * std)


def dopamine_init(q_network, args):
    """Dopamine's Flax initialisers (dopamine/jax/networks.py), every bias 0 (Flax's default).

    Impala (`Stack`): each stage's first conv xavier_uniform, the residual convs Flax's default
    lecun_normal = variance_scaling(1, fan_in, truncated_normal). Plain Rainbow (`RainbowNetwork`,
    rainbow.gin): Nature convs and dense layers variance_scaling(1/sqrt(3), fan_in, uniform), std
    0.76/sqrt(fan_in) where PyTorch's default gives 0.58/sqrt(fan_in). With `--noisy` or `--dueling`
    (`FullRainbowNetwork`, DER.gin): Nature convs and plain dense layers xavier_uniform; NoisyNet
    layers keep their own initialisation, the same as Dopamine's `NoisyNetwork`.
    """
    full_rainbow = args.noisy or args.dueling

    def plain_init_(weight):
        if full_rainbow:
            return nn.init.xavier_uniform_(weight)
        return variance_scaling_(weight, 1 / math.sqrt(3), "uniform")

    for module in q_network.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.zeros_(module.bias)
    if args.encoder == "impala":
        for module in q_network.encoder:
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, ResidualBlock):
                variance_scaling_(module.conv0.weight, 1.0, "truncated_normal")
                variance_scaling_(module.conv1.weight, 1.0, "truncated_normal")
    else:
        for module in q_network.encoder:
            if isinstance(module, nn.Conv2d):
                plain_init_(module.weight)
    for module in (*q_network.bottleneck.modules(), *q_network.head.modules()):
        if isinstance(module, nn.Linear):
            plain_init_(module.weight)


def q_values(logits, support):
    """Expected return per action: sum_i z_i softmax(logits)_i."""
    return (logits.softmax(dim=-1) * support).sum(dim=-1)


def parameter_counts(q_network) -> dict:
    return {part: utils.parameter_count(getattr(q_network, part)) for part in ("encoder", "bottleneck", "head")}


@torch.no_grad()
def network_diagnostics(q_network, obs, threshold: float) -> dict:
    """Dormant fractions per part and the feature norm (REFERENCE section 5) on a batch of observations.

    The encoder's neurons are its ReLU outputs (conv channels), the bottleneck's the dense layer's
    ReLU output; the head is linear here, so its neurons are the logits themselves.
    """
    encoder_activations = []
    hooks = [
        module.register_forward_hook(lambda module, inputs, output: encoder_activations.append(output))
        for module in q_network.encoder.modules() if isinstance(module, nn.ReLU)
    ]
    encoded = q_network.encoder(obs.float() / 255.0)
    for hook in hooks:
        hook.remove()
    features = q_network.bottleneck[0](encoded)
    hidden = q_network.bottleneck[1:](features)
    logits = q_network.head(hidden)
    return {
        "diag/dormant_fraction/encoder": utils.dormant_fraction(encoder_activations, threshold),
        "diag/dormant_fraction/bottleneck": utils.dormant_fraction([hidden], threshold),
        "diag/dormant_fraction/head": utils.dormant_fraction([logits.flatten(1)], threshold),
        "diag/feature_norm": features.norm(dim=1).mean().item(),
    }


def q_saliency(q_network, obs, support) -> torch.Tensor:
    """Vanilla-gradient saliency |dQ(s, a*)/ds| of the greedy action, as (B, 1, H, W) images in [0, 1]."""
    obs = obs.float().requires_grad_(True)
    q = q_values(q_network(obs), support)
    q.max(dim=1).values.sum().backward()
    return utils.saliency_image(obs.grad)


# Replay: each frame stored once per environment, stacks rebuilt at sample time, priorities in a sum tree
def make_replay(num_envs: int, capacity: int, resolution: int, device) -> dict:
    """Circular per-environment storage indexed by time slot t (slot t % capacity).

    Slot t holds the newest frame of observation o_t, and the action a_t, reward r_t and end
    flags of the step taken from o_t. `valid[t]` is False when that step was EnvPool's auto-reset
    step (taken from a final observation; its action is ignored): such a slot is never a
    transition. `episode_start[t]` marks a fresh game, where EnvPool fills the whole stack with the
    first frame (after a life loss EnvPool keeps stacking, so that is not a start).
    Leaf env * capacity + slot of the sum tree holds that transition's priority, 0 while it
    cannot be sampled (its n-step window not stored yet, or its frames overwritten).
    """
    shape = (num_envs, capacity)
    leaves = 1 << max(1, math.ceil(math.log2(num_envs * capacity)))
    return {
        "frames": torch.zeros(shape + (resolution, resolution), dtype=torch.uint8, device=device),
        "actions": torch.zeros(shape, dtype=torch.long, device=device),
        "rewards": torch.zeros(shape, dtype=torch.float32, device=device),
        "terminated": torch.zeros(shape, dtype=torch.bool, device=device),
        "truncated": torch.zeros(shape, dtype=torch.bool, device=device),
        "valid": torch.zeros(shape, dtype=torch.bool, device=device),
        "episode_start": torch.zeros(shape, dtype=torch.bool, device=device),
        "sum_tree": torch.zeros(2 * leaves, dtype=torch.float64, device=device),
        "max_priority": torch.ones((), dtype=torch.float64, device=device),  # Dopamine starts at 1
    }


def sum_tree_update(tree, leaves, priorities):
    """Set leaf priorities (leaf i lives at tree[len(tree) // 2 + i], the root at tree[1]) and
    recompute their ancestors one level at a time for the whole batch; an ancestor shared by
    several leaves is written several times with the same sum."""
    nodes = leaves + tree.numel() // 2
    tree[nodes] = priorities.to(tree.dtype)
    for _ in range(int(math.log2(tree.numel() // 2))):
        nodes = nodes // 2
        tree[nodes] = tree[2 * nodes] + tree[2 * nodes + 1]


def sum_tree_retrieve(tree, targets):
    """Prefix-sum search for all targets in parallel from the root: the leaf i with
    sum(p[:i]) <= target < sum(p[:i + 1]). A node is entered only if its sum is positive, so a
    zero-priority leaf is never returned, even when rounding puts a target on an edge."""
    nodes = torch.ones(targets.shape, dtype=torch.long, device=tree.device)
    targets = targets.to(tree.dtype)
    for _ in range(int(math.log2(tree.numel() // 2))):
        left, right = tree[2 * nodes], tree[2 * nodes + 1]
        go_right = (targets >= left) & (right > 0)
        targets = torch.where(go_right, targets - left, torch.minimum(targets, left))
        nodes = 2 * nodes + go_right.long()
    return nodes - tree.numel() // 2


def sum_tree_sample(tree, batch_size: int):
    """Stratified prioritised sampling (Schaul et al. 2016): one uniform draw in each of
    `batch_size` equal slices of the total priority. Returns (leaves, their priorities)."""
    strata = torch.arange(batch_size, device=tree.device, dtype=tree.dtype)
    targets = (strata + torch.rand(batch_size, device=tree.device, dtype=tree.dtype)) * (tree[1] / batch_size)
    leaves = sum_tree_retrieve(tree, targets)
    return leaves, tree[leaves + tree.numel() // 2]


def store_first_frame(replay: dict, slot_time: int, obs, elapsed_step):
    """Write the newest frame of a freshly reset observation at slot `slot_time`."""
    slot = slot_time % replay["frames"].shape[1]
    replay["frames"][:, slot] = obs[:, -1]
    replay["episode_start"][:, slot] = elapsed_step == 0


def store_step(replay: dict, slot_time: int, actions, rewards, terminated, truncated, was_reset_step, next_obs, next_elapsed_step, n_step: int, frame_stack: int):
    """Record the step taken from o_t (t = slot_time) and the newest frame of o_{t+1}.

    `was_reset_step` (the previous step ended an episode) marks EnvPool's auto-reset step: its
    slot is stored as not valid, so it is never sampled and an n-step return never crosses it.
    Priorities: transition t + 1 - n_step now has its whole window and gets the largest priority
    seen so far (Schaul et al.: new transitions first); the slots whose frame stacks reach back
    into the overwritten slot t + 1 get priority 0.
    """
    num_envs, capacity = replay["frames"].shape[:2]
    slot, next_slot = slot_time % capacity, (slot_time + 1) % capacity
    replay["actions"][:, slot] = actions
    replay["rewards"][:, slot] = rewards
    replay["terminated"][:, slot] = terminated
    replay["truncated"][:, slot] = truncated
    replay["valid"][:, slot] = ~was_reset_step
    replay["frames"][:, next_slot] = next_obs[:, -1]
    replay["episode_start"][:, next_slot] = next_elapsed_step == 0
    env_offsets = torch.arange(num_envs, device=replay["frames"].device)[:, None] * capacity
    stale_slots = (slot_time + 1 + torch.arange(frame_stack, device=env_offsets.device)) % capacity
    leaves, priorities = [(env_offsets + stale_slots).flatten()], [torch.zeros(num_envs * frame_stack, dtype=torch.float64, device=env_offsets.device)]
    if slot_time + 1 >= n_step:
        complete_slot = (slot_time + 1 - n_step) % capacity
        leaves.append(env_offsets[:, 0] + complete_slot)
        priorities.append(replay["max_priority"] * replay["valid"][:, complete_slot])
    sum_tree_update(replay["sum_tree"], torch.cat(leaves), torch.cat(priorities))


def store_env_step(replay: dict, slot_time: int, actions, rewards, terminated, truncated, info, next_obs, episode_done, args):
    """The training loop's store of one EnvPool step (host arrays; `next_obs` already on the replay's device).

    The step is a transition unless the previous one ended an episode (`episode_done`): then it was
    EnvPool's auto-reset step, whose action was ignored. Returns `episode_done` for the next step.
    """
    device = replay["frames"].device
    store_step(replay, slot_time, torch.as_tensor(actions, device=device), torch.as_tensor(rewards, device=device),
               torch.as_tensor(terminated, device=device), torch.as_tensor(truncated, device=device),
               torch.as_tensor(episode_done, device=device), next_obs,
               torch.as_tensor(info["elapsed_step"], device=device), args.n_step, args.frame_stack)
    return terminated | truncated


def stack_frames(replay: dict, env_index, slot_time, frame_stack: int):
    """Rebuild the stacked observation o_t (B, frame_stack, H, W) exactly as EnvPool returned it.

    Walking back from t, a slot that starts an episode repeats itself: EnvPool fills the stack with
    the first frame at a reset.
    """
    capacity = replay["frames"].shape[1]
    times = [slot_time]
    for _ in range(frame_stack - 1):
        previous = times[-1]
        times.append(torch.where(replay["episode_start"][env_index, previous % capacity], previous, previous - 1))
    times = torch.stack(times[::-1], dim=1)
    return replay["frames"][env_index[:, None], times % capacity]


def n_step_returns(rewards, terminated, truncated, gamma: float):
    """n-step returns from (B, n) rewards and end flags of steps t .. t+n-1.

    Sums gamma^k r_{t+k} up to and including the first step that ends the episode. Returns
    (return, steps m summed, discount gamma^m of the bootstrap value, zero if terminated).
    """
    n = rewards.shape[1]
    ended = terminated | truncated
    ends_before = torch.cumsum(ended.long(), dim=1) - ended.long()
    alive = ends_before == 0
    discounts = gamma ** torch.arange(n, device=rewards.device, dtype=rewards.dtype)
    returns = (rewards * discounts * alive).sum(dim=1)
    steps = alive.long().sum(dim=1)
    terminal = (terminated & alive).any(dim=1)
    bootstrap_discount = (gamma ** steps.to(rewards.dtype)) * (~terminal).to(rewards.dtype)
    return returns, steps, bootstrap_discount


def gather_batch(replay: dict, leaves, n_step: int, frame_stack: int, gamma: float):
    """The n-step transitions that start at the given sum-tree leaves, all on the replay's device."""
    capacity = replay["frames"].shape[1]
    env_index, slot_time = leaves // capacity, leaves % capacity
    window = (slot_time[:, None] + torch.arange(n_step, device=leaves.device)) % capacity
    returns, steps, bootstrap_discount = n_step_returns(
        replay["rewards"][env_index[:, None], window],
        replay["terminated"][env_index[:, None], window],
        replay["truncated"][env_index[:, None], window],
        gamma,
    )
    return {
        "observations": stack_frames(replay, env_index, slot_time, frame_stack),
        "actions": replay["actions"][env_index, slot_time],
        "returns": returns,
        "bootstrap_discount": bootstrap_discount,
        "next_observations": stack_frames(replay, env_index, slot_time + steps, frame_stack),
    }


def sample_batch(replay: dict, batch_size: int, n_step: int, frame_stack: int, gamma: float):
    """A prioritised batch with its leaves and sampling probabilities (priority / total priority)."""
    leaves, priorities = sum_tree_sample(replay["sum_tree"], batch_size)
    batch = gather_batch(replay, leaves, n_step, frame_stack, gamma)
    batch["leaves"], batch["probabilities"] = leaves, (priorities / replay["sum_tree"][1]).float()
    return batch


def recent_observations(replay: dict, buffer_time: int, count: int, frame_stack: int):
    """Stacks of the newest stored observations of every environment (at most `count`), for diagnostics."""
    num_envs, capacity = replay["valid"].shape
    device = replay["valid"].device
    per_env = max(1, min(buffer_time + 1, capacity - frame_stack, -(-count // num_envs)))
    slot_time = (buffer_time - torch.arange(per_env, device=device)).repeat_interleave(num_envs)
    env_index = torch.arange(num_envs, device=device).repeat(per_env)
    return stack_frames(replay, env_index, slot_time, frame_stack)[:count]


def cut_episodes_at_resume(replay: dict, buffer_time: int):
    """A resumed run restarts the games: the stored episodes end as time limits at o_{buffer_time}."""
    if buffer_time > 0:
        replay["truncated"][:, (buffer_time - 1) % replay["frames"].shape[1]] = True


# Rainbow math
def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def project_distribution(next_probs, returns, discounts, support, deterministic: bool = False):
    """C51 target (Bellemare et al. 2017, Algorithm 1): move each atom z_j to r + discount * z_j,
    clamp it to [v_min, v_max] and split its probability between the two neighbouring atoms.

    `deterministic` sums over one-hot masks (B x atoms x atoms) instead of `scatter_add_`, whose
    atomic adds on CUDA make the sum order, and so the last bits, vary between runs."""
    v_min, v_max, num_atoms = support[0], support[-1], support.numel()
    delta = (v_max - v_min) / (num_atoms - 1)
    target_atoms = (returns[:, None] + discounts[:, None] * support[None, :]).clamp(v_min, v_max)
    position = ((target_atoms - v_min) / delta).clamp(0, num_atoms - 1)  # float rounding may step past the last atom
    lower, upper = position.floor().long(), position.ceil().long()
    lower_weight = upper.to(position.dtype) - position + (lower == upper).to(position.dtype)  # a hit on an atom keeps it all
    upper_weight = position - lower.to(position.dtype)
    if deterministic:
        atoms = torch.arange(num_atoms, device=support.device)
        to_lower = (lower[:, :, None] == atoms).to(next_probs.dtype) * (next_probs * lower_weight)[:, :, None]
        to_upper = (upper[:, :, None] == atoms).to(next_probs.dtype) * (next_probs * upper_weight)[:, :, None]
        return (to_lower + to_upper).sum(dim=1)
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(1, lower, next_probs * lower_weight)
    projected.scatter_add_(1, upper, next_probs * upper_weight)
    return projected


def importance_weights(probabilities, exponent: float):
    """(1 / p)^exponent over the batch maximum (Dopamine: 1 / sqrt(p + 1e-10), over the max)."""
    weights = (probabilities + 1e-10) ** -exponent
    return weights / weights.max()


def rainbow_loss(q_network, target_network, batch: dict, support, double: bool, deterministic: bool = False):
    """Per-transition cross-entropy between the projected target distribution and the online one;
    also returns the online logits of the batch."""
    rows = torch.arange(len(batch["actions"]), device=support.device)
    with torch.no_grad():
        next_target_probs = target_network(batch["next_observations"]).softmax(dim=-1)
        chooser = q_network(batch["next_observations"]).softmax(dim=-1) if double else next_target_probs
        next_actions = (chooser * support).sum(dim=-1).argmax(dim=1)
        target = project_distribution(next_target_probs[rows, next_actions], batch["returns"], batch["bootstrap_discount"],
                                      support, deterministic)
    logits = q_network(batch["observations"])
    log_probs = logits[rows, batch["actions"]].log_softmax(dim=-1)
    return -(target * log_probs).sum(dim=-1), logits


def prioritized_update(q_network, target_network, optimizer, replay: dict, batch: dict, support, args):
    """One gradient step on the importance-weighted mean cross-entropy, then the sampled leaves get
    priority loss ** priority_exponent (Dopamine: sqrt(loss + 1e-10)) and the running maximum, which
    new transitions receive, grows with them. Returns the (detached) loss and online logits."""
    loss_per_transition, logits = rainbow_loss(q_network, target_network, batch, support, args.double,
                                               args.torch_deterministic)
    loss = (importance_weights(batch["probabilities"], args.importance_exponent) * loss_per_transition).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    priorities = (loss_per_transition.detach().double() + 1e-10) ** args.priority_exponent
    sum_tree_update(replay["sum_tree"], batch["leaves"], priorities)
    replay["max_priority"] = torch.maximum(replay["max_priority"], priorities.max())
    return loss.detach(), logits.detach()


def select_actions(q_network, obs, epsilon: float, num_actions: int, support):
    """Epsilon-greedy per environment on observations already on the device; the coins are
    host-side so that a fully random step skips the network."""
    explore = np.random.random(len(obs)) < epsilon
    actions = np.random.randint(num_actions, size=len(obs))
    if not explore.all():
        with torch.no_grad():
            greedy = q_values(q_network(obs), support).argmax(dim=1).cpu().numpy()
        actions = np.where(explore, actions, greedy)
    return actions


def evaluate(q_network, eval_envs, args, num_actions: int, device, support, capture_video: bool):
    """Play one full game per evaluation environment (no life loss, raw rewards) at `eval_epsilon`,
    without the NoisyNet noise."""
    obs, _ = eval_envs.reset()
    num_envs = len(obs)
    returns, finished = np.zeros(num_envs), np.zeros(num_envs, dtype=bool)
    frames = [obs[0, -1]] if capture_video else None
    was_training = q_network.training
    q_network.eval()
    while not finished.all():
        actions = select_actions(q_network, torch.as_tensor(obs, device=device), args.eval_epsilon, num_actions, support)
        obs, rewards, terminated, truncated, _ = eval_envs.step(actions)
        returns += rewards * ~finished
        if capture_video and not finished[0]:
            frames.append(obs[0, -1])
        finished |= terminated | truncated
    q_network.train(was_training)
    video = np.repeat(np.stack(frames)[..., None], 3, axis=-1) if capture_video else None
    return returns, video


# The valid range of every numeric flag (utils.check_ranges), checked before any work
FLAG_RANGES = {
    "seed": "[0, 4294967295]", "total_timesteps": "[1, inf)", "num_envs": "[1, inf)", "resolution": "[1, 4096]",
    "frame_stack": "[1, inf)", "frame_skip": "[1, inf)", "max_episode_steps": "[1, inf)", "width": "[1, inf)",
    "dense_scale": "[1, inf)", "learning_rate": "(0, inf)", "buffer_size": "[1, inf)", "gamma": "[0, 1]",
    "target_network_frequency": "[1, inf)", "batch_size": "[1, inf)", "start_e": "[0, 1]", "end_e": "[0, 1]",
    "learning_starts": "[0, inf)", "train_frequency": "[1, inf)", "n_step": "[1, inf)", "eval_every": "[0, inf)",
    "eval_episodes": "[1, inf)", "eval_epsilon": "[0, 1]", "save_every": "[0, inf)", "diag_every": "[0, inf)",
    "dormant_threshold": "[0, 1]", "log_every": "[1, inf)", "torch_threads": "[0, inf)",
    "repeat_action_probability": "[0, 1)", "num_atoms": "[2, inf)", "v_min": "(-inf, inf)", "v_max": "(-inf, inf)",
    "noisy_std": "(0, inf)", "adam_eps": "(0, inf)", "epsilon_decay_steps": "[1, inf)", "priority_exponent": "[0, inf)",
    "importance_exponent": "[0, inf)", "iteration_steps": "[1, inf)", "keep_checkpoints": "[1, inf)",
}


def check_args(args):
    """Refuse bad input with one line (exit 2) before any work."""
    if atari_game(args.env_id) not in atari_games():
        utils.fail(f"--env-id {args.env_id!r} is not an EnvPool Atari game; choose one of: {', '.join(atari_games())}")
    utils.check_choice("encoder", args.encoder, ("nature", "impala"))
    utils.check_choice("pool", args.pool, ("flatten", "avg", "max"))
    utils.check_choice("init", args.init, ("dopamine", "torch"))
    utils.check_ranges(args, FLAG_RANGES)
    if not args.v_min < args.v_max:
        utils.fail(f"--v-min {args.v_min} must be below --v-max {args.v_max}")
    if args.batch_size > args.buffer_size:
        utils.fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.learning_starts < args.batch_size:
        utils.fail(f"--learning-starts {args.learning_starts} must be at least --batch-size {args.batch_size}")
    if args.learning_starts >= args.total_timesteps:
        utils.fail(f"--learning-starts {args.learning_starts} must be below --total-timesteps {args.total_timesteps} "
                   "(else the run ends before its first update)")
    if args.buffer_size // args.num_envs < args.frame_stack + args.n_step + 1:
        utils.fail(f"--buffer-size {args.buffer_size} leaves {args.buffer_size // args.num_envs} slots per environment; "
                   f"--num-envs {args.num_envs} needs at least {args.frame_stack + args.n_step + 1} each")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            utils.fail("--track needs the `wandb` package; install it or drop --track")


def main():
    args = parse_args()
    args.env_id = atari_game(args.env_id)
    check_args(args)
    # derived values
    replay_capacity = args.buffer_size // args.num_envs  # slots per environment
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    replay_bytes = args.num_envs * replay_capacity * args.resolution**2
    if replay_bytes > 0.8 * utils.free_memory_bytes(device):  # on a CPU too: an OOM kill after set-up helps nobody
        utils.fail(f"--buffer-size {args.buffer_size} at --resolution {args.resolution} needs "
                   f"{replay_bytes / 2**30:.1f} GiB of replay, more than 80 % of the free {device.type} memory")

    last_good = None  # (step, checkpoint) of the last state whose losses were checked finite
    run_dir, checkpoint_file = utils.resolve_run(args)
    checkpoint = utils.load_checkpoint(checkpoint_file, SCRIPT, args, ARCHITECTURE_FLAGS) if checkpoint_file else None
    if checkpoint:  # the replay saved beside the newest checkpoint, if this is it
        checkpoint.update(utils.load_replay(checkpoint_file, checkpoint["global_step"]) or {})
    if checkpoint and "replay" in checkpoint and tuple(checkpoint["replay"]["valid"].shape) != (args.num_envs, replay_capacity):
        utils.fail(f"--resume {checkpoint_file!r} holds a replay of {tuple(checkpoint['replay']['valid'].shape)} "
                   f"(envs, slots); this run asks for {(args.num_envs, replay_capacity)}: keep --num-envs and --buffer-size")
    print("config:\n" + "\n".join(f"  {key} = {value}" for key, value in asdict(args).items()), flush=True)
    print(f"run folder: {run_dir}; device: {device}; replay: {replay_bytes / 2**30:.2f} GiB of uint8 frames", flush=True)
    writer = utils.start_run(args, run_dir, purge_step=checkpoint["global_step"] if checkpoint else None)
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity or None, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), save_code=True)

    # set-up
    utils.seed_everything(args.seed, args.torch_deterministic)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    global_step = checkpoint["global_step"] if checkpoint else 0
    env_seed = args.seed + global_step  # a resumed run cannot restore the emulators: it restarts the games
    envs = make_env(args, args.num_envs, env_seed)
    eval_envs = make_env(args, args.eval_episodes, env_seed + 1_000_000, for_evaluation=True)
    num_actions = envs.action_space.n
    support = torch.linspace(args.v_min, args.v_max, args.num_atoms, device=device)
    q_network = QNetwork(args, num_actions).to(device)
    if args.init == "dopamine":
        dopamine_init(q_network, args)
    target_network = QNetwork(args, num_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps)
    replay = make_replay(args.num_envs, replay_capacity, args.resolution, device)
    buffer_time, update_count, update_credit = 0, 0, 0
    iteration_returns = []  # whole-game returns of the training games that ended in this iteration (Dopamine's statistic)
    if checkpoint:
        q_network.load_state_dict(checkpoint["q_network"])
        target_network.load_state_dict(checkpoint["target_network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        update_count, update_credit = checkpoint["update_count"], checkpoint["update_credit"]
        iteration_returns = list(checkpoint.get("iteration_returns", []))
        if "replay" in checkpoint:
            replay = {key: value.to(device) for key, value in checkpoint["replay"].items()}
            buffer_time = checkpoint["buffer_time"]
            cut_episodes_at_resume(replay, buffer_time)
        utils.set_rng_state(checkpoint["rng"])
        print(f"resumed from {checkpoint_file} at step {global_step}", flush=True)
    q_forward = torch.compile(q_network) if args.compile else q_network
    target_forward = torch.compile(target_network) if args.compile else target_network

    counts = parameter_counts(q_network)
    print("parameters: " + ", ".join(f"{part} {count:,}" for part, count in counts.items()) + f", total {sum(counts.values()):,}", flush=True)
    if not checkpoint:
        for part, count in counts.items():
            writer.add_scalar(f"diag/params/{part}", count, 0)

    def checkpoint_payload(step):
        payload = {
            "script": SCRIPT, "args": asdict(args), "global_step": step, "rng": utils.rng_state(),
            "q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "optimizer": optimizer.state_dict(), "update_count": update_count, "update_credit": update_credit,
            "iteration_returns": list(iteration_returns),
        }
        return payload

    def stop_if_nonfinite(step):
        """One host sync: stop if any loss since the last check was not finite, leaving the last good state."""
        nonlocal last_good
        # the weights and Adam's moments too: the interval's last step may have broken them after its loss was checked
        if nonfinite.item() or not utils.finite_state(q_network, optimizer):
            if last_good is None:
                where = "no finite state was checked yet, so no checkpoint was written"
            else:
                good_step, good_state = last_good
                utils.save_checkpoint(utils.checkpoint_path(run_dir, good_step), good_state)
                where = f"the last good state is {utils.checkpoint_path(run_dir, good_step)}"
            print(f"error: non-finite loss or weights before step {step}; stopping ({where}). Try a lower --learning-rate.",
                  file=sys.stderr, flush=True)
            writer.close()
            raise SystemExit(1)
        last_good = (step, copy.deepcopy(checkpoint_payload(step)))

    def run_evaluation(step):
        returns, video = evaluate(q_forward, eval_envs, args, num_actions, device, support, args.capture_video)
        writer.add_scalar("eval/return", returns.mean(), step)
        normalized = utils.atari_human_normalized_score(args.env_id, returns.mean())
        if normalized is not None:
            writer.add_scalar("eval/normalized_score", normalized, step)
        if video is not None:
            utils.save_video(os.path.join(run_dir, "videos", f"eval_step_{step:012d}.gif"), video)
        print(f"global_step={step}, eval/return={returns.mean():.2f} over {len(returns)} games", flush=True)

    # training loop
    obs, info = envs.reset()
    obs_device = torch.as_tensor(obs, device=device)
    if buffer_time > 0:  # the stored slot o_{buffer_time} becomes an auto-reset slot before the new games
        was_reset_step = torch.ones(args.num_envs, dtype=torch.bool, device=device)
        zeros = torch.zeros(args.num_envs, device=device)
        store_step(replay, buffer_time, zeros.long(), zeros, zeros.bool(), zeros.bool(), was_reset_step,
                   obs_device, torch.as_tensor(info["elapsed_step"], device=device), args.n_step, args.frame_stack)
        buffer_time += 1
    else:
        store_first_frame(replay, 0, obs_device, torch.as_tensor(info["elapsed_step"], device=device))
    episode_done = np.zeros(args.num_envs, dtype=bool)
    episode_return = np.zeros(args.num_envs)
    loss_sum = torch.zeros((), device=device)
    q_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    losses_since_log = 0
    start_step, start_time = global_step, time.time()
    while global_step < args.total_timesteps:
        # Dopamine: epsilon 1 until learning starts, then linear to end_e over epsilon_decay_steps;
        # with NoisyNet layers 0 from the first step, the noise explores (full Rainbow's `zero_epsilon`)
        epsilon = linear_schedule(args.start_e, args.end_e, args.epsilon_decay_steps, max(0, global_step - args.learning_starts))
        epsilon = 0.0 if args.noisy else 1.0 if global_step < args.learning_starts else epsilon
        actions = select_actions(q_forward, obs_device, epsilon, num_actions, support)
        envs.send(actions)  # the emulators step in EnvPool's threads while the learner updates below
        previous_step = global_step
        global_step += args.num_envs

        # gradient updates: one per `train_frequency` agent steps, once the replay is warm
        stored = min(buffer_time, replay_capacity) * args.num_envs
        if global_step > args.learning_starts and stored >= min(args.learning_starts, args.buffer_size) and buffer_time >= args.n_step:
            update_credit += args.num_envs
            while update_credit >= args.train_frequency:
                update_credit -= args.train_frequency
                batch = sample_batch(replay, args.batch_size, args.n_step, args.frame_stack, args.gamma)
                loss, logits = prioritized_update(q_forward, target_forward, optimizer, replay, batch, support, args)
                update_count += 1
                loss_sum += loss
                q_sum += q_values(logits, support).mean()
                nonfinite |= ~torch.isfinite(loss)
                losses_since_log += 1
            if global_step // args.target_network_frequency > previous_step // args.target_network_frequency:
                target_network.load_state_dict(q_network.state_dict())

        # store the step taken from o_t; an auto-reset step (after an episode end) is never a transition
        next_obs, rewards, terminated, truncated, info = envs.recv()
        next_obs_device = torch.as_tensor(next_obs, device=device)
        episode_done = store_env_step(replay, buffer_time, actions, rewards, terminated, truncated, info, next_obs_device,
                                      episode_done, args)
        buffer_time += 1
        obs_device = next_obs_device
        for game_return, game_length in finished_games(episode_return, info, truncated):
            writer.add_scalar("charts/episodic_return", game_return, global_step)
            writer.add_scalar("charts/episodic_length", game_length, global_step)
            iteration_returns.append(float(game_return))
            print(f"global_step={global_step}, episodic_return={game_return:.0f}", flush=True)
        # Dopamine's reported score: the mean training return per iteration (its train_average_return)
        if global_step // args.iteration_steps > previous_step // args.iteration_steps:
            if iteration_returns:
                writer.add_scalar("charts/iteration_return", np.mean(iteration_returns), global_step)
            iteration_returns = []

        # logging, and the non-finite check (one host sync per log interval)
        if global_step // args.log_every > previous_step // args.log_every:
            stop_if_nonfinite(global_step)
            sps = (global_step - start_step) / (time.time() - start_time)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            if losses_since_log:
                writer.add_scalar("losses/loss", (loss_sum / losses_since_log).item(), global_step)
                writer.add_scalar("losses/q_values", (q_sum / losses_since_log).item(), global_step)
                loss_sum.zero_(), q_sum.zero_()
                losses_since_log = 0
            print(f"global_step={global_step}, SPS={sps:.1f}, epsilon={epsilon:.3f}, updates={update_count}", flush=True)

        # diagnostics on a batch of the newest stored observations, without the NoisyNet noise
        if args.diag_every and global_step // args.diag_every > previous_step // args.diag_every:
            q_network.eval()
            recent = recent_observations(replay, buffer_time, 256, args.frame_stack)
            for tag, value in network_diagnostics(q_network, recent, args.dormant_threshold).items():
                writer.add_scalar(tag, value, global_step)
            writer.add_images("images/saliency", q_saliency(q_network, recent[:4], support), global_step)
            q_network.zero_grad(set_to_none=True)
            q_network.train()

        # evaluation and checkpoints
        if args.eval_every and global_step // args.eval_every > previous_step // args.eval_every and global_step < args.total_timesteps:
            run_evaluation(global_step)
        if args.save_every and global_step // args.save_every > previous_step // args.save_every:
            stop_if_nonfinite(global_step)
            saved_replay = {"replay": replay, "buffer_time": buffer_time} if args.save_buffer else None
            utils.save_periodic_checkpoint(run_dir, global_step, checkpoint_payload(global_step), args.keep_checkpoints,
                                           saved_replay)

    # evaluation and saving at the end
    stop_if_nonfinite(global_step)
    run_evaluation(global_step)
    utils.save_checkpoint(os.path.join(run_dir, "final.pt"), checkpoint_payload(global_step))
    envs.close()
    eval_envs.close()
    writer.close()
    print(f"done: {run_dir}", flush=True)


if __name__ == "__main__":
    main()
