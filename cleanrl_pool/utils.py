"""What the cleanrl_pool scripts share and is not their algorithm, in sections a reader can skip by title: bad input,
seeding and RNG state, the run folder (lock, config, TensorBoard and W&B), checkpoints and the last good state, the
training loop's plumbing (interval test, log line, live progress), Atari (game names, whole-game returns, the saved
replay), speed machinery (host staging, CUDA graphs), score normalisation tables and the network's diagnostics.
Copy it next to any script you take out of this repository."""

import contextlib
import copy
import glob
import json
import os
import random
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields

import numpy as np
import torch


# Flags every script shares: each script's Args extends RunArgs with its own (tyro reads both, base first)
@dataclass
class RunArgs:
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
    resume: str = ""
    """a checkpoint to continue from, or `auto`: the newest of this env id, experiment and seed with the same training
    configuration (a finished one: exit 0, nothing trained; none: a new run)"""
    keep_checkpoints: int = 3
    """how many of the newest periodic checkpoints stay on disk (older ones are deleted)"""
    diag_batch_size: int = 256
    """the number of recent observations the diagnostics look at"""
    dormant_threshold: float = 0.025
    """a neuron is dormant when its normalised mean activation is at most this (Sokar et al. 2023)"""
    compile: bool = False
    """if toggled, compile the training computations with torch.compile (worth it on a GPU; slow to start)"""
    torch_threads: int = 0
    """CPU threads of torch (0: torch's default); 1 is fastest for small networks on a small, shared CPU"""
    progress: bool = True
    """show live progress: a bar on a terminal, else a line every 30 s (--no-progress: off)"""
    tf32: bool = True
    """TF32 matmuls and convolutions (CUDA only; --no-tf32: full float32)"""
    cudnn_benchmark: bool = True
    """cuDNN autotuning of the convolutions, unless --torch-deterministic (CUDA only)"""


# Bad input: one line, exit status 2, before any work
def fail(message: str):
    """Stop on a user's mistake with one clear line and exit status 2 (no traceback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_choice(flag: str, value, allowed):
    if value not in allowed:
        fail(f"--{flag} {value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


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


def check_tracking(args):
    """`--track` needs the optional `wandb` package: refuse it before any work when it is missing."""
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--track needs the `wandb` package (pip install wandb); the scripts run without it")


def check_memory(need_bytes: int, device: torch.device, what: str):
    """Refuse a buffer that would take more than 80 % of the free memory of `device` (an OOM kill after
    set-up helps nobody); `what` names the flags that decide its size."""
    free = free_memory_bytes(device)
    if need_bytes > 0.8 * free:
        fail(f"{what} needs {need_bytes / 2**30:.1f} GiB of {device.type} memory, more than 80 % of the "
             f"{free / 2**30:.1f} GiB free")


# Seeding and RNG state, the training device, mixed precision
def seed_everything(seed: int, torch_deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def set_up(args, device: torch.device):
    """What every run does before it builds anything: seed Python, NumPy and torch, set the CUDA switches
    (configure_cuda) and torch's CPU threads (`--torch-threads`, 0 = torch's default)."""
    seed_everything(args.seed, args.torch_deterministic)
    configure_cuda(args, device)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)


def training_device(args) -> torch.device:
    """CUDA when it is available and `--cuda` (the default), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")


def configure_cuda(args, device: torch.device):
    """The speed switches every script shares, on CUDA only: TF32 matmuls and convolutions (`--tf32`), and
    cuDNN autotuning (`--cudnn-benchmark`) unless `--torch-deterministic` asks for reproducible kernels."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark and not args.torch_deterministic


def mixed_precision(device: torch.device, bf16: bool):
    """A run's one mixed-precision context (nanoGPT's `ctx`): bfloat16 autocast on `device` where the script's speed plan
    turns bf16 on, else a context that does nothing. Enter it any number of times, but never inside itself: autocast
    keeps a single saved state, so a nested entry would leave autocast on at the outer exit."""
    return torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()


def within(context, function):
    """`function`, each call of it inside `context`: a fast path put around one step at one point (LeanRL's way), so
    that the step itself never names it."""
    def call(*args, **kwargs):
        with context:
            return function(*args, **kwargs)
    return call


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
# Flags every script has that do not change what is trained: a run continued with other values of these is the same
# run. A script adds its own such flags (its RUN_NEUTRAL_FLAGS, passed to resolve_run).
RUN_NEUTRAL_FLAGS = frozenset({
    "resume", "runs_dir", "track", "wandb_project_name", "wandb_entity", "capture_video", "torch_threads", "compile", "cuda",
    "eval_every", "eval_episodes", "save_every", "keep_checkpoints", "diag_every", "diag_batch_size", "dormant_threshold",
    "progress", "tf32", "cudnn_benchmark",  # tf32, cudnn_benchmark: speed switches, the same training computed faster
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


def flag_defaults(args) -> dict:
    """Each flag's default in the script's Args: the value a run written before the flag existed trained with (a new flag's
    default keeps the behaviour it adds to off), so an older config.json or checkpoint reads as if it had it."""
    return {field.name: field.default for field in fields(args) if field.default is not MISSING}


def training_config(config: dict, neutral_flags=RUN_NEUTRAL_FLAGS) -> dict:
    """The resolved flags that decide what is trained (JSON-normalised, the `neutral_flags` left out)."""
    return {key: value for key, value in json.loads(json.dumps(config)).items() if key not in neutral_flags}


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


def resolve_run(args, neutral_flags=RUN_NEUTRAL_FLAGS):
    """Pick the run folder and the checkpoint to resume from (None for a fresh run).

    `--resume PATH` continues in the run folder the checkpoint was written in, when the file still lies
    in it (a run folder moved as a whole continues where it is); a checkpoint copied elsewhere starts a
    new run folder under --runs-dir. `--resume auto` continues the newest run folder of the same env id,
    experiment name and seed that has a checkpoint and the same training configuration (config.json,
    `neutral_flags` aside); when that folder holds final.pt the run is finished: one line says so and the
    script exits 0 without training (Dopamine's runner does the same). Else it starts fresh, reusing a folder
    of that configuration that a kill left without any checkpoint.
    """
    for flag in ("exp_name", "env_id"):
        name = str(getattr(args, flag))
        if not name or "/" in name or os.sep in name or "__" in name:
            fail(f"--{flag.replace('_', '-')} {name!r} cannot name a run folder: no '/', no '__', not empty")
    check_writable_folder("runs-dir", args.runs_dir)
    fresh = run_prefix(args) + str(int(time.time()))
    if args.resume == "auto":
        wanted, defaults, orphan = training_config(asdict(args), neutral_flags), flag_defaults(args), None
        for run_dir in sorted(glob.glob(glob.escape(run_prefix(args)) + "*"), reverse=True):
            try:
                with open(os.path.join(run_dir, "config.json")) as f:
                    same = training_config({**defaults, **json.load(f)}, neutral_flags) == wanted
            except (OSError, ValueError):
                continue
            checkpoint, finished = latest_checkpoint(run_dir), os.path.exists(os.path.join(run_dir, "final.pt"))
            if same and finished:
                print(f"--resume auto: {run_dir} has finished (final.pt); nothing to train", flush=True)
                sys.exit(0)
            if same and checkpoint is not None:
                return run_dir, checkpoint
            if same and orphan is None:
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
    TensorBoard writer (and W&B with `--track`). A resumed run passes the step after its checkpoint's as `purge_step`:
    events a killed process logged after its last checkpoint are then hidden, as they are logged again."""
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
    if args.track:  # before the writer: W&B mirrors the TensorBoard events it writes
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity or None, sync_tensorboard=True,
                   config=asdict(args), name=os.path.basename(run_dir), save_code=True)
    writer = SummaryWriter(run_dir, purge_step=purge_step)
    table = "\n".join(f"|{key}|{value}|" for key, value in sorted(asdict(args).items()))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


def finish_run(writer):
    """Close the TensorBoard writer and the W&B run, if one was started."""
    writer.close()
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def print_config(args, **derived):
    """Print every resolved flag, then the values the script derived from them (device, run folder, sizes)."""
    print("config:\n" + "\n".join(f"  {key} = {value}" for key, value in asdict(args).items()), flush=True)
    print("derived: " + ", ".join(f"{key} = {value}" for key, value in derived.items()), flush=True)


# Checkpoints: one torch.save dict, written atomically, read as data only
CHECKPOINT_FORMAT = 2  # 2: the one-skeleton networks (Bottleneck modules); a checkpoint of another format is refused


def checkpoint_payload(script: str, args, global_step: int, **state) -> dict:
    """What every checkpoint holds (the script, its format, its resolved flags, the step, every RNG state) and
    the script's own `state` (networks, optimisers, whatever exact continuation needs)."""
    return {"script": script, "format": CHECKPOINT_FORMAT, "args": asdict(args), "global_step": global_step,
            "rng": rng_state(), **state}


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
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        fail(f"--resume {path!r} was written by an older {script} (checkpoint format {checkpoint.get('format', 1)}, "
             f"this one reads {CHECKPOINT_FORMAT}): start a new run")
    defaults = flag_defaults(args)
    for flag in architecture_flags:
        saved, asked = checkpoint["args"].get(flag, defaults.get(flag)), getattr(args, flag)
        if saved != asked:
            fail(f"--resume {path!r} was trained with --{flag.replace('_', '-')} {saved!r}, this run asks for {asked!r}")
    return checkpoint


def stop_if_nonfinite(finite: bool, last_good, run_dir: str, step: int, writer):
    """Stop when a loss, gradient or weight since the last check was not finite: write `last_good` (the payload
    of the last state checked finite, or None) as its checkpoint, say so on stderr, exit with status 1."""
    if finite:
        return
    if last_good is None:
        where = "no finite state was checked yet, so no checkpoint was written"
    else:
        path = checkpoint_path(run_dir, last_good["global_step"])
        save_checkpoint(path, last_good)
        where = f"the last good state is {path}"
    print(f"error: non-finite loss, gradient or weights before step {step}; stopping ({where}). "
          "Try a lower --learning-rate.", file=sys.stderr, flush=True)
    finish_run(writer)
    raise SystemExit(1)


# Run: one training run's bookkeeping, done once (folder, resume, writer, progress, last good state, log line, saving)
class Run:
    """What a training run keeps besides the algorithm. Made from the flags: the run folder and the checkpoint
    `--resume` continues (`checkpoint`, None when fresh; `step`, the step it starts at), chosen before any work.
    `open` prints the configuration and opens the folder and its TensorBoard writer; `start_clock` starts live
    progress and the SPS clock as the loop begins. It calls nothing back: main() keeps every interval test and
    decides what is logged, checked and saved."""

    def __init__(self, args, script: str, neutral_flags, architecture_flags):
        self.args = args
        self.dir, self.checkpoint_file = resolve_run(args, neutral_flags)
        self.checkpoint = self.checkpoint_file and load_checkpoint(self.checkpoint_file, script, args, architecture_flags)
        self.step = self.checkpoint["global_step"] if self.checkpoint else 0
        self.writer = self.progress = self.last_good = None

    def open(self, device, **derived):
        """Print every flag and the derived values, then create and lock the folder, write config.json, open the writer."""
        print_config(self.args, device=device, run_dir=self.dir, **derived)
        # a checkpoint is saved after its step's logging: TensorBoard hides what a killed process logged after it
        self.writer = start_run(self.args, self.dir, purge_step=self.step + 1 if self.checkpoint else None)

    def resumed(self):
        """Continue the checkpoint's random streams (after all the set-up's draws) and say so."""
        set_rng_state(self.checkpoint["rng"])
        echo(f"resumed from {self.checkpoint_file} at step {self.step}")

    def log_parameter_counts(self, counts: dict):
        log_parameter_counts(self.writer, counts, fresh=self.checkpoint is None)

    def start_clock(self, step: int):
        self.progress = Progress(self.args.total_timesteps, step, self.args.progress)
        self.clock = step, time.time()

    def sps(self, step: int) -> float:
        """Agent steps per second since `start_clock`."""
        return (step - self.clock[0]) / (time.time() - self.clock[1])

    def log(self, step: int, scalars: dict):
        log_scalars(self.writer, step, scalars)

    def check_finite(self, finite: bool, step: int):
        """Stop the run (exit 1, the last good state saved) unless `finite`: see `stop_if_nonfinite`."""
        stop_if_nonfinite(finite, self.last_good, self.dir, step, self.writer)

    def keep_good(self, payload: dict):
        """Remember a checkpoint payload that was just checked finite."""
        self.last_good = copy.deepcopy(payload)

    def save(self, step: int, payload: dict, replay: dict = None):
        save_periodic_checkpoint(self.dir, step, payload, self.args.keep_checkpoints, replay)

    def save_video(self, name: str, frames):
        save_video(os.path.join(self.dir, "videos", name), frames)

    def finish(self, payload: dict):
        """Write final.pt, close the writer (and W&B), say where the run is."""
        save_checkpoint(os.path.join(self.dir, "final.pt"), payload)
        finish_run(self.writer)
        echo(f"done: {self.dir}")


# Training-loop plumbing: the interval test, the log line, live progress
def crossed(previous_step: int, step: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (previous_step, step]: the loop's test for every interval (0: never)."""
    return every > 0 and step // every > previous_step // every


def echo(line: str):
    """Print a line of the run's log (above the progress bar, when there is one)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def log_scalars(writer, step: int, scalars: dict):
    """Write each `tag: value` at `step` and print them as the log line, `step N: SPS 123, td_loss 0.0123, ...`."""
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    echo(f"step {step}: " + ", ".join(f"{tag.split('/', 1)[-1]} {value:.4g}" for tag, value in scalars.items()))


def log_parameter_counts(writer, counts: dict, fresh: bool):
    """Print the weights per part and, in a fresh run, log them once as `diag/params/{part}` (CONVENTIONS)."""
    total = sum(counts.values())
    echo("parameters: " + ", ".join(f"{part} {count:,}" for part, count in counts.items()) + f", total {total:,}")
    if fresh:
        for part, count in counts.items():
            writer.add_scalar(f"diag/params/{part}", count, 0)


class Progress:
    """Live progress of a run: steps done, SPS, time left and the latest episodic return. A tqdm bar when
    stderr is a terminal; otherwise (CI, Slurm logs) a plain line every `interval` seconds; off with --no-progress."""

    def __init__(self, total: int, step: int, enabled: bool, interval: float = 30.0):
        self.total, self.step, self.enabled, self.interval = total, step, enabled, interval
        self.start_step, self.start_time = step, time.time()
        self.shown_at, self.latest_return, self.bar = self.start_time, None, None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=step, unit="step", unit_scale=True, dynamic_ncols=True, smoothing=0)
            self.interval = 0.5

    def update(self, step=None, episodic_return=None):
        """Advance to `step` (None: the same step, so that a long update still refreshes the clock) and note
        the latest finished episode's return; draws at most once per interval, so it is cheap to call often."""
        self.step = self.step if step is None else step
        self.latest_return = self.latest_return if episodic_return is None else float(episodic_return)
        now = time.time()
        if not self.enabled or now - self.shown_at < self.interval:
            return
        self.shown_at = now
        if self.bar is None:
            print(self.line(now), flush=True)
            return
        if self.latest_return is not None:
            self.bar.set_postfix_str(f"return {self.latest_return:.4g}", refresh=False)
        self.bar.update(self.step - self.bar.n)

    def line(self, now: float) -> str:
        """`progress: step 1,024/50,000 (2.0 %), SPS 12.3, 1:06:20 left, latest return 7.5`."""
        elapsed = max(now - self.start_time, 1e-9)
        sps = (self.step - self.start_step) / elapsed
        seconds = round((self.total - self.step) / sps) if sps > 0 else None
        left = "?" if seconds is None else f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        latest = "" if self.latest_return is None else f", latest return {self.latest_return:.4g}"
        return (f"progress: step {self.step:,}/{self.total:,} ({100 * self.step / self.total:.1f} %), "
                f"SPS {sps:,.1f}, {left} left{latest}")

    def close(self):
        if self.bar is not None:
            self.bar.update(self.step - self.bar.n)
            self.bar.close()
        elif self.enabled:
            print(self.line(time.time()), flush=True)


# Atari (DQN, Rainbow): game names, whole-game returns, the replay saved beside a checkpoint
def atari_game(env_id: str) -> str:
    """`Breakout` or `Breakout-v5` -> `Breakout`."""
    return env_id[: -len("-v5")] if env_id.endswith("-v5") else env_id


def atari_games() -> list:
    """The Atari games EnvPool registers, as plain names (its other `-v5` ids are MuJoCo tasks)."""
    from envpool.registration import registry

    specs = registry.specs.items()
    return sorted(name[: -len("-v5")] for name, spec in specs if spec[0] == "envpool.atari" and name.endswith("-v5"))


def finished_games(episode_return, info, truncated):
    """Full-game statistics: add a step's raw rewards (`info["reward"]`, all lives) to the running
    returns and give (return, length) of each game that ended (game over or time limit)."""
    episode_return += info["reward"]
    game_over = info["terminated"].astype(bool) | truncated
    finished = [(episode_return[i], int(info["elapsed_step"][i])) for i in np.flatnonzero(game_over)]
    episode_return[game_over] = 0.0
    return finished


def cut_episodes_at_resume(replay: dict, buffer_time: int):
    """A resumed run restarts the games: the stored episodes end as time limits at o_{buffer_time}."""
    if buffer_time > 0:
        replay["truncated"][:, (buffer_time - 1) % replay["frames"].shape[1]] = True


def load_saved_replay(checkpoint_file: str, step: int, num_envs: int, capacity: int, device):
    """(replay, buffer_time) saved beside the checkpoint of `step`, on `device`, its episodes cut where the resumed run
    restarts the games; None when that checkpoint has none. A replay of other (envs, slots) is refused."""
    saved = load_replay(checkpoint_file, step)
    if saved is None:
        return None
    shape = tuple(saved["replay"]["valid"].shape)
    if shape != (num_envs, capacity):
        fail(f"--resume {checkpoint_file!r} holds a replay of {shape} (envs, slots); this run asks for "
             f"{(num_envs, capacity)}: keep --num-envs and --buffer-size")
    replay = {key: value.to(device) for key, value in saved["replay"].items()}
    cut_episodes_at_resume(replay, saved["buffer_time"])
    return replay, saved["buffer_time"]


# Speed machinery (DQN, Rainbow): host-to-device staging, graph-safe replay writes, CUDA graphs
class HostStaging:
    """Host arrays to the device, each name always into the same device buffer (what a captured graph reads), with
    `pinned` through a reused pinned host buffer and a non_blocking copy (safe to reuse: each step's copy of the actions
    to the host waits for the previous step's copies); else a plain, blocking copy."""

    def __init__(self, device, pinned: bool):
        self.device, self.pinned, self.buffers = device, pinned, {}

    def __call__(self, name: str, array):
        host = torch.from_numpy(np.ascontiguousarray(array))
        if name not in self.buffers:
            pinned = torch.empty_like(host).pin_memory() if self.pinned else None
            self.buffers[name] = (pinned, torch.empty_like(host, device=self.device))
        pinned, staged = self.buffers[name]
        return staged.copy_(pinned.copy_(host) if self.pinned else host, non_blocking=self.pinned)

    def env_step(self, rewards, terminated, truncated, info) -> tuple:
        """(rewards, terminated, truncated, elapsed steps) of one EnvPool step, on the device."""
        return (self("rewards", rewards), self("terminated", terminated), self("truncated", truncated),
                self("elapsed_step", info["elapsed_step"]))


def write_slot(replay: dict, key: str, slot, values):
    """replay[key][:, slot] = values for a 1-element slot tensor, as one in-place index_copy_ (indexing with a device
    tensor would read it on the host); host arrays or tensors of any dtype."""
    values = torch.as_tensor(values, device=replay[key].device).to(replay[key].dtype)
    replay[key].index_copy_(1, slot, values.unsqueeze(1))


class CapturedStep:
    """`step(*tensors)` run eagerly on a side stream for `warmup` calls (Adam's state is created), then captured
    once as a CUDA graph and replayed at every later call, which must pass the very same tensors (a graph reads fixed
    addresses: callers fill them in place); returns the graph's static outputs, overwritten by each replay. If the
    capture fails, one line says why and the step runs eagerly from then on."""

    def __init__(self, step, name: str, warmup: int = 3):
        self.step, self.name, self.warmup = step, name, warmup
        self.graph, self.inputs, self.outputs, self.eager = None, None, None, False

    def __call__(self, *tensors):
        if self.eager:
            return self.step(*tensors)
        if self.graph is not None:
            if any(given is not captured for given, captured in zip(tensors, self.inputs, strict=True)):
                raise ValueError(f"the captured {self.name} was called with other tensors than it was captured with")
            self.graph.replay()
            return self.outputs
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step(*tensors)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        previous_stream = torch.cuda.current_stream()
        try:
            self.graph, self.inputs = torch.cuda.CUDAGraph(), tensors
            with torch.cuda.graph(self.graph):  # records the kernels without running them: the replay below runs them
                self.outputs = self.step(*tensors)
        except RuntimeError as error:
            torch.cuda.set_stream(previous_stream)  # a capture_end that fails leaves the capture stream current
            reason = str(error.__context__ or error).splitlines()[0]  # the step's error, not capture_end's
            echo(f"warning: --cuda-graphs could not capture the {self.name} ({reason}); it runs eagerly")
            self.graph, self.eager = None, True
        return self(*tensors)


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


def network_parts(network) -> dict:
    """The parts (CONVENTIONS) of a network made of `encoder` (the conv trunk), `bottleneck` (the join and the dense
    layer after it) and heads (its other parts): {part: its modules}."""
    heads = [module for name, module in network.named_children() if name not in ("encoder", "bottleneck")]
    return {"encoder": [network.encoder], "bottleneck": [network.bottleneck], "head": heads}


def parameter_counts(network) -> dict:
    """Weights per part of the network (`network_parts`)."""
    return {part: parameter_count(*modules) for part, modules in network_parts(network).items()}


@torch.no_grad()
def sparsity_diagnostics(network) -> dict:
    """Per part (as `parameter_counts`), as TensorBoard tags: `diag/sparsity/{part}`, the fraction of zero weights
    among its weights of more than one dimension (those sparse training can mask), and `diag/params/{part}_effective`,
    its parameters less those zero weights (the GAP paper's effective parameters)."""
    tags = {}
    for part, modules in network_parts(network).items():
        weights = [p for module in modules for p in module.parameters() if p.ndim > 1]
        zeros = int(torch.stack([(weight == 0).sum() for weight in weights]).sum()) if weights else 0
        tags[f"diag/sparsity/{part}"] = zeros / max(sum(weight.numel() for weight in weights), 1)
        tags[f"diag/params/{part}_effective"] = parameter_count(*modules) - zeros
    return tags


@torch.no_grad()
def network_diagnostics(network, obs, threshold: float) -> dict:
    """Dormant fraction per part and feature norm (REFERENCE §5) of a network made of `encoder`, `bottleneck` and heads
    (as `parameter_counts`), on a batch of observations, as TensorBoard tags.

    encoder: every ReLU output of the trunk (a conv channel is a neuron); bottleneck: its activated output; head: every
    head's outputs (one neuron per action, and per atom for C51); feature norm: mean L2 norm of the pooled features.
    """
    activations = {"encoder": [], "pooled": [], "bottleneck": [], "head": []}

    def recorder(part, record_input=False):
        return lambda module, inputs, output: activations[part].append(inputs[0] if record_input else output)

    heads = network_parts(network)["head"]
    relus = [module for module in network.encoder.modules() if isinstance(module, torch.nn.ReLU)]
    hooks = [relu.register_forward_hook(recorder("encoder")) for relu in relus]
    hooks.append(network.bottleneck.dense.register_forward_hook(recorder("pooled", record_input=True)))
    hooks.append(network.bottleneck.register_forward_hook(recorder("bottleneck")))
    hooks += [head.register_forward_hook(recorder("head")) for head in heads]
    try:
        network(obs)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        "diag/dormant_fraction/encoder": dormant_fraction(activations["encoder"], threshold),
        "diag/dormant_fraction/bottleneck": dormant_fraction(activations["bottleneck"], threshold),
        "diag/dormant_fraction/head": dormant_fraction([output.flatten(1) for output in activations["head"]], threshold),
        "diag/feature_norm": activations["pooled"][0].norm(dim=1).mean().item(),
    }


def q_saliency(q_function, obs) -> torch.Tensor:
    """Vanilla-gradient saliency |dQ(s, a*)/ds| of the greedy action, as (B, 1, H, W) images in [0, 1];
    `q_function` maps observations to Q-values (B, actions)."""
    obs = obs.float().requires_grad_(True)
    q_function(obs).max(dim=1).values.sum().backward()
    return saliency_image(obs.grad)


def grad_cam(encoder, q_from_feature_map, frames) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017, as jacobgil/pytorch-grad-cam) on the encoder's output A = encoder(frames), the
    feature map the join reads, for the score Q(s, a*) of the greedy action: alpha_k = spatial mean of dQ/dA^k,
    cam = ReLU(sum_k alpha_k A^k), resized bilinearly (half-pixel centres, as OpenCV's resize) to the frames' size and
    min-max normalised per image: (B, 1, H, W) in [0, 1]. `q_from_feature_map` maps A to Q-values (B, actions); no
    parameter's .grad is touched."""
    feature_map = encoder(frames)
    score = q_from_feature_map(feature_map).max(dim=1).values.sum()  # images do not mix: one backward serves all
    (gradient,) = torch.autograd.grad(score, feature_map)
    alpha = gradient.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((alpha * feature_map).sum(dim=1, keepdim=True)).detach().float()

    def min_max(images):  # pytorch-grad-cam's scale_cam_image: before the resize and again after it
        low = images.flatten(1).min(1).values.view(-1, 1, 1, 1)
        high = images.flatten(1).max(1).values.view(-1, 1, 1, 1)
        return (images - low) / (high - low + 1e-7)

    return min_max(torch.nn.functional.interpolate(min_max(cam), size=frames.shape[-2:], mode="bilinear", align_corners=False))


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


def finite_flag(*parts) -> torch.Tensor:
    """1.0 when every floating-point tensor of these modules, optimisers (their moments too) and tensors is
    finite, else 0.0: the test a "last good" state must pass, as a 0-d float32 tensor on their device, so that a
    training loop reads it together with its losses in one host sync (with nothing to check: 1.0 on the CPU)."""
    found = [t for part in parts for t in floating_tensors(part if isinstance(part, torch.Tensor) else part.state_dict())]
    if not found:
        return torch.ones(())
    return torch.stack([torch.isfinite(t).all() for t in found]).all().float()


def parameter_count(*modules) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for a new buffer: the GPU's when on CUDA, else the machine's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
