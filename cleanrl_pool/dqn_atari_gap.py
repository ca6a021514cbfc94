"""DQN on Atari (EnvPool) with a choice of bottleneck between encoder and dense head.

CleanRL `dqn_atari` defaults (Mnih et al. 2015 protocol: life loss is terminal, clipped rewards,
30 no-ops, fire on reset, 4-frame skip and stack), plus `--pool flatten|avg|max`, `--encoder
nature|impala`, `--dense-scale`, `--double` and `--n-step`, so that "scaling the dense layer hurts
with flatten and helps with global average pooling" (Sokar & Castro 2025, "Mind the GAP") can be
reproduced with plain DQN. The replay stores each frame once and rebuilds the 4-frame stacks when
it samples them, on the training device. The score is CleanRL's: 10 whole games (every life, raw
rewards) with the training wrappers, at epsilon = `end_e` (0.01).
"""

import copy
import math
import os
from dataclasses import dataclass

import envpool
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import utils

SCRIPT = os.path.basename(__file__)
ARCHITECTURE_FLAGS = ("encoder", "pool", "width", "dense_scale", "resolution", "frame_stack", "env_id", "num_experts",
                      "encoder_blocks", "dense_layers", "layer_norm")
# Flags of this script that do not change what is trained (bookkeeping, speed switches): --resume auto ignores them
RUN_NEUTRAL_FLAGS = utils.RUN_NEUTRAL_FLAGS | {"save_buffer", "log_every", "cuda_graphs", "pinned_staging", "eval_epsilon"}


# Args
@dataclass
class Args(utils.RunArgs):
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run folder's name)"""

    # Environment (EnvPool Atari, CleanRL's dqn_atari wrappers)
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

    # Network
    encoder: str = "nature"
    """the conv trunk: `nature` (Mnih et al. 2015) or `impala` (Espeholt et al. 2018)"""
    pool: str = "avg"
    """what joins the encoder to the dense layers: `flatten`, `avg` (global average pooling), `max`, `softmoe` (Dopamine's
    SoftMoE on the H x W tokens in place of the first dense layer) or `tokens` (the same block without routing)"""
    width: int = 1
    """multiplies every encoder channel count (the papers' τ)"""
    dense_scale: int = 1
    """multiplies the width of the dense layer after the bottleneck"""
    num_experts: int = 1
    """experts of `--pool softmoe` (1: the GAP paper's SoftMoE-1), each with ceil(H x W / num_experts) slots"""
    encoder_blocks: int = 2
    """residual blocks per stage of the Impala encoder (Dopamine's ImpalaEncoder.num_blocks)"""
    dense_layers: int = 1
    """hidden dense layers of 512 x dense_scale after the join (with softmoe/tokens, the block stands for the first)"""
    layer_norm: bool = False
    """if toggled, every hidden dense layer is Dense -> LayerNorm -> ReLU (BRO, Nauman et al. 2024)"""

    # DQN (CleanRL's dqn_atari defaults)
    learning_rate: float = 1e-4
    """the learning rate of the Adam optimiser"""
    weight_decay: float = 0.0
    """coupled L2, Adam(weight_decay=...): gradient + weight_decay x weight before Adam, as ReDo (Sokar et al. 2023)"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions, summed over environments"""
    gamma: float = 0.99
    """the discount factor"""
    tau: float = 1.0
    """target network update rate (CleanRL's tau; the papers' τ is --width)"""
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
    """steps of the n-step return (1: the one-step TD target)"""
    double: bool = False
    """if toggled, the online network picks the next action and the target network rates it (van Hasselt et al. 2016)"""

    # Sparse training (GAP §3.1; JaxPruner's Dopamine agents): masks on the weights, updated at gradient-update counts
    sparsity_method: str = "none"
    """`none`, `prune` (gradual magnitude pruning, Zhu & Gupta 2017), `static` (a random mask fixed at initialisation)
    or `rigl` (drop the smallest weights, regrow where the gradient is largest: Evci et al. 2020)"""
    sparsity: float = 0.9
    """the fraction of the masked weights that are zero: reached at the end of pruning, held by static and RigL (GAP 0.9)"""
    sparsity_scope: str = "all"
    """the weights masked: `all` (every conv and dense kernel, the output layer too, as JaxPruner) or `bottleneck`
    (only those after the encoder: the bottleneck's dense layer and the head, the GAP paper's psi)"""
    sparsity_distribution: str = "erk"
    """each masked tensor's sparsity: `erk` (Erdős-Rényi-Kernel, as JaxPruner's and RigL's DQN configs) or `uniform`"""
    sparsity_start: float = 0.04
    """pruning starts after this fraction of the agent steps (GAP: 8M of 200M frames); RigL updates from the start"""
    sparsity_end: float = 0.8
    """pruning reaches --sparsity, and RigL's drop fraction decays to 0, at this fraction of the agent steps (GAP: 160M
    of 200M frames)"""
    mask_update_every: int = 0
    """gradient updates between mask updates; 0: the method's reference, 1,000 for prune (JaxPruner), 5,000 for rigl (GAP)"""
    drop_fraction: float = 0.2
    """the fraction of each tensor's active weights RigL drops and regrows, cosine-decayed to 0 at --sparsity-end (GAP 0.2)"""

    # Evaluation, checkpoints and diagnostics (x axis: agent steps)
    eval_every: int = 500_000
    """agent steps between evaluations (one more runs at the end); 0 evaluates only at the end"""
    eval_episodes: int = 10
    """full-game episodes per evaluation, one per evaluation environment"""
    eval_epsilon: float = 0.01
    """epsilon of the greedy policy at evaluation (CleanRL's dqn_atari evaluates at its `end_e`, 0.01)"""
    save_every: int = 1_000_000
    """agent steps between checkpoints; 0 saves only `final.pt`"""
    save_buffer: bool = True
    """the newest checkpoint's replay is saved beside it (checkpoints/replay.pt, about buffer_size x resolution^2 bytes),
    so a resumed run does not repeat its warm-up; --no-save-buffer saves disk"""
    diag_every: int = 100_000
    """agent steps between diagnostics (dormant neurons, feature norm, saliency, Grad-CAM); 0 turns them off"""
    log_every: int = 1000
    """agent steps between logs of losses and SPS (each costs one host sync)"""

    # Speed switches (issue 13): each acts only with CUDA; on a CPU the run is the same with or without them
    cuda_graphs: bool = True
    """capture the learner step once as a CUDA graph and replay it at every update (CUDA only)"""
    pinned_staging: bool = True
    """copy observations, rewards and end flags to the device through pinned host buffers, without blocking (CUDA only)"""


# The valid range of every numeric flag (utils.check_ranges), checked before any work
FLAG_RANGES = {
    "seed": "[0, 4294967295]", "total_timesteps": "[1, inf)", "num_envs": "[1, inf)", "resolution": "[1, 4096]",
    "frame_stack": "[1, inf)", "frame_skip": "[1, inf)", "max_episode_steps": "[1, inf)", "width": "[1, inf)",
    "dense_scale": "[1, inf)", "learning_rate": "(0, inf)", "buffer_size": "[1, inf)", "gamma": "[0, 1]",
    "target_network_frequency": "[1, inf)", "batch_size": "[1, inf)", "start_e": "[0, 1]", "end_e": "[0, 1]",
    "learning_starts": "[0, inf)", "train_frequency": "[1, inf)", "n_step": "[1, inf)", "eval_every": "[0, inf)",
    "eval_episodes": "[1, inf)", "eval_epsilon": "[0, 1]", "save_every": "[0, inf)", "diag_every": "[0, inf)",
    "diag_batch_size": "[1, inf)", "dormant_threshold": "[0, 1]", "log_every": "[1, inf)", "torch_threads": "[0, inf)",
    "keep_checkpoints": "[1, inf)",
    "tau": "(0, 1]", "exploration_fraction": "(0, 1]",
    "sparsity": "(0, 1)", "sparsity_start": "[0, 1]", "sparsity_end": "[0, 1]", "mask_update_every": "[0, inf)",
    "drop_fraction": "[0, 1]",
    "num_experts": "[1, inf)", "encoder_blocks": "[0, inf)", "dense_layers": "[1, inf)", "weight_decay": "[0, inf)",
}

# Network: bottleneck (join + Linear(512 x dense_scale) + ReLU, or a SoftMoE block) on the encoder -> Q head
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

TOKEN_JOINS = ("softmoe", "tokens")  # --pool values whose block reads the H x W tokens in place of the first dense layer

class SoftMoE(nn.Module):
    """Soft MoE (Puigcerver et al. 2024) on the m = H x W tokens of d = C dims, as Dopamine's labs/moes layer (PER_PIXEL
    tokens, capacity factor 1, no normalisation): logits = x phi for p = ceil(m / n) slots of each of n experts;
    dispatch = softmax over the tokens, combine = softmax over all n p slots; each slot's input (the tokens mixed by
    dispatch) goes through its expert, shared by the expert's slots; each token's output mixes all slot outputs by
    combine. `routed=False` (--pool tokens) skips the routing: the one expert maps every token. In: the flattened
    feature map (B, C*H*W); out: the output tokens flattened (B, H*W*C). Dopamine's `scalar` parameter (used only by
    its normalisation, off) and its nan_to_num of the slot inputs (a no-op on finite inputs) are left out."""

    def __init__(self, token_dim: int, num_tokens: int, experts: list, routed: bool):
        super().__init__()
        self.token_dim, self.num_tokens, self.experts = token_dim, num_tokens, nn.ModuleList(experts)
        self.phi = None
        if routed:  # Flax's lecun_normal: normal cut at 2 std, variance 1 / fan_in, fan_in = experts x token_dim
            slots, std = math.ceil(num_tokens / len(experts)), 1 / math.sqrt(len(experts) * token_dim) / 0.87962566103423978
            self.phi = nn.Parameter(torch.empty(token_dim, len(experts), slots))
            nn.init.trunc_normal_(self.phi, 0.0, std, -2 * std, 2 * std)

    def forward(self, features):
        tokens = features.reshape(len(features), self.token_dim, self.num_tokens).transpose(1, 2)  # (B, m, d)
        if self.phi is None:
            return self.experts[0](tokens).flatten(1)
        logits = torch.einsum("bmd,dnp->bmnp", tokens, self.phi)
        dispatch = logits.softmax(dim=1)  # per slot, over the tokens
        combine = logits.flatten(2).softmax(dim=2).view_as(logits)  # per token, over all slots of all experts
        slot_inputs = torch.einsum("bmd,bmnp->bnpd", tokens, dispatch)
        slot_outputs = torch.stack([expert(slot_inputs[:, i]) for i, expert in enumerate(self.experts)], dim=1)
        return torch.einsum("bnpd,bmnp->bmd", slot_outputs, combine).flatten(1)

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

def nature_encoder(in_channels: int, width: int) -> nn.Sequential:
    """Mnih et al. 2015, VALID padding as in CleanRL: 84x84 -> 7x7x64 (Dopamine pads SAME: 11x11)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32 * width, 8, stride=4), nn.ReLU(),
        nn.Conv2d(32 * width, 64 * width, 4, stride=2), nn.ReLU(),
        nn.Conv2d(64 * width, 64 * width, 3, stride=1), nn.ReLU(),
    )

class ResidualBlock(nn.Module):
    """x + Conv3x3(ReLU(Conv3x3(ReLU(x)))), Espeholt et al. 2018."""

    def __init__(self, channels: int):
        super().__init__()
        self.relu0, self.conv0 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1, self.conv1 = nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(self.relu1(self.conv0(self.relu0(x))))

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


class SameMaxPool2d(SamePad2d):
    """Flax's max_pool(padding="SAME") of Dopamine's Impala `Stack`: SamePad2d's padding, of -inf, the odd pixel after:
    0 before and 1 after at 84 and 42 (PyTorch's MaxPool2d(3, 2, padding=1) pads 1 before, which moves every window one
    pixel up and left), 1 and 1 at 21; side ceil(side / stride)."""

    def forward(self, x):
        return F.max_pool2d(F.pad(x, self.pads(x), value=-math.inf), self.kernel, self.stride)

def impala_encoder(in_channels: int, width: int, blocks: int) -> nn.Sequential:
    """Espeholt et al. 2018 as Dopamine's ImpalaEncoder: three stages of Conv3x3 -> MaxPool(3, stride 2, SAME) ->
    `blocks` residual blocks (2 in the paper), (16, 32, 32) x width channels, then a ReLU: R x R -> ceil(R / 8)
    x ceil(R / 8) x 32 width."""
    layers, channels = [], in_channels
    for out_channels in (16 * width, 32 * width, 32 * width):
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1), SameMaxPool2d(3, 2)]
        layers += [ResidualBlock(out_channels) for _ in range(blocks)]
        channels = out_channels
    return nn.Sequential(*layers, nn.ReLU())

def make_encoder(args) -> nn.Sequential:
    """--encoder: the conv trunk on the stacked frames, Impala's with --encoder-blocks residual blocks per stage."""
    if args.encoder == "impala":
        return impala_encoder(args.frame_stack, args.width, args.encoder_blocks)
    return nature_encoder(args.frame_stack, args.width)

def hidden_layer(features: int, dense: int, args) -> list:
    """One hidden dense layer of psi: Linear -> ReLU, or BRO's Linear -> LayerNorm -> ReLU with --layer-norm."""
    return [nn.Linear(features, dense), *([nn.LayerNorm(dense)] if args.layer_norm else []), nn.ReLU()]

class QNetwork(nn.Module):
    """Q(s, .) = head(bottleneck(encoder(s / 255))); bottleneck = the join and psi's hidden dense layers, each
    Linear(512 x dense_scale) + ReLU; with softmoe / tokens a SoftMoE block of Dense(512 x dense_scale) -> ReLU ->
    Dense(C) experts stands for the first, and the next layer reads its H*W*C output (Dopamine's MoE networks)."""

    def __init__(self, args, num_actions: int):
        super().__init__()
        self.encoder = make_encoder(args)
        channels, side = feature_map_shape(self.encoder, args.frame_stack, args.resolution)
        dense = 512 * args.dense_scale
        if args.pool in TOKEN_JOINS:
            experts = [nn.Sequential(nn.Linear(channels, dense), nn.ReLU(), nn.Linear(dense, channels))
                       for _ in range(args.num_experts)]
            layers, features = [SoftMoE(channels, side * side, experts, args.pool == "softmoe")], channels * side * side
        else:
            layers, features = hidden_layer(pooled_size(channels, side, args.pool), dense, args), dense
        for _ in range(args.dense_layers - 1):  # deeper psi
            layers, features = layers + hidden_layer(features, dense, args), dense
        self.bottleneck = Bottleneck("flatten" if args.pool in TOKEN_JOINS else args.pool, nn.Sequential(*layers))
        self.head = nn.Linear(features, num_actions)

    def forward(self, obs):
        return self.head(self.bottleneck(self.encoder(obs.float() / 255.0)))

# Algorithm: DQN's TD target and loss (CleanRL), the learner step, epsilon-greedy acting
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


def make_learner(args, num_actions: int, device):
    """The online network, the target network (its copy) and Adam."""
    q_network = QNetwork(args, num_actions).to(device)
    target_network = QNetwork(args, num_actions).to(device)
    target_network.load_state_dict(q_network.state_dict())
    capturable = torch.device(device).type == "cuda"  # Adam's step count stays on the device: no sync, graph-safe
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                 capturable=capturable)
    return q_network, target_network, optimizer


def load_learner(checkpoint: dict, q_network, target_network, optimizer, masks: dict) -> tuple:
    """A checkpoint's networks, Adam and sparsity masks, in place; returns its counters (update_count,
    update_credit)."""
    q_network.load_state_dict(checkpoint["q_network"])
    target_network.load_state_dict(checkpoint["target_network"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    for mask_name, mask in masks.items():
        mask.copy_(checkpoint["sparsity_masks"][mask_name])
    return checkpoint["update_count"], checkpoint["update_credit"]


def learner_step(q_network, target_network, optimizer, replay: dict, buffer_time, args, masked=(), step: bool = True):
    """One update: a uniform batch, the mean squared TD error, one gradient step; no host value is read (a CUDA graph
    can capture it, with `buffer_time` a device tensor). Returns the (detached) loss and the mean Q(s, a) of the batch.

    Sparse training (`masked`: masked_pairs' (weight, mask) pairs): the step masks the weights after it, and static and
    RigL also mask the gradients before it (JaxPruner's is_sparse_gradients, pruning's are dense); `step=False`
    leaves the dense gradients in `.grad` and takes no step (a RigL mask update: JaxPruner's skip_gradients)."""
    batch = sample_batch(replay, buffer_time, args.batch_size, args.n_step, args.frame_stack, args.gamma)
    loss, q_taken = dqn_loss(q_network, target_network, batch, args.double)
    optimizer.zero_grad()
    loss.backward()
    if step:
        if args.sparsity_method in ("static", "rigl"):
            apply_masks([(weight.grad, mask) for weight, mask in masked])
        optimizer.step()
        apply_masks(masked)
    return loss.detach(), q_taken.detach().mean()


# Sparse training (GAP §3.1): JaxPruner's gradual magnitude pruning, static sparse training and RigL, per-tensor masks
def sparsifiable_weights(q_network, scope: str) -> dict:
    """The weights sparse training masks, by name: every parameter of more than one dimension (JaxPruner's
    NOT_DIM_ONE filter: conv and dense kernels, NoisyNet weight_mu and weight_sigma, the output layer too; biases
    never); `scope` bottleneck: only those after the encoder (the dense part, the GAP paper's psi: the bottleneck's
    dense layer and the head)."""
    return {name: weight for name, weight in q_network.named_parameters()
            if weight.ndim > 1 and (scope == "all" or not name.startswith("encoder."))}


def erk_sparsities(shapes: dict, sparsity: float) -> dict:
    """Erdős-Rényi-Kernel sparsity per tensor as JaxPruner (sparsity_distributions.py:140-281): density epsilon x
    sum(shape) / prod(shape), epsilon such that the tensors keep as many weights as `sparsity` everywhere would;
    while a density would pass 1, the tensors of the largest ratio become dense and epsilon is solved again."""
    dense = set()
    while True:
        kept, divisor, ratios = 0, 0.0, {}
        for name, shape in shapes.items():
            size = math.prod(shape)
            zeros = math.floor(sparsity * size)
            if name in dense:
                kept -= zeros
            else:
                ratios[name] = sum(shape) / size
                kept += size - zeros
                divisor += ratios[name] * size
        epsilon, largest = kept / divisor, max(ratios.values())
        if largest * epsilon <= 1:
            return {name: 0.0 if name in dense else 1 - epsilon * ratios[name] for name in shapes}
        dense |= {name for name, ratio in ratios.items() if ratio == largest}


def topk_mask(scores, sparsity: float):
    """JaxPruner's top-k mask (mask_calculator.py:66-92): True at the max(1, round(n (1 - sparsity))) largest
    scores, a tie going to the lower flat index."""
    flat = scores.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    mask[order[:max(1, round(flat.numel() * (1 - sparsity)))]] = True
    return mask.view(scores.shape)


def pruning_sparsity(target: float, update: int, start: int, end: int) -> float:
    """Zhu & Gupta's polynomial schedule as JaxPruner's (sparsity_schedules.py:95-135): target (1 - (1 - progress)^3),
    progress = clip(update + 1 - start, 0, end - start) / (end - start), its "+1" included; 1 when start == end."""
    progress = 1.0 if end == start else min(max(update + 1 - start, 0), end - start) / (end - start)
    return target * (1 - (1 - progress) ** 3)


def rigl_drop_fraction(initial: float, update: int, end: int) -> float:
    """optax.cosine_decay_schedule(initial, end) at `update`, RigL's drop fraction in JaxPruner (api.py:168-171)."""
    return initial * 0.5 * (1 + math.cos(math.pi * min(update, end) / end))


def rigl_mask(mask, weight, gradient, drop_fraction: float):
    """RigL's drop and grow (Evci et al. 2020) as JaxPruner's (sparse_trainers.py:102-133, 169-171): keep the
    density x (1 - drop_fraction) active weights of largest |w| (inactive ones score below all), then grow back to the
    old density the positions of largest |dense gradient| (kept ones score above all)."""
    density = mask.sum().item() / mask.numel()
    magnitude = weight.abs()
    kept = topk_mask(torch.where(mask, magnitude, magnitude.min() - 1e-5), 1 - density * (1 - drop_fraction))
    return topk_mask(torch.where(kept, gradient.abs().max() + 1e-5, gradient.abs()), 1 - density)


def mask_update_schedule(args) -> tuple:
    """(first, last, every) gradient update of the mask updates. The flags' fractions of the agent steps become the
    updates made by then (one per train_frequency steps after learning_starts); RigL updates from update 1 (JaxPruner's
    dqn.gin) to --sparsity-end; every: --mask-update-every, or the method's reference (prune 1,000, rigl 5,000)."""
    def updates_by(fraction):
        return max(0, (round(fraction * args.total_timesteps) - args.learning_starts) // args.train_frequency)
    every = args.mask_update_every or {"prune": 1_000, "rigl": 5_000}.get(args.sparsity_method, 0)
    first = 1 if args.sparsity_method == "rigl" else updates_by(args.sparsity_start)
    return first, updates_by(args.sparsity_end), every


def is_mask_update(method: str, update: int, first: int, last: int, every: int) -> bool:
    """Whether the masks change at this gradient update: JaxPruner's PeriodicSchedule (sparsity_schedules.py:53-70),
    every `every` updates from `first` to `last`; pruning also at `last` itself (ours, not JaxPruner's), so that a run
    whose `last` is no multiple of `every` still ends at its target."""
    if method not in ("prune", "rigl"):
        return False
    return (first <= update <= last and update % every == 0) or (method == "prune" and update == last)


def make_masks(q_network, args) -> tuple:
    """The masks ({name: bool tensor}, empty without sparse training) and each tensor's target sparsity (uniform or
    ERK). Pruning starts from all ones; static and RigL from a random top-k at the target (JaxPruner's
    StaticRandomSparse: uniform random scores), drawn with torch's generator."""
    if args.sparsity_method == "none":
        return {}, {}
    weights = sparsifiable_weights(q_network, args.sparsity_scope)
    sparsities = ({name: args.sparsity for name in weights} if args.sparsity_distribution == "uniform" else
                  erk_sparsities({name: tuple(weight.shape) for name, weight in weights.items()}, args.sparsity))
    if args.sparsity_method == "prune":
        return {name: torch.ones_like(weight, dtype=torch.bool) for name, weight in weights.items()}, sparsities
    return {name: topk_mask(torch.rand(weight.shape, device=weight.device), sparsities[name])
            for name, weight in weights.items()}, sparsities


def masked_pairs(network, masks: dict) -> list:
    """(weight, mask) for every masked weight of the online network or of its target."""
    return [(weight, masks[name]) for name, weight in network.named_parameters() if name in masks]


@torch.no_grad()
def apply_masks(pairs):
    """tensor *= mask, in place, for (tensor, mask) pairs (a captured step reads the same tensors)."""
    for tensor, mask in pairs:
        tensor.mul_(mask)


@torch.no_grad()
def prune_masks_(masks: dict, q_network, sparsities: dict, update: int, first: int, last: int):
    """Gradual magnitude pruning at this update (JaxPruner's MagnitudePruning): each mask, in place, keeps the largest
    |w| of the weights before the step at the tensor's target x the schedule; the step masks the weights after it."""
    for name, weight in q_network.named_parameters():
        if name in masks:
            masks[name].copy_(topk_mask(weight.abs(), pruning_sparsity(sparsities[name], update, first, last)))


@torch.no_grad()
def rigl_masks_(masks: dict, q_network, optimizer, drop_fraction: float):
    """RigL's mask update from the dense gradients in `.grad`: new masks in place, Adam's moments (exp_avg,
    exp_avg_sq) of the grown weights reset to 0 (JaxPruner's restart_inner_state), the dropped weights zeroed; grown
    weights start at 0, as they were under the mask."""
    for name, weight in q_network.named_parameters():
        if name in masks:
            new_mask = rigl_mask(masks[name], weight, weight.grad, drop_fraction)
            grown = new_mask & ~masks[name]
            optimizer.state[weight]["exp_avg"].masked_fill_(grown, 0)
            optimizer.state[weight]["exp_avg_sq"].masked_fill_(grown, 0)
            masks[name].copy_(new_mask)
            weight.mul_(new_mask)


def sparse_training(args, updates: tuple):
    """What a sparse run's checkpoint must match to be resumed: its sparsity flags and mask updates (None: dense)."""
    if args.sparsity_method == "none":
        return None
    return {"method": args.sparsity_method, "sparsity": args.sparsity, "scope": args.sparsity_scope,
            "distribution": args.sparsity_distribution, "mask_updates": list(updates), "drop_fraction": args.drop_fraction}


def check_resumed_sparsity(checkpoint, checkpoint_file: str, args):
    """Refuse (exit 2) to resume a checkpoint whose sparse training is not the one this run asks for."""
    asked = sparse_training(args, mask_update_schedule(args))
    if checkpoint and checkpoint.get("sparse_training") != asked:
        utils.fail(f"--resume {checkpoint_file!r} was trained with sparse training {checkpoint.get('sparse_training')}, "
                   f"this run asks for {asked}")


class SparseTraining:
    """A run's sparse training (none with --sparsity-method none): the masks and each tensor's target sparsity
    (make_masks), the schedule of the mask updates, the online and the target weights they mask."""

    def __init__(self, args, q_network, target_network):
        self.args, self.q_network = args, q_network
        self.masks, self.sparsities = make_masks(q_network, args)  # {} without sparse training
        self.schedule = mask_update_schedule(args)  # (first, last, every) gradient update of the mask updates
        self.online, self.target = masked_pairs(q_network, self.masks), masked_pairs(target_network, self.masks)

    def start(self, resumed: bool):
        """Sparse from initialisation (JaxPruner: from after the first step); a resumed target keeps its weights until
        the next sync, as in the run it continues."""
        apply_masks(self.online + ([] if resumed else self.target))

    def update(self, update: int, step, dense_gradients, optimizer):
        """Gradient update number `update` with the masks that change at it, outside a captured step: before the learner
        step `step` from the weights (prune: the step masks them after it), or instead of it from the dense gradients
        that `dense_gradients` leaves in `.grad` (RigL). Returns the step's (loss, mean Q)."""
        if not is_mask_update(self.args.sparsity_method, update, *self.schedule):
            return step()
        if self.args.sparsity_method == "prune":
            prune_masks_(self.masks, self.q_network, self.sparsities, update, *self.schedule[:2])
            return step()
        outputs = dense_gradients()
        rigl_masks_(self.masks, self.q_network, optimizer, rigl_drop_fraction(self.args.drop_fraction, update,
                                                                              self.schedule[1]))
        return outputs

    def sync_target(self):
        """The target, just synced, as sparse as the online network (whatever the sync's rate)."""
        apply_masks(self.target)

    def checkpoint_state(self) -> dict:
        if not self.masks:
            return {}
        return {"sparse_training": sparse_training(self.args, self.schedule), "sparsity_masks": self.masks}


def soft_update(target, online, rate: float):
    """target <- target + rate (online - target), parameter by parameter (rate 1: an exact copy)."""
    for target_param, param in zip(target.parameters(), online.parameters()):
        target_param.data.lerp_(param.data, rate)


def linear_schedule(start_e: float, end_e: float, duration: float, t: int) -> float:
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def select_actions(q_function, obs, epsilon, num_actions: int):
    """Epsilon-greedy per environment on observations already on the device, coins drawn there by torch; the actions
    stay there. `epsilon`: a float (at 1 the network is skipped) or a 0-d tensor on the device (no host value is read:
    a CUDA graph can capture it). `q_function`: obs -> Q (B, actions)."""
    explore = torch.rand(len(obs), device=obs.device) < epsilon
    actions = torch.randint(num_actions, (len(obs),), device=obs.device)
    if torch.is_tensor(epsilon) or epsilon < 1:
        with torch.no_grad():
            actions = torch.where(explore, actions, q_function(obs).argmax(dim=1))
    return actions


# Storage: each frame stored once per environment, stacks rebuilt at sample time
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


def store_env_step(replay: dict, slot_time, actions, rewards, terminated, truncated, info, next_obs, episode_done):
    """Record the EnvPool step taken from o_t (t = slot_time: an int, or a 0-d tensor on the device) and the newest
    frame of o_{t+1} (host arrays or tensors; `next_obs` already on the replay's device). No host value is read: a
    CUDA graph can capture it. Returns `episode_done` for the next step.

    The step is a transition unless the previous one ended an episode (`episode_done`): then it was
    EnvPool's auto-reset step, whose action was ignored. Its slot is stored as not valid, so it is
    never sampled and an n-step return never crosses it.
    """
    capacity, device = replay["frames"].shape[1], replay["frames"].device
    slot = torch.as_tensor(slot_time, device=device).reshape(1) % capacity
    next_slot = (slot + 1) % capacity
    utils.write_slot(replay, "actions", slot, actions)
    utils.write_slot(replay, "rewards", slot, rewards)
    utils.write_slot(replay, "terminated", slot, terminated)
    utils.write_slot(replay, "truncated", slot, truncated)
    utils.write_slot(replay, "valid", slot, ~torch.as_tensor(episode_done, device=device))
    utils.write_slot(replay, "frames", next_slot, next_obs[:, -1])
    utils.write_slot(replay, "episode_start", next_slot, torch.as_tensor(info["elapsed_step"], device=device) == 0)
    return terminated | truncated


def store_reset(replay: dict, buffer_time: int, obs, info) -> int:
    """Store the observations of envs.reset() and return their slot time: 0 in a fresh replay; after a resumed
    replay's o_{buffer_time}, the next slot, and slot buffer_time holds no transition (the games restart there): it is
    never sampled and no n-step return crosses it."""
    capacity, slot_time = replay["frames"].shape[1], buffer_time + 1 if buffer_time > 0 else 0
    if buffer_time > 0:
        for key in ("actions", "rewards", "terminated", "truncated", "valid"):
            replay[key][:, buffer_time % capacity] = 0
    replay["frames"][:, slot_time % capacity] = obs[:, -1]
    replay["episode_start"][:, slot_time % capacity] = torch.as_tensor(info["elapsed_step"], device=obs.device) == 0
    return slot_time


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


def gather_batch(replay: dict, env_index, slot_time, n_step: int, frame_stack: int, gamma: float) -> dict:
    """The n-step transitions taken from o_t at (env_index, t = slot_time), all on the replay's device."""
    capacity = replay["frames"].shape[1]
    window = (slot_time[:, None] + torch.arange(n_step, device=slot_time.device)) % capacity
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
    }


def sample_batch(replay: dict, buffer_time, batch_size: int, n_step: int, frame_stack: int, gamma: float,
                 resample_rounds: int = 8):
    """Sample transitions uniformly over valid slots, all on the replay's device.

    `buffer_time` (an int, or a tensor on the device: no host value is read, so this can be captured) is the slot
    of the newest observation. A transition t needs slots t-frame_stack+1 .. t+n_step still in memory. Auto-reset
    slots are redrawn (rejection sampling, all rounds drawn at once: each transition keeps its first valid draw); one
    left invalid after `resample_rounds` redraws (probability ~ invalid_fraction^rounds) gets weight 0 in the loss.
    """
    num_envs, capacity = replay["valid"].shape
    device = replay["valid"].device
    buffer_time = torch.as_tensor(buffer_time, device=device)
    low = (buffer_time - capacity + frame_stack).clamp(min=0)
    span = buffer_time - n_step + 1 - low  # slot times low .. buffer_time - n_step
    draws = (resample_rounds + 1, batch_size)
    env_draws = torch.randint(num_envs, draws, device=device)
    time_draws = torch.randint(2**62, draws, device=device) % span + low  # uniform to 2^-40; tensor bounds
    first_valid = replay["valid"][env_draws, time_draws % capacity].to(torch.uint8).argmax(dim=0, keepdim=True)
    env_index, slot_time = env_draws.gather(0, first_valid)[0], time_draws.gather(0, first_valid)[0]
    batch = gather_batch(replay, env_index, slot_time, n_step, frame_stack, gamma)
    batch["weights"] = replay["valid"][env_index, slot_time % capacity].float()
    return batch


def recent_observations(replay: dict, buffer_time: int, count: int, frame_stack: int):
    """Stacks of the newest stored observations of every environment (at most `count`), for diagnostics."""
    num_envs, capacity = replay["valid"].shape
    device = replay["valid"].device
    per_env = max(1, min(buffer_time + 1, capacity - frame_stack, -(-count // num_envs)))
    slot_time = (buffer_time - torch.arange(per_env, device=device)).repeat_interleave(num_envs)
    env_index = torch.arange(num_envs, device=device).repeat(per_env)
    return stack_frames(replay, env_index, slot_time, frame_stack)[:count]


# Environment: EnvPool Atari, one frame per step stored, whole games measured from the raw rewards
def make_env(args, num_envs: int, seed: int):
    """EnvPool Atari set to CleanRL's `dqn_atari` wrappers, every option explicit, for training and
    evaluation alike (CleanRL's `dqn_eval` reuses the training env).

    Life loss is terminal and rewards are clipped to their sign (Mnih et al. 2015). `info["reward"]`
    is always the raw reward and `info["terminated"]` the real game over, so full-game returns are
    measured from them.
    """
    return envpool.make(
        f"{utils.atari_game(args.env_id)}-v5", env_type="gymnasium", num_envs=num_envs, seed=seed,
        img_height=args.resolution, img_width=args.resolution, gray_scale=True, use_inter_area_resize=True,
        stack_num=args.frame_stack, frame_skip=args.frame_skip, full_action_space=False,
        max_episode_steps=args.max_episode_steps,
        noop_max=30,
        use_fire_reset=True,  # as CleanRL's FireResetEnv, for games whose action set has FIRE
        episodic_life=True,
        reward_clip=True,
        repeat_action_probability=0.0,  # CleanRL's NoFrameskip-v4: no sticky actions
    )


# Evaluation: whole games at a fixed epsilon; the network's diagnostics
def evaluate(q_function, eval_envs, epsilon: float, num_actions: int, device, capture_video: bool):
    """Play one whole game per evaluation environment at `epsilon`. The return sums the raw rewards
    (`info["reward"]`) of all lives until the real game over (`info["terminated"]`) or the time limit,
    whatever `eval_envs` does at a lost life and with the rewards it returns (see make_env)."""
    obs, _ = eval_envs.reset()
    num_envs = len(obs)
    returns, finished = np.zeros(num_envs), np.zeros(num_envs, dtype=bool)
    frames = [obs[0, -1]] if capture_video else None
    while not finished.all():
        actions = select_actions(q_function, torch.as_tensor(obs, device=device), epsilon, num_actions).cpu().numpy()
        obs, _, _, truncated, info = eval_envs.step(actions)
        returns += info["reward"] * ~finished
        if capture_video and not finished[0]:
            frames.append(obs[0, -1])
        finished |= info["terminated"].astype(bool) | truncated
    video = np.repeat(np.stack(frames)[..., None], 3, axis=-1) if capture_video else None
    return returns, video


def log_evaluation(run, step: int, q_function, eval_envs, args, device):
    """Evaluate (one whole game per evaluation environment) and log the mean return, its human-normalised score
    and, with --capture-video, the first game."""
    returns, video = evaluate(q_function, eval_envs, args.eval_epsilon, eval_envs.action_space.n, device,
                              args.capture_video)
    normalized = utils.atari_human_normalized_score(args.env_id, returns.mean())
    normalized = {} if normalized is None else {"eval/normalized_score": normalized}
    run.log(step, {"eval/return": returns.mean(), **normalized})
    if video is not None:
        run.save_video(f"eval_step_{step:012d}.gif", video)


def log_diagnostics(run, step: int, q_network, obs, args, sparse: bool):
    """The network's diagnostics on recent observations (utils.network_diagnostics; with sparse training, the
    sparsities), and the saliency and Grad-CAM of Q(s, a*) on four of them."""
    diagnostics = utils.network_diagnostics(q_network, obs, args.dormant_threshold)
    for tag, value in {**diagnostics, **(utils.sparsity_diagnostics(q_network) if sparse else {})}.items():
        run.writer.add_scalar(tag, value, step)
    run.writer.add_images("images/saliency", utils.q_saliency(q_network, obs[:4]), step)
    grad_cam = utils.grad_cam(q_network.encoder, lambda features: q_network.head(q_network.bottleneck(features)),
                              obs[:4].float() / 255.0)  # Q(s, a*) from the feature map the join reads
    run.writer.add_images("images/grad_cam", grad_cam, step)
    q_network.zero_grad(set_to_none=True)


# Main: the loop's device steps, the learner's losses between logs, the flags' check, then train
def device_steps(args, q_forward, target_forward, optimizer, replay: dict, sparse, num_actions: int, device):
    """The loop's device work, on tensors that stay in place: `act` (epsilon-greedy a_t from o_t, which is stored
    at slot buffer_time), `store` (the staged step into the replay) and `learn` (one gradient update; sparse
    training's mask updates run outside it: SparseTraining.update). With --cuda-graphs on CUDA each is captured as
    a CUDA graph at this one point and replayed at every call after a few eager warm-ups (LeanRL's habit; a capture
    that fails runs eagerly, and so does RigL's dense-gradient pass)."""
    captured = args.cuda_graphs and device.type == "cuda"
    newest_slot = torch.zeros((), dtype=torch.long, device=device)  # buffer_time: the slot of o_t
    epsilon_now = torch.ones((), device=device)  # the captured acting's epsilon
    actions_now = torch.zeros(args.num_envs, dtype=torch.long, device=device)  # a_t
    episode_done = torch.zeros(args.num_envs, dtype=torch.bool, device=device)  # did the last step end a game

    def act_greedy(obs, epsilon):  # epsilon-greedy on the staged observations, into actions_now
        actions_now.copy_(select_actions(q_forward, obs, epsilon, num_actions))

    def store(actions, rewards, terminated, truncated, elapsed_step, next_obs):  # the staged step, into the replay
        done = store_env_step(replay, newest_slot, actions, rewards, terminated, truncated,
                              {"elapsed_step": elapsed_step}, next_obs, episode_done)
        episode_done.copy_(done)

    def update(step: bool = True):  # one learner step on tensors that stay in place (step=False: gradients only)
        return learner_step(q_forward, target_forward, optimizer, replay, newest_slot, args, sparse.online, step=step)

    graphed_act, graphed_store, graphed_update = act_greedy, store, update
    if captured:  # each of the three a CUDA graph, replayed at every call
        graphed_act, graphed_store, graphed_update = (utils.CapturedStep(act_greedy, "acting"),
                                                      utils.CapturedStep(store, "store"),
                                                      utils.CapturedStep(update, "learner step"))

    def act(obs, epsilon: float, buffer_time: int):
        newest_slot.fill_(buffer_time)
        graphed_act(obs, epsilon_now.fill_(epsilon) if captured else epsilon)
        return actions_now

    def learn(update_count: int):
        return sparse.update(update_count, graphed_update, lambda: update(step=False), optimizer)

    return act, graphed_store, learn


def learner_losses(flag, loss_total, q_total, updates: int) -> tuple:
    """A device flag (utils.finite_flag) as a bool, and the mean loss and Q of the `updates` learner steps since the
    last log ({} without updates), read in one host sync; the sums restart from 0."""
    finite, mean_loss, mean_q_value = torch.stack([flag, loss_total / max(updates, 1),
                                                   q_total / max(updates, 1)]).tolist()
    if not updates:
        return finite == 1, {}
    loss_total.zero_(), q_total.zero_()
    return finite == 1, {"losses/td_loss": mean_loss, "losses/q_values": mean_q_value}


def check_args(args):
    """Refuse bad input with one line (exit 2) before any work."""
    if utils.atari_game(args.env_id) not in utils.atari_games():
        utils.fail(f"--env-id {args.env_id!r} is not an EnvPool Atari game; choose one of: "
                   f"{', '.join(utils.atari_games())}")
    utils.check_choice("encoder", args.encoder, ("nature", "impala"))
    utils.check_choice("pool", args.pool, ("flatten", "avg", "max", *TOKEN_JOINS))
    utils.check_choice("sparsity-method", args.sparsity_method, ("none", "prune", "static", "rigl"))
    utils.check_choice("sparsity-scope", args.sparsity_scope, ("all", "bottleneck"))
    utils.check_choice("sparsity-distribution", args.sparsity_distribution, ("erk", "uniform"))
    utils.check_ranges(args, FLAG_RANGES)
    if args.encoder_blocks != 2 and args.encoder != "impala":
        utils.fail(f"--encoder-blocks {args.encoder_blocks} needs --encoder impala (the Nature CNN has no residual blocks)")
    if args.num_experts != 1 and args.pool != "softmoe":
        utils.fail(f"--num-experts {args.num_experts} needs --pool softmoe")
    if args.layer_norm and args.pool in TOKEN_JOINS:
        utils.fail(f"--layer-norm is for the dense layers of --pool flatten|avg|max; --pool {args.pool}'s experts have none")
    with torch.device("meta"):
        encoder = make_encoder(args)
    if feature_map_shape(encoder, args.frame_stack, args.resolution)[1] < 1:
        low = next(side for side in range(1, 4097) if feature_map_shape(encoder, args.frame_stack, side)[1] >= 1)
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
    if args.sparsity_start > args.sparsity_end:
        utils.fail(f"--sparsity-start {args.sparsity_start} must not be above --sparsity-end {args.sparsity_end}")
    utils.check_tracking(args)
    device = utils.training_device(args)
    utils.check_memory(args.buffer_size // args.num_envs * args.num_envs * args.resolution**2, device,
                       f"--buffer-size {args.buffer_size} at --resolution {args.resolution}")


def main():
    args = tyro.cli(Args)
    check_args(args)  # all bad input: one line, exit 2 (also memory, via utils.check_memory)
    args.env_id = utils.atari_game(args.env_id)  # `Breakout-v5` trains, and names its run folder, as `Breakout`
    # derived values
    replay_capacity = args.buffer_size // args.num_envs  # slots per environment
    replay_gib = args.num_envs * replay_capacity * args.resolution**2 / 2**30  # uint8 frames
    exploration_steps = args.exploration_fraction * args.total_timesteps
    device = utils.training_device(args)
    run = utils.Run(args, SCRIPT, RUN_NEUTRAL_FLAGS, ARCHITECTURE_FLAGS)  # the run folder, and the checkpoint to resume
    checkpoint, global_step = run.checkpoint, run.step
    check_resumed_sparsity(checkpoint, run.checkpoint_file, args)
    # (replay, buffer_time) saved beside the newest checkpoint, if this is it
    resumed_replay = checkpoint and utils.load_saved_replay(run.checkpoint_file, global_step, args.num_envs,
                                                            replay_capacity, device)
    run.open(device, replay=f"{replay_gib:.2f} GiB")

    # set-up
    utils.set_up(args, device)  # seeds, CUDA switches, CPU threads
    env_seed = args.seed + global_step  # a resumed run cannot restore the emulators: it restarts the games
    envs = make_env(args, args.num_envs, env_seed)
    eval_envs = make_env(args, args.eval_episodes, env_seed + 1_000_000)  # the training settings, as CleanRL's dqn_eval
    num_actions = envs.action_space.n
    q_network, target_network, optimizer = make_learner(args, num_actions, device)
    sparse = SparseTraining(args, q_network, target_network)  # nothing to do without --sparsity-method
    replay, buffer_time = resumed_replay or (make_replay(args.num_envs, replay_capacity, args.resolution, device), 0)
    update_count, update_credit = 0, 0
    if checkpoint:
        update_count, update_credit = load_learner(checkpoint, q_network, target_network, optimizer, sparse.masks)
        run.resumed()  # and the random streams
    sparse.start(resumed=bool(checkpoint))
    run.log_parameter_counts(utils.parameter_counts(q_network))
    q_forward = torch.compile(q_network) if args.compile else q_network
    target_forward = torch.compile(target_network) if args.compile else target_network
    act, store, learn = device_steps(args, q_forward, target_forward, optimizer, replay, sparse, num_actions, device)
    stage = utils.HostStaging(device, args.pinned_staging and device.type == "cuda")  # one device buffer per name
    loss_total, q_total = torch.zeros((), device=device), torch.zeros((), device=device)  # summed since the last log

    def finite_flag():  # on the device: are the losses since the last check (their sum), the weights and Adam's moments finite
        return utils.finite_flag(loss_total, q_network, optimizer)

    def checkpoint_payload():
        return utils.checkpoint_payload(SCRIPT, args, global_step, q_network=q_network.state_dict(),
                                        target_network=target_network.state_dict(), optimizer=optimizer.state_dict(),
                                        update_count=update_count, update_credit=update_credit, **sparse.checkpoint_state())

    # training loop
    obs, info = envs.reset()
    obs_device = stage("obs", obs)
    buffer_time = store_reset(replay, buffer_time, obs_device, info)
    episode_return = np.zeros(args.num_envs)
    logged_updates = update_count
    run.start_clock(global_step)
    while global_step < args.total_timesteps:
        epsilon = linear_schedule(args.start_e, args.end_e, exploration_steps, global_step)
        actions = act(obs_device, epsilon, buffer_time)
        envs.send(actions.cpu().numpy())  # the step's one host sync; the emulators step while the learner updates
        previous_step = global_step
        global_step += args.num_envs

        # gradient updates: one per `train_frequency` agent steps, once the replay is warm
        warm = min(buffer_time, replay_capacity) * args.num_envs >= min(args.learning_starts, args.buffer_size)
        if global_step > args.learning_starts and warm and buffer_time >= args.n_step:
            update_credit += args.num_envs
            while update_credit >= args.train_frequency:
                update_credit -= args.train_frequency
                loss, mean_q = learn(update_count)
                update_count += 1
                loss_total += loss
                q_total += mean_q
            if utils.crossed(previous_step, global_step, args.target_network_frequency):
                soft_update(target_network, q_network, args.tau)
                sparse.sync_target()

        # store the step taken from o_t; an auto-reset step (after an episode end) is never a transition
        next_obs, rewards, terminated, truncated, info = envs.recv()
        obs_device = stage("obs", next_obs)
        store(actions, *stage.env_step(rewards, terminated, truncated, info), obs_device)
        buffer_time += 1
        for game_return, game_length in utils.finished_games(episode_return, info, truncated):
            run.log(global_step, {"charts/episodic_return": game_return, "charts/episodic_length": game_length})
            run.progress.update(episodic_return=game_return)
        run.progress.update(global_step)

        # logging, and the non-finite check: the interval's one host sync reads both
        if utils.crossed(previous_step, global_step, args.log_every):
            updates, logged_updates = update_count - logged_updates, update_count
            finite, losses = learner_losses(finite_flag(), loss_total, q_total, updates)
            run.check_finite(finite, global_step)
            run.keep_good(checkpoint_payload())
            run.log(global_step, {"charts/SPS": run.sps(global_step), "charts/learning_rate": optimizer.param_groups[0]["lr"],
                                  "charts/epsilon": epsilon, **losses})
        # diagnostics on recent observations, evaluation and checkpoints
        if utils.crossed(previous_step, global_step, args.diag_every):
            recent = recent_observations(replay, buffer_time, args.diag_batch_size, args.frame_stack)
            log_diagnostics(run, global_step, q_network, recent, args, sparse=bool(sparse.masks))
        if utils.crossed(previous_step, global_step, args.eval_every) and global_step < args.total_timesteps:
            log_evaluation(run, global_step, q_forward, eval_envs, args, device)
        if utils.crossed(previous_step, global_step, args.save_every):
            run.check_finite(bool(finite_flag()), global_step)
            saved_replay = {"replay": replay, "buffer_time": buffer_time} if args.save_buffer else None
            run.save(global_step, checkpoint_payload(), saved_replay)

    # evaluation and saving at the end
    run.progress.close()
    run.check_finite(bool(finite_flag()), global_step)
    log_evaluation(run, global_step, q_forward, eval_envs, args, device)
    run.finish(checkpoint_payload())
    envs.close()
    eval_envs.close()


if __name__ == "__main__":
    main()
