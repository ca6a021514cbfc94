"""What every cleanrl_pool script shares byte for byte and is not algorithm logic: bad-input
exits, the run folder, seeding and RNG state, checkpoints, score normalisation tables and the
summaries of the diagnostics. Copy it next to any script you take out of this repository."""

import glob
import json
import os
import random
import sys
import time
from dataclasses import asdict

import numpy as np
import torch


# Bad input: one line, exit status 2, before any work
def fail(message: str):
    """Stop on a user's mistake with one clear line and exit status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_choice(flag: str, value, allowed):
    if value not in allowed:
        fail(f"--{flag} {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_positive(flag: str, value):
    if not value > 0:
        fail(f"--{flag} {value!r} must be positive")


# Seeding and RNG state
def seed_everything(seed: int, torch_deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def rng_state() -> dict:
    """Python, NumPy, torch and CUDA generator states as plain data that `weights_only` loads."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict):
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Run folder: runs/{env_id}__{exp_name}__{seed}__{unix_time}/
def run_prefix(args) -> str:
    return os.path.join(args.runs_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__")


def checkpoint_path(run_dir: str, global_step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{global_step:012d}.pt")


def latest_checkpoint(run_dir: str):
    """The newest periodic checkpoint of a run folder, or None."""
    paths = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step_*.pt")))
    return paths[-1] if paths else None


def resolve_run(args):
    """Pick the run folder and the checkpoint to resume from (None for a fresh run).

    `--resume PATH` continues in the folder that holds PATH; `--resume auto` continues the newest
    folder of the same env id, experiment name and seed that has a checkpoint, else starts fresh.
    """
    if args.resume == "auto":
        for run_dir in sorted(glob.glob(run_prefix(args) + "*"), reverse=True):
            checkpoint = latest_checkpoint(run_dir)
            if checkpoint is not None:
                return run_dir, checkpoint
        args.resume = ""
    if args.resume:
        if not os.path.isfile(args.resume):
            fail(f"--resume {args.resume!r}: no such checkpoint file")
        return os.path.dirname(os.path.dirname(os.path.abspath(args.resume))), args.resume
    return run_prefix(args) + str(int(time.time())), None


def write_json(path: str, data):
    """Write JSON atomically: a temporary file, then `os.replace`."""
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp_path, path)


def start_run(args, run_dir: str):
    """Create the run folder, write config.json and open the TensorBoard writer."""
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    write_json(os.path.join(run_dir, "config.json"), asdict(args))
    writer = SummaryWriter(run_dir)
    table = "\n".join(f"|{key}|{value}|" for key, value in sorted(asdict(args).items()))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


# Checkpoints: one torch.save dict, written atomically, read as data only
def save_checkpoint(path: str, payload: dict):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = path + ".tmp"
    torch.save(payload, tmp_path)
    os.replace(tmp_path, path)


def load_checkpoint(path: str, script: str, args, architecture_flags) -> dict:
    """Read a checkpoint with `weights_only=True` and refuse one from another script or network."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"--resume {path!r} is not a readable checkpoint ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != script:
        found = checkpoint.get("script") if isinstance(checkpoint, dict) else None
        fail(f"--resume {path!r} was written by {found!r}, not by {script}")
    for flag in architecture_flags:
        saved, asked = checkpoint["args"][flag], getattr(args, flag)
        if saved != asked:
            fail(f"--resume {path!r} holds a network with --{flag.replace('_', '-')} {saved!r}, this run asks for {asked!r}")
    return checkpoint


# Score normalisation (REFERENCE §2, §7)
PROCGEN_SCORE_RANGES = {  # game: {mode: (min, max)}, normalised score = (R - min) / (max - min)
    "bigfish": {"easy": (1, 40), "hard": (0, 40)},
    "bossfight": {"easy": (0.5, 13), "hard": (0.5, 13)},
    "caveflyer": {"easy": (3.5, 12), "hard": (2, 13.4)},
    "chaser": {"easy": (0.5, 13), "hard": (0.5, 14.2)},
    "climber": {"easy": (2, 12.6), "hard": (1, 12.6)},
    "coinrun": {"easy": (5, 10), "hard": (5, 10)},
    "dodgeball": {"easy": (1.5, 19), "hard": (1.5, 19)},
    "fruitbot": {"easy": (-1.5, 32.4), "hard": (-0.5, 27.2)},
    "heist": {"easy": (3.5, 10), "hard": (2, 10)},
    "jumper": {"easy": (3, 10), "hard": (1, 10)},
    "leaper": {"easy": (3, 10), "hard": (1.5, 10)},
    "maze": {"easy": (5, 10), "hard": (4, 10)},
    "miner": {"easy": (1.5, 13), "hard": (1.5, 20)},
    "ninja": {"easy": (3.5, 10), "hard": (2, 10)},
    "plunder": {"easy": (4.5, 30), "hard": (3, 30)},
    "starpilot": {"easy": (2.5, 64), "hard": (1.5, 35)},
}

ATARI_RANDOM_HUMAN = {  # game: (random score, human score), human-normalised = (R - random) / (human - random)
    "Alien": (227.8, 7127.7), "Amidar": (5.8, 1719.5), "Assault": (222.4, 742.0),
    "Asterix": (210.0, 8503.3), "BankHeist": (14.2, 753.1), "BattleZone": (2360.0, 37187.5),
    "BeamRider": (363.9, 16926.5), "Boxing": (0.1, 12.1), "Breakout": (1.7, 30.5),
    "ChopperCommand": (811.0, 7387.8), "CrazyClimber": (10780.5, 35829.4), "DemonAttack": (152.1, 1971.0),
    "Freeway": (0.0, 29.6), "Frostbite": (65.2, 4334.7), "Gopher": (257.6, 2412.5),
    "Hero": (1027.0, 30826.4), "Jamesbond": (29.0, 302.8), "Kangaroo": (52.0, 3035.0),
    "Krull": (1598.0, 2665.5), "KungFuMaster": (258.5, 22736.3), "MsPacman": (307.3, 6951.6),
    "Pong": (-20.7, 14.6), "PrivateEye": (24.9, 69571.3), "Qbert": (163.9, 13455.0),
    "RoadRunner": (11.5, 7845.0), "Seaquest": (68.4, 42054.7), "SpaceInvaders": (148.0, 1668.7),
    "UpNDown": (533.4, 11693.2), "WizardOfWor": (563.5, 4756.5),
}


def procgen_normalized_score(game: str, distribution_mode: str, episodic_return):
    low, high = PROCGEN_SCORE_RANGES[game][distribution_mode]
    return (episodic_return - low) / (high - low)


def atari_human_normalized_score(game: str, episodic_return):
    """Human-normalised score, or None for a game without published random and human scores."""
    if game not in ATARI_RANDOM_HUMAN:
        return None
    random_score, human_score = ATARI_RANDOM_HUMAN[game]
    return (episodic_return - random_score) / (human_score - random_score)


# Diagnostics summaries (REFERENCE §5)
def dormant_fraction(activations, threshold: float) -> float:
    """Fraction of dormant neurons over a list of layer outputs (Sokar et al. 2023).

    A neuron's score is its mean |activation| over the batch (and over space for a conv channel)
    divided by the mean score of its layer; it is dormant when the score is <= threshold.
    """
    dormant, total = 0, 0
    for activation in activations:
        per_neuron = activation.detach().abs().float().transpose(0, 1).flatten(1).mean(1)
        score = per_neuron / (per_neuron.mean() + 1e-9)
        dormant += int((score <= threshold).sum())
        total += score.numel()
    return dormant / max(total, 1)


def saliency_image(gradient: torch.Tensor) -> torch.Tensor:
    """Gradient saliency (B, C, H, W) -> (B, 1, H, W) in [0, 1]: |grad|, max over channels,
    clipped at each image's 99th percentile, then min-max normalised (Procgen-HD paper)."""
    saliency = gradient.detach().abs().float().amax(dim=1, keepdim=True)
    ceiling = torch.quantile(saliency.flatten(1), 0.99, dim=1).view(-1, 1, 1, 1)
    saliency = torch.minimum(saliency, ceiling)
    low = saliency.flatten(1).min(1).values.view(-1, 1, 1, 1)
    high = saliency.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (saliency - low) / (high - low + 1e-12)


def save_video(path: str, frames, fps: int = 30):
    """Write uint8 frames (T, H, W, 3) as an animated GIF (no codec or network needed)."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(frame)) for frame in frames]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = path + ".tmp"
    images[0].save(tmp_path, format="GIF", save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
    os.replace(tmp_path, path)


def parameter_count(*modules) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for a new buffer: the GPU's when on CUDA, else the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
