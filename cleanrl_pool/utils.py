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


def check_ranges(args, ranges: dict):
    """Refuse any flag outside its range, written as an interval: "[0, 1]", "(0, inf)", "[1, 4096]" (square
    brackets include the end). NaN is in no range and inf only in one that names it with "]"; None (an
    optional flag left unset) and flags not listed pass."""
    for name, interval in ranges.items():
        value = getattr(args, name)
        if value is None:
            continue
        low, high = (float(end.strip(" [()]")) for end in interval.split(","))
        above = value >= low if interval.startswith("[") else value > low
        below = value <= high if interval.endswith("]") else value < high
        if not (above and below):
            fail(f"--{name.replace('_', '-')} {value!r} is outside {interval}")


def check_writable_folder(flag: str, path: str):
    """A folder, or one that can be made: its nearest existing ancestor is a writable folder."""
    if not path.strip():
        fail(f"--{flag} {path!r} names no folder")
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--{flag} {path!r} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--{flag} {path!r} cannot be written: {existing} is not a writable folder")


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


# Run folder: runs/{env_id}__{exp_name}__{seed}__{unix_time}/, one training process at a time
# Flags that do not change what is trained: a run continued with other values of these is the same run.
RUN_NEUTRAL_FLAGS = frozenset({
    "resume", "runs_dir", "track", "wandb_project_name", "wandb_entity", "capture_video", "torch_threads", "compile", "cuda",
    "eval_every", "eval_episodes", "final_eval_episodes", "eval_num_envs", "save_every", "save_buffer", "keep_checkpoints",
    "diag_every", "diag_batch_size", "dormant_threshold", "log_every", "iteration_steps",
})
_run_lock = None  # the open lock file of this process's run folder: the OS releases it when the process ends


def run_prefix(args) -> str:
    return os.path.join(args.runs_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__")


def checkpoint_path(run_dir: str, global_step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{global_step:012d}.pt")


def latest_checkpoint(run_dir: str):
    """The newest periodic checkpoint of a run folder, or None."""
    paths = sorted(glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "step_*.pt")))
    return paths[-1] if paths else None


def training_config(config: dict) -> dict:
    """The resolved flags that decide what is trained (JSON-normalised, bookkeeping flags left out)."""
    return {key: value for key, value in json.loads(json.dumps(config)).items() if key not in RUN_NEUTRAL_FLAGS}


def run_folder_of(checkpoint_file: str) -> str:
    """The folder a checkpoint file lies in: run_dir for final.pt, run_dir for checkpoints/step_*.pt."""
    folder = os.path.dirname(os.path.abspath(checkpoint_file))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def recorded_run_name(checkpoint_file: str):
    """The run folder name a checkpoint was written in (None for one from before it was recorded), read
    memory-mapped so that a checkpoint holding a replay is not read whole twice."""
    try:
        checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        fail(f"--resume {checkpoint_file!r} is not a readable checkpoint ({type(error).__name__})")
    return checkpoint.get("run_name") if isinstance(checkpoint, dict) else None


def resolve_run(args):
    """Pick the run folder and the checkpoint to resume from (None for a fresh run).

    `--resume PATH` continues in the run folder the checkpoint was written in, when the file still lies
    in it (a run folder moved as a whole continues where it is); a checkpoint copied elsewhere starts a
    new run folder under --runs-dir. `--resume auto` continues the newest run folder of the same env id,
    experiment name and seed that has a checkpoint and the same training configuration (config.json,
    RUN_NEUTRAL_FLAGS aside); else it starts fresh, reusing a folder of that configuration that a kill
    left without any checkpoint.
    """
    for flag in ("exp_name", "env_id"):
        name = str(getattr(args, flag))
        if not name or "/" in name or os.sep in name or "__" in name:
            fail(f"--{flag.replace('_', '-')} {name!r} cannot name a run folder: no '/', no '__', not empty")
    check_writable_folder("runs-dir", args.runs_dir)
    fresh = run_prefix(args) + str(int(time.time()))
    if args.resume == "auto":
        wanted, orphan = training_config(asdict(args)), None
        for run_dir in sorted(glob.glob(glob.escape(run_prefix(args)) + "*"), reverse=True):
            try:
                with open(os.path.join(run_dir, "config.json")) as f:
                    same = training_config(json.load(f)) == wanted
            except (OSError, ValueError):
                continue
            checkpoint = latest_checkpoint(run_dir)
            if same and checkpoint is not None:
                return run_dir, checkpoint
            if same and orphan is None and not os.path.exists(os.path.join(run_dir, "final.pt")):
                orphan = run_dir
        args.resume = ""
        return orphan or fresh, None
    if args.resume:
        if not os.path.isfile(args.resume):
            fail(f"--resume {args.resume!r}: no such checkpoint file")
        folder, name = run_folder_of(args.resume), recorded_run_name(args.resume)
        in_place = os.path.isfile(os.path.join(folder, "config.json")) and name in (None, os.path.basename(folder))
        return (folder if in_place else fresh), args.resume
    return fresh, None


def write_json(path: str, data):
    """Write JSON atomically: a temporary file, then `os.replace`."""
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
    os.replace(tmp_path, path)


def start_run(args, run_dir: str, purge_step=None):
    """Create (or take over) the run folder, lock it for this process, write config.json and open the
    TensorBoard writer. A resumed run passes its step as `purge_step`: events a killed process logged
    after its last checkpoint are then hidden, as they are logged again."""
    import fcntl

    from torch.utils.tensorboard import SummaryWriter

    global _run_lock
    try:
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        lock = open(os.path.join(run_dir, ".lock"), "w")
    except OSError as error:
        fail(f"--runs-dir {args.runs_dir!r} cannot hold the run folder {run_dir!r} ({error.strerror})")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"the run folder {run_dir!r} is in use by another process; wait for it, or start a new run")
    _run_lock = lock
    # Leftovers of a killed process: half-written files, and an orphan's event files (no checkpoint to continue)
    for stale in glob.glob(os.path.join(glob.escape(run_dir), "**", "*.tmp"), recursive=True):
        os.remove(stale)
    if purge_step is None:
        for stale in glob.glob(os.path.join(glob.escape(run_dir), "events.out.tfevents.*")):
            os.remove(stale)
    write_json(os.path.join(run_dir, "config.json"), asdict(args))
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    table = "\n".join(f"|{key}|{value}|" for key, value in sorted(asdict(args).items()))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


# Checkpoints: one torch.save dict, written atomically, read as data only
def save_checkpoint(path: str, payload: dict):
    """Write atomically, recording the run folder's name (`--resume PATH` continues there)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp_path = path + ".tmp"
    torch.save(dict(payload, run_name=os.path.basename(run_folder_of(path))), tmp_path)
    os.replace(tmp_path, path)


def save_periodic_checkpoint(run_dir: str, step: int, payload: dict, keep: int, replay: dict = None):
    """checkpoints/step_*.pt, of which the newest `keep` stay. An off-policy run's `replay` goes beside the
    newest one only (checkpoints/replay.pt, recording its step, written after it): a resumed run skips
    its warm-up, and a run's disk holds one replay, not one per checkpoint."""
    save_checkpoint(checkpoint_path(run_dir, step), payload)
    if replay is not None:
        save_checkpoint(os.path.join(run_dir, "checkpoints", "replay.pt"), dict(replay, global_step=step))
    for old in sorted(glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "step_*.pt")))[:-keep]:
        os.remove(old)


def load_replay(checkpoint_file: str, step: int):
    """The replay saved beside the checkpoint of `step` (memory-mapped), or None when the newest replay
    belongs to another checkpoint or none was saved (the run then fills its replay again)."""
    path = os.path.join(run_folder_of(checkpoint_file), "checkpoints", "replay.pt")
    if not os.path.isfile(path):
        return None
    try:
        replay = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        fail(f"--resume {checkpoint_file!r}: its replay {path!r} is not readable ({type(error).__name__})")
    if replay.get("global_step") != step:
        return None
    return {key: value for key, value in replay.items() if key not in ("global_step", "run_name")}


def load_checkpoint(path: str, script: str, args, architecture_flags) -> dict:
    """Read a checkpoint with `weights_only=True` and refuse one from another script or network."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        fail(f"--resume {path!r} is not a readable checkpoint ({type(error).__name__})")
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != script:
        found = checkpoint.get("script") if isinstance(checkpoint, dict) else None
        fail(f"--resume {path!r} was written by {found!r}, not by {script}")
    if not isinstance(checkpoint.get("args"), dict) or "global_step" not in checkpoint:
        fail(f"--resume {path!r} lacks the resolved arguments or the step it was written at")
    for flag in architecture_flags:
        saved, asked = checkpoint["args"].get(flag), getattr(args, flag)
        if saved != asked:
            fail(f"--resume {path!r} was trained with --{flag.replace('_', '-')} {saved!r}, this run asks for {asked!r}")
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


def floating_tensors(value) -> list:
    """Every floating-point tensor in a (nested) state dict, list or tensor."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        return [t for item in value.values() for t in floating_tensors(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in floating_tensors(item)]
    return []


def finite_state(*parts) -> bool:
    """Whether every floating-point tensor of these modules, optimisers (their moments too) and tensors
    is finite: the test a "last good" state must pass. One host sync."""
    found = [t for part in parts for t in floating_tensors(part if isinstance(part, torch.Tensor) else part.state_dict())]
    return bool(torch.stack([torch.isfinite(t).all() for t in found]).all()) if found else True


def parameter_count(*modules) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for a new buffer: the GPU's when on CUDA, else the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
