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
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
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
PROCGEN_GAMES = sorted(utils.PROCGEN_SCORE_RANGES)


# Args
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    compile: bool = False
    """if toggled, the network is wrapped in torch.compile (worth it on a GPU)"""
    torch_threads: int = 0
    """CPU threads of torch (0: torch's default); 1 is fastest for small networks on a small, shared CPU"""
    track: bool = False
    """if toggled, the run is also synced to Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "cleanrl_pool"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    capture_video: bool = False
    """if toggled, the first evaluation episode of each level set is saved as a GIF in run_dir/videos"""
    runs_dir: str = "runs"
    """the folder that holds the run folders"""
    resume: str = ""
    """a checkpoint to continue from (the games too: an exact continuation), or `auto`: the newest of this env id,
    experiment and seed with the same training configuration (else a new run)"""

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
    """what joins the encoder to the dense layer: flatten (Impala), avg (Impoola) or max"""
    width: int = 2
    """tau, multiplies the encoder channels (16, 32, 32)"""
    dense_scale: int = 1
    """multiplies the width (256) of the dense layer after the bottleneck"""

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
    keep_checkpoints: int = 3
    """how many of the newest periodic checkpoints stay on disk (older ones are deleted)"""
    diag_every: int = 250_000
    """log dormant fractions, feature norm and saliency every this many steps (0: never)"""
    diag_batch_size: int = 256
    """the number of recent observations the diagnostics look at"""
    dormant_threshold: float = 0.025
    """a neuron is dormant when its normalised mean activation is at most this (Sokar et al. 2023)"""


# The valid range of every numeric flag, checked before any work (utils.check_ranges)
FLAG_RANGES = {
    "seed": f"[0, {procgen_hd.INT32_MAX - 200_000}]",  # the envs' seeds are seed, seed + 100,000 and seed + 200,000
    "torch_threads": "[0, inf)", "num_levels": f"[0, {procgen_hd.INT32_MAX}]", "start_level": f"[0, {procgen_hd.INT32_MAX}]",
    "resolution": f"[1, {procgen_hd.MAX_RESOLUTION}]", "num_envs": "[1, inf)",
    "width": "[1, inf)", "dense_scale": "[1, inf)",
    "total_timesteps": "[1, inf)", "learning_rate": "(0, inf)", "num_steps": "[1, inf)", "gamma": "[0, 1]",
    "gae_lambda": "[0, 1]", "num_minibatches": "[1, inf)", "update_epochs": "[1, inf)", "clip_coef": "(0, inf)",
    "ent_coef": "[0, inf)", "vf_coef": "[0, inf)", "max_grad_norm": "(0, inf)", "target_kl": "(0, inf)", "reward_clip": "(0, inf)",
    "eval_every": "[0, inf)", "eval_episodes": "[0, inf)", "final_eval_episodes": "[0, inf)", "eval_num_envs": "[1, inf)",
    "save_every": "[0, inf)", "keep_checkpoints": "[1, inf)", "diag_every": "[0, inf)", "diag_batch_size": "[1, inf)",
    "dormant_threshold": "[0, 1]",
}


# Environment construction: Procgen-HD, drawn natively at R x R, reset in the step that ends an episode
def make_envs(args, num_envs: int, num_levels: int, seed: int) -> procgen_hd.ProcgenHDEnv:
    """`num_envs` games on `num_levels` levels from `start_level` (0 levels: the full distribution)."""
    return procgen_hd.ProcgenHDEnv(args.env_id, num_envs, args.resolution, num_levels=num_levels,
                                   start_level=args.start_level if num_levels else 0,
                                   distribution_mode=args.distribution_mode, seed=seed)


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
    normalizer["var"] = (
        normalizer["var"] * normalizer["count"] + batch_var * batch_count + delta**2 * normalizer["count"] * batch_count / total
    ) / total
    normalizer["count"] = total
    normalizer["discounted_return"] = returns * (1 - done)
    scaled = reward / torch.sqrt(normalizer["var"] + 1e-8)
    return scaled.clamp(-clip, clip).float()


# Network: Impala-CNN encoder, bottleneck (flatten / avg / max, then the dense layer), actor and critic heads
def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class ResidualBlock(nn.Module):
    """x + Conv3x3(ReLU(Conv3x3(ReLU(x))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.relu0 = nn.ReLU()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        return x + self.conv1(self.relu1(self.conv0(self.relu0(x))))


def impala_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    """Conv3x3 -> MaxPool(3, stride 2, padding 1) -> two residual blocks; halves the side (ceil)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ResidualBlock(out_channels),
        ResidualBlock(out_channels),
    )


def pool_features(feature_map: torch.Tensor, pool: str) -> torch.Tensor:
    """The bottleneck's join: (B, C, H, W) -> (B, C*H*W) for flatten, (B, C) for avg / max."""
    if pool == "flatten":
        return feature_map.flatten(1)
    if pool == "avg":
        return feature_map.mean(dim=(2, 3))
    return feature_map.amax(dim=(2, 3))


class Agent(nn.Module):
    def __init__(self, num_actions: int, resolution: int, pool: str, width: int, dense_scale: int):
        super().__init__()
        channels = [16 * width, 32 * width, 32 * width]
        self.pool = pool
        self.encoder = nn.Sequential(
            impala_stage(3, channels[0]), impala_stage(channels[0], channels[1]), impala_stage(channels[1], channels[2]),
            nn.ReLU(),
        )
        side = math.ceil(resolution / 8)  # three stride-2 poolings; Impala's dense layer grows as R^2
        pooled_size = channels[2] * (side * side if pool == "flatten" else 1)
        hidden_size = 256 * dense_scale
        self.dense = nn.Sequential(nn.Linear(pooled_size, hidden_size), nn.ReLU())
        self.actor = layer_init(nn.Linear(hidden_size, num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(hidden_size, 1), std=1)

    def forward(self, obs):
        """uint8 (B, 3, R, R) -> (action logits, value)."""
        hidden = self.dense(pool_features(self.encoder(obs.float() / 255.0), self.pool))
        return self.actor(hidden), self.critic(hidden).squeeze(-1)


def sample_action(logits, generator=None):
    """A sample of softmax(logits) by the Gumbel-max trick: unlike Categorical.sample, non-finite
    logits do not crash mid-rollout, so the once-per-iteration non-finite check can report them."""
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    return torch.argmax(logits - torch.log(-torch.log(uniform)), dim=1)


def get_action_and_value(model, obs, action=None):
    logits, value = model(obs)
    distribution = Categorical(logits=logits, validate_args=False)
    if action is None:
        action = sample_action(logits)
    return action, distribution.log_prob(action), distribution.entropy(), value


def parameter_counts(agent: Agent) -> dict:
    """Weights per part (CONVENTIONS): encoder = conv trunk, bottleneck = the dense layer after the join."""
    return {
        "encoder": utils.parameter_count(agent.encoder),
        "bottleneck": utils.parameter_count(agent.dense),
        "head": utils.parameter_count(agent.actor, agent.critic),
    }


def network_diagnostics(agent: Agent, obs: torch.Tensor, threshold: float) -> dict:
    """Dormant fraction per part and feature norm on a batch of observations (REFERENCE §5).

    encoder: every ReLU output of the trunk; bottleneck: the dense layer's activated output;
    head: the actor's logits and the critic's value; feature norm: mean L2 norm of the pooled vector.
    """
    activations = {"encoder": [], "pooled": [], "bottleneck": [], "head": []}

    def recorder(part, record_input=False):
        return lambda module, inputs, output: activations[part].append(inputs[0] if record_input else output)

    hooks = [m.register_forward_hook(recorder("encoder")) for m in agent.encoder.modules() if isinstance(m, nn.ReLU)]
    hooks.append(agent.dense.register_forward_hook(recorder("pooled", record_input=True)))
    hooks.append(agent.dense.register_forward_hook(recorder("bottleneck")))
    hooks += [agent.actor.register_forward_hook(recorder("head")), agent.critic.register_forward_hook(recorder("head"))]
    try:
        with torch.no_grad():
            agent(obs)
    finally:
        for hook in hooks:
            hook.remove()
    diagnostics = {
        f"dormant_fraction/{part}": utils.dormant_fraction(activations[part], threshold)
        for part in ("encoder", "bottleneck", "head")
    }
    diagnostics["feature_norm"] = activations["pooled"][0].norm(dim=1).mean().item()
    return diagnostics


def saliency_grid(agent: Agent, obs: torch.Tensor) -> torch.Tensor:
    """One row per observation: the frame, |dV/ds| and |d logit(a*)/ds| (a* = most likely action),
    as (3, B*R, 3*R) in [0, 1] (Procgen-HD paper's vanilla-gradient saliency)."""
    pixels = obs.float().requires_grad_()
    logits, value = agent(pixels)
    value_gradient = torch.autograd.grad(value.sum(), pixels, retain_graph=True)[0]
    chosen_logit = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    action_gradient = torch.autograd.grad(chosen_logit, pixels)[0]
    rows = [
        obs.float() / 255.0,
        utils.saliency_image(value_gradient).expand(-1, 3, -1, -1),
        utils.saliency_image(action_gradient).expand(-1, 3, -1, -1),
    ]
    return torch.cat([torch.cat(list(images), dim=1) for images in rows], dim=2).cpu()


# Storage: the rollout on the training device, observations as uint8
def allocate_rollout(num_steps: int, num_envs: int, resolution: int, device) -> dict:
    return {
        "obs": torch.zeros((num_steps, num_envs, 3, resolution, resolution), dtype=torch.uint8, device=device),
        "actions": torch.zeros((num_steps, num_envs), dtype=torch.long, device=device),
        "logprobs": torch.zeros((num_steps, num_envs), device=device),
        "rewards": torch.zeros((num_steps, num_envs), device=device),
        "dones": torch.zeros((num_steps, num_envs), device=device),
        "values": torch.zeros((num_steps, num_envs), device=device),
    }


def collect_rollout(model, envs, rollout: dict, next_obs, next_done, reward_normalizer: dict, episodes: dict,
                    gamma: float, reward_clip: float):
    """Play one rollout, writing every step into `rollout`; returns (next_obs, next_done, finished episodes'
    returns, their lengths). One host transfer of actions per step, everything else stays on the device.

    CleanRL's convention: dones[t] = 1 when obs[t] is the first frame of an episode (the previous step
    ended one). Procgen resets inside the step that ends an episode, so every step is a real transition.
    """
    device = next_obs.device
    finished_returns, finished_lengths = [], []
    for step in range(rollout["obs"].shape[0]):
        rollout["obs"][step] = next_obs
        rollout["dones"][step] = next_done
        with torch.no_grad():
            action, logprob, _, value = get_action_and_value(model, next_obs)
        rollout["actions"][step], rollout["logprobs"][step], rollout["values"][step] = action, logprob, value
        obs, reward, done, _ = envs.step(action.cpu().numpy())
        next_obs = torch.from_numpy(obs).to(device)
        next_done = torch.from_numpy(done).to(device, torch.float32)
        rollout["rewards"][step] = normalize_reward(
            reward_normalizer, torch.from_numpy(reward).to(device), next_done, gamma, reward_clip
        )
        # An episode's return ends with the reward of the step that ended it
        episodes["return"] += reward
        episodes["length"] += 1
        if done.any():
            finished_returns += episodes["return"][done].tolist()
            finished_lengths += episodes["length"][done].tolist()
            episodes["return"][done], episodes["length"][done] = 0.0, 0
    return next_obs, next_done, finished_returns, finished_lengths


def compute_gae(rewards, values, dones, next_value, next_done, gamma: float, gae_lambda: float):
    """Generalised advantage estimation (Schulman et al. 2016), CleanRL's convention:
    dones[t] = 1 when obs[t] follows the end of an episode, so step t - 1 does not bootstrap.
    Returns (advantages, returns), both (T, N)."""
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


# Evaluation: a fixed number of whole episodes per environment, actions sampled like the papers
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


def main():
    args = tyro.cli(Args)

    # Bad input stops here, before any work
    utils.check_choice("env-id", args.env_id, PROCGEN_GAMES)
    utils.check_choice("distribution-mode", args.distribution_mode, ["easy", "hard"])
    utils.check_choice("pool", args.pool, ["flatten", "avg", "max"])
    if args.num_levels is None:
        args.num_levels = 200 if args.distribution_mode == "easy" else 500  # Procgen paper's protocol
    utils.check_ranges(args, FLAG_RANGES)
    if args.start_level + args.num_levels > procgen_hd.INT32_MAX:
        utils.fail(f"--start-level {args.start_level} + --num-levels {args.num_levels} must stay below 2**31 "
                   "(Procgen's level seeds)")
    if args.eval_every and not args.eval_episodes:
        utils.fail(f"--eval-episodes 0 with --eval-every {args.eval_every}: evaluate some episodes, or --eval-every 0")
    batch_size = args.num_envs * args.num_steps
    if args.num_minibatches > batch_size or batch_size % args.num_minibatches:
        utils.fail(f"--num-minibatches {args.num_minibatches} must divide the rollout of {batch_size} steps (num-envs x num-steps)")
    minibatch_size = batch_size // args.num_minibatches
    if args.norm_adv and minibatch_size < 2:
        utils.fail(f"--num-minibatches {args.num_minibatches} leaves minibatches of {minibatch_size} step: advantages "
                   "cannot be normalised over one step (fewer minibatches, or --no-norm-adv)")
    num_iterations = args.total_timesteps // batch_size
    if num_iterations == 0:
        utils.fail(f"--total-timesteps {args.total_timesteps} is less than one rollout of {batch_size} steps")
    learning_rate = args.learning_rate * (2 / args.width if args.rescale_lr else 1.0)  # Impoola: lr / (tau / 2)
    if args.track:
        try:
            import wandb
        except ImportError:
            utils.fail("--track needs wandb (pip install wandb); the script runs without it")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    rollout_bytes = batch_size * 3 * args.resolution**2
    free_bytes = utils.free_memory_bytes(device)
    if rollout_bytes > 0.8 * free_bytes:
        utils.fail(f"--resolution {args.resolution} needs {rollout_bytes / 1e9:.1f} GB of uint8 rollout on {device.type}, "
                   f"{free_bytes / 1e9:.1f} GB free; lower --resolution, --num-envs or --num-steps")
    run_dir, checkpoint_file = utils.resolve_run(args)
    checkpoint = None
    if checkpoint_file:
        checkpoint = utils.load_checkpoint(checkpoint_file, SCRIPT, args, ["env_id", "pool", "width", "dense_scale", "resolution",
                                                                           "num_envs", "distribution_mode"])
        if "env_states" not in checkpoint:
            utils.fail(f"--resume {checkpoint_file!r} holds no game states (written before the Procgen-HD back end)")

    # Set-up
    print(f"{SCRIPT}: " + ", ".join(f"{key}={value}" for key, value in sorted(asdict(args).items())))
    print(f"derived: device={device}, batch_size={batch_size}, minibatch_size={minibatch_size}, "
          f"num_iterations={num_iterations}, learning_rate={learning_rate:g}, run_dir={run_dir}")
    if args.track:
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), save_code=True)
    writer = utils.start_run(args, run_dir, purge_step=checkpoint["global_step"] if checkpoint else None)
    utils.seed_everything(args.seed, args.torch_deterministic)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    global_step = checkpoint["global_step"] if checkpoint else 0
    envs = make_envs(args, args.num_envs, args.num_levels, args.seed)
    num_actions = envs.num_actions

    agent = Agent(num_actions, args.resolution, args.pool, args.width, args.dense_scale).to(device)
    optimizer = optim.Adam(agent.parameters(), lr=learning_rate, eps=1e-5)
    model = torch.compile(agent) if args.compile else agent
    reward_normalizer = new_reward_normalizer(args.num_envs, device)
    next_obs_np, _ = envs.reset()
    next_done = torch.zeros(args.num_envs, device=device)
    episodes = {"return": np.zeros(args.num_envs), "length": np.zeros(args.num_envs, dtype=np.int64)}
    if checkpoint:  # an exact continuation: the games, mid-episode, and every statistic that spans iterations
        agent.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        reward_normalizer.update({key: value.to(device) for key, value in checkpoint["reward_normalizer"].items()})
        next_obs_np, _ = envs.set_state(checkpoint["env_states"])
        next_done = checkpoint["next_done"].to(device)
        episodes = {key: value.numpy().copy() for key, value in checkpoint["episodes"].items()}
        utils.set_rng_state(checkpoint["rng"])
        print(f"resumed from {checkpoint_file} at step {global_step}")
    params = parameter_counts(agent)
    print("parameters: " + ", ".join(f"{part} {count:,}" for part, count in params.items()) + f", total {sum(params.values()):,}")
    if not checkpoint:
        for part, count in params.items():
            writer.add_scalar(f"diag/params/{part}", count, 0)

    def checkpoint_payload():
        return {
            "script": SCRIPT, "args": asdict(args), "global_step": global_step, "rng": utils.rng_state(),
            "model": agent.state_dict(), "optimizer": optimizer.state_dict(),
            "reward_normalizer": {key: value.cpu() for key, value in reward_normalizer.items()},
            "env_states": envs.get_state(), "next_done": next_done.cpu(),
            "episodes": {key: torch.from_numpy(value.copy()) for key, value in episodes.items()},
        }

    def run_evaluation(num_episodes: int):
        # Fresh games with fixed seeds: every evaluation of a run plays the same levels, so checkpoints compare fairly
        for level_set, num_levels, seed in (("train_levels", args.num_levels, args.seed + 100_000),
                                            ("test_levels", 0, args.seed + 200_000)):  # test: the full distribution
            level_envs = make_envs(args, args.eval_num_envs, num_levels, seed)
            returns, frames = evaluate(model, level_envs, num_episodes, seed, device, args.capture_video)
            level_envs.close()
            score = utils.procgen_normalized_score(args.env_id, args.distribution_mode, returns.mean())
            writer.add_scalar(f"eval/{level_set}/return", returns.mean(), global_step)
            writer.add_scalar(f"eval/{level_set}/normalized_score", score, global_step)
            print(f"step {global_step}: eval {level_set} return {returns.mean():.2f} (+- {returns.std():.2f}, "
                  f"{len(returns)} episodes), normalized score {score:.3f}")
            if frames:
                utils.save_video(os.path.join(run_dir, "videos", f"{level_set}_step{global_step}.gif"), frames)

    rollout = allocate_rollout(args.num_steps, args.num_envs, args.resolution, device)
    next_obs = torch.from_numpy(next_obs_np).to(device)
    start_iteration = global_step // batch_size + 1
    start_time, start_step = time.time(), global_step

    # Training loop
    for iteration in range(start_iteration, num_iterations + 1):
        last_good = copy.deepcopy(checkpoint_payload())
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = (1.0 - (iteration - 1.0) / num_iterations) * learning_rate
        # Rollout, then the episodes it finished
        next_obs, next_done, finished_returns, finished_lengths = collect_rollout(
            model, envs, rollout, next_obs, next_done, reward_normalizer, episodes, args.gamma, args.reward_clip
        )
        global_step += batch_size
        if finished_returns:
            writer.add_scalar("charts/episodic_return", np.mean(finished_returns), global_step)
            writer.add_scalar("charts/episodic_length", np.mean(finished_lengths), global_step)

        # Bootstrap the value of the last observation, then GAE
        with torch.no_grad():
            next_value = model(next_obs)[1]
            advantages, returns = compute_gae(
                rollout["rewards"], rollout["values"], rollout["dones"], next_value, next_done, args.gamma, args.gae_lambda
            )

        # Flatten the batch
        b_obs = rollout["obs"].reshape((-1, 3, args.resolution, args.resolution))
        b_logprobs, b_actions = rollout["logprobs"].reshape(-1), rollout["actions"].reshape(-1)
        b_advantages, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), rollout["values"].reshape(-1)

        # Optimise the policy and value network
        totals = torch.zeros(7, device=device)  # policy, value, entropy losses, old kl, kl, clipfrac, minibatches
        finite = torch.ones((), dtype=torch.bool, device=device)
        for epoch in range(args.update_epochs):
            b_inds = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb_inds = b_inds[start : start + minibatch_size]
                _, newlogprob, entropy, newvalue = get_action_and_value(model, b_obs[mb_inds], b_actions[mb_inds])
                logratio = newlogprob - b_logprobs[mb_inds]
                ratio = logratio.exp()
                with torch.no_grad():
                    old_approx_kl = (-logratio).mean()
                    approx_kl = ((ratio - 1) - logratio).mean()
                    clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()

                mb_advantages = b_advantages[mb_inds]
                if args.norm_adv:
                    mb_advantages = (mb_advantages - mb_advantages.mean()) / (mb_advantages.std() + 1e-8)

                # Policy loss
                pg_loss1 = -mb_advantages * ratio
                pg_loss2 = -mb_advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(pg_loss1, pg_loss2).mean()

                # Value loss (unclipped by default, as the Impoola / HD papers)
                v_loss_unclipped = (newvalue - b_returns[mb_inds]) ** 2
                if args.clip_vloss:
                    v_clipped = b_values[mb_inds] + torch.clamp(newvalue - b_values[mb_inds], -args.clip_coef, args.clip_coef)
                    v_loss_unclipped = torch.max(v_loss_unclipped, (v_clipped - b_returns[mb_inds]) ** 2)
                v_loss = 0.5 * v_loss_unclipped.mean()

                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + v_loss * args.vf_coef

                optimizer.zero_grad()
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()
                finite &= torch.isfinite(loss) & torch.isfinite(grad_norm)
                totals += torch.stack([pg_loss.detach(), v_loss.detach(), entropy_loss.detach(), old_approx_kl,
                                       approx_kl, clipfrac, torch.ones((), device=device)])
            if args.target_kl is not None and approx_kl.item() > args.target_kl:
                break

        # One host sync per iteration: stop on a non-finite loss, gradient or weight with the last good state on disk
        if not (bool(finite) and utils.finite_state(agent, optimizer)):
            path = utils.checkpoint_path(run_dir, last_good["global_step"])
            utils.save_checkpoint(path, last_good)
            writer.close()
            print(f"error: non-finite loss, gradient or weights at step {global_step}; the last good state is in {path}. "
                  "Try a lower --learning-rate.", file=sys.stderr, flush=True)
            raise SystemExit(1)
        means = (totals[:6] / totals[6]).tolist()
        var_returns = b_returns.var()
        explained_var = (1 - (b_returns - b_values).var() / var_returns).item() if var_returns > 0 else float("nan")
        sps = (global_step - start_step) / (time.time() - start_time)

        writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        for name, value in zip(("policy_loss", "value_loss", "entropy", "old_approx_kl", "approx_kl", "clipfrac"), means):
            writer.add_scalar(f"losses/{name}", value, global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("charts/SPS", sps, global_step)
        print(f"step {global_step}: SPS {sps:.1f}, value_loss {means[1]:.4f}, policy_loss {means[0]:.4f}, entropy {means[2]:.3f}"
              + (f", episodic_return {np.mean(finished_returns):.2f}" if finished_returns else ""))

        # Diagnostics on recent observations (REFERENCE §5)
        previous_step = global_step - batch_size
        if args.diag_every and global_step // args.diag_every > previous_step // args.diag_every:
            recent = b_obs[torch.randperm(batch_size, device=device)[: args.diag_batch_size]]
            for name, value in network_diagnostics(agent, recent, args.dormant_threshold).items():
                writer.add_scalar(f"diag/{name}", value, global_step)
            writer.add_image("images/saliency", saliency_grid(agent, recent[:4]), global_step)

        # Periodic evaluation (the last iteration's is the final one below) and checkpoint
        if args.eval_every and iteration < num_iterations and global_step // args.eval_every > previous_step // args.eval_every:
            run_evaluation(args.eval_episodes)
        if args.save_every and global_step // args.save_every > previous_step // args.save_every:
            utils.save_periodic_checkpoint(run_dir, global_step, checkpoint_payload(), args.keep_checkpoints)

    # Final evaluation and saving
    if args.final_eval_episodes:
        run_evaluation(args.final_eval_episodes)
    utils.save_checkpoint(os.path.join(run_dir, "final.pt"), checkpoint_payload())
    envs.close()
    writer.close()
    if args.track:
        wandb.finish()


if __name__ == "__main__":
    main()
