"""PPO with the Impala-CNN encoder on Procgen-HD, flatten (Impala) or global average pooling
(Impoola) between the encoder and the dense layer.

Reproduces Impoola (Trumpp et al., RLC 2025) and "Higher Resolution, Better Generalization"
(Trumpp et al., TMLR 2026): train on 200 levels (500 for hard), evaluate on those levels and on the
full level distribution. `--resolution R` is the side of the frame the game draws natively (the
authors' Procgen-HD fork, package `procgen_hd`): the same field of view, levels and rewards at every
R, only more pixels. R = 64 is the original Procgen, bit for bit.
Usage: python cleanrl_pool/ppo_procgen_impoola.py --env-id bigfish --resolution 192
"""

import copy
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import procgen_hd
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical

import utils

SCRIPT = os.path.basename(__file__)
ARCHITECTURE_FLAGS = ("env_id", "pool", "width", "dense_scale", "resolution", "num_envs", "distribution_mode")
# Flags of this script that do not change what is trained (bookkeeping, speed switches): --resume auto ignores them
RUN_NEUTRAL_FLAGS = utils.RUN_NEUTRAL_FLAGS | {"final_eval_episodes", "eval_num_envs", "channels_last", "micro_batch_size",
                                             "overlap_envs"}


# Args
@dataclass
class Args(utils.RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""

    # Environment (Procgen generalisation protocol: train on a fixed set of levels, test on all)
    env_id: str = "bigfish"
    """the Procgen game (one of the 16, lower case)"""
    distribution_mode: str = "easy"
    """the Procgen distribution mode: easy or hard"""
    num_levels: Optional[int] = None
    """the number of training levels (default 200 for easy, 500 for hard, as the Procgen paper; 0: all levels)"""
    start_level: int = 0
    """the first training level seed"""
    resolution: int = 64
    """side of the square frame the game draws natively and the network sees (papers: 48-192)"""
    num_envs: int = 64
    """the number of parallel training environments"""

    # Network (Impala-CNN, REFERENCE §3)
    pool: str = "avg"
    """what joins the encoder to the dense layer: `flatten`, `avg` (global average pooling) or `max`"""
    width: int = 2
    """multiplies every encoder channel count (the papers' τ)"""
    dense_scale: int = 1
    """multiplies the width of the dense layer after the bottleneck"""

    # PPO (Impoola / Procgen-HD defaults; CleanRL ppo_procgen differs in gamma, lr and value clipping)
    total_timesteps: int = 25_000_000
    """total environment steps of training"""
    learning_rate: float = 3.5e-4
    """the Adam learning rate at width 2"""
    rescale_lr: bool = True
    """if toggled, the learning rate is multiplied by 2 / width (Impoola)"""
    anneal_lr: bool = False
    """if toggled, the learning rate decays linearly to 0 (the papers keep it constant)"""
    num_steps: int = 256
    """the number of steps per environment per rollout"""
    gamma: float = 0.99
    """the discount factor (Impoola; CleanRL uses 0.999)"""
    gae_lambda: float = 0.95
    """the lambda of generalised advantage estimation"""
    num_minibatches: int = 8
    """the number of minibatches per epoch"""
    update_epochs: int = 3
    """the number of epochs over each rollout"""
    norm_adv: bool = True
    """if toggled, advantages are normalised per minibatch"""
    clip_coef: float = 0.2
    """the PPO surrogate clipping coefficient"""
    clip_vloss: bool = False
    """if toggled, the value loss is clipped like the policy (the papers leave it unclipped)"""
    ent_coef: float = 0.01
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm of the gradient"""
    target_kl: Optional[float] = None
    """if set, an iteration's epochs stop once the approximate KL exceeds it"""
    reward_clip: float = 10.0
    """normalised rewards are clipped to [-reward_clip, reward_clip]"""

    # Evaluation, checkpoints and diagnostics (x axis: environment steps)
    eval_every: int = 2_500_000
    """evaluate on train and test levels every this many steps (0: only at the end)"""
    eval_episodes: int = 256
    """episodes per level set at each periodic evaluation (papers: 1,000)"""
    final_eval_episodes: int = 2500
    """episodes per level set at the final evaluation (papers: 2,500; 0: none)"""
    eval_num_envs: int = 64
    """the number of parallel environments of each evaluation level set"""
    save_every: int = 1_000_000
    """write a checkpoint every this many steps (0: only final.pt)"""
    diag_every: int = 250_000
    """log dormant fractions, feature norm and saliency every this many steps (0: never)"""

    # Speed switches (issue 13): each acts only with CUDA; on a CPU the run is the same with or without them
    bf16: bool = False
    """bfloat16 autocast for the rollout's inference and the update; weights, losses and advantages in float32 (CUDA only).
    Off by default: no reference codebase uses it, and it moves gradients (2-6 % an update, CPU proxy); --bf16 turns it on"""
    channels_last: bool = True
    """the network and the observation batches in channels-last memory order (CUDA only)"""
    micro_batch_size: int = 0
    """steps per micro-batch, gradients summed over a minibatch (0: on CUDA the most that fit, measured; else the minibatch)"""
    overlap_envs: bool = True
    """two halves of the envs in turn, one half's game step beside the other's policy step (CUDA only; an even --num-envs)"""


# The valid range of every numeric flag, checked before any work (utils.check_ranges)
FLAG_RANGES = {
    "seed": f"[0, {procgen_hd.INT32_MAX - 200_000}]",  # the envs' seeds are seed, seed + 100,000 and seed + 200,000
    "torch_threads": "[0, inf)", "num_levels": f"[0, {procgen_hd.INT32_MAX}]", "start_level": f"[0, {procgen_hd.INT32_MAX}]",
    "resolution": f"[1, {procgen_hd.MAX_RESOLUTION}]", "num_envs": "[1, inf)", "width": "[1, inf)", "dense_scale": "[1, inf)",
    "total_timesteps": "[1, inf)", "learning_rate": "(0, inf)", "num_steps": "[1, inf)", "gamma": "[0, 1]",
    "gae_lambda": "[0, 1]", "num_minibatches": "[1, inf)", "update_epochs": "[1, inf)", "clip_coef": "(0, inf)",
    "ent_coef": "[0, inf)", "vf_coef": "[0, inf)", "max_grad_norm": "(0, inf)", "target_kl": "(0, inf)",
    "reward_clip": "(0, inf)",
    "eval_every": "[0, inf)", "eval_episodes": "[0, inf)", "final_eval_episodes": "[0, inf)", "eval_num_envs": "[1, inf)",
    "save_every": "[0, inf)", "keep_checkpoints": "[1, inf)", "diag_every": "[0, inf)", "diag_batch_size": "[1, inf)",
    "dormant_threshold": "[0, 1]", "micro_batch_size": "[0, inf)",
}

def parse_args() -> Args:
    """Parse the flags, then resolve the default that depends on another flag: --num-levels by --distribution-mode."""
    args = tyro.cli(Args)
    if args.num_levels is None:
        args.num_levels = 200 if args.distribution_mode == "easy" else 500  # Procgen paper's protocol
    return args

# Network: the bottleneck (the join flatten | avg | max, then Linear -> ReLU) on the Impala-CNN encoder -> actor, critic
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

class ResidualBlock(nn.Module):
    """x + Conv3x3(ReLU(Conv3x3(ReLU(x)))), Espeholt et al. 2018."""

    def __init__(self, channels: int):
        super().__init__()
        self.relu0, self.conv0 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1, self.conv1 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(self.relu1(self.conv0(self.relu0(x))))

def impala_encoder(in_channels: int, width: int) -> nn.Sequential:
    """Espeholt et al. 2018: three stages of Conv3x3 -> MaxPool(3, stride 2, padding 1) -> two residual blocks,
    (16, 32, 32) x width channels, then a ReLU: R x R -> ceil(R / 8) x ceil(R / 8) x 32 width."""
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

def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer

class Agent(nn.Module):
    def __init__(self, num_actions: int, resolution: int, pool: str, width: int, dense_scale: int):
        super().__init__()
        self.encoder = impala_encoder(3, width)
        channels, side = feature_map_shape(self.encoder, 3, resolution)  # side ceil(R / 8): flatten's dense grows as R^2
        hidden_size = 256 * dense_scale
        self.bottleneck = Bottleneck(pool, nn.Sequential(nn.Linear(pooled_size(channels, side, pool), hidden_size), nn.ReLU()))
        self.actor = layer_init(nn.Linear(hidden_size, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(hidden_size, 1), std=1)

    def forward(self, obs):
        """uint8 (B, 3, R, R) -> (action logits, value). The pixels are scaled in torch's default float dtype; the heads run
        in the weights' dtype also under bf16 autocast, so that log-probs and values keep full precision."""
        hidden = self.bottleneck(self.encoder(obs / 255.0))
        with torch.autocast(obs.device.type, enabled=False):
            hidden = hidden.to(self.actor.weight.dtype)
            return self.actor(hidden), self.critic(hidden).squeeze(-1)

# Algorithm: GAE, the clipped PPO loss, action sampling, the update epochs and what the speed switches turn on
def compute_gae(rewards, values, dones, next_value, next_done, gamma: float, gae_lambda: float):
    """Generalised advantage estimation (Schulman et al. 2016), CleanRL's convention:
    dones[t] = 1 when obs[t] follows the end of an episode, so step t - 1 does not bootstrap.
    Returns (advantages, returns), both (T, N). Compiled with --compile."""
    num_steps = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            next_nonterminal, next_values = 1.0 - next_done, next_value
        else:
            next_nonterminal, next_values = 1.0 - dones[t + 1], values[t + 1]
        delta = rewards[t] + gamma * next_values * next_nonterminal - values[t]
        advantages[t] = last_gae = delta + gamma * gae_lambda * next_nonterminal * last_gae
    return advantages, advantages + values


def ppo_loss(model, minibatch: dict, clip_coef: float, clip_vloss: bool, ent_coef: float, vf_coef: float):
    """The clipped surrogate, value and entropy terms on one (micro-)batch (obs, actions, logprobs, values, advantages
    already normalised, returns), each a mean over it; returns (loss, its named parts and statistics, detached). Under
    --bf16 `model` is the network's forward inside the autocast context (main): ratio, advantages, value targets and
    losses stay float32."""
    _, newlogprob, entropy, newvalue = get_action_and_value(model, minibatch["obs"], minibatch["actions"])
    logratio = newlogprob - minibatch["logprobs"]
    ratio = logratio.exp()
    advantages = minibatch["advantages"]
    policy_loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef)).mean()
    # Value loss (unclipped by default, as the Impoola / HD papers)
    value_error = (newvalue - minibatch["returns"]) ** 2
    if clip_vloss:
        clipped = minibatch["values"] + torch.clamp(newvalue - minibatch["values"], -clip_coef, clip_coef)
        value_error = torch.max(value_error, (clipped - minibatch["returns"]) ** 2)
    value_loss = 0.5 * value_error.mean()
    entropy_loss = entropy.mean()
    loss = policy_loss - ent_coef * entropy_loss + value_loss * vf_coef
    with torch.no_grad():
        stats = {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy_loss,
                 "old_approx_kl": (-logratio).mean(), "approx_kl": ((ratio - 1) - logratio).mean(),
                 "clipfrac": ((ratio - 1.0).abs() > clip_coef).float().mean()}
    return loss, {name: value.detach() for name, value in stats.items()}


def get_action_and_value(model, obs, action=None):
    """(action, its log-prob, entropy, value); the distribution in the dtype of the logits, float32 also under bf16
    autocast (Agent.forward)."""
    logits, value = model(obs)
    distribution = Categorical(logits=logits, validate_args=False)
    if action is None:
        action = sample_action(logits)
    return action, distribution.log_prob(action), distribution.entropy(), value


def sample_action(logits, generator=None):
    """A sample of softmax(logits) by the Gumbel-max trick: unlike Categorical.sample, non-finite
    logits do not crash mid-rollout, so the once-per-iteration non-finite check can report them."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    return torch.argmax(logits - torch.log(-torch.log(uniform)), dim=1)


def policy_step(model, obs):
    """The rollout's inference (compiled with --compile): (action, log-prob, value) of a batch of frames, no gradient."""
    with torch.no_grad():
        action, logprob, _, value = get_action_and_value(model, obs)
    return action, logprob, value


def ppo_update(model, agent, optimizer, batch: dict, args, micro_batch_size: int, on_minibatch):
    """`--update-epochs` epochs of `--num-minibatches` shuffled minibatches of the rollout, an Adam step and `on_minibatch()`
    each (stopping past `--target-kl`). A minibatch's advantages are normalised over all of it, then its gradient is summed
    over micro-batches of `micro_batch_size` steps, each loss scaled by its share. Returns ppo_loss's named parts' means
    and whether all were finite (a tensor)."""
    batch_size = len(batch["obs"])
    minibatch_size = batch_size // args.num_minibatches
    totals, num_parts = {}, 0
    finite = torch.ones((), dtype=torch.bool, device=batch["obs"].device)
    for _ in range(args.update_epochs):
        order = torch.randperm(batch_size, device=batch["obs"].device)
        for start in range(0, batch_size, minibatch_size):
            minibatch = {key: value[order[start : start + minibatch_size]] for key, value in batch.items()}
            if args.norm_adv:
                advantages = minibatch["advantages"]
                minibatch["advantages"] = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            optimizer.zero_grad()
            approx_kls = []
            for micro_start in range(0, minibatch_size, micro_batch_size):
                micro_batch = {key: value[micro_start : micro_start + micro_batch_size] for key, value in minibatch.items()}
                loss, stats = ppo_loss(model, micro_batch, args.clip_coef, args.clip_vloss, args.ent_coef, args.vf_coef)
                (loss * (micro_batch_size / minibatch_size)).backward()
                finite &= torch.isfinite(loss)
                totals = {name: totals.get(name, 0.0) + value for name, value in stats.items()}
                num_parts += 1
                approx_kls.append(stats["approx_kl"])
            grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            finite &= torch.isfinite(grad_norm)
            on_minibatch()
        if args.target_kl is not None and torch.stack(approx_kls).mean().item() > args.target_kl:  # the last minibatch's
            break
    means = (torch.stack(list(totals.values())) / num_parts).tolist()  # one host sync
    return dict(zip(totals, means)), finite


def explained_variance(values, returns) -> float:
    """1 - Var[returns - values] / Var[returns]: how much of the returns the critic predicts (NaN if they are constant)."""
    return (1 - (returns - values).var() / returns.var()).item() if returns.var() > 0 else float("nan")


def speed_plan(args, device) -> dict:
    """Which of the speed switches act on `device`: on CUDA each as asked (bf16 where the card has it, overlap_envs with an
    even --num-envs), on a CPU none, so that a CPU run is the plain one. (tf32, cudnn_benchmark: utils.configure_cuda.)"""
    cuda = device.type == "cuda"
    return {"bf16": cuda and args.bf16 and torch.cuda.is_bf16_supported(), "channels_last": cuda and args.channels_last,
            "overlap_envs": cuda and args.overlap_envs and args.num_envs % 2 == 0}


def update_memory(args, device, probe_size: int = 16) -> tuple:
    """(bytes per step, fixed bytes) of an update on CUDA, measured: the peak allocated by the forward and backward of a
    probe micro-batch (torch.cuda.max_memory_allocated, under the run's bf16 and channels_last, as ppo_update) less its
    gradients, per step; fixed: the weights, their gradients and Adam's two moments."""
    fast = speed_plan(args, device)
    agent = Agent(procgen_hd.NUM_ACTIONS, args.resolution, args.pool, args.width, args.dense_scale).to(device)
    obs = torch.zeros((probe_size, 3, args.resolution, args.resolution), dtype=torch.uint8, device=device)
    if fast["channels_last"]:
        agent, obs = agent.to(memory_format=torch.channels_last), obs.contiguous(memory_format=torch.channels_last)
    weight_bytes = sum(p.numel() * p.element_size() for p in agent.parameters())
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    try:
        forward = utils.within(utils.mixed_precision(device, fast["bf16"]), agent)
        actions = torch.zeros(probe_size, dtype=torch.long, device=device)
        _, logprob, entropy, value = get_action_and_value(forward, obs, actions)
        (logprob + entropy + value).sum().backward()
    except torch.cuda.OutOfMemoryError:
        utils.fail(f"--resolution {args.resolution} at --width {args.width}: an update of {probe_size} steps does not fit "
                   "in the free CUDA memory")
    peak = torch.cuda.max_memory_allocated(device) - before - weight_bytes  # the gradients are counted in `fixed`
    del agent, forward, obs, actions, logprob, entropy, value
    torch.cuda.empty_cache()
    return max(peak, 0) / probe_size, 4 * weight_bytes


def rollout_memory(args) -> str:
    return f"the uint8 rollout (--num-envs {args.num_envs} x --num-steps {args.num_steps} at --resolution {args.resolution})"


def resolve_micro_batch_size(args) -> int:
    """--micro-batch-size as the run uses it: on CUDA, 0 is the largest that fits by a measured probe of the update, and
    the update's activations beside the rollout are checked against the free memory (exit 2); on a CPU it stays as given
    (0: the whole minibatch)."""
    device = utils.training_device(args)
    if device.type != "cuda":
        return args.micro_batch_size
    minibatch_size = args.num_envs * args.num_steps // args.num_minibatches
    bytes_per_step, fixed_bytes = update_memory(args, device, min(16, minibatch_size))
    fixed_bytes += args.num_envs * args.num_steps * 3 * args.resolution**2  # the rollout
    fixed_bytes += minibatch_size * (3 * args.resolution**2 + 32)  # and a minibatch gathered from it
    micro_batch_size = args.micro_batch_size or fitting_micro_batch_size(
        minibatch_size, bytes_per_step, fixed_bytes, utils.free_memory_bytes(device))
    utils.check_memory(int(fixed_bytes + micro_batch_size * bytes_per_step), device, f"{rollout_memory(args)} and an "
                       f"update on micro-batches of {micro_batch_size} steps (--micro-batch-size)")
    return micro_batch_size


def fitting_micro_batch_size(minibatch_size: int, bytes_per_step: float, fixed_bytes: float, free_bytes: float) -> int:
    """The largest divisor of the minibatch whose update (fixed + size x per-step bytes) takes at most 80 % of the free
    memory, as utils.check_memory asks; 1 if none does (the memory check then refuses the run)."""
    sizes = [size for size in range(1, minibatch_size + 1) if minibatch_size % size == 0]
    return max([size for size in sizes if fixed_bytes + size * bytes_per_step <= 0.8 * free_bytes], default=1)


# Storage: the rollout on the training device, observations as uint8
def allocate_rollout(num_steps: int, num_envs: int, resolution: int, device, channels_last: bool = False) -> dict:
    """The rollout's tensors, (num_steps, num_envs, ...); with `channels_last` the frames (3, R, R) lie in frame-last memory,
    as Procgen-HD draws them, so that every minibatch gathered from them is channels-last."""
    side = (resolution, resolution)
    if channels_last:
        obs = torch.zeros((num_steps, num_envs, *side, 3), dtype=torch.uint8, device=device).permute(0, 1, 4, 2, 3)
    else:
        obs = torch.zeros((num_steps, num_envs, 3, *side), dtype=torch.uint8, device=device)
    return {
        "obs": obs,
        "actions": torch.zeros((num_steps, num_envs), dtype=torch.long, device=device),
        "logprobs": torch.zeros((num_steps, num_envs), device=device),
        "rewards": torch.zeros((num_steps, num_envs), device=device),
        "dones": torch.zeros((num_steps, num_envs), device=device),
        "values": torch.zeros((num_steps, num_envs), device=device),
    }


def collect_rollout(policy, envs, rollout: dict, next_obs, next_done, reward_normalizer: dict, episodes: dict, gamma: float,
                    reward_clip: float, on_step=None):
    """Play one rollout, writing every step into `rollout`; returns (next_obs, next_done, finished episodes' returns, their
    lengths). `policy(obs)` gives (action, log-prob, value). One host transfer of actions per step, everything else stays
    on the device. `on_step(steps, episodic_return)` follows every step: steps so far (all envs), mean return of the
    episodes it finished (or None).

    CleanRL's convention: dones[t] = 1 when obs[t] is the first frame of an episode (the previous step
    ended one). Procgen resets inside the step that ends an episode, so every step is a real transition.
    """
    device = next_obs.device
    finished_returns, finished_lengths = [], []
    for step in range(rollout["obs"].shape[0]):
        rollout["obs"][step], rollout["dones"][step] = next_obs, next_done
        action, rollout["logprobs"][step], rollout["values"][step] = policy(next_obs)
        rollout["actions"][step] = action
        frames, reward, done, _ = envs.step(action.cpu().numpy())
        next_obs = torch.from_numpy(frames).to(device)  # channels-last: Procgen-HD draws frame-last
        next_done = torch.from_numpy(done).to(device, torch.float32)
        rollout["rewards"][step] = normalize_reward(
            reward_normalizer, torch.from_numpy(reward).to(device), next_done, gamma, reward_clip
        )
        episodic_return = tally_episodes(episodes, reward, done, finished_returns, finished_lengths)
        if on_step is not None:
            on_step((step + 1) * len(done), episodic_return)
    return next_obs, next_done, finished_returns, finished_lengths


def tally_episodes(episodes: dict, reward, done, finished_returns: list, finished_lengths: list):
    """Add a step's rewards to the running episodes; those it ended (an episode's return ends with the reward of the step
    that ended it) move to the finished lists and restart. Returns the mean return of the episodes ended, or None."""
    episodes["return"] += reward
    episodes["length"] += 1
    if not done.any():
        return None
    episodic_return = episodes["return"][done].mean()
    finished_returns += episodes["return"][done].tolist()
    finished_lengths += episodes["length"][done].tolist()
    episodes["return"][done], episodes["length"][done] = 0.0, 0
    return episodic_return


def collect_rollout_overlapped(policy, envs, rollout: dict, next_obs, next_done, reward_normalizer: dict, episodes: dict,
                               gamma: float, reward_clip: float, on_step=None):
    """collect_rollout on the envs as halves (an EnvHalves, --overlap-envs): in turn, each half waits for its game step
    (step_wait), acts and starts the next one (step_async), so one half's game step runs while the other's policy step
    does. The data are collect_rollout's on the same games; one host transfer of actions per half and step."""
    device, num_steps = next_obs.device, rollout["obs"].shape[0]
    bounds = np.cumsum([0] + [half.num_envs for half in envs.halves])
    parts = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    obs, dones = [next_obs[part] for part in parts], [next_done[part] for part in parts]
    results = [None] * len(parts)  # each half's (reward, done) of its last game step, as numpy
    finished_returns, finished_lengths = [], []
    for step in range(num_steps + 1):  # each half: the frames of `step` (its game step step - 1), then its action
        for index, (half, part) in enumerate(zip(envs.halves, parts)):
            if step:
                frames, reward, done, _ = half.step_wait()
                obs[index] = torch.from_numpy(frames).to(device)  # channels-last: Procgen-HD draws frame-last
                dones[index], results[index] = torch.from_numpy(done).to(device, torch.float32), (reward, done)
            if step < num_steps:
                rollout["obs"][step, part], rollout["dones"][step, part] = obs[index], dones[index]
                action, rollout["logprobs"][step, part], rollout["values"][step, part] = policy(obs[index])
                rollout["actions"][step, part] = action
                half.step_async(action.cpu().numpy())
        if not step:
            continue
        reward, done = (np.concatenate(values) for values in zip(*results))
        next_done = torch.cat(dones)
        rollout["rewards"][step - 1] = normalize_reward(
            reward_normalizer, torch.from_numpy(reward).to(device), next_done, gamma, reward_clip
        )
        episodic_return = tally_episodes(episodes, reward, done, finished_returns, finished_lengths)
        if on_step is not None:
            on_step(step * len(done), episodic_return)
    return torch.cat(obs), next_done, finished_returns, finished_lengths


# Environment: Procgen-HD, drawn natively at R x R, reset in the step that ends an episode; reward normalisation
PROCGEN_GAMES = sorted(utils.PROCGEN_SCORE_RANGES)


def make_envs(args, num_envs: int, num_levels: int, seed: int) -> procgen_hd.ProcgenHDEnv:
    """`num_envs` games on `num_levels` levels from `start_level` (0 levels: the full distribution)."""
    return procgen_hd.ProcgenHDEnv(args.env_id, num_envs, args.resolution, num_levels=num_levels,
                                   start_level=args.start_level if num_levels else 0,
                                   distribution_mode=args.distribution_mode, seed=seed)


class EnvHalves:
    """`envs` (closed) continued by two ProcgenHDEnv halves from `make(num_envs)`, each with its games' states: the same
    games as `envs`, stepped in turn by the overlapped rollout (--overlap-envs). Checkpoints hold the per-env states."""

    def __init__(self, envs, make):
        self.num_envs, self.num_actions = envs.num_envs, envs.num_actions
        states = envs.get_state()
        envs.close()
        self.halves = [make(self.num_envs // 2) for _ in range(2)]
        self.set_state(states)

    def get_state(self) -> list:
        return [state for half in self.halves for state in half.get_state()]

    def set_state(self, states: list):
        """Like ProcgenHDEnv.set_state: (frames, info) of the restored games, channel-first views of frame-last memory."""
        frames = [half.set_state(states[i * half.num_envs : (i + 1) * half.num_envs])[0] for i, half in enumerate(self.halves)]
        return np.concatenate([f.transpose(0, 2, 3, 1) for f in frames]).transpose(0, 3, 1, 2), {}

    def close(self):
        for half in self.halves:
            half.close()


def new_reward_normalizer(num_envs: int, device) -> dict:
    """Running variance of the discounted return (gym's NormalizeReward), as tensors."""
    return {
        "mean": torch.zeros((), dtype=torch.float64, device=device),
        "var": torch.ones((), dtype=torch.float64, device=device),
        "count": torch.full((), 1e-4, dtype=torch.float64, device=device),
        "discounted_return": torch.zeros(num_envs, dtype=torch.float64, device=device),
    }


def normalize_reward(normalizer: dict, reward, done, gamma: float, clip: float):
    """Scale rewards by the running std of the discounted return, then clip (CleanRL / gym 0.23).

    `reward` of a step that ends an episode is that episode's last: it joins the return, which then
    restarts at zero for the next episode.
    """
    returns = normalizer["discounted_return"] * gamma + reward
    batch_mean, batch_var, batch_count = returns.mean(), returns.var(unbiased=False), returns.numel()
    delta = batch_mean - normalizer["mean"]
    total = normalizer["count"] + batch_count
    normalizer["mean"] = normalizer["mean"] + delta * batch_count / total
    count = normalizer["count"]
    normalizer["var"] = (normalizer["var"] * count + batch_var * batch_count + delta**2 * count * batch_count / total) / total
    normalizer["count"] = total
    normalizer["discounted_return"] = returns * (1 - done)
    scaled = reward / torch.sqrt(normalizer["var"] + 1e-8)
    return scaled.clamp(-clip, clip).float()


# Evaluation: a fixed number of whole episodes per environment, actions sampled like the papers; the network's diagnostics
def evaluate(model, envs, num_episodes: int, seed: int, device, record_video: bool = False):
    """Returns of `num_episodes` episodes and, if asked, the frames of env 0's first episode. Actions are
    sampled from a generator of their own (`seed`), so evaluating never changes how training goes on.

    Env i plays exactly its quota (num_episodes // n, one more for the first num_episodes % n),
    decided before any episode ends, so short episodes are not over-represented.
    """
    quota = np.full(envs.num_envs, num_episodes // envs.num_envs)
    quota[: num_episodes % envs.num_envs] += 1
    finished = np.zeros(envs.num_envs, dtype=np.int64)
    episode_return = np.zeros(envs.num_envs)
    returns, frames = [], []
    generator = torch.Generator(device).manual_seed(seed)
    obs, _ = envs.reset()
    while (finished < quota).any():
        frame = torch.from_numpy(obs).to(device)
        if record_video and finished[0] == 0:
            frames.append(obs[0].transpose(1, 2, 0))
        with torch.no_grad():
            action = sample_action(model(frame)[0], generator)
        obs, reward, done, _ = envs.step(action.cpu().numpy())
        episode_return += reward
        for i in np.flatnonzero(done):
            if finished[i] < quota[i]:
                returns.append(episode_return[i])
                finished[i] += 1
            episode_return[i] = 0.0
    return np.array(returns), frames


def saliency_grid(agent: Agent, obs: torch.Tensor) -> torch.Tensor:
    """One row per observation: the frame, |dV/ds| and |d logit(a*)/ds| (a* = most likely action),
    as (3, B*R, 3*R) in [0, 1] (Procgen-HD paper's vanilla-gradient saliency)."""
    pixels = obs.float().requires_grad_()
    logits, value = agent(pixels)
    value_gradient = torch.autograd.grad(value.sum(), pixels, retain_graph=True)[0]
    chosen_logit = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    action_gradient = torch.autograd.grad(chosen_logit, pixels)[0]
    rows = [obs.float() / 255.0, utils.saliency_image(value_gradient).expand(-1, 3, -1, -1),
            utils.saliency_image(action_gradient).expand(-1, 3, -1, -1)]
    return torch.cat([torch.cat(list(images), dim=1) for images in rows], dim=2).cpu()


def log_evaluation(run, step: int, model, num_episodes: int, args, device):
    """Evaluate `num_episodes` on the training levels and on the full distribution, and log each set's mean return, its
    normalised score and, with --capture-video, its first game. Fresh games with fixed seeds: every evaluation of a run
    plays the same levels, so checkpoints compare fairly."""
    for level_set, num_levels, seed in (("train_levels", args.num_levels, args.seed + 100_000),
                                        ("test_levels", 0, args.seed + 200_000)):  # test: the full distribution
        level_envs = make_envs(args, args.eval_num_envs, num_levels, seed)
        returns, frames = evaluate(model, level_envs, num_episodes, seed, device, args.capture_video)
        level_envs.close()
        score = utils.procgen_normalized_score(args.env_id, args.distribution_mode, returns.mean())
        run.writer.add_scalar(f"eval/{level_set}/return", returns.mean(), step)
        run.writer.add_scalar(f"eval/{level_set}/normalized_score", score, step)
        utils.echo(f"step {step}: eval {level_set} return {returns.mean():.2f} (+- {returns.std():.2f}, "
                   f"{len(returns)} episodes), normalized score {score:.3f}")
        if frames:
            run.save_video(f"{level_set}_step_{step:012d}.gif", frames)


def log_diagnostics(run, step: int, agent: Agent, obs, args):
    """The network's diagnostics on recent observations (utils.network_diagnostics, REFERENCE §5), and the saliency of
    V and of the most likely action's logit on four of them."""
    for tag, value in utils.network_diagnostics(agent, obs, args.dormant_threshold).items():
        run.writer.add_scalar(tag, value, step)
    run.writer.add_image("images/saliency", saliency_grid(agent, obs[:4]), step)


# Main: what a resume restores, check_args, then set-up, the training loop (one iteration: rollout, GAE, update, log)
def load_training_state(checkpoint: dict, agent: Agent, optimizer, reward_normalizer: dict, envs, device) -> tuple:
    """An exact continuation, in place: the network, Adam, the reward normaliser and the games mid-episode. Returns the
    games' observations, `next_done` and the running episodes' returns and lengths."""
    agent.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    reward_normalizer.update({key: value.to(device) for key, value in checkpoint["reward_normalizer"].items()})
    next_obs_np, _ = envs.set_state(checkpoint["env_states"])
    episodes = {key: value.numpy().copy() for key, value in checkpoint["episodes"].items()}
    return next_obs_np, checkpoint["next_done"].to(device), episodes


def check_args(args):
    """Every bad input, as one line and exit status 2, before any work (on CUDA, the update's memory:
    resolve_micro_batch_size)."""
    utils.check_choice("env-id", args.env_id, PROCGEN_GAMES)
    utils.check_choice("distribution-mode", args.distribution_mode, ["easy", "hard"])
    utils.check_choice("pool", args.pool, ["flatten", "avg", "max"])
    utils.check_ranges(args, FLAG_RANGES)
    if args.start_level + args.num_levels > procgen_hd.INT32_MAX:
        utils.fail(f"--start-level {args.start_level} + --num-levels {args.num_levels} must stay below 2**31 "
                   "(Procgen's level seeds)")
    if args.eval_every and not args.eval_episodes:
        utils.fail(f"--eval-episodes 0 with --eval-every {args.eval_every}: evaluate some episodes, or --eval-every 0")
    batch_size = args.num_envs * args.num_steps
    if args.num_minibatches > batch_size or batch_size % args.num_minibatches:
        utils.fail(f"--num-minibatches {args.num_minibatches} must divide the rollout of {batch_size} steps "
                   "(num-envs x num-steps)")
    if args.norm_adv and batch_size // args.num_minibatches < 2:
        utils.fail(f"--num-minibatches {args.num_minibatches} leaves minibatches of {batch_size // args.num_minibatches} "
                   "step: advantages cannot be normalised over one step (fewer minibatches, or --no-norm-adv)")
    minibatch_size = batch_size // args.num_minibatches
    if args.micro_batch_size and minibatch_size % args.micro_batch_size:
        utils.fail(f"--micro-batch-size {args.micro_batch_size} must divide the minibatch of {minibatch_size} steps "
                   "(num-envs x num-steps / num-minibatches)")
    if args.total_timesteps < batch_size:
        utils.fail(f"--total-timesteps {args.total_timesteps} is less than one rollout of {batch_size} steps")
    utils.check_tracking(args)
    utils.check_memory(batch_size * 3 * args.resolution**2, utils.training_device(args), rollout_memory(args))


def main():
    args = parse_args()
    check_args(args)  # all bad input: one line, exit 2 (also memory, via utils.check_memory)
    args.micro_batch_size = resolve_micro_batch_size(args)  # on CUDA, 0: the most that fit (measured)
    # derived values
    batch_size = args.num_envs * args.num_steps
    minibatch_size = batch_size // args.num_minibatches
    micro_batch_size = args.micro_batch_size or minibatch_size  # 0 (on a CPU): the whole minibatch
    num_iterations = args.total_timesteps // batch_size
    learning_rate = args.learning_rate * (2 / args.width if args.rescale_lr else 1.0)  # Impoola: lr / (τ / 2)
    device = utils.training_device(args)
    fast = speed_plan(args, device)  # the speed switches acting here (none on a CPU)
    ctx = utils.mixed_precision(device, fast["bf16"])  # bf16 autocast of the training's forwards (evaluation stays float32)
    run = utils.Run(args, SCRIPT, RUN_NEUTRAL_FLAGS, ARCHITECTURE_FLAGS)  # the run folder, and the checkpoint to resume
    checkpoint, global_step = run.checkpoint, run.step
    run.open(device, batch_size=batch_size, minibatch_size=minibatch_size, micro_batch_size=micro_batch_size,
             num_iterations=num_iterations, learning_rate=f"{learning_rate:g}",
             speed_switches=", ".join(name for name, on in fast.items() if on) or "none")

    # set-up
    utils.set_up(args, device)  # seeds, CUDA switches, CPU threads
    envs = make_envs(args, args.num_envs, args.num_levels, args.seed)
    next_obs_np, _ = envs.reset()
    play_rollout = collect_rollout
    if fast["overlap_envs"]:  # the same games, as two halves stepped in turn
        envs = EnvHalves(envs, lambda num_envs: make_envs(args, num_envs, args.num_levels, args.seed))
        play_rollout = collect_rollout_overlapped
    agent = Agent(envs.num_actions, args.resolution, args.pool, args.width, args.dense_scale).to(device)
    if fast["channels_last"]:
        agent = agent.to(memory_format=torch.channels_last)
    optimizer = optim.Adam(agent.parameters(), lr=learning_rate, eps=1e-5)
    model = torch.compile(agent) if args.compile else agent
    policy, gae = (torch.compile(policy_step), torch.compile(compute_gae)) if args.compile else (policy_step, compute_gae)
    rollout = allocate_rollout(args.num_steps, args.num_envs, args.resolution, device, fast["channels_last"])
    reward_normalizer = new_reward_normalizer(args.num_envs, device)
    next_done = torch.zeros(args.num_envs, device=device)
    episodes = {"return": np.zeros(args.num_envs), "length": np.zeros(args.num_envs, dtype=np.int64)}
    if checkpoint:  # an exact continuation: the games, mid-episode, and every statistic that spans iterations
        next_obs_np, next_done, episodes = load_training_state(checkpoint, agent, optimizer, reward_normalizer, envs, device)
        run.resumed()  # and the random streams
    next_obs = torch.from_numpy(next_obs_np).to(device)
    run.log_parameter_counts(utils.parameter_counts(agent))

    def checkpoint_payload():
        return utils.checkpoint_payload(SCRIPT, args, global_step, model=agent.state_dict(), optimizer=optimizer.state_dict(),
                                        reward_normalizer={key: value.cpu() for key, value in reward_normalizer.items()},
                                        env_states=envs.get_state(), next_done=next_done.cpu(),
                                        episodes={key: torch.from_numpy(value.copy()) for key, value in episodes.items()})

    # training loop
    run.start_clock(global_step)
    for iteration in range(global_step // batch_size + 1, num_iterations + 1):
        previous_step = global_step
        run.keep_good(checkpoint_payload())  # this iteration's start: the previous one checked it finite
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * learning_rate
        # Rollout, then the value of the last observation and GAE (one autocast region: bf16 weights cast once, cached)
        with ctx:
            next_obs, next_done, finished_returns, finished_lengths = play_rollout(
                lambda obs: policy(agent, obs), envs, rollout, next_obs, next_done, reward_normalizer, episodes, args.gamma,
                args.reward_clip,
                on_step=lambda steps, episodic_return: run.progress.update(global_step + steps, episodic_return),
            )
            with torch.no_grad():
                next_value = model(next_obs)[1]
        global_step += batch_size
        advantages, returns = gae(
            rollout["rewards"], rollout["values"], rollout["dones"], next_value, next_done, args.gamma, args.gae_lambda
        )
        # Optimise the policy and value network on the flattened rollout (with --bf16, the network's forward autocast)
        batch = {key: rollout[key].flatten(0, 1) for key in ("obs", "actions", "logprobs", "values")}
        batch["advantages"], batch["returns"] = advantages.flatten(), returns.flatten()
        update_model = utils.within(ctx, model)  # the network's forward inside the mixed-precision context
        losses, finite = ppo_update(update_model, agent, optimizer, batch, args, micro_batch_size, run.progress.update)

        # logging, and the non-finite check (a few host syncs per iteration, none per environment step)
        run.check_finite(bool(finite) and bool(utils.finite_flag(agent, optimizer)), global_step)
        scalars = {"charts/SPS": run.sps(global_step), "charts/learning_rate": optimizer.param_groups[0]["lr"],
                   **{f"losses/{name}": value for name, value in losses.items()},
                   "losses/explained_variance": explained_variance(batch["values"], batch["returns"])}
        if finished_returns:
            scalars["charts/episodic_return"] = np.mean(finished_returns)
            scalars["charts/episodic_length"] = np.mean(finished_lengths)
        run.log(global_step, scalars)
        # diagnostics on recent observations (REFERENCE §5)
        if utils.crossed(previous_step, global_step, args.diag_every):
            recent = batch["obs"][torch.randperm(batch_size, device=device)[: args.diag_batch_size]]
            log_diagnostics(run, global_step, agent, recent, args)
        # evaluation (the last iteration's is the final one below) and checkpoints
        if utils.crossed(previous_step, global_step, args.eval_every) and iteration < num_iterations:
            log_evaluation(run, global_step, model, args.eval_episodes, args, device)
        if utils.crossed(previous_step, global_step, args.save_every):
            run.save(global_step, checkpoint_payload())

    # evaluation and saving at the end (every iteration's check covered the last state)
    run.progress.close()
    if args.final_eval_episodes:
        log_evaluation(run, global_step, model, args.final_eval_episodes, args, device)
    run.finish(checkpoint_payload())
    envs.close()


if __name__ == "__main__":
    main()
