"""Throughput on this machine: for each script and each resolution / width / pool, the raw environment
rate (the script's own environment construction, random actions: Procgen-HD drawing natively at R for
PPO, EnvPool for the others), the training rate of the script itself, their ratio, and the GPU memory
the run took; for each script every speed switch (issue 13) on against off; for DQN and Rainbow the
aggregate rate of k runs sharing one GPU. For PPO also Procgen-HD against EnvPool's Procgen step +
render at R (a resize of the 64 x 64 frame), with `--raw-num-envs` envs, as the cost of the native picture.

    python benchmark/throughput.py                                   # every script, preset by device
    python benchmark/throughput.py --scripts ppo_procgen_impoola --resolutions 64,128 --pools flatten,avg
    python3 benchmark/throughput.py --bundle .carry/bundle.tar.xz --device-budget 450 --env-seconds 3 \
        --out $OUT/throughput_gpu.md 2>&1 | tail -60

The last one is the whole GPU measurement (every switch of the four scripts, 1, 4 and 8 DQN and Rainbow runs on
the GPU) in one command of at most 8 minutes: on the lent machine through the device tool with carry [".carry"]
and timeout_s 540 (the bundle is gpu_carry.py's: the packages that machine lacks). PPO at 192 with widths 2 and 4
(the issue's other targets) is then `--scripts ppo_procgen_impoola --resolutions 192 --widths 2,4 --switches none`.

Training rate = environment steps per second of a short real run of the script, from its log lines
`step N: SPS x` (the `charts/SPS` points): the run is warmed up until it logs a step past learning-starts
(PPO: its first iteration), so start-up, the random warm-up, the first updates, torch.compile and the CUDA
graph capture are left out; then it runs `--window` seconds (and at least one more log interval) and is
stopped; the rate is the steps between the first and the last point of that window over the time between
them. `total-timesteps` only caps a run. GPU memory = the peak of nvidia-smi's `memory.used` on the GPU
during the run less its value just before (CUDA contexts included; the GPU must run nothing else).

Speed switches: per script its boolean Args fields of SWITCHES, read from the script's source at run time
(a switch a script does not declare is listed as "not in this script"). At each script's first configuration:
"all defaults" (no switch flag), "all switches off" (`--no-NAME` for each: the plain path), and for each switch
the defaults with that one flipped (`--no-NAME` for one that is on by default, `--NAME` for one that is off,
such as compile and bf16). On a CPU the switches do nothing (apart from compile), so those rates differ by noise only.
`--shared-gpu-runs 1,4,8`: DQN and Rainbow, k runs of the defaults (seeds 1..k) started together the way
`sweep.py --jobs-per-gpu k` starts them (OMP_NUM_THREADS = cores / k), the sum of their rates.

Run lengths, per preset (`--preset`, default gpu when CUDA is available):
- cpu: tiny runs that end themselves (PPO 8 envs x 32 steps, 2 iterations; DQN and Rainbow 500 steps from
  learning-starts 100; SAC 160 steps, batch 128, the test visuals), --window 60 s; no switch rows and no shared
  runs unless asked (`--switches all --shared-gpu-runs 1,2`).
- gpu: PPO 64 envs x 64 steps, 2 minibatches of 2,048 (the paper's minibatch size; 4,096 steps an iteration);
  DQN and Rainbow learning-starts 1,000, a log line every 250 steps, replay 100k (epsilon at its end value
  from then on); SAC learning-starts 1,000, batch 512, replay 100k, a log line every 100 steps; --window 3 s;
  --switches all; --shared-gpu-runs 1,4,8.
  Not measured yet (no GPU has run it): a run should take about 10 s (start-up, warm-up, window), plus the
  compile time with torch.compile; 35 runs at the default resolutions.
`--device-budget S` bounds the whole invocation (bundle, raw rates, every run): the runs go in order of
priority (each script's defaults, the plain paths, the shared GPU runs, the flipped switches, compile on, the
other configurations); each may use what is left less 10 s for each run after it (`--timeout` at most), and a
run that no longer fits is a "skipped (device budget)" row. Writes a Markdown table with the device, the date
and every command (after each row, so a stopped measurement keeps what it measured).
"""

import argparse
import ast
import collections
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "cleanrl_pool"))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import sweep  # noqa: E402
import utils  # noqa: E402

NEVER = "1000000000"  # an interval longer than any measurement run
# Per script: the game/task, default resolutions, and the flags of the short training run on a CPU
# (small, so a 2-core machine finishes) and on a GPU (the papers' batch shapes; total-timesteps only caps it).
RECIPES = {
    "ppo_procgen_impoola": {
        "env_id": "bigfish", "resolutions": [64, 128, 192],
        "cpu": {"num-envs": 8, "num-steps": 32, "num-minibatches": 2, "total-timesteps": 512},
        "gpu": {"num-envs": 64, "num-steps": 64, "num-minibatches": 2, "total-timesteps": 50_000_000},
        "quiet": {"eval-every": NEVER, "eval-episodes": 1, "final-eval-episodes": 1, "eval-num-envs": 1,
                  "save-every": NEVER, "diag-every": NEVER},
    },
    "dqn_atari_gap": {
        "env_id": "Breakout", "resolutions": [84],
        "cpu": {"learning-starts": 100, "total-timesteps": 500, "buffer-size": 10000, "log-every": 100},
        # epsilon at its end value from learning-starts on: the late-training policy (a greedy step costs a forward)
        "gpu": {"learning-starts": 1000, "total-timesteps": 10_000_000, "buffer-size": 100000, "log-every": 250,
                "exploration-fraction": 0.0001},
        "quiet": {"eval-every": NEVER, "eval-episodes": 1, "max-episode-steps": 2000, "save-every": NEVER,
                  "diag-every": NEVER},
    },
    "rainbow_atari_gap": {  # epsilon (without --noisy) at its end value right after learning-starts, as DQN's
        "env_id": "Breakout", "resolutions": [84],
        "cpu": {"learning-starts": 100, "total-timesteps": 500, "buffer-size": 10000, "log-every": 100,
                "epsilon-decay-steps": 1},
        "gpu": {"learning-starts": 1000, "total-timesteps": 10_000_000, "buffer-size": 100000, "log-every": 250,
                "epsilon-decay-steps": 1},
        "quiet": {"eval-every": NEVER, "eval-episodes": 1, "max-episode-steps": 2000, "save-every": NEVER,
                  "diag-every": NEVER},
    },
    "sac_dmc_gap": {
        "env_id": "cheetah-run", "resolutions": [84],
        # a CPU renders DMC at ~30 frames/s with the real visuals, and one update of batch 512 takes ~20 s
        # on 2 cores: the CPU preset uses the test visuals, DrQ's config-file batch 128 and a small replay
        "cpu": {"learning-starts": 100, "total-timesteps": 160, "log-every": 20, "cheap-visuals-for-tests": True,
                "batch-size": 128, "buffer-size": 10000},
        "gpu": {"learning-starts": 1000, "total-timesteps": 1_000_000, "buffer-size": 100000, "log-every": 100},
        "quiet": {"eval-every": NEVER, "eval-episodes": 1, "save-every": NEVER, "diag-every": NEVER},
    },
}
# The speed switches of issue 13 (boolean Args fields, each off-able with --no-NAME), per script
SWITCHES = {
    "ppo_procgen_impoola": ("tf32", "cudnn_benchmark", "bf16", "channels_last", "overlap_envs", "compile"),
    "dqn_atari_gap": ("tf32", "cudnn_benchmark", "cuda_graphs", "pinned_staging", "compile"),
    "rainbow_atari_gap": ("tf32", "cudnn_benchmark", "cuda_graphs", "pinned_staging", "compile"),
    "sac_dmc_gap": ("tf32", "cudnn_benchmark", "bf16", "channels_last", "compile"),
}
SHARED_GPU_SCRIPTS = ("dqn_atari_gap", "rainbow_atari_gap")  # the GAP grid runs them k to a GPU
PRESET_DEFAULTS = {"cpu": {"window": 60.0, "shared_gpu_runs": "none", "switches": "none"},
                   "gpu": {"window": 3.0, "shared_gpu_runs": "1,4,8", "switches": "all"}}
RESERVE_S = 10.0  # device budget kept for each run still to come (a start-up and a short window on a GPU)
LOG_LINE = re.compile(r"step (\d+): (?:.*, )?SPS ([^,\s]+)")


# Raw environment rate, with each script's own construction
def import_script(name: str):
    import importlib

    return importlib.import_module(name)


def env_rate(script: str, flags: dict, seconds: float) -> float:
    """Agent steps per second (all envs together) of the script's environment under random actions."""
    module = import_script(script)
    known = {field for field in module.Args.__dataclass_fields__}
    args = module.Args(**{k.replace("-", "_"): v for k, v in flags.items() if k.replace("-", "_") in known})
    if script == "ppo_procgen_impoola":
        envs = module.make_envs(args, args.num_envs, 200, args.seed)

        def step():
            envs.step(np.random.randint(0, envs.num_actions, args.num_envs))
    elif script == "sac_dmc_gap":
        args.action_repeat = args.action_repeat or module.DMC_TASKS[args.env_id][1]
        module.make_egl_visible()
        with tempfile.TemporaryDirectory() as assets:
            base_path = module.cheap_visuals_assets(assets) if args.cheap_visuals_for_tests else ""
            envs = module.make_env(args, args.num_envs, args.seed, base_path)
        action_dim = envs[0].action_space.shape[0]

        def step():
            module.step_env(envs, np.random.uniform(-1, 1, (args.num_envs, action_dim)).astype(np.float32), args.action_repeat)
    else:
        envs = module.make_env(args, args.num_envs, args.seed)
        num_actions = envs.action_space.n

        def step():
            envs.step(np.random.randint(0, num_actions, args.num_envs))
    if script == "sac_dmc_gap":
        module.reset_env(envs)
    else:
        envs.reset()
    for _ in range(5):  # warm-up
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += args.num_envs
    return steps / (time.perf_counter() - start)


def env_rate_in_child(script: str, flags: dict, seconds: float, timeout: float = 0) -> float:
    """`env_rate` in a fresh process: Procgen-HD draws one frame size per process, and no measurement
    inherits another's threads or memory. It may take `timeout` seconds (default: `seconds` + 600)."""
    timeout = timeout or seconds + 600
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import throughput; "
            f"print(throughput.env_rate({script!r}, json.loads({json.dumps(flags)!r}), {seconds!r}))")
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"raw rate of {script} took over {timeout:.0f} s") from None
    if result.returncode != 0:
        raise RuntimeError(f"raw rate of {script} failed: {result.stderr.strip().splitlines()[-1:]}")
    return float(result.stdout.split()[-1])


def envpool_procgen_rate(game: str, num_envs: int, resolution: int, seconds: float) -> float:
    """Steps/s of EnvPool's Procgen with random actions, plus its batched render at R when R != 64 (a resize)."""
    import envpool

    kwargs = {} if resolution == 64 else dict(render_mode="rgb_array", render_width=resolution, render_height=resolution)
    envs = envpool.make(f"{game.capitalize()}Easy-v0", env_type="gymnasium", num_envs=num_envs, seed=0, **kwargs)
    envs.reset()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, _, _, info = envs.step(np.random.randint(0, 15, num_envs))
        if resolution != 64:
            envs.render(env_ids=info["env_id"])
        steps += num_envs
    return steps / (time.perf_counter() - start)


# The scripts' flags, read from their source (other work may be adding switches right now)
def script_defaults(script: str) -> dict:
    """{field: (annotation name or None, literal default or None)} of the `Args` dataclass of cleanrl_pool/{script}.py."""
    path = os.path.join(REPO, "cleanrl_pool", script + ".py")
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as error:
        utils.fail(f"--scripts {script!r}: {path} cannot be read as Python ({error})")
    fields = {}
    for item in sweep.args_fields(tree, path) or []:  # with utils.RunArgs' fields, when Args extends it
        try:
            default = ast.literal_eval(item.value) if item.value is not None else None
        except ValueError:
            default = None
        fields[item.target.id] = (item.annotation.id if isinstance(item.annotation, ast.Name) else None, default)
    if not fields:
        utils.fail(f"--scripts {script!r}: {path} has no `Args` dataclass")
    return fields


def script_switches(script: str, fields: dict) -> dict:
    """{switch: default} for each of the script's SWITCHES it declares as a bool with a literal default."""
    return {name: fields[name][1] for name in SWITCHES[script]
            if name in fields and fields[name][0] == "bool" and isinstance(fields[name][1], bool)}


def flag_list(flags: dict) -> list:
    """{flag: value} -> command-line arguments; a boolean is `--flag` or `--no-flag` (tyro's pair)."""
    out = []
    for flag, value in flags.items():
        if isinstance(value, bool):
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out += [f"--{flag}", str(value)]
    return out


def switch_flags(switches: dict) -> list:
    """{switch: on} -> `--name` / `--no-name` (underscores spelled as dashes)."""
    return flag_list({name.replace("_", "-"): on for name, on in switches.items()})


# Training rate of the script, and its GPU memory
def gpu_memory_used():
    """MiB in use on the first visible GPU (nvidia-smi), or None."""
    device = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    try:
        out = subprocess.run(["nvidia-smi", "-i", device, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def gpu_memory_poller(peak: list, stop: threading.Event):
    """Poll nvidia-smi twice a second; keep the largest memory.used (MiB) in peak[0]."""
    while not stop.is_set():
        used = gpu_memory_used()
        if used is not None:
            peak[0] = max(peak[0] or 0, used)
        stop.wait(0.5)


def read_log(run: dict):
    """Collect a child's output: the last lines, and (time, step, SPS) of each log line `step N: ... SPS x ...`."""
    for line in run["process"].stdout:
        now = time.perf_counter()
        run["tail"].append(line.rstrip())
        match = LOG_LINE.match(line.strip())
        if match:
            try:
                run["points"].append((now, int(match.group(1)), float(match.group(2))))
            except ValueError:
                pass


def stop_processes(processes):
    """SIGTERM to each child's process group (compile workers included), SIGKILL to what is left 10 s later."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        running = [process for process in processes if process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        end = time.perf_counter() + grace
        while any(process.poll() is None for process in running) and time.perf_counter() < end:
            time.sleep(0.05)


def warmed_up(run: dict, warmup_step: int):
    """The time of a run's first log point past `warmup_step`, or None."""
    return next((t for t, step, _ in list(run["points"]) if step > warmup_step), None)


def measure(commands, on_gpu: bool, warmup_step: int, window: float, timeout: float, threads: int = 0):
    """Start the commands together, each in an empty folder (its cwd); warm up until every run has logged a step
    past `warmup_step`, then `window` seconds more (and at least one more log point of each run), then stop them;
    or until they end, or `timeout` seconds after the start (a run that ends before the others have warmed up is
    measured from its own warm-up's end). Returns ([per command: {"rate": steps/s in the window,
    "sps": its last charts/SPS, "wall": s} or {"error": text}], peak GPU MiB of them together or None)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env.setdefault("OMP_NUM_THREADS", str(threads))  # as sweep.py's local queue does
    baseline = gpu_memory_used() if on_gpu else None
    peak, stop = [None], threading.Event()
    if baseline is not None:
        threading.Thread(target=gpu_memory_poller, args=(peak, stop), daemon=True).start()
    start, runs = time.perf_counter(), []
    with contextlib.ExitStack() as stack:
        for command in commands:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder,
                                       env=env, start_new_session=True)
            run = {"process": process, "points": [], "tail": collections.deque(maxlen=40), "stopped": False}
            run["reader"] = threading.Thread(target=read_log, args=(run,), daemon=True)
            run["reader"].start()
            runs.append(run)
        window_start = None
        try:
            while any(run["process"].poll() is None for run in runs) and time.perf_counter() - start < timeout:
                starts = [warmed_up(run, warmup_step) for run in runs]
                if window_start is None and all(s is not None or run["process"].poll() is not None
                                                for s, run in zip(starts, runs)) and any(s is not None for s in starts):
                    window_start = max(s for s in starts if s is not None)
                if window_start is not None and time.perf_counter() >= window_start + window and all(
                        sum(t >= window_start for t, _, _ in run["points"]) >= 2
                        for run in runs if run["process"].poll() is None):
                    break
                time.sleep(0.05)
        finally:
            for run in runs:
                run["stopped"] = run["process"].poll() is None
            stop_processes([run["process"] for run in runs])
        wall = time.perf_counter() - start
        for run in runs:
            run["reader"].join(timeout=max(0.0, start + wall + 10 - time.perf_counter()))
    stop.set()
    if window_start is None:  # the runs ended (or the time limit came) before the loop saw every warm-up end
        window_start = max((s for s in (warmed_up(run, warmup_step) for run in runs) if s is not None), default=math.inf)
    results = []
    for run in runs:
        points = [point for point in run["points"] if point[0] >= window_start]
        code = run["process"].returncode
        if len(points) < 2 and not run["stopped"] and code == 0:  # it ended before the others had warmed up (tiny runs)
            own = warmed_up(run, warmup_step)
            points = [point for point in run["points"] if own is not None and point[0] >= own]
        if not run["stopped"] and code != 0:
            results.append({"error": f"exit {code}: " + " | ".join(list(run["tail"])[-8:])[-1500:]})
        elif len(points) < 2:
            why = f"stopped at the {timeout:.0f} s limit" if run["stopped"] else "ended"
            results.append({"error": f"{why} with {len(points)} log points after the warm-up (past step {warmup_step}) "
                                     f"of {len(run['points'])}: " + " | ".join(list(run["tail"])[-3:])[-500:]})
        else:
            (t0, step0, _), (t1, step1, sps) = points[0], points[-1]
            results.append({"rate": (step1 - step0) / max(t1 - t0, 1e-9), "sps": sps, "wall": wall})
    memory = None if baseline is None or peak[0] is None else max(0, peak[0] - baseline)
    return results, memory


def device_description(on_gpu: bool) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{os.cpu_count()} CPU cores ({cpu})"
    if on_gpu:
        import torch

        text = f"{torch.cuda.get_device_name(0)}, " + text
    return text


def rate_text(rate: float) -> str:
    """Steps/s with a thousands separator, and three significant digits below 100 (a CPU runs SAC at < 1)."""
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def ratio_text(numerator, denominator) -> str:
    return f"{numerator / denominator:.3g}" if numerator is not None and denominator else "–"


def memory_text(memory) -> str:
    return f"{memory:,} MiB" if memory is not None else "–"


def check_out_file(out: str):
    """--out is a file that can be written: not a folder, and in a folder that exists or can be made."""
    if os.path.isdir(out):
        utils.fail(f"--out {out!r} is a folder; give the Markdown file to write")
    existing = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        utils.fail(f"--out {out!r} cannot be written: {existing} is not a writable folder")
    if os.path.exists(out) and not os.access(out, os.W_OK):
        utils.fail(f"--out {out!r} is not writable")


def use_bundle(bundle: str, prefix: str):
    """Unpack gpu_carry.py's bundle (the lent GPU machine lacks envpool, tyro, Procgen-HD, ...) for this process
    and every child: its site folder on sys.path and PYTHONPATH, the missing libraries, NVIDIA EGL for MuJoCo."""
    import gpu_evidence

    extra = gpu_evidence.unpack_bundle(bundle, prefix)
    os.environ.update({key: value for key, value in gpu_evidence.child_environment(extra, 1).items()
                       if key != "OMP_NUM_THREADS"})
    sys.path.insert(0, os.path.join(prefix, "site"))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", default=",".join(RECIPES), help="comma-separated scripts to measure")
    parser.add_argument("--resolutions", default="", help="comma-separated sides for every script (default: each script's: "
                        "Procgen 64,128,192, the others 84)")
    parser.add_argument("--widths", default="", help="comma-separated --width values (default: each script's own default)")
    parser.add_argument("--pools", default="", help="comma-separated --pool values (default: each script's own default)")
    parser.add_argument("--preset", default="", help="cpu or gpu run sizes (default: gpu when CUDA is available)")
    parser.add_argument("--switches", default="", help="all, none, or comma-separated switches to flip one at a time "
                        "(default: all on a GPU, none on a CPU)")
    parser.add_argument("--shared-gpu-runs", default="", help="comma-separated k: DQN and Rainbow, k runs at once "
                        "(default: 1,4,8 on a GPU, none on a CPU)")
    parser.add_argument("--set", action="append", default=[], help="FLAG=VALUE for every training run of the scripts that "
                        "have FLAG (repeatable), e.g. torch-deterministic=false")
    parser.add_argument("--window", type=float, default=0.0, help="seconds of steady training measured per run "
                        "(default: 3 on a GPU, 60 on a CPU)")
    parser.add_argument("--device-budget", type=float, default=0.0, help="seconds this whole invocation may take (0: none)")
    parser.add_argument("--env-seconds", type=float, default=5.0, help="seconds of random-action stepping per raw env rate")
    parser.add_argument("--raw-num-envs", type=int, default=64, help="envs of the Procgen-HD vs EnvPool comparison (0: none)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a training run may take at most")
    parser.add_argument("--bundle", default="", help="gpu_carry.py's bundle to unpack first (the lent GPU machine)")
    parser.add_argument("--prefix", default="/tmp/cleanrl_pool_carry", help="where --bundle is unpacked")
    parser.add_argument("--out", default="", help="the Markdown file (default: benchmark/results/throughput_{preset}.md)")
    parser.add_argument("--note", default="", help="a line about the conditions (other load, ...) put under the table")
    parser.error = utils.fail  # a wrong or unknown flag: one line, exit 2
    return parser.parse_args(argv)


def int_list(flag: str, text: str, low: int, high: int) -> list:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        utils.fail(f"--{flag} {text!r} must be comma-separated integers")
    if not all(low <= value <= high for value in values):
        utils.fail(f"--{flag} {text!r}: each value must be from {low} to {high}")
    if len(set(values)) != len(values):
        utils.fail(f"--{flag} {text!r} names a value twice")
    return values


def check_input(args):
    """Every bad input: one line, exit 2, before anything is measured. Returns the scripts and each one's Args."""
    if args.preset:
        utils.check_choice("preset", args.preset, ["cpu", "gpu"])
    scripts = [s.strip().removesuffix(".py") for s in args.scripts.split(",") if s.strip()]
    if not scripts:
        utils.fail(f"--scripts {args.scripts!r} names no script; choose from: {', '.join(RECIPES)}")
    for script in scripts:
        utils.check_choice("scripts", script, list(RECIPES))
        if not os.path.isfile(os.path.join(REPO, "cleanrl_pool", script + ".py")):
            utils.fail(f"--scripts {script!r}: cleanrl_pool/{script}.py does not exist yet")
    if len(set(scripts)) != len(scripts):
        utils.fail(f"--scripts {','.join(scripts)!r} names a value twice")
    for flag, low, most in (("env_seconds", 0, 3600), ("timeout", 0, 7 * 86400), ("window", -1, 86400),
                            ("device_budget", -1, 7 * 86400)):
        value = getattr(args, flag)
        if not (math.isfinite(value) and low < value <= most) and not (low < 0 and value == 0):
            what = "above 0" if low == 0 else "above 0 (or 0: the default)"
            utils.fail(f"--{flag.replace('_', '-')} {value} must be a number of seconds {what}, at most {most}")
    if not 0 <= args.raw_num_envs <= 4096:
        utils.fail(f"--raw-num-envs {args.raw_num_envs} must be 0 (no comparison) or from 1 to 4096")
    if "\n" in args.note or "\r" in args.note:
        utils.fail("--note must be one line (it goes under the table)")
    if args.bundle and not os.path.isfile(args.bundle):
        utils.fail(f"--bundle {args.bundle!r} is no file; build it with benchmark/gpu_carry.py")
    fields = {script: script_defaults(script) for script in scripts}
    known = sorted({name for script in scripts for name in SWITCHES[script]})
    if args.switches not in ("", "all", "none"):
        names = [name.strip().replace("-", "_") for name in args.switches.split(",")]
        for name in names:
            if name not in known:
                utils.fail(f"--switches {args.switches!r}: {name!r} is no switch of {', '.join(scripts)}; choose all, "
                           f"none or from: {', '.join(known)}")
        if len(set(names)) != len(names):
            utils.fail(f"--switches {args.switches!r} names a value twice")
    if args.shared_gpu_runs not in ("", "none"):
        int_list("shared-gpu-runs", args.shared_gpu_runs, 1, 64)
    for flag, values in sweep.parse_assignments(args.set, "set", single=True).items():
        if flag.replace("-", "_") in known:
            utils.fail(f"--set {flag}: a speed switch; the switch rows turn it on and off (--switches)")
        if flag in ("runs-dir", "seed", "env-id", "resolution", "width", "pool"):
            utils.fail(f"--set {flag}: the benchmark sets it (--scripts, --resolutions, --widths, --pools)")
        if not any(flag.replace("-", "_") in fields[script] for script in scripts):
            utils.fail(f"--set {flag!r} is no flag of {', '.join(scripts)}")
        if len(values) > 1:
            utils.fail(f"--set {flag} is given twice")
        kinds = {fields[script][flag.replace("-", "_")][0] for script in scripts if flag.replace("-", "_") in fields[script]}
        if ("bool" in kinds) != isinstance(values[0], bool):
            utils.fail(f"--set {flag}={values[0]!r}: " + ("a bool flag takes true or false" if "bool" in kinds
                                                          else "true/false is for bool flags"))
    return scripts, fields


# The plan: per script its configurations; the first one also gets the switch rows and the shared GPU runs
def build_plan(scripts, fields, preset: str, configs_of, overrides: dict, chosen: str, shared_ks) -> tuple:
    """(plan, jobs): plan[script] = what its rows show (configs, switches, rows {(config, variant): job}, shared
    {k: job}); jobs = every training run (a job: one command, or k started together), in order of priority."""
    plan, jobs = {}, []
    for script in scripts:
        recipe, own = RECIPES[script], fields[script]
        switches = script_switches(script, own)
        wanted = ([] if chosen == "none" else list(SWITCHES[script]) if chosen == "all"
                  else [name for name in (n.strip().replace("-", "_") for n in chosen.split(",")) if name in SWITCHES[script]])
        sets = {flag: value for flag, value in overrides.items() if flag.replace("-", "_") in own}
        entry = plan[script] = {"configs": configs_of(script), "switches": switches, "wanted": wanted, "rows": {},
                                "shared": {}, "sets": sets}
        for index, (resolution, width, pool) in enumerate(entry["configs"]):
            flags = {"env-id": recipe["env_id"], "resolution": resolution, **recipe[preset], **recipe["quiet"],
                     "width": width, "pool": pool, **sets}
            base = [sys.executable, os.path.join(REPO, "cleanrl_pool", script + ".py")] + flag_list(flags)
            common = {"script": script, "config": index, "warmup": int(flags.get("learning-starts", 0)),
                      "where": f"{script}, {recipe['env_id']} {resolution}, width {width}, {pool}"}
            variants = [("defaults", "all defaults", [], 0 if index == 0 else 5)]
            if index == 0 and wanted:
                variants.append(("plain", "all switches off (plain path)", switch_flags(dict.fromkeys(switches, False)), 1))
                variants += [((name,), f"defaults, {name} {'off' if switches[name] else 'on'}",
                              switch_flags({name: not switches[name]}), 4 if name == "compile" else 3)
                             for name in wanted if name in switches]
            for variant, label, extra, priority in variants:
                entry["rows"][(index, variant)] = job = dict(common, label=label, extra=extra, priority=priority,
                                                             commands=[base + extra + ["--runs-dir", "runs"]])
                jobs.append(job)
            if index == 0:
                entry["rows"].update({(0, (name,)): None for name in wanted if name not in switches})  # listed as such
            if index == 0 and script in SHARED_GPU_SCRIPTS:
                for k in shared_ks:
                    if k == 1:
                        entry["shared"][k] = entry["rows"][(0, "defaults")]  # one run alone: the defaults row
                        continue
                    entry["shared"][k] = job = dict(common, label=f"{k} runs at once", base=base, priority=2,
                                                    threads=max(1, (os.cpu_count() or 1) // k),
                                                    commands=[base + ["--seed", str(seed), "--runs-dir", "runs"]
                                                              for seed in range(1, k + 1)])
                    jobs.append(job)
    jobs.sort(key=lambda job: job["priority"])  # stable: scripts in order within one priority
    return plan, jobs


def outcome(job):
    """(steps/s, last charts/SPS, GPU MiB) of a measured one-run job, or the text its row shows instead."""
    if "results" not in job:
        return job.get("skipped", "not measured")
    result = job["results"][0]
    return "failed" if "error" in result else (result["rate"], result["sps"], job["memory"])


def shown(command) -> str:
    """A command as the table lists it: `python cleanrl_pool/...`, run in an empty folder."""
    return shlex.join(["python"] + command[1:]).replace(REPO + "/", "")


def table_lines(report: dict) -> list:
    """The Markdown: header, the configurations, PPO's Procgen-HD vs EnvPool, the switches, the shared GPU runs,
    the failures and every command."""
    plan, raw, scripts = report["plan"], report["raw"], list(report["plan"])
    lines = [f"# Throughput ({report['preset']} preset)", ""] + [f"- {line}" for line in report["header"]] + [""]
    if report["note"]:
        lines += [f"Conditions: {report['note']}", ""]
    lines += ["| script | env | resolution | width | pool | raw env steps/s | training steps/s | training / raw "
              "| charts/SPS | GPU memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for script in scripts:
        for index, (resolution, width, pool) in enumerate(plan[script]["configs"]):
            rate = raw.get((script, resolution), "–")
            found = outcome(plan[script]["rows"][(index, "defaults")])
            cells = [script, RECIPES[script]["env_id"], resolution, width, pool,
                     rate_text(rate) if isinstance(rate, float) else rate]
            if isinstance(found, tuple):
                cells += [rate_text(found[0]), ratio_text(found[0], rate if isinstance(rate, float) else None),
                          rate_text(found[1]), memory_text(found[2])]
            else:
                cells += [found, "–", "–", "–"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    if report["native"]:
        lines += ["", "Procgen-HD (native render at R) against EnvPool's Procgen step + render at R (a resize of the "
                  f"64 x 64 frame), bigfish, {report['raw_num_envs']} envs, random actions, {report['env_seconds']:g} s each:",
                  "", "| resolution | Procgen-HD steps/s | EnvPool step + render steps/s | Procgen-HD / EnvPool |",
                  "|---|---|---|---|"]
        lines += ["| " + " | ".join(map(str, [resolution, *row])) + " |" for resolution, row in report["native"].items()]
    switch_scripts = [script for script in scripts if plan[script]["wanted"]]
    if switch_scripts:
        lines += ["", "Speed switches at each script's first configuration: all defaults, all switches off (the plain "
                  "path), and the defaults with one switch flipped; / raw env, / plain and / defaults are ratios of steps/s. "
                  "cudnn_benchmark acts only with `--set torch-deterministic=false`.", "",
                  "| script | run | switch flags | steps/s | / raw env | / plain | / defaults | GPU memory |",
                  "|---|---|---|---|---|---|---|---|"]
    for script in switch_scripts:
        entry = plan[script]
        rate = raw.get((script, entry["configs"][0][0]))
        rate = rate if isinstance(rate, float) else None
        reference = {variant: outcome(entry["rows"][(0, variant)]) for variant in ("defaults", "plain")}
        reference = {variant: found[0] if isinstance(found, tuple) else None for variant, found in reference.items()}
        for (index, variant), job in entry["rows"].items():
            if index:
                continue
            if job is None:
                lines.append(f"| {script} | {variant[0]}: not in this script | – | – | – | – | – | – |")
                continue
            found = outcome(job)
            cells = [script, job["label"], f"`{' '.join(job['extra'])}`" if job["extra"] else "(none)"]
            if isinstance(found, tuple):
                cells += [rate_text(found[0]), ratio_text(found[0], rate), ratio_text(found[0], reference["plain"]),
                          ratio_text(found[0], reference["defaults"]), memory_text(found[2])]
            else:
                cells += [found, "–", "–", "–", "–"]
            lines.append("| " + " | ".join(cells) + " |")
    shared_scripts = [script for script in scripts if plan[script]["shared"]]
    if shared_scripts:
        lines += ["", "Runs sharing one GPU: k runs of the defaults at the first configuration (seeds 1..k) started "
                  "together as `sweep.py --jobs-per-gpu k` starts them (OMP_NUM_THREADS = cores / k), measured over one "
                  "window; aggregate = the sum of their steps/s; k = 1 is the defaults row.", "",
                  "| script | runs on the GPU | aggregate steps/s | per run | aggregate / one run | GPU memory, all runs |",
                  "|---|---|---|---|---|---|"]
    for script in shared_scripts:
        alone = outcome(plan[script]["rows"][(0, "defaults")])
        alone = alone[0] if isinstance(alone, tuple) else None
        for k, job in plan[script]["shared"].items():
            failed = sum("error" in result for result in job.get("results", []))
            if "results" not in job or failed:
                cells = [job.get("skipped", "not measured") if "results" not in job else f"failed ({failed} of {k})"]
                cells += ["–", "–", "–"]
            else:
                total = sum(result["rate"] for result in job["results"])
                cells = [rate_text(total), rate_text(total / k), ratio_text(total, alone), memory_text(job["memory"])]
            lines.append("| " + " | ".join([script, str(k)] + cells) + " |")
    if report["notes"]:
        lines += ["", "Failures:", ""] + [f"- {note}" for note in report["notes"]]
    lines += ["", "Training commands (each in an empty folder; the benchmark stops each run after its window):", "", "```"]
    for script in scripts:
        jobs = [job for job in plan[script]["rows"].values() if job is not None]
        jobs += [job for k, job in plan[script]["shared"].items() if k > 1]
        for job in jobs:
            state = f"; {job['skipped']}" if "skipped" in job else ""
            lines.append(f"# {job['where']}: {job['label']}{state}")
            if "base" in job:  # k runs at once
                lines.append(f"for seed in $(seq 1 {len(job['commands'])}); do (mkdir -p run_$seed && cd run_$seed "
                             f"&& OMP_NUM_THREADS={job['threads']} {shown(job['base'])} --seed $seed --runs-dir runs) & done; "
                             "wait")
            else:
                lines.append(shown(job["commands"][0]))
    return lines + ["```", ""]


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    scripts, fields = check_input(args)
    widths = int_list("widths", args.widths, 1, 64) if args.widths else None
    resolution_lists = {script: int_list("resolutions", args.resolutions, 1, 4096) if args.resolutions
                        else RECIPES[script]["resolutions"] for script in scripts}
    pools = [p.strip() for p in args.pools.split(",")] if args.pools else None
    for pool in pools or []:
        utils.check_choice("pools", pool, ["flatten", "avg", "max"])
    if pools and len(set(pools)) != len(pools):
        utils.fail(f"--pools {','.join(pools)!r} names a value twice")
    overrides = {flag: values[0] for flag, values in sweep.parse_assignments(args.set, "set", single=True).items()}
    if args.out:
        check_out_file(args.out)  # before the bundle's unpacking
    if args.bundle:
        use_bundle(args.bundle, args.prefix)
    import torch

    on_gpu = torch.cuda.is_available()
    preset = args.preset or ("gpu" if on_gpu else "cpu")
    out = args.out or os.path.join(REPO, "benchmark", "results", f"throughput_{preset}.md")
    check_out_file(out)
    window = args.window or PRESET_DEFAULTS[preset]["window"]
    shared_text = args.shared_gpu_runs or PRESET_DEFAULTS[preset]["shared_gpu_runs"]
    shared_ks = [] if shared_text == "none" else int_list("shared-gpu-runs", shared_text, 1, 64)
    deadline = started + args.device_budget if args.device_budget else math.inf

    def configs_of(script):
        own = fields[script]
        return [(resolution, width, pool) for resolution in resolution_lists[script]
                for width in (widths or [own["width"][1]]) for pool in (pools or [own["pool"][1]])]

    plan, jobs = build_plan(scripts, fields, preset, configs_of, overrides,
                            args.switches or PRESET_DEFAULTS[preset]["switches"], shared_ks)
    report = {"plan": plan, "raw": {}, "native": {}, "notes": [], "preset": preset, "note": args.note,
              "raw_num_envs": args.raw_num_envs, "env_seconds": args.env_seconds}
    load_before = os.getloadavg()[0]

    def write_table():  # after every measurement, so a long measurement that is stopped keeps what it measured
        spent = time.perf_counter() - started
        report["header"] = [
            f"device: {device_description(on_gpu)}; torch {torch.__version__}",
            f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; 1-minute load average "
            f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the last row "
            "(other jobs share the machine when it exceeds the core count)",
            f"command: `python benchmark/throughput.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
            f"time: {spent:.0f} s" + (f" of a {args.device_budget:g} s device budget" if args.device_budget else "")
            + f"; each run warmed up past learning-starts (PPO: its first iteration), then measured for {window:g} s "
            "and at least one more log interval and stopped (or until it ended)",
            "raw env: the script's own environment construction (PPO: Procgen-HD drawing natively at R; the others: "
            f"EnvPool) stepped with random actions, {args.env_seconds:g} s, same number of envs as the training run",
            "training: steps/s between the first and last log line (`charts/SPS` point) of the measured window of a real "
            "run; `charts/SPS` = the script's own cumulative number; GPU memory: nvidia-smi's peak memory.used during "
            "the run less its value before"]
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write("\n".join(table_lines(report)))

    def time_left(runs_after: int) -> float:
        return deadline - time.perf_counter() - RESERVE_S * runs_after

    # Raw environment rates (and PPO's Procgen-HD against EnvPool), then the training runs by priority
    raw, native = report["raw"], report["native"]
    for script in scripts:
        recipe = RECIPES[script]
        for resolution in dict.fromkeys(config[0] for config in plan[script]["configs"]):
            base = {"env-id": recipe["env_id"], "resolution": resolution, **recipe[preset], **recipe["quiet"],
                    **plan[script]["sets"]}
            if time_left(len(jobs)) < args.env_seconds:
                raw[(script, resolution)] = "skipped (device budget)"
                continue
            limit = min(args.env_seconds + 600, time_left(len(jobs)))  # a hung simulator costs no more than this
            try:
                raw[(script, resolution)] = env_rate_in_child(script, base, args.env_seconds, limit)
            except RuntimeError as error:  # a size the back end refuses, a missing simulator: a row that says so
                print(f"{script} r{resolution} raw env failed: {error}", file=sys.stderr, flush=True)
                raw[(script, resolution)] = "failed"
                report["notes"].append(f"{script} {resolution}, raw env rate: {error}")
                write_table()
                continue
            print(f"{script} {recipe['env_id']} {resolution}: raw env {raw[(script, resolution)]:,.0f} steps/s", flush=True)
            if script == "ppo_procgen_impoola" and args.raw_num_envs:
                try:
                    same = args.raw_num_envs == base.get("num-envs")  # the training run's envs: the rate just measured
                    hd = raw[(script, resolution)] if same else env_rate_in_child(
                        script, {**base, "num-envs": args.raw_num_envs}, args.env_seconds, limit)
                    resized = envpool_procgen_rate(recipe["env_id"], args.raw_num_envs, resolution, args.env_seconds)
                except Exception as error:  # EnvPool's Procgen can be missing or refuse a size: the comparison says failed
                    print(f"  {args.raw_num_envs} envs: comparison failed: {error}", file=sys.stderr, flush=True)
                    native[resolution] = ["failed", "–", "–"]
                else:
                    native[resolution] = [rate_text(hd), rate_text(resized), f"{hd / resized:.3g}"]
                    print(f"  {args.raw_num_envs} envs: Procgen-HD {hd:,.0f}, "
                          f"EnvPool step + render {resized:,.0f} steps/s", flush=True)
            write_table()
    for number, job in enumerate(jobs):
        limit = min(args.timeout, time_left(len(jobs) - number - 1))
        name = f"{job['where']}: {job['label']}"
        if limit < RESERVE_S:
            job["skipped"] = "skipped (device budget)"
            print(f"{name}: skipped, {max(limit, 0):.0f} s left for it", flush=True)
            write_table()
            continue
        job["results"], job["memory"] = measure(job["commands"], on_gpu, job["warmup"], window, limit,
                                                job.get("threads", 0))
        for result in job["results"]:
            if "error" in result:
                print(f"{name} failed: {result['error']}", file=sys.stderr, flush=True)
                report["notes"].append(f"{name}: {result['error'][-400:]}")
        rates = ", ".join(rate_text(result["rate"]) for result in job["results"] if "rate" in result)
        print(f"{name}: {rates or 'failed'} steps/s ({time.perf_counter() - started:.0f} s in)", flush=True)
        write_table()
    write_table()
    print(f"wrote {out}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind on a kill, so measure() stops its runs
    main()
