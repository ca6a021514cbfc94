"""Rainbow on Atari (EnvPool) with the encoder-to-head join as a flag: flatten, global average
pooling (GAP) or global max pooling. Defaults follow Dopamine's rainbow.gin, the agent of "Mind
the GAP" (Sokar & Castro 2025): C51, 3-step returns, prioritised replay, Impala encoder, dense
layer x4. `--noisy --dueling --double` give full Rainbow; `--preset der` gives Data-Efficient
Rainbow on Atari 100k (van Hasselt et al. 2019, Dopamine's DER.gin)."""

import argparse
import copy
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import utils

SCRIPT = os.path.basename(__file__)
ARCHITECTURE_FLAGS = ["env_id", "encoder", "pool", "width", "dense_scale", "resolution", "noisy", "dueling", "num_atoms"]


# Args
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    runs_dir: str = "runs"
    """folder that holds the run folders"""
    preset: str = "rainbow"
    """rainbow (Dopamine rainbow.gin, 50M agent steps) or der (Data-Efficient Rainbow, Atari 100k); explicit flags override it"""
    seed: int = 1
    """seed of python, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when it is available"""
    compile: bool = False
    """torch.compile the network (worth it on a GPU; slow to start on a CPU)"""
    track: bool = False
    """log to Weights & Biases as well (needs `wandb` installed)"""
    wandb_project_name: str = "cleanrl_pool"
    """the W&B project"""
    wandb_entity: str = ""
    """the W&B entity (team); empty for your default"""
    capture_video: bool = False
    """save the first evaluation episode of every evaluation as a GIF under run_dir/videos/"""

    # Environment (EnvPool Atari, Dopamine's protocol: Machado et al. 2018)
    env_id: str = "Breakout"
    """the Atari game, a plain name (EnvPool's `<name>-v5`)"""
    resolution: int = 84
    """square side of the grey frames the network sees (EnvPool's img_height/img_width)"""
    num_envs: int = 1
    """parallel environments; the replay ratio stays one update per `train_frequency` agent steps summed over envs"""
    repeat_action_probability: float = 0.25
    """sticky actions (Dopamine 0.25; DER 0)"""
    episodic_life: bool = False
    """a lost life is terminal for learning (Dopamine no; DER yes); returns are still whole games"""
    max_episode_steps: int = 27_000
    """agent steps per episode at most (Dopamine: 27,000 = 108k frames = 30 minutes)"""

    # Network
    encoder: str = "impala"
    """impala (Dopamine's Impala for Atari, the GAP paper's main encoder) or nature (Mnih 2015)"""
    pool: str = "avg"
    """what joins encoder and dense layer: flatten, avg (global average pooling) or max"""
    width: int = 1
    """multiplies every encoder channel count"""
    dense_scale: int = 4
    """the first dense layer has 512 * dense_scale units (the GAP paper's default x4)"""
    num_atoms: int = 51
    """C51 atoms"""
    v_min: float = -10.0
    """lowest atom of the return distribution"""
    v_max: float = 10.0
    """highest atom of the return distribution"""
    noisy: bool = False
    """NoisyNet layers (factorised Gaussian, Fortunato et al. 2018) in the dense layers (full Rainbow)"""
    noisy_std: float = 0.5
    """sigma_0 of the noisy layers (Fortunato et al.; Dopamine)"""
    dueling: bool = False
    """dueling value/advantage heads (full Rainbow)"""

    # Algorithm (Dopamine rainbow.gin)
    total_timesteps: int = 50_000_000
    """agent steps in total (Dopamine: 200 iterations x 250k = 200M frames)"""
    learning_rate: float = 6.25e-5
    """Adam learning rate"""
    adam_eps: float = 1.5e-4
    """Adam epsilon"""
    buffer_size: int = 1_000_000
    """replay capacity in agent steps (all envs together)"""
    save_buffer: bool = False
    """put the replay buffer (frames and priorities) into checkpoints, so a resumed run keeps it (large)"""
    gamma: float = 0.99
    """discount factor"""
    n_step: int = 3
    """multi-step return length"""
    double: bool = False
    """double Q-learning: the online network picks the next action (full Rainbow)"""
    target_network_frequency: int = 8_000
    """agent steps between hard copies of the online network into the target network"""
    batch_size: int = 32
    """transitions per gradient update"""
    learning_starts: int = 20_000
    """agent steps stored before the first update (Dopamine's min_replay_history)"""
    train_frequency: int = 4
    """agent steps (summed over envs) per gradient update"""
    priority_exponent: float = 0.5
    """priority = loss ** priority_exponent (Dopamine: sqrt of the loss)"""
    importance_exponent: float = 0.5
    """importance weight = (1 / probability) ** importance_exponent, normalised by the batch maximum"""
    start_e: float = 1.0
    """epsilon at the start of learning"""
    end_e: float = 0.01
    """final epsilon"""
    epsilon_decay_steps: int = 250_000
    """agent steps after `learning_starts` over which epsilon falls linearly (Dopamine 250k; DER 2,000)"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation policy"""

    # Evaluation, checkpoints, diagnostics
    eval_every: int = 250_000
    """agent steps between evaluations (one more at the end)"""
    eval_episodes: int = 10
    """whole-game episodes per evaluation"""
    save_every: int = 1_000_000
    """agent steps between checkpoints"""
    resume: str = ""
    """checkpoint to resume from, or `auto` (latest of this env id, exp name and seed)"""
    diag_every: int = 250_000
    """agent steps between diagnostics (dormant neurons, feature norm, saliency)"""
    dormant_threshold: float = 0.025
    """a neuron whose normalised mean activation is <= this is dormant"""
    log_every: int = 1_000
    """agent steps between loss logs (and the non-finite-loss check)"""


PRESETS = {
    "rainbow": {},
    # DER (van Hasselt et al. 2019) as Dopamine's labs/atari_100k/configs/DER.gin
    "der": dict(
        noisy=True, dueling=True, double=True, n_step=10, learning_starts=1_600, train_frequency=1,
        target_network_frequency=2_000, learning_rate=1e-4, adam_eps=1.5e-4, repeat_action_probability=0.0,
        episodic_life=True, total_timesteps=100_000, eval_episodes=100, epsilon_decay_steps=2_000,
    ),
}


def parse_args() -> Args:
    """Read `--preset` first, then let tyro parse every flag with the preset's values as defaults."""
    preset_parser = argparse.ArgumentParser(add_help=False)
    preset_parser.add_argument("--preset", default="rainbow")
    preset = preset_parser.parse_known_args()[0].preset
    utils.check_choice("preset", preset, list(PRESETS))
    return tyro.cli(Args, default=Args(preset=preset, **PRESETS[preset]))


# Environment construction
def make_env(args, num_envs: int, seed: int, episodic_life: bool):
    """EnvPool Atari with every option set explicitly (EnvPool's defaults are not Dopamine's)."""
    import envpool

    return envpool.make(
        f"{args.env_id}-v5",
        env_type="gymnasium",
        num_envs=num_envs,
        seed=seed,
        img_height=args.resolution,
        img_width=args.resolution,
        stack_num=4,
        frame_skip=4,
        gray_scale=True,
        repeat_action_probability=args.repeat_action_probability,
        episodic_life=episodic_life,
        reward_clip=True,  # Dopamine clips rewards to [-1, 1]; Atari rewards are integers, so sign() is the same
        noop_max=1,  # Dopamine has no no-op starts; EnvPool crashes with 0
        use_fire_reset=False,  # Dopamine does not press FIRE at reset
        max_episode_steps=args.max_episode_steps,
        full_action_space=False,  # Dopamine uses the minimal action set
    )


# Network: encoder (with its --pool), then the C51 heads
class NoisyLinear(nn.Module):
    """Linear layer with factorised Gaussian noise (Fortunato et al. 2018, eqs. 10-11): the weight
    noise is f(eps_out) f(eps_in)^T with f(x) = sign(x) sqrt(|x|); fresh noise each forward in
    training mode, none in evaluation mode."""

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


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x):
        return x + self.net(x)


def make_encoder(encoder: str, width: int, in_channels: int) -> nn.Sequential:
    """The conv trunk phi (REFERENCE §3). PyTorch's default init equals Dopamine's
    variance_scaling(1/3, fan_in, uniform)."""
    if encoder == "nature":
        return nn.Sequential(
            nn.Conv2d(in_channels, 32 * width, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32 * width, 64 * width, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64 * width, 64 * width, 3, stride=1), nn.ReLU(),
        )
    stages, channels = [], in_channels
    for out_channels in (16 * width, 32 * width, 32 * width):
        stages.append(nn.Sequential(
            nn.Conv2d(channels, out_channels, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1),
            ResidualBlock(out_channels), ResidualBlock(out_channels),
        ))
        channels = out_channels
    return nn.Sequential(*stages, nn.ReLU())


def encoder_output_side(encoder: str, resolution: int) -> int:
    """Side of the encoder's feature map (VALID convs for nature, three stride-2 pools for impala)."""
    if encoder == "nature":
        return ((resolution - 8) // 4 + 1 - 4) // 2 + 1 - 2
    for _ in range(3):
        resolution = (resolution - 1) // 2 + 1
    return resolution


def join(features, pool: str):
    """The bottleneck's join: flatten (H*W*C features) or global average / max pooling (C features)."""
    if pool == "flatten":
        return features.flatten(1)
    if pool == "avg":
        return features.mean(dim=(2, 3))
    return features.amax(dim=(2, 3))


class QNetwork(nn.Module):
    """encoder -> join (--pool) -> dense 512 * dense_scale -> ReLU -> C51 head (dueling optional).
    Returns logits of shape (batch, actions, atoms)."""

    def __init__(self, args, num_actions: int):
        super().__init__()
        self.pool, self.num_actions, self.num_atoms, self.dueling = args.pool, num_actions, args.num_atoms, args.dueling
        self.encoder = make_encoder(args.encoder, args.width, 4)
        channels = self.encoder[-2][0].out_channels if args.encoder == "impala" else 64 * args.width
        side = encoder_output_side(args.encoder, args.resolution)
        joined = channels * side * side if args.pool == "flatten" else channels
        hidden = 512 * args.dense_scale

        def linear(i, o):
            return NoisyLinear(i, o, args.noisy_std) if args.noisy else nn.Linear(i, o)

        self.dense = linear(joined, hidden)
        self.advantage = linear(hidden, num_actions * args.num_atoms)
        self.value = linear(hidden, args.num_atoms) if args.dueling else None

    def head(self, hidden):
        advantage = self.advantage(hidden).view(-1, self.num_actions, self.num_atoms)
        if not self.dueling:
            return advantage
        value = self.value(hidden).view(-1, 1, self.num_atoms)
        return value + advantage - advantage.mean(dim=1, keepdim=True)

    def forward(self, obs):
        joined = join(self.encoder(obs.float() / 255.0), self.pool)
        return self.head(F.relu(self.dense(joined)))

    def parts(self):
        """(encoder, bottleneck, head) modules, for parameter counts."""
        head = [self.advantage] + ([self.value] if self.dueling else [])
        return [self.encoder], [self.dense], head


def q_values(logits, support):
    return (logits.softmax(dim=-1) * support).sum(-1)


# Rainbow math
def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """Linear from `start` at t=0 to `end` at t=duration, constant after (and `start` before 0)."""
    return end + (start - end) * min(max(1.0 - t / duration, 0.0), 1.0)


def n_step_returns(rewards, terminated, truncated, gamma: float):
    """Truncated n-step returns over windows (B, n) that stop at the first episode end.

    Returns (return, discount of the bootstrap value, steps): return = sum_i gamma^i r_i over the
    rewards up to and including the first terminated/truncated step; the bootstrap observation is
    `steps` rows ahead and its discount is gamma^steps, or 0 when the episode terminated.
    """
    ended = (terminated | truncated).float()
    alive = torch.cumprod(torch.cat([torch.ones_like(ended[:, :1]), 1.0 - ended[:, :-1]], dim=1), dim=1)
    powers = gamma ** torch.arange(rewards.shape[1], device=rewards.device, dtype=rewards.dtype)
    returns = (alive * powers * rewards).sum(1)
    steps = alive.sum(1).long()
    hit_terminal = (alive * terminated.float()).amax(1)
    return returns, (gamma**steps) * (1.0 - hit_terminal), steps


def project_distribution(next_probs, returns, discounts, support):
    """C51 target (Bellemare et al. 2017, Alg. 1): move each atom z_j to r + discount * z_j, clamp
    to [v_min, v_max] and split its probability between the two neighbouring atoms."""
    v_min, v_max, num_atoms = support[0], support[-1], support.numel()
    delta = (v_max - v_min) / (num_atoms - 1)
    target_atoms = (returns[:, None] + discounts[:, None] * support[None, :]).clamp(v_min, v_max)
    position = (target_atoms - v_min) / delta
    lower, upper = position.floor().long(), position.ceil().long()
    lower_weight = upper.float() - position + (lower == upper).float()  # an exact hit keeps all of it
    upper_weight = position - lower.float()
    projected = torch.zeros_like(next_probs)
    projected.scatter_add_(1, lower, next_probs * lower_weight)
    projected.scatter_add_(1, upper, next_probs * upper_weight)
    return projected


def importance_weights(probabilities, exponent: float):
    """(1 / p)^exponent normalised by the batch maximum (Dopamine: 1/sqrt(p) / max)."""
    weights = (probabilities + 1e-10) ** -exponent
    return weights / weights.max()


def sum_tree_update(tree, leaves, priorities):
    """Set leaf priorities (leaf i lives at tree[len(tree)//2 + i], the root at tree[1]) and
    recompute their ancestors one level at a time for the whole batch; ancestors shared by
    several leaves are written with the same sum."""
    nodes = leaves + tree.numel() // 2
    tree[nodes] = priorities.to(tree.dtype)
    for _ in range(int(math.log2(tree.numel() // 2))):
        nodes = nodes // 2
        tree[nodes] = tree[2 * nodes] + tree[2 * nodes + 1]


def sum_tree_retrieve(tree, targets):
    """Prefix-sum search, all targets in parallel from the root: the leaf i with
    sum(p[:i]) <= target < sum(p[:i + 1]). A node is entered only if its sum is positive, so a
    zero-priority leaf is never returned, even when rounding puts a target at an edge."""
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


# Replay storage: one row per vector step, each frame stored once per env, priorities in a sum tree
def make_replay(buffer_size: int, num_envs: int, resolution: int, device):
    """Row t of env e holds the newest frame of the observation the agent acted on, its action,
    the clipped reward and the episode-end flags of that step, `valid` (False for EnvPool's
    auto-reset step, whose action the env ignores) and `stack_start` (EnvPool filled the whole
    4-frame stack with this frame: a fresh game). Leaf t * num_envs + e of the sum tree holds the
    priority of the transition that starts at row t of env e (0 until its n-step window is stored)."""
    rows = buffer_size // num_envs
    leaves = 1 << max(1, math.ceil(math.log2(rows * num_envs)))
    return {
        "frames": torch.zeros((rows, num_envs, resolution, resolution), dtype=torch.uint8, device=device),
        "actions": torch.zeros((rows, num_envs), dtype=torch.long, device=device),
        "rewards": torch.zeros((rows, num_envs), dtype=torch.float32, device=device),
        "terminated": torch.zeros((rows, num_envs), dtype=torch.bool, device=device),
        "truncated": torch.zeros((rows, num_envs), dtype=torch.bool, device=device),
        "valid": torch.zeros((rows, num_envs), dtype=torch.bool, device=device),
        "stack_start": torch.zeros((rows, num_envs), dtype=torch.bool, device=device),
        "tree": torch.zeros(2 * leaves, dtype=torch.float64, device=device),
        "max_priority": torch.ones((), dtype=torch.float64, device=device),  # Dopamine starts at 1
        "rows_written": 0,
    }


def store_step(replay, frame, action, reward, terminated, truncated, valid, stack_start, n_step: int, stack_num: int = 4):
    """Write one row for all envs. The transition n rows back now has its whole n-step window and
    gets the maximum priority seen so far (if it is a real step); the row being overwritten and
    the stack_num - 1 rows after it (whose frame stacks reach back into it) get priority 0."""
    rows, num_envs = replay["valid"].shape
    row = replay["rows_written"] % rows
    replay["frames"][row] = frame
    replay["actions"][row] = action
    replay["rewards"][row] = reward
    replay["terminated"][row] = terminated
    replay["truncated"][row] = truncated
    replay["valid"][row] = valid
    replay["stack_start"][row] = stack_start
    envs = torch.arange(num_envs, device=frame.device)
    stale_rows = (row + torch.arange(stack_num, device=frame.device)) % rows
    leaves = [(stale_rows[:, None] * num_envs + envs).flatten()]
    priorities = [torch.zeros(stack_num * num_envs, dtype=torch.float64, device=frame.device)]
    if replay["rows_written"] >= n_step:
        complete_row = (row - n_step) % rows
        leaves.append(complete_row * num_envs + envs)
        priorities.append(replay["max_priority"] * replay["valid"][complete_row])
    sum_tree_update(replay["tree"], torch.cat(leaves), torch.cat(priorities))
    replay["rows_written"] += 1


def stack_frames(replay, rows_index, envs, stack_num: int = 4):
    """Rebuild EnvPool's frame stacks (B, stack_num, H, W) for rows of envs: walk back one row per
    frame, but never past a row whose stack EnvPool filled with its own frame (a fresh game)."""
    rows = replay["valid"].shape[0]
    stack = [rows_index]
    for _ in range(stack_num - 1):
        newest = stack[0]
        stack.insert(0, torch.where(replay["stack_start"][newest, envs], newest, (newest - 1) % rows))
    return replay["frames"][torch.stack(stack, dim=1), envs[:, None]]


def gather_transitions(replay, leaves, n_step: int, gamma: float):
    """n-step transitions starting at the given leaves: (obs, action, return, discount, next_obs).
    The window stops at the first episode end, so it never crosses EnvPool's auto-reset step."""
    rows, num_envs = replay["valid"].shape
    start_rows, envs = leaves // num_envs, leaves % num_envs
    window = (start_rows[:, None] + torch.arange(n_step, device=leaves.device)) % rows
    returns, discounts, steps = n_step_returns(
        replay["rewards"][window, envs[:, None]], replay["terminated"][window, envs[:, None]],
        replay["truncated"][window, envs[:, None]], gamma,
    )
    next_rows = (start_rows + steps) % rows
    obs, next_obs = stack_frames(replay, start_rows, envs), stack_frames(replay, next_rows, envs)
    return obs, replay["actions"][start_rows, envs], returns, discounts, next_obs


def sample_transitions(replay, batch_size: int, n_step: int, gamma: float):
    """A prioritised batch plus its leaves and sampling probabilities (priority / total)."""
    leaves, priorities = sum_tree_sample(replay["tree"], batch_size)
    return gather_transitions(replay, leaves, n_step, gamma), leaves, (priorities / replay["tree"][1]).float()


def recent_observations(replay, count: int):
    """Stacks of the newest stored rows of every env (at most `count`), for diagnostics."""
    rows, num_envs = replay["valid"].shape
    newest = min(replay["rows_written"], rows)
    per_env = max(1, min(newest, math.ceil(count / num_envs)))
    device = replay["frames"].device
    row_index = ((replay["rows_written"] - 1 - torch.arange(per_env, device=device)) % rows).repeat_interleave(num_envs)
    envs = torch.arange(num_envs, device=device).repeat(per_env)
    return stack_frames(replay, row_index, envs)[:count]


# Training and evaluation steps
def rainbow_loss(q_network, target_network, obs, actions, returns, discounts, next_obs, support, double: bool):
    """Per-transition cross-entropy between the projected target distribution and the online one."""
    with torch.no_grad():
        next_target_probs = target_network(next_obs).softmax(dim=-1)
        chooser = q_network(next_obs).softmax(dim=-1) if double else next_target_probs
        next_actions = (chooser * support).sum(-1).argmax(dim=1)
        next_probs = next_target_probs[torch.arange(len(next_actions), device=support.device), next_actions]
        target = project_distribution(next_probs, returns, discounts, support)
    logits = q_network(obs)
    chosen_log_probs = logits[torch.arange(len(actions), device=support.device), actions].log_softmax(dim=-1)
    return -(target * chosen_log_probs).sum(-1), logits


def evaluate(args, q_network, support, device, episodes: int, epsilon: float, capture_video: bool):
    """Whole games (no life-loss ends) with an epsilon-greedy policy and the noise switched off.
    Each env owns a fixed share of the episodes, so short episodes are not favoured."""
    num_envs = min(episodes, 8)
    envs = make_env(args, num_envs, args.seed + 10_000, episodic_life=False)
    quota = np.array([episodes // num_envs + (e < episodes % num_envs) for e in range(num_envs)])
    returns, running, frames = [], np.zeros(num_envs), []
    obs, _ = envs.reset()
    was_training = q_network.training
    q_network.eval()
    while (quota > 0).any():
        with torch.no_grad():
            obs_device = torch.from_numpy(obs).to(device)
            actions = q_values(q_network(obs_device), support).argmax(dim=1)
            explore = torch.rand(num_envs, device=device) < epsilon
            actions = torch.where(explore, torch.randint(0, envs.action_space.n, (num_envs,), device=device), actions)
        obs, _, terminated, truncated, info = envs.step(actions.cpu().numpy())
        running += info["reward"]
        if capture_video and len(returns) == 0 and quota[0] > 0:
            frames.append(np.repeat(obs[0, -1][:, :, None], 3, axis=2))
        for e in np.flatnonzero(terminated | truncated):
            if quota[e] > 0:
                returns.append(running[e])
                quota[e] -= 1
            running[e] = 0.0
    envs.close()
    q_network.train(was_training)
    return returns, frames


def diagnostics(writer, q_network, support, obs, dormant_threshold: float, global_step: int):
    """Dormant fractions per part, feature norm and gradient saliency of Q(s, a*) on recent observations."""
    activations = {"encoder": []}
    hooks = [m.register_forward_hook(lambda m, i, o: activations["encoder"].append(o))
             for m in q_network.encoder.modules() if isinstance(m, nn.ReLU)]
    was_training = q_network.training
    q_network.eval()
    with torch.no_grad():
        joined = join(q_network.encoder(obs.float() / 255.0), q_network.pool)
        hidden = F.relu(q_network.dense(joined))
        logits = q_network.head(hidden)
    for hook in hooks:
        hook.remove()
    writer.add_scalar("diag/dormant_fraction/encoder", utils.dormant_fraction(activations["encoder"], dormant_threshold), global_step)
    writer.add_scalar("diag/dormant_fraction/bottleneck", utils.dormant_fraction([hidden], dormant_threshold), global_step)
    writer.add_scalar("diag/dormant_fraction/head", utils.dormant_fraction([logits.flatten(1)], dormant_threshold), global_step)
    writer.add_scalar("diag/feature_norm", joined.norm(dim=1).mean().item(), global_step)
    pixels = obs[:8].float().requires_grad_(True)
    values = q_values(q_network(pixels), support)
    values.max(dim=1).values.sum().backward()
    writer.add_images("images/saliency", utils.saliency_image(pixels.grad), global_step, dataformats="NCHW")
    q_network.zero_grad(set_to_none=True)
    q_network.train(was_training)


def validate(args):
    """Bad input stops here, before the run folder exists."""
    import envpool

    utils.check_choice("encoder", args.encoder, ["nature", "impala"])
    utils.check_choice("pool", args.pool, ["flatten", "avg", "max"])
    if f"{args.env_id}-v5" not in envpool.list_all_envs():
        utils.fail(f"--env-id {args.env_id!r} is not an EnvPool Atari game; use a plain name such as Breakout or Pong")
    for flag in ["num_envs", "total_timesteps", "width", "dense_scale", "batch_size", "buffer_size", "n_step",
                 "train_frequency", "target_network_frequency", "learning_rate", "eval_every", "eval_episodes",
                 "save_every", "diag_every", "log_every", "max_episode_steps", "epsilon_decay_steps"]:
        utils.check_positive(flag.replace("_", "-"), getattr(args, flag))
    smallest = 36 if args.encoder == "nature" else 8
    if args.resolution < smallest or args.resolution > 1024:
        utils.fail(f"--resolution {args.resolution!r} must be between {smallest} and 1024 for --encoder {args.encoder}")
    if args.num_atoms < 2 or not args.v_min < args.v_max:
        utils.fail(f"--num-atoms {args.num_atoms!r} must be >= 2 and --v-min {args.v_min!r} below --v-max {args.v_max!r}")
    if not 0 <= args.repeat_action_probability < 1:
        utils.fail(f"--repeat-action-probability {args.repeat_action_probability!r} must be in [0, 1)")
    if args.batch_size > args.buffer_size:
        utils.fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}")
    if args.learning_starts > args.buffer_size:
        utils.fail(f"--learning-starts {args.learning_starts} is larger than --buffer-size {args.buffer_size}")
    if args.buffer_size // args.num_envs <= args.n_step + 4:
        utils.fail(f"--buffer-size {args.buffer_size} leaves {args.buffer_size // args.num_envs} rows per env; need more than --n-step + 4 = {args.n_step + 4}")
    if args.learning_starts < args.batch_size:
        utils.fail(f"--learning-starts {args.learning_starts} must be at least --batch-size {args.batch_size}")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            utils.fail("--track needs the `wandb` package, which is not installed")


def main():
    # Set-up
    args = parse_args()
    validate(args)
    run_dir, checkpoint_file = utils.resolve_run(args)
    checkpoint = utils.load_checkpoint(checkpoint_file, SCRIPT, args, ARCHITECTURE_FLAGS) if checkpoint_file else None
    rows_per_env = args.buffer_size // args.num_envs
    print(f"{SCRIPT} resolved config:\n" + "\n".join(f"  {key} = {value}" for key, value in sorted(asdict(args).items())))
    print(f"  (derived) run_dir = {run_dir}, replay rows per env = {rows_per_env}, "
          f"updates per vector step = {args.num_envs / args.train_frequency:g}")

    utils.seed_everything(args.seed, args.torch_deterministic)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    envs = make_env(args, args.num_envs, args.seed + (checkpoint["global_step"] if checkpoint else 0), args.episodic_life)
    num_actions = envs.action_space.n
    support = torch.linspace(args.v_min, args.v_max, args.num_atoms, device=device)
    q_network = QNetwork(args, num_actions).to(device)
    target_network = copy.deepcopy(q_network)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps)
    network = torch.compile(q_network) if args.compile else q_network
    target = torch.compile(target_network) if args.compile else target_network
    replay = make_replay(args.buffer_size, args.num_envs, args.resolution, device)

    global_step, pending_update_steps, nonfinite_last_good = 0, 0, None
    if checkpoint:
        q_network.load_state_dict(checkpoint["q_network"])
        target_network.load_state_dict(checkpoint["target_network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        global_step, pending_update_steps = checkpoint["global_step"], checkpoint["pending_update_steps"]
        utils.set_rng_state(checkpoint["rng"])
        if "replay" in checkpoint:
            for key, value in checkpoint["replay"].items():
                replay[key] = value.to(device) if torch.is_tensor(value) else value
            # the stored episodes do not go on after a resume: windows still open at the save never complete
            open_rows = (replay["rows_written"] - 1 - torch.arange(args.n_step, device=device)) % rows_per_env
            replay["valid"][open_rows] = False
        print(f"resumed from {checkpoint_file} at step {global_step} (replay {'restored' if 'replay' in checkpoint else 'empty'})")
    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity or None, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), save_code=True)
    writer = utils.start_run(args, run_dir)
    parts = dict(zip(["encoder", "bottleneck", "head"], (utils.parameter_count(*p) for p in q_network.parts())))
    print("parameters: " + ", ".join(f"{part} {count:,}" for part, count in parts.items()))
    if global_step == 0:
        for part, count in parts.items():
            writer.add_scalar(f"diag/params/{part}", count, 0)

    def checkpoint_payload(step, networks_and_optimizer):
        payload = {"script": SCRIPT, "args": asdict(args), "global_step": step, "rng": utils.rng_state(),
                   "pending_update_steps": pending_update_steps, **networks_and_optimizer}
        if args.save_buffer:
            payload["replay"] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in replay.items()}
        return payload

    def current_state():
        return {"q_network": q_network.state_dict(), "target_network": target_network.state_dict(), "optimizer": optimizer.state_dict()}

    def run_evaluation(step):
        returns, frames = evaluate(args, q_network, support, device, args.eval_episodes, args.eval_epsilon, args.capture_video)
        mean_return = float(np.mean(returns))
        writer.add_scalar("eval/return", mean_return, step)
        normalized = utils.atari_human_normalized_score(args.env_id, mean_return)
        if normalized is not None:
            writer.add_scalar("eval/normalized_score", normalized, step)
        if frames:
            utils.save_video(os.path.join(run_dir, "videos", f"eval_{step:012d}.gif"), frames)
        print(f"step {step}: eval return {mean_return:.2f} over {len(returns)} episodes")

    # Training loop
    obs, info = envs.reset()
    obs = torch.from_numpy(obs).to(device)
    stack_start = torch.from_numpy(info["elapsed_step"] == 0).to(device)
    after_episode_end = np.zeros(args.num_envs, dtype=bool)
    episode_returns = np.zeros(args.num_envs)
    losses_sum = torch.zeros((), device=device)
    q_sum = torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    loss_count, start_step, start_time = 0, global_step, time.time()
    while global_step < args.total_timesteps:
        # act: epsilon-greedy on the online network (with noise when --noisy), epsilon 1 until learning starts
        epsilon = linear_schedule(args.start_e, args.end_e, args.epsilon_decay_steps, global_step - args.learning_starts)
        with torch.no_grad():
            actions = q_values(network(obs), support).argmax(dim=1)
        explore = torch.rand(args.num_envs, device=device) < epsilon
        actions = torch.where(explore, torch.randint(0, num_actions, (args.num_envs,), device=device), actions)
        next_obs, reward, terminated, truncated, info = envs.step(actions.cpu().numpy())
        global_step += args.num_envs

        # store: the step right after an episode end is EnvPool's auto-reset (action ignored): kept
        # as a frame (the last observation of that episode) but never as a transition
        store_step(
            replay, obs[:, -1], actions, torch.from_numpy(reward).to(device), torch.from_numpy(terminated).to(device),
            torch.from_numpy(truncated).to(device), torch.from_numpy(~after_episode_end).to(device), stack_start, args.n_step,
        )
        obs = torch.from_numpy(next_obs).to(device)
        stack_start = torch.from_numpy(info["elapsed_step"] == 0).to(device)
        after_episode_end = terminated | truncated

        # whole-game statistics from EnvPool's unclipped reward (a lost life is not a game over)
        episode_returns += info["reward"]
        for e in np.flatnonzero(info["terminated"].astype(bool) | truncated):
            writer.add_scalar("charts/episodic_return", episode_returns[e], global_step)
            writer.add_scalar("charts/episodic_length", info["elapsed_step"][e], global_step)
            episode_returns[e] = 0.0

        # learn: one update per train_frequency agent steps, once min replay is stored
        stored_steps = min(replay["rows_written"], rows_per_env) * args.num_envs
        if stored_steps >= args.learning_starts and replay["rows_written"] > args.n_step + 1:
            pending_update_steps += args.num_envs
            for _ in range(pending_update_steps // args.train_frequency):
                (batch_obs, batch_actions, returns, discounts, batch_next_obs), leaves, probabilities = sample_transitions(
                    replay, args.batch_size, args.n_step, args.gamma
                )
                loss_per_sample, logits = rainbow_loss(
                    network, target, batch_obs, batch_actions, returns, discounts, batch_next_obs, support, args.double
                )
                loss = (importance_weights(probabilities, args.importance_exponent) * loss_per_sample).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # Dopamine: new priority = sqrt(loss + 1e-10); new transitions get the running maximum
                new_priorities = (loss_per_sample.detach().double() + 1e-10) ** args.priority_exponent
                new_priorities = torch.where(torch.isfinite(new_priorities), new_priorities, replay["max_priority"])
                sum_tree_update(replay["tree"], leaves, new_priorities)
                replay["max_priority"] = torch.maximum(replay["max_priority"], new_priorities.max())
                losses_sum += loss.detach()
                q_sum += q_values(logits.detach(), support).mean()
                nonfinite |= ~torch.isfinite(loss.detach())
                loss_count += 1
            pending_update_steps %= args.train_frequency
            if global_step // args.target_network_frequency != (global_step - args.num_envs) // args.target_network_frequency:
                target_network.load_state_dict(q_network.state_dict())

        # log (the only host syncs of learning) and stop on a non-finite loss with the last good state saved
        if global_step // args.log_every != (global_step - args.num_envs) // args.log_every:
            if loss_count:
                if bool(nonfinite):
                    path = utils.checkpoint_path(run_dir, nonfinite_last_good[0])
                    utils.save_checkpoint(path, checkpoint_payload(*nonfinite_last_good))
                    writer.close()
                    print(f"error: non-finite loss between steps {nonfinite_last_good[0]} and {global_step}; "
                          f"last good state saved to {path}", file=sys.stderr)
                    sys.exit(1)
                writer.add_scalar("losses/loss", (losses_sum / loss_count).item(), global_step)
                writer.add_scalar("losses/q_values", (q_sum / loss_count).item(), global_step)
                losses_sum.zero_(), q_sum.zero_()
                loss_count = 0
            nonfinite_last_good = (global_step, copy.deepcopy(current_state()))
            sps = int((global_step - start_step) / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            print(f"step {global_step}: SPS {sps}")

        if global_step // args.diag_every != (global_step - args.num_envs) // args.diag_every:
            diagnostics(writer, q_network, support, recent_observations(replay, 256), args.dormant_threshold, global_step)
        if global_step // args.eval_every != (global_step - args.num_envs) // args.eval_every and global_step < args.total_timesteps:
            run_evaluation(global_step)
        if global_step // args.save_every != (global_step - args.num_envs) // args.save_every:
            utils.save_checkpoint(utils.checkpoint_path(run_dir, global_step), checkpoint_payload(global_step, current_state()))

    # Evaluation and saving
    envs.close()
    run_evaluation(global_step)
    utils.save_checkpoint(os.path.join(run_dir, "final.pt"), checkpoint_payload(global_step, current_state()))
    writer.close()
    print(f"done: {global_step} agent steps, run folder {run_dir}")


if __name__ == "__main__":
    main()
