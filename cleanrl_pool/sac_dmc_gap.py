"""SAC from pixels on DeepMind Control (EnvPool) with a choice of bottleneck between encoder and dense layer.

DrQ (Kostrikov, Yarats & Fergus 2021) defaults: 84x84 camera-0 frames, 3-frame stack, per-task
action repeat with summed rewards, random shift (pad 4) with two augmented views for the target
and the loss (K = M = 2), shared 4-conv encoder trained by the critic only, twin critics, auto
temperature. `--pool flatten|avg|max` replaces DrQ's flatten before the Linear(50) -> LayerNorm ->
tanh projection, so that "global average pooling lets pixel RL scale" (Sokar & Castro 2025, "Mind
the GAP", SAC on DMC) can be tested. `--preset dopamine` is Dopamine's SAC from pixels
(labs/sac_from_pixels/sac_pixels.gin, jax/agents/sac/sac_agent.py): no augmentation, SAME-padded convs
(42x42x32 at 84), actor, temperature and targets updated every step in one combined loss, alpha from 1
with its loss on log alpha, target entropy -|A|/2, 10k random steps, a target actor whose mean action
the target critic rates, an unbounded log std, orthogonal / glorot weights. Still ours in that preset:
a 100k replay (Dopamine: 1M).
Step counts are agent steps: DrQ's "100k steps" are 100k environment frames = 100k / action repeat.
"""

import argparse
import copy
import ctypes
import ctypes.util
import glob
import itertools
import math
import os
import shutil
import tempfile
from dataclasses import dataclass

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import utils

SCRIPT = os.path.basename(__file__)
ARCHITECTURE_FLAGS = ("env_id", "pool", "width", "dense_scale", "resolution", "frame_stack", "feature_dim", "hidden_dim",
                      "padding")
# Flags of this script that do not change what is trained (bookkeeping, speed switches): --resume auto ignores them
RUN_NEUTRAL_FLAGS = utils.RUN_NEUTRAL_FLAGS | {"save_buffer", "log_every", "channels_last", "overlap_envs"}


# Args
@dataclass
class Args(utils.RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    preset: str = "drq"
    """`drq` (DrQ, Kostrikov et al. 2021) or `dopamine` (Dopamine's sac_pixels.gin); explicit flags override it"""

    # Environment (EnvPool DeepMind Control pixels, DrQ's protocol)
    env_id: str = "cheetah-run"
    """the DMC task as `domain-task` (`cheetah-run`, `walker-walk`, `ball_in_cup-catch`, ...)"""
    total_timesteps: int = 100_000
    """total agent steps, summed over environments (environment frames = steps x action repeat)"""
    num_envs: int = 1
    """parallel EnvPool environments (DrQ: 1); each collected transition earns `update_to_data` updates"""
    resolution: int = 84
    """square side of the frames EnvPool renders (DrQ: 84)"""
    frame_stack: int = 3
    """frames stacked into one observation (DrQ: 3)"""
    action_repeat: int = 0
    """control steps per agent step, rewards summed; 0: DrQ's per-task value (cartpole 8, finger/walker 2, others 4)"""
    cheap_visuals_for_tests: bool = False
    """TESTS / CPU SMOKE RUNS ONLY: no shadows or anti-aliasing (5-15x faster, other pictures); never report its results"""

    # Network
    pool: str = "flatten"
    """what joins the encoder to the dense layer: `flatten`, `avg` (global average pooling) or `max`"""
    width: int = 1
    """multiplies every encoder channel count (the papers' τ)"""
    padding: str = "valid"
    """padding of the 4 convs: `valid` (DrQ: 84 -> 35x35) or `same` (Dopamine's Flax convs: 84 -> 42x42)"""
    dense_scale: int = 1
    """multiplies the width of the dense layer after the bottleneck"""
    feature_dim: int = 50
    """width of the dense layer after the bottleneck at --dense-scale 1 (DrQ: 50)"""
    hidden_dim: int = 1024
    """width of the two hidden layers of the actor and of each critic (DrQ: 1024)"""

    # SAC (DrQ's defaults)
    learning_rate: float = 1e-3
    """Adam learning rate of actor, critic and temperature (DrQ: 1e-3)"""
    buffer_size: int = 100_000
    """replay capacity in transitions (DrQ: 100k)"""
    batch_size: int = 512
    """transitions per gradient update (DrQ paper: 512; its config file: 128)"""
    gamma: float = 0.99
    """the discount factor per agent step"""
    reward_scale: float = 1.0
    """multiplies the rewards the critic learns from (DrQ: 1; Dopamine's SAC from pixels: 0.1); logged returns stay raw"""
    tau: float = 0.01
    """target network update rate (CleanRL's tau; the papers' τ is --width); DrQ: 0.01, Dopamine: 0.005"""
    init_temperature: float = 0.1
    """initial entropy temperature alpha (DrQ: 0.1; Dopamine: 1)"""
    target_entropy_scale: float = 1.0
    """target entropy = -target_entropy_scale x |A| (DrQ: 1; Dopamine: 0.5)"""
    alpha_loss_on: str = "alpha"
    """the temperature loss: `alpha` (DrQ) or `log_alpha` (Dopamine, Haarnoja et al. 2018) x (-log pi - target entropy)"""
    combined_loss: bool = False
    """if toggled, Dopamine's single update: 0.5 x critic loss + actor loss + temperature loss, from the same weights"""
    learning_starts: int = 1000
    """agent steps of uniformly random actions before learning starts (DrQ: 1000 seed steps)"""
    update_to_data: int = 1
    """gradient updates per collected transition (DrQ: 1)"""
    actor_update_frequency: int = 2
    """gradient updates between actor and temperature updates (DrQ: 2)"""
    target_update_frequency: int = 2
    """gradient updates between target critic EMA updates (DrQ: 2)"""
    log_std_min: float = -10.0
    """lower bound of the actor's log standard deviation (DrQ: -10)"""
    log_std_max: float = 2.0
    """upper bound of the actor's log standard deviation (DrQ: 2)"""
    bound_log_std: bool = True
    """if toggled, squash the actor's log std into [log_std_min, log_std_max] by tanh (DrQ); off: Dopamine's unbounded exp"""
    target_next_action: str = "online_sample"
    """the target's next action: `online_sample` (DrQ: a' ~ online actor) or `target_mean` (Dopamine, see critic_loss)"""
    init: str = "drq"
    """initial weights: `drq` (orthogonal, ReLU gain in convs) or `dopamine` (orthogonal encoder, glorot_uniform MLPs)"""
    augment: bool = True
    """if toggled, random-shift augmentation with two views (DrQ K=M=2); --no-augment: plain SAC from pixels"""
    image_pad: int = 4
    """random shift: pad each side by this many replicated pixels, then crop back (DrQ: 4)"""

    # Evaluation, checkpoints and diagnostics (x axis: agent steps)
    eval_every: int = 5_000
    """agent steps between evaluations (DrQ: 5000; one more runs at the end); 0 evaluates only at the end"""
    eval_episodes: int = 10
    """episodes per evaluation with the mean action, one per evaluation environment (DrQ: 10)"""
    save_every: int = 50_000
    """agent steps between checkpoints; 0 saves only `final.pt`"""
    save_buffer: bool = True
    """the newest checkpoint's replay is saved beside it (checkpoints/replay.pt, about buffer_size x 12 x resolution^2
    bytes), so a resumed run does not repeat its warm-up; --no-save-buffer saves disk"""
    diag_every: int = 10_000
    """agent steps between diagnostics (dormant neurons, feature norm, saliency); 0 turns them off"""
    log_every: int = 1000
    """agent steps between logs of losses and SPS (each costs one host sync)"""

    # Speed switches (issue 13): each acts only with CUDA; on a CPU the run is the same with or without them
    bf16: bool = False
    """bfloat16 autocast in the update; losses, soft Q targets, log-probs and temperature stay float32 (CUDA only).
    Off by default: no reference codebase uses it, and it moves gradients (~1 % an update, CPU proxy); --bf16 turns it on"""
    channels_last: bool = True
    """channels-last memory format for the encoders and the update's observation batches (CUDA only)"""
    overlap_envs: bool = True
    """the environment steps while the GPU updates: each step's updates run during the next environment step, whose
    action is chosen before them (CUDA only)"""


PRESETS = {
    "drq": {},  # the defaults above: DrQ
    "dopamine": dict(  # dopamine/labs/sac_from_pixels/sac_pixels.gin and dopamine/jax/agents/sac/sac_agent.py
        learning_rate=3e-4, batch_size=256, tau=0.005, reward_scale=0.1, action_repeat=4, augment=False,
        learning_starts=10_000,  # min_replay_history: uniformly random actions until then
        actor_update_frequency=1, target_update_frequency=1,  # update_period 1, soft target update every training step
        init_temperature=1.0, target_entropy_scale=0.5, alpha_loss_on="log_alpha",  # log_alpha = 0; target_entropy None
        combined_loss=True, padding="same",  # 0.5 * critic + policy + alpha loss; Flax's default SAME padding
        target_next_action="target_mean", bound_log_std=False, init="dopamine",  # sac_agent.py train(); continuous_networks.py
    ),
}

# The valid range of every numeric flag (utils.check_ranges), checked before any work
FLAG_RANGES = {
    "seed": "[0, 4294967295]", "total_timesteps": "[1, inf)", "num_envs": "[1, inf)",
    "resolution": "[1, 2048]",  # 2048: the largest size tested; check_args refuses a frame too small for the encoder
    "frame_stack": "[1, inf)", "action_repeat": "[0, inf)",
    "width": "[1, inf)", "dense_scale": "[1, inf)", "feature_dim": "[1, inf)", "hidden_dim": "[1, inf)",
    "learning_rate": "(0, inf)", "buffer_size": "[1, inf)", "batch_size": "[1, inf)", "gamma": "[0, 1]",
    "reward_scale": "(0, inf)", "tau": "(0, 1]", "init_temperature": "(0, inf)", "target_entropy_scale": "(0, inf)",
    "learning_starts": "[0, inf)", "update_to_data": "[1, inf)", "actor_update_frequency": "[1, inf)",
    "target_update_frequency": "[1, inf)", "log_std_min": "(-inf, inf)", "log_std_max": "(-inf, inf)", "image_pad": "[0, inf)",
    "eval_every": "[0, inf)", "eval_episodes": "[1, inf)", "save_every": "[0, inf)", "diag_every": "[0, inf)",
    "diag_batch_size": "[1, inf)", "dormant_threshold": "[0, 1]", "log_every": "[1, inf)", "torch_threads": "[0, inf)",
    "keep_checkpoints": "[1, inf)",
}

def parse_args() -> Args:
    """Read `--preset` first, then parse every flag with that preset's values as the defaults."""
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default="drq")
    preset = preset_parser.parse_known_args()[0].preset
    utils.check_choice("preset", preset, tuple(PRESETS))
    return tyro.cli(Args, default=Args(preset=preset, **PRESETS[preset]))

# Network: per-head bottleneck (pool + Linear -> LayerNorm -> tanh) on a shared encoder (4 convs) -> actor / twin critics
def pool_features(feature_map: torch.Tensor, pool: str) -> torch.Tensor:
    """The join between encoder and dense layer, the papers' subject: (B, C, H, W) -> (B, C*H*W) for flatten,
    (B, C) for global average pooling (avg: GAP, Impoola) or global max pooling (max)."""
    if pool == "flatten":
        return feature_map.flatten(1)
    if pool == "avg":
        return feature_map.mean(dim=(2, 3))
    return feature_map.amax(dim=(2, 3))

def pooled_size(channels: int, side: int, pool: str) -> int:
    """Features after the join: C*H*W for flatten (the dense layer then grows with R^2), C for global pooling."""
    return channels * side * side if pool == "flatten" else channels

class Bottleneck(nn.Module):
    """The join and the dense layer after it, dense(pool_features(feature map)): the weights that grow with the
    feature map under flatten and stay C x dense under GAP. `diag/params/bottleneck` counts them."""

    def __init__(self, pool: str, dense: nn.Module):
        super().__init__()
        self.pool, self.dense = pool, dense

    def forward(self, feature_map):
        return self.dense(pool_features(feature_map, self.pool))

def feature_map_shape(encoder: nn.Module, in_channels: int, resolution: int) -> tuple:
    """(channels, side) of the encoder's feature map for one R x R frame, traced on the meta device (shapes
    only, no compute); (0, 0) when the frame is too small for the encoder's kernels."""
    frame = torch.zeros(1, in_channels, resolution, resolution, device="meta")
    try:
        shape = copy.deepcopy(encoder).to("meta")(frame).shape
    except RuntimeError:  # a kernel larger than its padded input
        return 0, 0
    return shape[1], shape[2]

class SamePad2d(nn.Module):
    """TensorFlow / Flax SAME padding for a (kernel, stride) conv: output side ceil(side / stride), the odd pixel after."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def pads(self, x) -> list:
        """F.pad's (left, right, top, bottom) for x: max((ceil(side / stride) - 1) x stride + kernel - side, 0) per axis."""
        pads = []
        for side in (x.shape[-1], x.shape[-2]):  # F.pad takes the last axis first
            total = max((math.ceil(side / self.stride) - 1) * self.stride + self.kernel - side, 0)
            pads += [total // 2, total - total // 2]
        return pads

    def forward(self, x):
        return F.pad(x, self.pads(x))

class Encoder(nn.Module):
    """DrQ's conv trunk: four 3x3 convs (strides 2, 1, 1, 1, 32 x width channels, ReLUs) on frames scaled to [0, 1];
    returns the feature map: 35x35 at 84 with VALID padding (DrQ), 42x42 with SAME (Dopamine's Flax convs)."""

    def __init__(self, in_channels: int, width: int, padding: str = "valid"):
        super().__init__()
        channels, layers = 32 * width, []
        for index, stride in enumerate((2, 1, 1, 1)):
            if padding == "same":
                layers.append(SamePad2d(3, stride))
            layers += [nn.Conv2d(in_channels if index == 0 else channels, channels, 3, stride=stride), nn.ReLU()]
        self.convs = nn.Sequential(*layers)

    def forward(self, obs):
        return self.convs(obs.float() / 255.0)


def bottleneck(pool: str, in_features: int, feature_dim: int) -> Bottleneck:
    """DrQ's per-head join and dense layer: pool -> Linear -> LayerNorm -> tanh (H*W*C*dim weights with flatten)."""
    return Bottleneck(pool, nn.Sequential(nn.Linear(in_features, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh()))


def mlp(in_features: int, hidden_dim: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, out_features))


class Critic(nn.Module):
    """Twin Q(s, a) on the encoder's feature map, with the critic's own bottleneck before the two heads (DrQ)."""

    def __init__(self, pool: str, in_features: int, feature_dim: int, hidden_dim: int, action_dim: int):
        super().__init__()
        self.bottleneck = bottleneck(pool, in_features, feature_dim)
        self.q1 = mlp(feature_dim + action_dim, hidden_dim, 1)
        self.q2 = mlp(feature_dim + action_dim, hidden_dim, 1)

    def forward(self, feature_map, actions):
        latent_actions = torch.cat([self.bottleneck(feature_map), actions], dim=1)
        return self.q1(latent_actions).squeeze(1).float(), self.q2(latent_actions).squeeze(1).float()  # float32 under bf16


class Actor(nn.Module):
    """Tanh-squashed diagonal Gaussian on the encoder's feature map, with the actor's own bottleneck; log std
    squashed into [log_std_min, log_std_max] (DrQ), or unbounded with `log_std_bounds` None (Dopamine's
    `scale_diag = exp(raw)`)."""

    def __init__(self, pool: str, in_features: int, feature_dim: int, hidden_dim: int, action_dim: int, log_std_bounds):
        super().__init__()
        self.bottleneck = bottleneck(pool, in_features, feature_dim)
        self.trunk = mlp(feature_dim, hidden_dim, 2 * action_dim)
        self.log_std_bounds = log_std_bounds

    def forward(self, feature_map):
        mean, log_std = self.trunk(self.bottleneck(feature_map)).float().chunk(2, dim=1)  # float32 under bf16
        if self.log_std_bounds is not None:
            low, high = self.log_std_bounds
            log_std = low + 0.5 * (high - low) * (torch.tanh(log_std) + 1)
        return mean, log_std


def init_weights(module):
    """DrQ: orthogonal weights (ReLU gain for convs), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.orthogonal_(module.weight, nn.init.calculate_gain("relu"))
        nn.init.zeros_(module.bias)


def dopamine_init_weights(encoder, actor, critic):
    """Dopamine's SAC from pixels: orthogonal (gain 1) convs and encoder dense layers
    (labs/sac_from_pixels/continuous_networks.py), glorot_uniform actor and critic MLPs
    (jax/continuous_networks.py), zero biases, LayerNorm at scale 1 and offset 0."""
    for network in (encoder, actor.bottleneck, critic.bottleneck):
        for module in network.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(module.weight)
                nn.init.zeros_(module.bias)
    for network in (actor.trunk, critic.q1, critic.q2):
        for module in network.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)


def make_networks(args, in_channels: int, action_dim: int, device, memory_format=torch.contiguous_format):
    """The encoder (its convs' weights in `memory_format`), actor and critic, with DrQ's or Dopamine's initial weights
    (--init)."""
    encoder = Encoder(in_channels, args.width, args.padding).to(device)
    in_features = pooled_size(*feature_map_shape(encoder, in_channels, args.resolution), args.pool)
    feature_dim = args.feature_dim * args.dense_scale
    log_std_bounds = (args.log_std_min, args.log_std_max) if args.bound_log_std else None
    actor = Actor(args.pool, in_features, feature_dim, args.hidden_dim, action_dim, log_std_bounds).to(device)
    critic = Critic(args.pool, in_features, feature_dim, args.hidden_dim, action_dim).to(device)
    for network in (encoder, actor, critic):
        network.apply(init_weights)
    if args.init == "dopamine":
        dopamine_init_weights(encoder, actor, critic)
    return encoder.to(memory_format=memory_format), actor, critic


# Algorithm: SAC (Haarnoja et al. 2018) as DrQ uses it, and Dopamine's combined update
def squashed_gaussian_log_prob(pre_tanh, mean, log_std):
    """log pi(tanh(u)) for u ~ N(mean, exp(log_std)), summed over action dimensions.

    Change of variables: log N(u) - sum log(1 - tanh(u)^2), with the stable form
    log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)).
    """
    gaussian = -0.5 * ((pre_tanh - mean) / log_std.exp()) ** 2 - log_std - 0.5 * np.log(2 * np.pi)
    log_det_jacobian = 2.0 * (np.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (gaussian - log_det_jacobian).sum(dim=1)


def sample_action(mean, log_std):
    """Reparameterised sample a = tanh(mean + std * eps) and its log-probability."""
    pre_tanh = mean + log_std.exp() * torch.randn_like(mean)
    return torch.tanh(pre_tanh), squashed_gaussian_log_prob(pre_tanh, mean, log_std)


def soft_q_target(rewards, terminated, next_q1, next_q2, next_log_prob, alpha, gamma: float):
    """r + gamma (1 - terminated) (min_i Q'_i(s', a') - alpha log pi(a'|s')); a time limit is not terminal."""
    next_value = torch.min(next_q1, next_q2) - alpha * next_log_prob
    return rewards + gamma * (1.0 - terminated) * next_value


def critic_loss(encoder, actor, critic, target_encoder, target_critic, log_alpha, batch: dict, views: int, gamma: float,
                target_actor=None):
    """DrQ's critic loss: the soft Q target averaged over `views` augmented next observations (K),
    the squared errors of both critics summed over `views` augmented observations (M).

    The target's next action a' ~ pi(s') of the online actor (DrQ), or with `target_actor` Dopamine's
    (sac_agent.py, `network_def.apply(target_params, next_state, rng, True)`): the target network's
    actor on the target encoder, the target critic at its MEAN action tanh(mu), minus alpha times the
    log-probability of a SAMPLED action. `batch` holds the views concatenated along the batch
    dimension. Returns (loss, Q1(s, a), Q2(s, a)).
    """
    with torch.no_grad():
        if target_actor is None:
            next_mean, next_log_std = actor(encoder(batch["next_observations"]))
            next_actions, next_log_prob = sample_action(next_mean, next_log_std)
            next_q1, next_q2 = target_critic(target_encoder(batch["next_observations"]), next_actions)
        else:
            next_features = target_encoder(batch["next_observations"])
            next_mean, next_log_std = target_actor(next_features)
            next_log_prob = sample_action(next_mean, next_log_std)[1]
            next_q1, next_q2 = target_critic(next_features, torch.tanh(next_mean))
        targets = soft_q_target(batch["rewards"], batch["terminated"], next_q1, next_q2, next_log_prob, log_alpha.exp(), gamma)
        targets = targets.view(views, -1).mean(dim=0).repeat(views)
    q1, q2 = critic(encoder(batch["observations"]), batch["actions"])
    return views * (F.mse_loss(q1, targets) + F.mse_loss(q2, targets)), q1, q2


def actor_and_temperature_losses(encoder, actor, critic, log_alpha, observations, target_entropy: float,
                                 alpha_loss_on: str = "alpha"):
    """Actor loss alpha log pi - min Q on features detached from the encoder (only the critic trains
    the convs, DrQ), and the temperature loss."""
    with torch.no_grad():
        features = encoder(observations)
    mean, log_std = actor(features)
    actions, log_prob = sample_action(mean, log_std)
    q1, q2 = critic(features, actions)
    actor_loss = (log_alpha.exp().detach() * log_prob - torch.min(q1, q2)).mean()
    return actor_loss, temperature_loss(log_alpha, log_prob, target_entropy, alpha_loss_on)


def temperature_loss(log_alpha, log_prob, target_entropy: float, alpha_loss_on: str = "alpha"):
    """DrQ's alpha * (-log pi - target entropy), or Dopamine's log alpha * (...): alpha grows while the
    entropy is below its target. Both move log alpha the same way; DrQ's step is alpha times larger."""
    multiplier = log_alpha.exp() if alpha_loss_on == "alpha" else log_alpha
    return (multiplier * (-log_prob - target_entropy).detach()).mean()


def combined_step(qf_loss, actor_loss, alpha_loss, critic_optimizer, actor_optimizer, alpha_optimizer):
    """Dopamine's SAC step: 0.5 x critic loss + actor loss + temperature loss, every gradient from the
    same weights, the critic frozen inside the actor loss (its `frozen_params`). The three Adams hold
    disjoint parameters with equal settings, so they step exactly as Dopamine's network optimiser and
    its separate one for log alpha."""
    optimizers = (critic_optimizer, actor_optimizer, alpha_optimizer)
    for optimizer in optimizers:
        optimizer.zero_grad()
    (actor_loss + alpha_loss).backward()
    critic_optimizer.zero_grad()  # drop what the actor loss sent into the critic
    (0.5 * qf_loss).backward()  # "a smaller weight to the critic empirically gives better results" (sac_agent.py)
    for optimizer in optimizers:
        optimizer.step()


@torch.no_grad()
def soft_update(targets, onlines, rate: float):
    """Move every weight of the target networks by `rate` of its distance to the online network's weight (an
    exponential moving average), all in one fused op."""
    target_params = [param for target in targets for param in target.parameters()]
    torch._foreach_lerp_(target_params, [param for online in onlines for param in online.parameters()], rate)


@torch.no_grad()
def select_actions(encoder, actor, obs, action_dim: int, random: bool):
    """Uniformly random actions in [-1, 1] (DrQ's seed steps), else a sample of the policy."""
    if random:
        return torch.rand((len(obs), action_dim), device=obs.device) * 2 - 1
    return sample_action(*actor(encoder(obs)))[0]


def make_learner(args, encoder, actor, critic, device):
    """The networks, their targets (Dopamine's with an actor) and the three Adams by name, and log alpha."""
    log_alpha = torch.tensor(np.log(args.init_temperature), dtype=torch.float32, device=device, requires_grad=True)
    parts = {"encoder": encoder, "actor": actor, "critic": critic, "target_encoder": copy.deepcopy(encoder),
             "target_critic": copy.deepcopy(critic),
             "critic_optimizer": torch.optim.Adam([*encoder.parameters(), *critic.parameters()], lr=args.learning_rate),
             "actor_optimizer": torch.optim.Adam(actor.parameters(), lr=args.learning_rate),
             "alpha_optimizer": torch.optim.Adam([log_alpha], lr=args.learning_rate)}
    if args.target_next_action == "target_mean":  # Dopamine's target network has an actor too
        parts["target_actor"] = copy.deepcopy(actor)
    return parts, log_alpha


def load_learner(checkpoint: dict, parts: dict, log_alpha) -> int:
    """make_learner's networks, optimisers and log alpha as a checkpoint holds them, in place; returns its update count.
    A target actor the checkpoint lacks (it was trained with --target-next-action online_sample) starts as a copy of its
    actor, and one line says so."""
    for name, part in parts.items():
        if name == "target_actor" and name not in checkpoint:
            utils.echo("the checkpoint has no target actor (--target-next-action online_sample): it starts as the actor")
        part.load_state_dict(checkpoint.get(name, checkpoint["actor"]))
    log_alpha.data.copy_(checkpoint["log_alpha"])
    return checkpoint["update_count"]


def learner_step(parts: dict, log_alpha, batch: dict, update_count: int, losses, args, views: int) -> dict:
    """Gradient update number `update_count` on `batch`: DrQ's critic step, then the actor and temperature every
    --actor-update-frequency updates; or Dopamine's one step on all three losses (--combined-loss); then the target update
    every --target-update-frequency updates. `parts`: make_learner's networks and optimisers, `losses` the loss functions
    as main() runs them (compiled with --compile, inside the mixed-precision context with --bf16). Returns the detached
    losses of what was updated."""
    compute_critic_loss, compute_actor_losses = losses
    target_entropy = -args.target_entropy_scale * batch["actions"].shape[1]  # DrQ -|A|, Dopamine -|A|/2
    encoder, actor, critic, target_encoder, target_critic, critic_optimizer, actor_optimizer, alpha_optimizer = (
        parts[name] for name in ("encoder", "actor", "critic", "target_encoder", "target_critic", "critic_optimizer",
                                 "actor_optimizer", "alpha_optimizer"))
    target_actor = parts.get("target_actor")  # Dopamine's target network has an actor too
    qf_loss, q1, q2 = compute_critic_loss(encoder, actor, critic, target_encoder, target_critic, log_alpha, batch, views,
                                          args.gamma, target_actor)
    updated = {"qf_loss": qf_loss.detach(), "qf1_values": q1.detach().mean(), "qf2_values": q2.detach().mean()}
    if args.combined_loss:  # Dopamine: one step on all three losses, from the same weights
        actor_loss, alpha_loss = compute_actor_losses(encoder, actor, critic, log_alpha, batch["observations"],
                                                      target_entropy, args.alpha_loss_on)
        combined_step(qf_loss, actor_loss, alpha_loss, critic_optimizer, actor_optimizer, alpha_optimizer)
        updated.update(actor_loss=actor_loss.detach(), alpha_loss=alpha_loss.detach())
    else:  # DrQ: the critic, then the actor and temperature on the critic just updated
        critic_optimizer.zero_grad()
        qf_loss.backward()
        critic_optimizer.step()
        if update_count % args.actor_update_frequency == 0:
            observations = batch["observations"][: args.batch_size]  # the first augmented view, as DrQ
            actor_loss, alpha_loss = compute_actor_losses(encoder, actor, critic, log_alpha, observations, target_entropy,
                                                          args.alpha_loss_on)
            actor_optimizer.zero_grad()
            alpha_optimizer.zero_grad()
            (actor_loss + alpha_loss).backward()  # disjoint gradients: each loss detaches the other's input
            actor_optimizer.step()
            alpha_optimizer.step()
            updated.update(actor_loss=actor_loss.detach(), alpha_loss=alpha_loss.detach())
    if update_count % args.target_update_frequency == 0:
        targets, onlines = [target_encoder, target_critic], [encoder, critic]
        if target_actor is not None:
            targets, onlines = targets + [target_actor], onlines + [actor]
        soft_update(targets, onlines, args.tau)
    return updated


def speed_switches(args, device):
    """(bf16, memory format, overlap_envs) as --bf16, --channels-last and --overlap-envs apply: only with CUDA (on a
    CPU the run is the plain one)."""
    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda and args.channels_last else torch.contiguous_format
    return cuda and args.bf16, memory_format, cuda and args.overlap_envs


# Storage: the replay, uint8 on the training device; a transition stores o_t and only the newest frame of o_{t+1}
def replay_bytes(capacity: int, obs_channels: int, resolution: int) -> int:
    """The replay's frames: each transition's stack and the newest frame of the next one."""
    return capacity * (obs_channels + 3) * resolution**2


def make_replay(capacity: int, obs_shape, action_dim: int, device) -> dict:
    """o_{t+1} is o_t's stack shifted by one frame plus its newest frame, so storing that frame alone
    is exact and saves a third of DrQ's memory (which stores both stacks)."""
    channels, height, width = obs_shape
    frame_channels = 3
    return {
        "observations": torch.zeros((capacity, channels, height, width), dtype=torch.uint8, device=device),
        "next_frames": torch.zeros((capacity, frame_channels, height, width), dtype=torch.uint8, device=device),
        "actions": torch.zeros((capacity, action_dim), dtype=torch.float32, device=device),
        "rewards": torch.zeros(capacity, dtype=torch.float32, device=device),
        "terminated": torch.zeros(capacity, dtype=torch.float32, device=device),
    }


def add_transitions(replay: dict, position: int, observations, actions, rewards, next_observations, terminated) -> int:
    """Write n transitions at the circular position; returns the next position."""
    capacity = replay["rewards"].shape[0]
    index = (position + torch.arange(len(observations), device=observations.device)) % capacity
    replay["observations"][index] = observations
    replay["next_frames"][index] = next_observations[:, -3:]
    replay["actions"][index] = actions
    replay["rewards"][index] = rewards
    replay["terminated"][index] = terminated
    return (position + len(observations)) % capacity


def random_shift(obs, pad: int):
    """DrQ's augmentation: replicate-pad by `pad`, crop back at a random integer offset per image.

    Implemented by clamped indexing (identical to pad + crop), so frames stay uint8 on the device.
    """
    batch, channels, height, width = obs.shape
    shifts = torch.randint(-pad, pad + 1, (batch, 2), device=obs.device)
    rows = (torch.arange(height, device=obs.device) + shifts[:, :1]).clamp(0, height - 1)
    cols = (torch.arange(width, device=obs.device) + shifts[:, 1:]).clamp(0, width - 1)
    batch_index = torch.arange(batch, device=obs.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=obs.device)[None, :, None, None]
    return obs[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def sample_batch(replay: dict, size: int, batch_size: int, views: int, pad: int, memory_format=torch.contiguous_format):
    """Uniform indices drawn on the device; with `views` > 1, each view is an independent random shift; the
    observations in `memory_format`."""
    index = torch.randint(size, (batch_size,), device=replay["rewards"].device)
    observations = replay["observations"][index]
    next_observations = torch.cat([observations[:, 3:], replay["next_frames"][index]], dim=1)
    if views > 1:
        observations = torch.cat([random_shift(observations, pad) for _ in range(views)])
        next_observations = torch.cat([random_shift(next_observations, pad) for _ in range(views)])
    return {
        "observations": observations.contiguous(memory_format=memory_format),
        "next_observations": next_observations.contiguous(memory_format=memory_format),
        "actions": replay["actions"][index].repeat(views, 1),
        "rewards": replay["rewards"][index].repeat(views),
        "terminated": replay["terminated"][index].repeat(views),
    }


def recent_observations(replay: dict, position: int, size: int, count: int):
    index = (position - 1 - torch.arange(min(count, size), device=replay["rewards"].device)) % replay["rewards"].shape[0]
    return replay["observations"][index]


def load_resumed_replay(checkpoint_file: str, step: int, buffer_size: int, device):
    """(replay, position, size) saved beside the checkpoint of `step`, on `device`; None when that checkpoint has none
    (the run fills its replay again). A replay of another --buffer-size is refused."""
    saved = utils.load_replay(checkpoint_file, step)
    if saved is None:
        return None
    if len(saved["replay"]["rewards"]) != buffer_size:
        utils.fail(f"--buffer-size {buffer_size} differs from the {len(saved['replay']['rewards'])} transitions "
                   f"of the replay saved in {checkpoint_file}; resume with that --buffer-size")
    return {key: value.to(device) for key, value in saved["replay"].items()}, saved["replay_position"], saved["replay_size"]


# Environment: EnvPool's DMC pixels with DrQ's action repeat (a state-only twin sums the rewards)
DMC_TASKS = {  # --env-id: (EnvPool id, default action repeat, camera)
    # the PlaNet benchmark with DrQ's action repeats
    "cartpole-swingup": ("CartpoleSwingup-v1", 8, 0),
    "reacher-easy": ("ReacherEasy-v1", 4, 0),
    "cheetah-run": ("CheetahRun-v1", 4, 0),
    "finger-spin": ("FingerSpin-v1", 2, 0),
    "walker-walk": ("WalkerWalk-v1", 2, 0),
    "ball_in_cup-catch": ("BallInCupCatch-v1", 4, 0),
    # more tasks, action repeat 2 as DrQ-v2 uses everywhere; quadruped seen by camera 2 (Dreamer, DrQ)
    "cartpole-balance": ("CartpoleBalance-v1", 2, 0),
    "reacher-hard": ("ReacherHard-v1", 2, 0),
    "finger-turn_easy": ("FingerTurnEasy-v1", 2, 0),
    "finger-turn_hard": ("FingerTurnHard-v1", 2, 0),
    "walker-stand": ("WalkerStand-v1", 2, 0),
    "walker-run": ("WalkerRun-v1", 2, 0),
    "hopper-stand": ("HopperStand-v1", 2, 0),
    "hopper-hop": ("HopperHop-v1", 2, 0),
    "pendulum-swingup": ("PendulumSwingup-v1", 2, 0),
    "acrobot-swingup": ("AcrobotSwingup-v1", 2, 0),
    "quadruped-walk": ("QuadrupedWalk-v1", 2, 2),
    "quadruped-run": ("QuadrupedRun-v1", 2, 2),
}


CONTROL_STEPS_PER_EPISODE = 1000  # every DMC task above ends by its time limit after 1000 control steps


def make_egl_visible():
    """Let MuJoCo inside EnvPool find EGL, or stop with one line before any work.

    EnvPool renders DMC pixels through EGL only (`MUJOCO_GL` is ignored). Its wheel ships libEGL
    under a renamed file that MuJoCo's loader cannot find by name, and a failed load kills the
    process ("gladLoadGL error", uncatchable). Loading a libEGL with RTLD_GLOBAL first fixes that;
    nothing is done when EGL is already visible (a GPU driver loaded it, or LD_PRELOAD).
    """
    if hasattr(ctypes.CDLL(None), "eglGetProcAddress"):
        return
    wheel_libs = os.path.join(os.path.dirname(os.path.dirname(envpool.__file__)), "envpool.libs")
    candidates = sorted(glob.glob(os.path.join(wheel_libs, "libEGL*.so*"))) + [ctypes.util.find_library("EGL")]
    vendors = glob.glob("/usr/share/glvnd/egl_vendor.d/*.json") + glob.glob("/etc/glvnd/egl_vendor.d/*.json")
    for path in filter(None, candidates):
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        if vendors or os.environ.get("__EGL_VENDOR_LIBRARY_FILENAMES"):
            return
    utils.fail("DMC pixels need EGL: no libEGL or no EGL driver found (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri, "
               "installed by install.sh; or a GPU driver)")


def cheap_visuals_assets(directory: str) -> str:
    """A copy of EnvPool's DMC assets with shadows and 4x anti-aliasing off, for tests on a CPU only.

    Physics and rewards are unchanged, the pictures are not the benchmark's. Returns the `base_path`.
    """
    from envpool.mujoco.dmc.registration import _DMC_BASE_PATH

    target = os.path.join(directory, "mujoco", "assets_dmc")
    shutil.copytree(os.path.join(_DMC_BASE_PATH, "mujoco", "assets_dmc"), target, ignore=shutil.ignore_patterns("dog*"))
    visual = os.path.join(target, "common", "visual.xml")
    with open(visual) as f:
        text = f.read()
    with open(visual, "w") as f:
        f.write(text.replace('<quality shadowsize="2048"/>', '<quality shadowsize="0" offsamples="0"/>'))
    return directory


def make_env(args, num_envs: int, seed: int, base_path: str = ""):
    """A pixel env for observations and a state-only twin for DrQ's rewards.

    DrQ's action repeat runs k control steps, SUMS their rewards and ends the episode after 1000/k
    agent steps. EnvPool's `frame_skip=k` does the k steps in C++ and renders once, but returns the
    LAST control step's reward. The twin (same task, same seeds, same actions, frame_skip 1, no
    rendering) steps the same physics one control step at a time; its k rewards are summed.
    Rendering k times instead (frame_skip 1 on the pixel env) would cost k x the renders.
    """
    task_id, _, camera = DMC_TASKS[args.env_id]
    common = dict(env_type="gymnasium", num_envs=num_envs, seed=seed, **({"base_path": base_path} if base_path else {}))
    pixel_env = envpool.make(
        task_id, from_pixels=True, render_width=args.resolution, render_height=args.resolution,
        render_camera_id=camera,  # the default -1 is a free camera, not dm_control's camera 0
        frame_skip=args.action_repeat, max_episode_steps=CONTROL_STEPS_PER_EPISODE // args.action_repeat,
        frame_stack=args.frame_stack, **common,
    )
    reward_env = envpool.make(task_id, frame_skip=1, max_episode_steps=CONTROL_STEPS_PER_EPISODE, **common)
    return pixel_env, reward_env


def make_envs(args, seed: int):
    """The training env and the evaluation env (one environment per evaluation episode); the test-only cheap
    visuals' assets (a warning line says they are on) are read when an env is made, so their temporary copy can go
    right after."""
    if args.cheap_visuals_for_tests:
        utils.echo("warning: --cheap-visuals-for-tests: no shadows or anti-aliasing, not the benchmark's pictures")
    with tempfile.TemporaryDirectory() as assets:
        base_path = cheap_visuals_assets(assets) if args.cheap_visuals_for_tests else ""
        return make_env(args, args.num_envs, seed, base_path), make_env(args, args.eval_episodes, seed + 1_000_000, base_path)


def reset_env(env):
    pixel_env, reward_env = env
    reward_env.reset()
    return pixel_env.reset()[0]


def send_actions(env, actions):
    """Start one agent step and return at once: the pixel env's step and the twin's first control step run in
    EnvPool's threads until `receive_step`."""
    pixel_env, reward_env = env
    pixel_env.send(actions)
    reward_env.send(actions)


def receive_step(env, actions, action_repeat: int):
    """Wait for the agent step that `send_actions` started: (obs, summed reward, terminated, truncated, auto_reset).

    `auto_reset` marks EnvPool's reset step after an episode end (its action is ignored and the
    observation is the new episode's first): never a transition. Every task here ends by time
    limit, so all environments reset together; the twin's last control-step reward must equal the
    pixel env's reward, which checks on every step that both simulate the same physics.
    """
    pixel_env, reward_env = env
    obs, last_reward, terminated, truncated, info = pixel_env.recv()
    control_reward = reward_env.recv()[1]  # the twin's reset step, or its first control step
    auto_reset = info["elapsed_step"] == 0
    rewards = np.zeros(len(obs))
    if auto_reset.any() and not auto_reset.all():
        raise RuntimeError("environments reset at different steps: the reward twin cannot follow them")
    if not auto_reset.any():
        rewards += control_reward
        for _ in range(action_repeat - 1):
            control_reward = reward_env.step(actions)[1]
            rewards += control_reward
        if not np.allclose(control_reward, last_reward, rtol=1e-4, atol=1e-6):
            raise RuntimeError("the pixel env and its reward twin diverged")
    return obs, rewards, terminated, truncated, auto_reset


def step_env(env, actions, action_repeat: int):
    """One agent step with DrQ's action repeat, waited for (see `receive_step`)."""
    send_actions(env, actions)
    return receive_step(env, actions, action_repeat)


def finished_episodes(episodes: dict, rewards, auto_reset, ended) -> list:
    """Add a step to each environment's running return and length (EnvPool's reset step is not an agent step); returns
    (return, length) of each episode that `ended`, whose tallies start again."""
    episodes["return"] += rewards
    episodes["length"] += ~auto_reset
    ended = np.flatnonzero(ended)
    finished = [(episodes["return"][i], episodes["length"][i]) for i in ended]
    episodes["return"][ended], episodes["length"][ended] = 0.0, 0
    return finished


# Evaluation: the mean action, one episode per environment; the network's diagnostics
@torch.no_grad()
def evaluate(encoder, actor, eval_env, action_repeat: int, device, capture_video: bool):
    """One episode per evaluation environment with the mean action tanh(mean) (DrQ); returns (returns, video)."""
    obs = reset_env(eval_env)
    returns = np.zeros(len(obs))
    frames = [obs[0, -3:].transpose(1, 2, 0)] if capture_video else None
    for _ in range(CONTROL_STEPS_PER_EPISODE // action_repeat):
        mean, _ = actor(encoder(torch.as_tensor(obs, device=device)))
        obs, rewards, _, _, _ = step_env(eval_env, torch.tanh(mean).cpu().numpy(), action_repeat)
        returns += rewards
        if capture_video:
            frames.append(obs[0, -3:].transpose(1, 2, 0))
    return returns, (np.stack(frames) if capture_video else None)


def parameter_counts(encoder, actor, critic) -> dict:
    return {
        "encoder": utils.parameter_count(encoder),
        "bottleneck": utils.parameter_count(actor.bottleneck, critic.bottleneck),
        "head": utils.parameter_count(actor.trunk, critic.q1, critic.q2),
    }


@torch.no_grad()
def network_diagnostics(encoder, actor, critic, obs, threshold: float) -> dict:
    """Dormant fractions per part and the feature norm (REFERENCE section 5) on a batch of observations.

    Encoder neurons: the conv channels after each ReLU; bottleneck: the tanh outputs of the actor's
    and the critic's dense layers; head: the hidden ReLU units of the actor and of both critics.
    """
    encoder_activations, feature_map = [], obs.float() / 255.0
    for layer in encoder.convs:
        feature_map = layer(feature_map)
        if isinstance(layer, nn.ReLU):
            encoder_activations.append(feature_map)
    actor_latent, critic_latent = actor.bottleneck(feature_map), critic.bottleneck(feature_map)
    mean, _ = actor(feature_map)
    head_activations = []
    for network, inputs in ((actor.trunk, actor_latent), (critic.q1, torch.cat([critic_latent, torch.tanh(mean)], 1)),
                            (critic.q2, torch.cat([critic_latent, torch.tanh(mean)], 1))):
        for layer in network:
            inputs = layer(inputs)
            if isinstance(layer, nn.ReLU):
                head_activations.append(inputs)
    return {
        "diag/dormant_fraction/encoder": utils.dormant_fraction(encoder_activations, threshold),
        "diag/dormant_fraction/bottleneck": utils.dormant_fraction([actor_latent, critic_latent], threshold),
        "diag/dormant_fraction/head": utils.dormant_fraction(head_activations, threshold),
        "diag/feature_norm": pool_features(feature_map, actor.bottleneck.pool).norm(dim=1).mean().item(),
    }


def value_saliency(encoder, actor, critic, obs) -> torch.Tensor:
    """|dV(s)/ds| with V(s) = min_i Q_i(s, tanh(mean(s))), shown beside the newest frame, as (B, 3, H, 2W) in [0, 1];
    the networks' gradients are cleared afterwards."""
    pixels = obs.float().requires_grad_(True)
    feature_map = encoder(pixels)
    mean, _ = actor(feature_map)
    torch.min(*critic(feature_map, torch.tanh(mean))).sum().backward()
    for network in (encoder, actor, critic):
        network.zero_grad(set_to_none=True)
    saliency = utils.saliency_image(pixels.grad).expand(-1, 3, -1, -1)
    return torch.cat([obs[:, -3:].float() / 255.0, saliency], dim=3)


def log_evaluation(run, step: int, encoder, actor, eval_env, args, device):
    """Evaluate (one episode per evaluation environment) and log the mean return, its normalised score and, with
    --capture-video, the first episode."""
    returns, video = evaluate(encoder, actor, eval_env, args.action_repeat, device, args.capture_video)
    if video is not None:
        run.save_video(f"eval_step_{step:012d}.gif", video)
    run.log(step, {  # DMC: at most a reward of 1 per control step
        "eval/return": returns.mean(), "eval/normalized_score": returns.mean() / CONTROL_STEPS_PER_EPISODE})


def log_diagnostics(run, step: int, encoder, actor, critic, obs, args):
    """The networks' diagnostics on recent observations (network_diagnostics), and the value saliency of four of them."""
    for tag, value in network_diagnostics(encoder, actor, critic, obs, args.dormant_threshold).items():
        run.writer.add_scalar(tag, value, step)
    run.writer.add_images("images/saliency", value_saliency(encoder, actor, critic, obs[:4]), step)


# Main: the learner's losses between logs, check the flags, then train
LOSS_NAMES = ("qf1_values", "qf2_values", "qf_loss", "actor_loss", "alpha_loss")  # learner_step's, as logged


def loss_means(recent_losses: dict) -> dict:
    """The mean of each loss over the updates since the last log that computed it, on the device."""
    return {name: torch.stack(values).mean() for name, values in recent_losses.items() if values}


def learner_finite(parts: dict, log_alpha, means: dict) -> torch.Tensor:
    """On the device: are the losses' means since the last log (loss_means), log alpha, every weight and Adam moment
    finite (the last update may have broken the weights)."""
    return utils.finite_flag(log_alpha, *parts.values(), *means.values())


def learner_scalars(parts: dict, log_alpha, recent_losses: dict) -> tuple:
    """(learner_finite, the learner's scalars to log: alpha, the learning rate and the losses' means since the last
    log), read in one host sync."""
    means = loss_means(recent_losses)
    finite, alpha, *mean_values = torch.stack([
        learner_finite(parts, log_alpha, means), log_alpha.detach().exp().reshape(()),
        *(mean.float() for mean in means.values())]).tolist()
    return finite == 1, {"losses/alpha": alpha, "charts/learning_rate": parts["critic_optimizer"].param_groups[0]["lr"],
                         **{f"losses/{name}": value for name, value in zip(means, mean_values)}}


def check_args(args):
    """Refuse bad input with one line (exit 2) before any work: flags, replay memory, a machine without EGL."""
    utils.check_choice("env-id", args.env_id, tuple(DMC_TASKS))
    utils.check_choice("pool", args.pool, ("flatten", "avg", "max"))
    utils.check_choice("padding", args.padding, ("valid", "same"))
    utils.check_choice("alpha-loss-on", args.alpha_loss_on, ("alpha", "log_alpha"))
    utils.check_choice("target-next-action", args.target_next_action, ("online_sample", "target_mean"))
    utils.check_choice("init", args.init, ("drq", "dopamine"))
    utils.check_ranges(args, FLAG_RANGES)
    channels = 3 * args.frame_stack
    with torch.device("meta"):  # shapes only
        encoder = Encoder(channels, args.width, args.padding)
    if feature_map_shape(encoder, channels, args.resolution)[1] < 1:
        low = next(r for r in itertools.count(args.resolution + 1) if feature_map_shape(encoder, channels, r)[1] >= 1)
        utils.fail(f"--resolution {args.resolution} is too small for --padding {args.padding}; use at least {low}")
    if args.action_repeat and CONTROL_STEPS_PER_EPISODE % args.action_repeat:
        utils.fail(f"--action-repeat {args.action_repeat} must divide the {CONTROL_STEPS_PER_EPISODE} control steps of "
                   f"an episode (e.g. 1, 2, 4, 5, 8); 0 takes the task's default")
    if args.learning_starts >= args.total_timesteps:
        utils.fail(f"--learning-starts {args.learning_starts} must be below --total-timesteps {args.total_timesteps} "
                   "(else the run ends before its first update)")
    if args.combined_loss and args.actor_update_frequency != 1:
        utils.fail(f"--combined-loss updates the actor at every step; "
                   f"--actor-update-frequency {args.actor_update_frequency} must be 1")
    if args.log_std_min >= args.log_std_max:
        utils.fail(f"--log-std-min {args.log_std_min} must be below --log-std-max {args.log_std_max}")
    if args.batch_size > args.buffer_size:
        utils.fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.buffer_size < args.num_envs:
        utils.fail(f"--buffer-size {args.buffer_size} is smaller than --num-envs {args.num_envs}")
    if args.augment and args.image_pad >= args.resolution:
        utils.fail(f"--image-pad {args.image_pad} must be smaller than --resolution {args.resolution}")
    utils.check_tracking(args)
    device = utils.training_device(args)
    utils.check_memory(replay_bytes(args.buffer_size, channels, args.resolution), device, f"--buffer-size {args.buffer_size} "
                       f"at --resolution {args.resolution} and --frame-stack {args.frame_stack}")
    make_egl_visible()


def main():
    args = parse_args()
    check_args(args)
    # derived values
    args.action_repeat = args.action_repeat or DMC_TASKS[args.env_id][1]
    views = 2 if args.augment else 1  # DrQ's K = M = 2 augmented views
    obs_shape = (3 * args.frame_stack, args.resolution, args.resolution)
    device = utils.training_device(args)
    run = utils.Run(args, SCRIPT, RUN_NEUTRAL_FLAGS, ARCHITECTURE_FLAGS)  # the run folder, and the checkpoint to resume
    checkpoint, global_step = run.checkpoint, run.step
    # (replay, position, size) saved beside the newest checkpoint, if this is it
    resumed_replay = checkpoint and load_resumed_replay(run.checkpoint_file, global_step, args.buffer_size, device)
    run.open(device, agent_steps_per_episode=CONTROL_STEPS_PER_EPISODE // args.action_repeat,
             environment_frames=f"{args.total_timesteps * args.action_repeat:,}",
             replay_gib=round(replay_bytes(args.buffer_size, obs_shape[0], args.resolution) / 2**30, 2))

    # set-up
    utils.set_up(args, device)  # seeds, CUDA switches, CPU threads
    bf16, memory_format, overlap_envs = speed_switches(args, device)
    ctx = utils.mixed_precision(device, bf16)  # bf16 autocast around the losses: networks in bfloat16, their outputs float32
    env, eval_env = make_envs(args, args.seed + global_step)  # a resumed run cannot restore the simulators: new episodes
    action_dim = env[0].action_space.shape[0]
    encoder, actor, critic = make_networks(args, obs_shape[0], action_dim, device, memory_format)
    parts, log_alpha = make_learner(args, encoder, actor, critic, device)
    replay, replay_position, replay_size = resumed_replay or (
        make_replay(args.buffer_size, obs_shape, action_dim, device), 0, 0)
    update_count = 0
    if checkpoint:
        update_count = load_learner(checkpoint, parts, log_alpha)
        run.resumed()  # and the random streams
    run.log_parameter_counts(parameter_counts(encoder, actor, critic))
    losses = tuple(utils.within(ctx, torch.compile(fn) if args.compile else fn)  # each call inside the context
                   for fn in (critic_loss, actor_and_temperature_losses))

    def checkpoint_payload():
        return utils.checkpoint_payload(SCRIPT, args, global_step, update_count=update_count, log_alpha=log_alpha.detach(),
                                        **{name: part.state_dict() for name, part in parts.items()})

    recent_losses = {name: [] for name in LOSS_NAMES}  # since the last log, on the device

    def run_updates(count: int):  # `count` gradient updates on the replay as it is now
        nonlocal update_count
        for _ in range(count):
            update_count += 1
            batch = sample_batch(replay, replay_size, args.batch_size, views, args.image_pad, memory_format)
            updated = learner_step(parts, log_alpha, batch, update_count, losses, args, views)
            for name, value in updated.items():
                recent_losses[name].append(value)

    # training loop
    obs = torch.as_tensor(reset_env(env), device=device)
    episodes = {"return": np.zeros(args.num_envs), "length": np.zeros(args.num_envs, dtype=int)}
    run.start_clock(global_step)
    deferred_updates = 0  # --overlap-envs: the last step's updates, run while the environment takes the next step
    state_reads = (args.log_every, args.diag_every, args.eval_every, args.save_every)  # intervals that read the networks
    while global_step < args.total_timesteps:
        previous_step = global_step
        actions = select_actions(encoder, actor, obs, action_dim, random=global_step < args.learning_starts)
        host_actions = actions.cpu().numpy()
        send_actions(env, host_actions)  # the environment steps from here to receive_step
        run_updates(deferred_updates)
        next_obs, rewards, terminated, truncated, auto_reset = receive_step(env, host_actions, args.action_repeat)
        collected = int((~auto_reset).sum())  # EnvPool's reset step is not an agent step (DrQ counts 1000/k per episode)
        global_step += collected
        next_obs = torch.as_tensor(next_obs, device=device)

        # store real transitions (all environments reset together); a time limit is not terminal: the target bootstraps
        if collected:
            scaled_rewards = args.reward_scale * torch.as_tensor(rewards, device=device, dtype=torch.float32)
            replay_position = add_transitions(replay, replay_position, obs, actions, scaled_rewards, next_obs,
                                              torch.as_tensor(terminated, device=device, dtype=torch.float32))
        replay_size = min(replay_size + collected, args.buffer_size)
        obs = next_obs
        finished = finished_episodes(episodes, rewards, auto_reset, terminated | truncated)
        for episode_return, episode_length in finished:
            run.writer.add_scalar("charts/episodic_return", episode_return, global_step)
            run.writer.add_scalar("charts/episodic_length", episode_length, global_step)
        run.progress.update(global_step, episodic_return=finished[-1][0] if finished else None)

        # gradient updates, once the replay holds the seed steps (DrQ: one per agent step); --overlap-envs runs them
        # during the next environment step, unless this step logs, diagnoses, evaluates, saves or ends the run
        learning = global_step >= args.learning_starts and replay_size >= max(1, min(args.learning_starts, args.buffer_size))
        updates = collected * args.update_to_data if learning else 0
        deferred_updates = updates if overlap_envs and global_step < args.total_timesteps and not any(
            utils.crossed(previous_step, global_step, every) for every in state_reads) else 0
        run_updates(updates - deferred_updates)

        # logging, and the non-finite check: the interval's one host sync reads both
        if utils.crossed(previous_step, global_step, args.log_every):
            finite, scalars = learner_scalars(parts, log_alpha, recent_losses)
            run.check_finite(finite, global_step)
            run.keep_good(checkpoint_payload())
            run.log(global_step, {"charts/SPS": run.sps(global_step), **scalars})
            recent_losses.update({name: [] for name in LOSS_NAMES})

        # diagnostics on recent observations
        if replay_size and utils.crossed(previous_step, global_step, args.diag_every):
            recent = recent_observations(replay, replay_position, replay_size, args.diag_batch_size)
            log_diagnostics(run, global_step, encoder, actor, critic, recent, args)

        # evaluation and checkpoints
        if utils.crossed(previous_step, global_step, args.eval_every) and global_step < args.total_timesteps:
            log_evaluation(run, global_step, encoder, actor, eval_env, args, device)
        if utils.crossed(previous_step, global_step, args.save_every):
            # checked since the last log too: its losses, every weight and Adam moment
            run.check_finite(bool(learner_finite(parts, log_alpha, loss_means(recent_losses))), global_step)
            saved_replay = {"replay": replay, "replay_position": replay_position, "replay_size": replay_size}
            run.save(global_step, checkpoint_payload(), saved_replay if args.save_buffer else None)

    # evaluation and saving at the end
    run.progress.close()
    run.check_finite(bool(learner_finite(parts, log_alpha, loss_means(recent_losses))), global_step)
    log_evaluation(run, global_step, encoder, actor, eval_env, args, device)
    run.finish(checkpoint_payload())
    for simulator in (*env, *eval_env):
        simulator.close()


if __name__ == "__main__":
    main()
