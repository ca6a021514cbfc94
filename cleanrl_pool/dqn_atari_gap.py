"""DQN on Atari (EnvPool) with a choice of bottleneck between encoder and dense head.

CleanRL `dqn_atari` defaults (Mnih et al. 2015 protocol: life loss is terminal, clipped rewards,
30 no-ops, fire on reset, 4-frame skip and stack), plus `--pool flatten|avg|max`, `--encoder
nature|impala`, `--dense-scale`, `--double` and `--n-step`, so that "scaling the dense layer hurts
with flatten and helps with global average pooling" (Sokar & Castro 2025, "Mind the GAP") can be
reproduced with plain DQN. The replay stores each frame once and rebuilds the 4-frame stacks when
it samples them, on the training device.
"""

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass

import envpool
import numpy as np
import torch
import torch.nn as nn
import tyro

import utils

SCRIPT = os.path.basename(__file__)
ARCHITECTURE_FLAGS = ("encoder", "pool", "width", "dense_scale", "resolution", "frame_stack", "env_id")


# Args
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""
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
    total_timesteps: int = 10_000_000
    """total agent steps, summed over environments (frames = steps x frame skip)"""
    num_envs: int = 1
    """parallel EnvPool environments; the replay ratio stays one update per `train_frequency` steps"""
    resolution: int = 84
    """square side of the grey frame EnvPool renders (its `img_height`/`img_width`)"""
    frame_stack: int = 4
    """frames stacked into one observation"""
    frame_skip: int = 4
    """emulator frames per agent step (the last two are max-pooled)"""
    max_episode_steps: int = 100_000
    """agent steps before an episode is truncated (CleanRL's `NoFrameskip-v4` limit: 400k frames)"""

    encoder: str = "nature"
    """the conv trunk: `nature` (Mnih et al. 2015) or `impala` (Espeholt et al. 2018)"""
    pool: str = "avg"
    """what joins the encoder to the dense layer: `flatten`, `avg` (global average pooling) or `max`"""
    width: int = 1
    """multiplies every encoder channel count"""
    dense_scale: int = 1
    """multiplies the width of the dense layer after the bottleneck (512 at x1; the GAP paper's x1/x2/x4/x8)"""

    learning_rate: float = 1e-4
    """the learning rate of the Adam optimiser"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions, summed over environments"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 1.0
    """target network update rate (1.0 copies the online network)"""
    target_network_frequency: int = 1000
    """agent steps between target network updates"""
    batch_size: int = 32
    """transitions per gradient update"""
    start_e: float = 1.0
    """exploration epsilon at the start"""
    end_e: float = 0.01
    """exploration epsilon at the end of the schedule"""
    exploration_fraction: float = 0.10
    """fraction of `total_timesteps` over which epsilon goes from `start_e` to `end_e`"""
    learning_starts: int = 80_000
    """agent steps of random-ish play before learning starts"""
    train_frequency: int = 4
    """agent steps (summed over environments) per gradient update"""
    n_step: int = 1
    """steps of the n-step return (1: CleanRL's one-step target)"""
    double: bool = False
    """if toggled, use the double-DQN target (van Hasselt et al. 2016)"""

    eval_every: int = 500_000
    """agent steps between evaluations (one more runs at the end); 0 evaluates only at the end"""
    eval_episodes: int = 10
    """full-game episodes per evaluation, one per evaluation environment"""
    eval_epsilon: float = 0.05
    """epsilon of the greedy policy at evaluation (CleanRL's `dqn_eval`)"""
    save_every: int = 1_000_000
    """agent steps between checkpoints; 0 saves only `final.pt`"""
    save_buffer: bool = True
    """the newest checkpoint's replay is saved beside it (checkpoints/replay.pt, about buffer_size x resolution^2 bytes),
    so a resumed run does not repeat its warm-up; --no-save-buffer saves disk"""
    keep_checkpoints: int = 3
    """how many of the newest periodic checkpoints stay on disk (older ones are deleted)"""
    resume: str = ""
    """a checkpoint to continue from, or `auto`: the newest of this env id, experiment and seed with the same training
    configuration (else a new run)"""
    diag_every: int = 100_000
    """agent steps between diagnostics (dormant neurons, feature norm, saliency); 0 turns them off"""
    dormant_threshold: float = 0.025
    """a neuron is dormant when its normalised mean activation is at most this (Sokar et al. 2023)"""
    log_every: int = 1000
    """agent steps between logs of losses and SPS (each costs one host sync)"""
    compile: bool = False
    """if toggled, wrap the network in torch.compile"""
    torch_threads: int = 0
    """CPU threads of torch (0: torch's default); 1 is fastest for small networks on a small, shared CPU"""


# Environment construction
def atari_game(env_id: str) -> str:
    """`Breakout` or `Breakout-v5` -> `Breakout`."""
    return env_id[: -len("-v5")] if env_id.endswith("-v5") else env_id


def atari_games() -> list:
    """The Atari games EnvPool registers, as plain names (its other `-v5` ids are MuJoCo tasks)."""
    from envpool.registration import registry

    return sorted(name[: -len("-v5")] for name, spec in registry.specs.items() if spec[0] == "envpool.atari" and name.endswith("-v5"))


def make_env(args, num_envs: int, seed: int):
    """EnvPool Atari set to CleanRL's `dqn_atari` wrappers, every option explicit, for training and
    evaluation alike (CleanRL's `dqn_eval` reuses the training env).

    Life loss is terminal and rewards are clipped to their sign (Mnih et al. 2015). `info["reward"]`
    is always the raw reward and `info["terminated"]` the real game over, so full-game returns are
    measured from them.
    """
    return envpool.make(
        f"{atari_game(args.env_id)}-v5",
        env_type="gymnasium",
        num_envs=num_envs,
        seed=seed,
        img_height=args.resolution,
        img_width=args.resolution,
        gray_scale=True,
        use_inter_area_resize=True,
        stack_num=args.frame_stack,
        frame_skip=args.frame_skip,
        noop_max=30,
        use_fire_reset=True,  # as CleanRL's FireResetEnv, for games whose action set has FIRE
        episodic_life=True,
        reward_clip=True,
        repeat_action_probability=0.0,  # CleanRL's NoFrameskip-v4: no sticky actions
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


# Network: encoder (nature | impala) -> bottleneck (pool + dense) -> Q head
def nature_encoder(in_channels: int, width: int) -> nn.Sequential:
    """Mnih et al. 2015, VALID padding as in CleanRL: 84x84 -> 7x7x64 (Dopamine pads SAME: 11x11)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32 * width, 8, stride=4), nn.ReLU(),
        nn.Conv2d(32 * width, 64 * width, 4, stride=2), nn.ReLU(),
        nn.Conv2d(64 * width, 64 * width, 3, stride=1), nn.ReLU(),
    )


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
    """(channels, side) of the encoder's feature map; side < 1 means the frame is too small."""
    if encoder == "nature":
        side = (((resolution - 8) // 4 + 1) - 4) // 2 + 1 - 2
        return 64 * width, side
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


class QNetwork(nn.Module):
    """Q(s, .) = head(bottleneck(encoder(s / 255))); bottleneck = pool + Linear(512 x dense_scale) + ReLU."""

    def __init__(self, args, num_actions: int):
        super().__init__()
        make_encoder = nature_encoder if args.encoder == "nature" else impala_encoder
        self.encoder = make_encoder(args.frame_stack, args.width)
        channels, side = encoder_output_shape(args.encoder, args.width, args.resolution)
        features = channels * side * side if args.pool == "flatten" else channels
        dense = 512 * args.dense_scale
        self.bottleneck = nn.Sequential(make_pool(args.pool), nn.Linear(features, dense), nn.ReLU())
        self.head = nn.Linear(dense, num_actions)

    def forward(self, obs):
        return self.head(self.bottleneck(self.encoder(obs.float() / 255.0)))


def parameter_counts(q_network) -> dict:
    return {part: utils.parameter_count(getattr(q_network, part)) for part in ("encoder", "bottleneck", "head")}


@torch.no_grad()
def network_diagnostics(q_network, obs, threshold: float) -> dict:
    """Dormant fractions per part and the feature norm (REFERENCE section 5) on a batch of observations.

    The encoder's neurons are its ReLU outputs (conv channels), the bottleneck's the dense layer's
    ReLU output; the head is one linear layer here, so its neurons are the Q-values themselves.
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
    q_values = q_network.head(hidden)
    return {
        "diag/dormant_fraction/encoder": utils.dormant_fraction(encoder_activations, threshold),
        "diag/dormant_fraction/bottleneck": utils.dormant_fraction([hidden], threshold),
        "diag/dormant_fraction/head": utils.dormant_fraction([q_values], threshold),
        "diag/feature_norm": features.norm(dim=1).mean().item(),
    }


def q_saliency(q_network, obs) -> torch.Tensor:
    """Vanilla-gradient saliency |dQ(s, a*)/ds| of the greedy action, as (B, 1, H, W) images in [0, 1]."""
    obs = obs.float().requires_grad_(True)
    q_values = q_network(obs)
    q_values.max(dim=1).values.sum().backward()
    return utils.saliency_image(obs.grad)


# Replay: each frame stored once per environment, stacks rebuilt at sample time
def make_replay(num_envs: int, capacity: int, resolution: int, device) -> dict:
    """Circular per-environment storage indexed by time slot t (slot t % capacity).

    Slot t holds the newest frame of observation o_t, and the action a_t, reward r_t and end
    flags of the step taken from o_t. `valid[t]` is False when that step was EnvPool's auto-reset
    step (taken from a final observation; its action is ignored): such a slot is never a
    transition. `episode_start[t]` marks a fresh game, where EnvPool fills the whole stack with the
    first frame (after a life loss EnvPool keeps stacking, so that is not a start).
    """
    shape = (num_envs, capacity)
    return {
        "frames": torch.zeros(shape + (resolution, resolution), dtype=torch.uint8, device=device),
        "actions": torch.zeros(shape, dtype=torch.long, device=device),
        "rewards": torch.zeros(shape, dtype=torch.float32, device=device),
        "terminated": torch.zeros(shape, dtype=torch.bool, device=device),
        "truncated": torch.zeros(shape, dtype=torch.bool, device=device),
        "valid": torch.zeros(shape, dtype=torch.bool, device=device),
        "episode_start": torch.zeros(shape, dtype=torch.bool, device=device),
    }


def store_first_frame(replay: dict, slot_time: int, obs, elapsed_step):
    """Write the newest frame of a freshly reset observation at slot `slot_time`."""
    slot = slot_time % replay["frames"].shape[1]
    replay["frames"][:, slot] = obs[:, -1]
    replay["episode_start"][:, slot] = elapsed_step == 0


def store_step(replay: dict, slot_time: int, actions, rewards, terminated, truncated, was_reset_step, next_obs, next_elapsed_step):
    """Record the step taken from o_t (t = slot_time) and the newest frame of o_{t+1}.

    `was_reset_step` (the previous step ended an episode) marks EnvPool's auto-reset step: its
    slot is stored as not valid, so it is never sampled and an n-step return never crosses it.
    """
    capacity = replay["frames"].shape[1]
    slot, next_slot = slot_time % capacity, (slot_time + 1) % capacity
    replay["actions"][:, slot] = actions
    replay["rewards"][:, slot] = rewards
    replay["terminated"][:, slot] = terminated
    replay["truncated"][:, slot] = truncated
    replay["valid"][:, slot] = ~was_reset_step
    replay["frames"][:, next_slot] = next_obs[:, -1]
    replay["episode_start"][:, next_slot] = next_elapsed_step == 0


def store_env_step(replay: dict, slot_time: int, actions, rewards, terminated, truncated, info, next_obs, episode_done):
    """The training loop's store of one EnvPool step (host arrays; `next_obs` already on the replay's device).

    The step is a transition unless the previous one ended an episode (`episode_done`): then it was
    EnvPool's auto-reset step, whose action was ignored. Returns `episode_done` for the next step.
    """
    device = replay["frames"].device
    store_step(replay, slot_time, torch.as_tensor(actions, device=device), torch.as_tensor(rewards, device=device),
               torch.as_tensor(terminated, device=device), torch.as_tensor(truncated, device=device),
               torch.as_tensor(episode_done, device=device), next_obs, torch.as_tensor(info["elapsed_step"], device=device))
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


def sample_batch(replay: dict, buffer_time: int, batch_size: int, n_step: int, frame_stack: int, gamma: float, resample_rounds: int = 8):
    """Sample transitions uniformly over valid slots, all on the replay's device.

    `buffer_time` is the slot of the newest observation. A transition t needs slots t-frame_stack+1
    .. t+n_step still in memory. Auto-reset slots are redrawn (rejection sampling); one left after
    `resample_rounds` (probability ~ invalid_fraction^rounds) gets weight 0 in the loss.
    """
    num_envs, capacity = replay["valid"].shape
    device = replay["valid"].device
    low = max(0, buffer_time - capacity + frame_stack)
    high = buffer_time - n_step
    env_index = torch.randint(num_envs, (batch_size,), device=device)
    slot_time = torch.randint(low, high + 1, (batch_size,), device=device)
    for _ in range(resample_rounds):
        valid = replay["valid"][env_index, slot_time % capacity]
        env_index = torch.where(valid, env_index, torch.randint(num_envs, (batch_size,), device=device))
        slot_time = torch.where(valid, slot_time, torch.randint(low, high + 1, (batch_size,), device=device))
    valid = replay["valid"][env_index, slot_time % capacity]
    window = (slot_time[:, None] + torch.arange(n_step, device=device)) % capacity
    returns, steps, bootstrap_discount = n_step_returns(
        replay["rewards"][env_index[:, None], window],
        replay["terminated"][env_index[:, None], window],
        replay["truncated"][env_index[:, None], window],
        gamma,
    )
    return {
        "observations": stack_frames(replay, env_index, slot_time, frame_stack),
        "actions": replay["actions"][env_index, slot_time % capacity],
        "returns": returns,
        "bootstrap_discount": bootstrap_discount,
        "next_observations": stack_frames(replay, env_index, slot_time + steps, frame_stack),
        "weights": valid.float(),
    }


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


# DQN math
def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def compute_td_target(returns, bootstrap_discount, next_q_target, next_q_online=None):
    """r^(n) + gamma^m max_a Q_target(s_{t+m}, a); with `next_q_online`, double DQN picks a by the online net."""
    if next_q_online is None:
        next_value = next_q_target.max(dim=1).values
    else:
        next_value = next_q_target.gather(1, next_q_online.argmax(dim=1, keepdim=True)).squeeze(1)
    return returns + bootstrap_discount * next_value


def dqn_loss(q_network, target_network, batch: dict, double: bool):
    """Mean squared TD error (CleanRL), over the valid transitions of the batch; also returns Q(s, a)."""
    with torch.no_grad():
        next_q_target = target_network(batch["next_observations"])
        next_q_online = q_network(batch["next_observations"]) if double else None
        td_target = compute_td_target(batch["returns"], batch["bootstrap_discount"], next_q_target, next_q_online)
    q_taken = q_network(batch["observations"]).gather(1, batch["actions"][:, None]).squeeze(1)
    weights = batch["weights"]
    loss = (weights * (q_taken - td_target) ** 2).sum() / weights.sum().clamp(min=1.0)
    return loss, q_taken


def select_actions(q_network, obs, epsilon: float, num_actions: int):
    """Epsilon-greedy per environment on observations already on the device; the coins are
    host-side so that a fully random step skips the network."""
    explore = np.random.random(len(obs)) < epsilon
    actions = np.random.randint(num_actions, size=len(obs))
    if not explore.all():
        with torch.no_grad():
            greedy = q_network(obs).argmax(dim=1).cpu().numpy()
        actions = np.where(explore, actions, greedy)
    return actions


def evaluate(q_network, eval_envs, args, num_actions: int, device, capture_video: bool):
    """Play one whole game per evaluation environment at `eval_epsilon` on the training settings, as
    CleanRL's `dqn_eval` reuses the training env: a lost life resets as in training (FIRE games serve
    again), and the return sums the raw rewards of all lives until the real game over or time limit."""
    obs, _ = eval_envs.reset()
    num_envs = len(obs)
    returns, finished = np.zeros(num_envs), np.zeros(num_envs, dtype=bool)
    frames = [obs[0, -1]] if capture_video else None
    while not finished.all():
        actions = select_actions(q_network, torch.as_tensor(obs, device=device), args.eval_epsilon, num_actions)
        obs, _, _, truncated, info = eval_envs.step(actions)
        returns += info["reward"] * ~finished
        if capture_video and not finished[0]:
            frames.append(obs[0, -1])
        finished |= info["terminated"].astype(bool) | truncated
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
    "dormant_threshold": "[0, 1]", "log_every": "[1, inf)", "torch_threads": "[0, inf)", "keep_checkpoints": "[1, inf)",
    "tau": "(0, 1]", "exploration_fraction": "(0, 1]",
}


def check_args(args):
    """Refuse bad input with one line (exit 2) before any work."""
    if atari_game(args.env_id) not in atari_games():
        utils.fail(f"--env-id {args.env_id!r} is not an EnvPool Atari game; choose one of: {', '.join(atari_games())}")
    utils.check_choice("encoder", args.encoder, ("nature", "impala"))
    utils.check_choice("pool", args.pool, ("flatten", "avg", "max"))
    utils.check_ranges(args, FLAG_RANGES)
    if encoder_output_shape(args.encoder, args.width, args.resolution)[1] < 1:
        low = next(r for r in range(1, 1000) if encoder_output_shape(args.encoder, 1, r)[1] >= 1)
        utils.fail(f"--resolution {args.resolution} is too small for --encoder {args.encoder}; use at least {low}")
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
    args = tyro.cli(Args)
    args.env_id = atari_game(args.env_id)
    check_args(args)
    # derived values
    replay_capacity = args.buffer_size // args.num_envs  # slots per environment
    exploration_steps = args.exploration_fraction * args.total_timesteps
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
    eval_envs = make_env(args, args.eval_episodes, env_seed + 1_000_000)  # the training settings, as CleanRL's dqn_eval
    num_actions = envs.action_space.n
    q_network = QNetwork(args, num_actions).to(device)
    target_network = QNetwork(args, num_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate)
    replay = make_replay(args.num_envs, replay_capacity, args.resolution, device)
    buffer_time, update_count, update_credit = 0, 0, 0
    if checkpoint:
        q_network.load_state_dict(checkpoint["q_network"])
        target_network.load_state_dict(checkpoint["target_network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        update_count, update_credit = checkpoint["update_count"], checkpoint["update_credit"]
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
            print(f"error: non-finite TD loss or weights before step {step}; stopping ({where}). Try a lower --learning-rate.",
                  file=sys.stderr, flush=True)
            writer.close()
            raise SystemExit(1)
        last_good = (step, copy.deepcopy(checkpoint_payload(step)))

    def run_evaluation(step):
        returns, video = evaluate(q_forward, eval_envs, args, num_actions, device, args.capture_video)
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
                   obs_device, torch.as_tensor(info["elapsed_step"], device=device))
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
        epsilon = linear_schedule(args.start_e, args.end_e, exploration_steps, global_step)
        actions = select_actions(q_forward, obs_device, epsilon, num_actions)
        envs.send(actions)  # the emulators step in EnvPool's threads while the learner updates below
        previous_step = global_step
        global_step += args.num_envs

        # gradient updates: one per `train_frequency` agent steps, once the replay is warm
        stored = min(buffer_time, replay_capacity) * args.num_envs
        if global_step > args.learning_starts and stored >= min(args.learning_starts, args.buffer_size) and buffer_time >= args.n_step:
            update_credit += args.num_envs
            while update_credit >= args.train_frequency:
                update_credit -= args.train_frequency
                batch = sample_batch(replay, buffer_time, args.batch_size, args.n_step, args.frame_stack, args.gamma)
                loss, q_taken = dqn_loss(q_forward, target_forward, batch, args.double)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                update_count += 1
                loss_sum += loss.detach()
                q_sum += q_taken.detach().mean()
                nonfinite |= ~torch.isfinite(loss.detach())
                losses_since_log += 1
            if global_step // args.target_network_frequency > previous_step // args.target_network_frequency:
                for target_param, param in zip(target_network.parameters(), q_network.parameters()):
                    target_param.data.copy_(args.tau * param.data + (1.0 - args.tau) * target_param.data)

        # store the step taken from o_t; an auto-reset step (after an episode end) is never a transition
        next_obs, rewards, terminated, truncated, info = envs.recv()
        next_obs_device = torch.as_tensor(next_obs, device=device)
        episode_done = store_env_step(replay, buffer_time, actions, rewards, terminated, truncated, info, next_obs_device,
                                      episode_done)
        buffer_time += 1
        obs_device = next_obs_device
        for game_return, game_length in finished_games(episode_return, info, truncated):
            writer.add_scalar("charts/episodic_return", game_return, global_step)
            writer.add_scalar("charts/episodic_length", game_length, global_step)
            print(f"global_step={global_step}, episodic_return={game_return:.0f}", flush=True)

        # logging, and the non-finite check (one host sync per log interval)
        if global_step // args.log_every > previous_step // args.log_every:
            stop_if_nonfinite(global_step)
            sps = (global_step - start_step) / (time.time() - start_time)
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("charts/epsilon", epsilon, global_step)
            if losses_since_log:
                writer.add_scalar("losses/td_loss", (loss_sum / losses_since_log).item(), global_step)
                writer.add_scalar("losses/q_values", (q_sum / losses_since_log).item(), global_step)
                loss_sum.zero_(), q_sum.zero_()
                losses_since_log = 0
            print(f"global_step={global_step}, SPS={sps:.1f}, epsilon={epsilon:.3f}, updates={update_count}", flush=True)

        # diagnostics on a batch of the newest stored observations
        if args.diag_every and global_step // args.diag_every > previous_step // args.diag_every:
            recent = recent_observations(replay, buffer_time, 256, args.frame_stack)
            for tag, value in network_diagnostics(q_network, recent, args.dormant_threshold).items():
                writer.add_scalar(tag, value, global_step)
            writer.add_images("images/saliency", q_saliency(q_network, recent[:4]), global_step)
            q_network.zero_grad(set_to_none=True)

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
