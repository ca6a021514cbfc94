"""First learning evidence on one GPU in one short lease (issue 14): four runs side by side, then the analysis.

    python3 benchmark/gpu_evidence.py --bundle .carry/bundle.tar.xz      # on the lent GPU (16 cores), about 9 minutes
    python3 benchmark/gpu_evidence.py --bundle .carry/bundle.tar.xz --check  # there, first: every game plays (a minute)
    .venv/bin/python benchmark/gpu_evidence.py --smoke                   # the same pipeline, tiny, on a CPU

Runs, concurrently, each pinned to its own share of the CPU cores: PPO on Procgen-HD bigfish (easy, width 2,
64 x 64), `--pool flatten` (Impala) and `--pool avg` (Impoola) for the same number of steps with a test-level
evaluation at the end; DQN on Breakout `--pool avg`; SAC from pixels on cartpole-swingup `--pool avg`.
A calibration phase (the same four runs, a few iterations each, concurrently) measures each run's steps per
second and start-up; the real budgets are then what fits before the deadline, so every run finishes (final
evaluation and final.pt) in time. Every child also has a wall-clock timeout. Random-policy returns are measured
with the scripts' own environment construction and evaluation. Then benchmark/analyze.py, a curves PNG and a
table from the runs' TensorBoard event files, printed last. Everything lands in --out; --pack DIR (default
$OUT when set) also writes DIR/evidence.tar.gz (the tree without checkpoints), table.md, the PNG and summary.md.
"""

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.path.join(REPO, "cleanrl_pool")
MARKER = ".gpu_evidence"  # marks an --out this script made, so a rerun may clear it
NVIDIA_EGL_VENDOR = "/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json"  # the lent machine's driver (device README)
GL_SONAMES = ("libEGL.so.1", "libGL.so.1", "libGLX.so.0", "libGLdispatch.so.0", "libOpenGL.so.0")


def fail(message: str):
    """A user's mistake: one line on stderr, exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# Runs and sizes: flags are {flag: value} (None for a switch); size flags override KIND_FLAGS
SCRIPTS = {"ppo": "ppo_procgen_impoola.py", "dqn": "dqn_atari_gap.py", "sac": "sac_dmc_gap.py"}
RUNS = [  # (name, kind, CPU share, flags)
    ("ppo_flatten", "ppo", 5, {"--pool": "flatten", "--exp-name": "ppo_evidence-flatten"}),
    ("ppo_avg", "ppo", 5, {"--pool": "avg", "--exp-name": "ppo_evidence-avg"}),
    ("dqn_avg", "dqn", 3, {"--pool": "avg", "--exp-name": "dqn_evidence-avg"}),
    ("sac_avg", "sac", 3, {"--pool": "avg", "--exp-name": "sac_evidence-avg"}),
]
KIND_FLAGS = {
    "ppo": {"--env-id": "bigfish", "--distribution-mode": "easy", "--width": 2, "--resolution": 64, "--save-every": 0},
    "dqn": {"--env-id": "Breakout", "--save-every": 0, "--no-save-buffer": None, "--exploration-fraction": 0.2},
    "sac": {"--env-id": "cartpole-swingup", "--save-every": 0, "--no-save-buffer": None},  # a replay is GBs to write
}
RUNS_BY_NAME = {run[0]: run for run in RUNS}
PREFLIGHT = ("import sys, torch, envpool, gymnasium, tyro, procgen_hd; print('python', sys.version.split()[0], 'torch', "
             "torch.__version__, 'cuda', torch.cuda.is_available(), 'envpool', envpool.__version__, 'procgen_hd', "
             "procgen_hd.BUILD_INFO['commit'][:12])")
EVAL_TAGS = {"ppo": "eval/test_levels/return", "dqn": "eval/return", "sac": "eval/return"}
# Per kind: flags, calibration (total steps, extra flags, learning starts), budget rounding unit, floor and cap,
# number of evaluations, and the seconds reserved for evaluations and saving after training
SIZES = {
    "gpu": {
        "minutes": 9.0, "reserve_s": 50, "calibration_timeout_s": 120, "analyze_timeout_s": 60,
        "random": {"ppo_envs": 64, "ppo_episodes": 128, "dqn_games": 10, "sac_envs": 10, "sac_resolution": 84},
        "ppo": {"flags": {"--num-envs": 64, "--eval-num-envs": 128, "--eval-episodes": 128, "--final-eval-episodes": 256},
                "calibration": (3 * 16384, {"--eval-every": 0, "--final-eval-episodes": 128, "--diag-every": 0}, 0),
                "unit": 16384, "floor": 16384, "cap": 25_000_000, "evals": 4, "eval_reserve_s": 45},
        "dqn": {"flags": {"--num-envs": 8, "--learning-starts": 20000, "--buffer-size": 1_000_000, "--eval-episodes": 10},
                "calibration": (6000, {"--learning-starts": 1000, "--buffer-size": 10000, "--log-every": 250,
                                       "--eval-every": 0, "--eval-episodes": 2, "--diag-every": 0}, 1000),
                "unit": 1000, "floor": 40000, "cap": 500_000, "evals": 5, "eval_reserve_s": 30},
        "sac": {"flags": {"--num-envs": 1, "--eval-episodes": 10},
                "calibration": (1000, {"--learning-starts": 300, "--buffer-size": 2000, "--log-every": 100,
                                       "--eval-every": 0, "--eval-episodes": 1, "--diag-every": 0}, 300),
                "unit": 125, "floor": 2000, "cap": 100_000, "evals": 5, "eval_reserve_s": 20},
    },
    "smoke": {  # fixed tiny budgets (floor = cap), a small network: it checks the pipeline, not the speed
        "minutes": 5.0, "reserve_s": 40, "calibration_timeout_s": 90, "analyze_timeout_s": 60,
        "random": {"ppo_envs": 2, "ppo_episodes": 2, "dqn_games": 1, "sac_envs": 1, "sac_resolution": 32},
        "ppo": {"flags": {"--width": 1, "--resolution": 32, "--num-envs": 4, "--num-steps": 16, "--num-minibatches": 2,
                          "--update-epochs": 1, "--eval-num-envs": 2, "--eval-episodes": 2, "--final-eval-episodes": 2,
                          "--diag-every": 64, "--torch-threads": 1},
                "calibration": (64, {"--eval-every": 0, "--final-eval-episodes": 2, "--diag-every": 0}, 0),
                "unit": 64, "floor": 128, "cap": 128, "evals": 2, "eval_reserve_s": 0},
        "dqn": {"flags": {"--num-envs": 2, "--learning-starts": 100, "--buffer-size": 1000, "--eval-episodes": 1,
                          "--max-episode-steps": 500, "--log-every": 50, "--diag-every": 200, "--torch-threads": 1},
                "calibration": (200, {"--eval-every": 0, "--diag-every": 0}, 100),
                "unit": 100, "floor": 300, "cap": 300, "evals": 2, "eval_reserve_s": 0},
        "sac": {"flags": {"--num-envs": 1, "--batch-size": 16, "--buffer-size": 500, "--hidden-dim": 32,
                          "--learning-starts": 60, "--eval-episodes": 1, "--resolution": 32, "--log-every": 25,
                          "--diag-every": 125, "--cheap-visuals-for-tests": None, "--torch-threads": 1},
                "calibration": (100, {"--eval-every": 0, "--diag-every": 0}, 60),
                "unit": 125, "floor": 250, "cap": 250, "evals": 2, "eval_reserve_s": 0},
    },
}


def flag_list(flags: dict) -> list:
    """{flag: value} -> argv; a value of None is a bare switch."""
    argv = []
    for flag, value in flags.items():
        argv += [flag] if value is None else [flag, str(value)]
    return argv


def split_cores(cores, weights) -> list:
    """Disjoint CPU sets in proportion to `weights`; with fewer cores than runs, every run gets all of them."""
    cores = sorted(cores)
    if len(cores) < len(weights):
        return [cores] * len(weights)
    counts = [max(1, int(len(cores) * w / sum(weights))) for w in weights]
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]) * len(cores):  # hand out the rest, largest first
        if sum(counts) >= len(cores):
            break
        counts[i] += 1
    while sum(counts) > len(cores):  # more runs than the rounding allows: take back from the largest
        counts[counts.index(max(counts))] -= 1
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [cores[start:start + count] for start, count in zip(starts, counts)]


# Budgets from the calibration
def training_rate(points, learning_starts: int):
    """Steps per second from the (step, wall time, SPS) points of charts/SPS once learning runs, the first
    such interval (warm-up) left out when there are enough; else the last logged SPS; None without points."""
    after = [p for p in points if p[0] > learning_starts]
    if len(after) >= 3:
        after = after[1:]
    if len(after) >= 2 and after[-1][1] > after[0][1]:
        return (after[-1][0] - after[0][0]) / (after[-1][1] - after[0][1])
    return points[-1][2] if points else None


def plan_steps(rate, startup_s: float, seconds_left: float, spec: dict) -> int:
    """Total steps that fit: 90 % of rate x (time left - 1.25 x start-up - evaluation reserve - 10 s), rounded
    down to the unit and clamped to [floor, cap]; the floor when the rate is unknown."""
    if not rate or not math.isfinite(rate):
        return spec["floor"]
    available = seconds_left - 1.25 * startup_s - spec["eval_reserve_s"] - 10
    steps = int(0.9 * rate * max(available, 0.0)) // spec["unit"] * spec["unit"]
    return max(spec["floor"], min(spec["cap"], steps))


def eval_interval(total: int, spec: dict) -> int:
    """Every total / evals steps, rounded to the unit (the last evaluation is the final one)."""
    return max(spec["unit"], round(total / spec["evals"] / spec["unit"]) * spec["unit"])


# Reading event files (TensorBoard's reader, as analyze.py and tests/conftest.py)
def read_points(run_dir: str) -> dict:
    """{tag: [(step, wall time, value), ...]} of every scalar in a run folder's event files, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents"):
            accumulator = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0})
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                points.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in points.items()}


def run_folder(runs_dir: str):
    """The one run folder (config.json inside) a child wrote under its --runs-dir, or None."""
    if not os.path.isdir(runs_dir):
        return None
    found = sorted(os.path.join(runs_dir, d) for d in os.listdir(runs_dir)
                   if os.path.isfile(os.path.join(runs_dir, d, "config.json")))
    return found[-1] if found else None


# The machine: bundle, environment variables, child processes
def system_sonames() -> set:
    """Library names the dynamic loader already finds (`ldconfig -p`)."""
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        listing = ""
    return {line.split()[0] for line in listing.splitlines()[1:] if line.strip()}


def unpack_bundle(bundle: str, prefix: str) -> dict:
    """Unpack gpu_carry.py's bundle into `prefix`; returns the variables the children need. Only the libraries
    the machine lacks go on LD_LIBRARY_PATH (its own stay first choice); the libglvnd debs are unpacked into /
    as the device README does, only when its loaders are missing and we are root."""
    shutil.rmtree(prefix, ignore_errors=True)
    os.makedirs(prefix)
    with tarfile.open(bundle) as archive:
        archive.extractall(prefix, filter="data")
    present = system_sonames()
    missing_dir = os.path.join(prefix, "lib-missing")
    os.makedirs(missing_dir)
    added = []
    for name in sorted(os.listdir(os.path.join(prefix, "lib"))):
        if name not in present:
            os.symlink(os.path.join(prefix, "lib", name), os.path.join(missing_dir, name))
            added.append(name)
    debs = sorted(os.listdir(os.path.join(prefix, "debs")))
    if any(soname not in present for soname in GL_SONAMES) and os.geteuid() == 0 and shutil.which("dpkg"):
        for deb in debs:
            subprocess.run(["dpkg", "-x", os.path.join(prefix, "debs", deb), "/"], check=True)
        subprocess.run(["ldconfig"], check=False)
        print(f"bundle: unpacked {len(debs)} libglvnd debs into / ({', '.join(debs)})", flush=True)
    print(f"bundle: {bundle} -> {prefix}; libraries added to LD_LIBRARY_PATH: "
          f"{', '.join(added) or 'none (all present)'}", flush=True)
    joined = lambda new, old: new + (os.pathsep + old if old else "")  # noqa: E731
    return {"PYTHONPATH": joined(os.path.join(prefix, "site"), os.environ.get("PYTHONPATH", "")),
            "LD_LIBRARY_PATH": joined(missing_dir, os.environ.get("LD_LIBRARY_PATH", ""))}


def child_environment(extra: dict, threads: int) -> dict:
    """The parent's variables, the bundle's, NVIDIA EGL for MuJoCo when the driver ships it, OpenMP threads."""
    env = dict(os.environ, **extra, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", OMP_NUM_THREADS=str(threads))
    if os.path.isfile(NVIDIA_EGL_VENDOR):
        env.setdefault("__EGL_VENDOR_LIBRARY_FILENAMES", NVIDIA_EGL_VENDOR)
        env.setdefault("MUJOCO_EGL_DEVICE_ID", "0")
    return env


def launch(command, log_path: str, env: dict, cores) -> dict:
    """Start a child in its own process group, pinned to `cores`, output to `log_path`."""
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               preexec_fn=lambda: os.sched_setaffinity(0, cores))
    return {"process": process, "log": log, "log_path": log_path, "start": time.time(), "timed_out": False}


def stop(jobs):
    """SIGINT (Python unwinds) to each child's whole process group, SIGKILL to those still there 15 s later."""
    for sig, grace in ((signal.SIGINT, 15.0), (signal.SIGKILL, 5.0)):
        running = [job for job in jobs if job["process"].poll() is None]
        for job in running:
            try:
                os.killpg(job["process"].pid, sig)
            except ProcessLookupError:
                pass
        end = time.time() + grace
        while any(job["process"].poll() is None for job in running) and time.time() < end:
            time.sleep(0.2)


def wait_all(jobs: dict, deadline: float, progress_every: float = 60.0):
    """Wait for every job, stopping those still running at `deadline`; a progress line per job now and then."""
    next_progress = time.time() + progress_every
    while any(job["process"].poll() is None for job in jobs.values()):
        for job in jobs.values():
            if job["process"].poll() is not None:
                job.setdefault("end", time.time())
        if time.time() > deadline:
            late = [name for name, job in jobs.items() if job["process"].poll() is None]
            print(f"timeout: stopping {', '.join(late)} at the wall-clock limit", flush=True)
            for name in late:
                jobs[name]["timed_out"] = True
            stop([jobs[name] for name in late])
            break
        if time.time() > next_progress:
            next_progress += progress_every
            for name, job in jobs.items():
                if job["process"].poll() is None:
                    print(f"  {time.time() - job['start']:5.0f} s {name}: {last_line(job['log_path'])[:100]}", flush=True)
        time.sleep(1.0)
    for job in jobs.values():
        job["process"].wait()
        job["log"].close()
        job["seconds"] = job.get("end", time.time()) - job["start"]


def last_line(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 2000))
        lines = f.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


# Random-policy returns, with the scripts' own environment construction (run as a child: --random-policy)
def random_policy_returns(size: str, path: str):
    """Write {kind: (mean return, episodes)} of a uniformly random policy to `path` after each kind (SAC's EGL,
    last, can kill the process): PPO's evaluation of the full level distribution with uniform logits, DQN's
    whole-game evaluation at epsilon 1, SAC's env with uniform actions."""
    import tempfile

    import numpy as np
    import torch

    sys.path.insert(0, SCRIPTS_DIR)
    sizes, cpu, seed = SIZES[size]["random"], torch.device("cpu"), 12345
    results = {}

    # PPO: uniform logits through its own evaluation (each script imported just before its game: PPO needs no EnvPool)
    import ppo_procgen_impoola as ppo

    ppo_args = ppo.Args(env_id="bigfish", distribution_mode="easy", resolution=64)
    envs = ppo.make_envs(ppo_args, sizes["ppo_envs"], 0, seed)
    uniform = lambda obs: (torch.zeros(len(obs), envs.num_actions), None)  # noqa: E731  (logits, value)
    returns, _ = ppo.evaluate(uniform, envs, sizes["ppo_episodes"], seed, cpu)
    envs.close()
    results["ppo"] = (float(returns.mean()), len(returns))
    write_json(path, results)

    # DQN: its whole-game evaluation at epsilon 1
    import dqn_atari_gap as dqn

    dqn_args = dqn.Args(env_id="Breakout", eval_epsilon=1.0)
    envs = dqn.make_env(dqn_args, sizes["dqn_games"], seed)
    returns, _ = dqn.evaluate(None, envs, dqn_args.eval_epsilon, envs.action_space.n, cpu, False)  # epsilon 1: no network
    envs.close()
    results["dqn"] = (float(returns.mean()), len(returns))
    write_json(path, results)

    # SAC: its pixel env and reward twin, uniform actions, one episode per env
    import sac_dmc_gap as sac

    sac.make_egl_visible()
    sac_args = sac.Args(env_id="cartpole-swingup", resolution=sizes["sac_resolution"], frame_stack=1)
    sac_args.action_repeat = sac.DMC_TASKS[sac_args.env_id][1]
    with tempfile.TemporaryDirectory() as assets:  # physics and rewards do not depend on the pictures
        env = sac.make_env(sac_args, sizes["sac_envs"], seed, sac.cheap_visuals_assets(assets) if size == "smoke" else "")
        sac.reset_env(env)
        space, rng, returns = env[0].action_space, np.random.default_rng(seed), np.zeros(sizes["sac_envs"])
        for _ in range(sac.CONTROL_STEPS_PER_EPISODE // sac_args.action_repeat):  # exactly one episode per env
            actions = rng.uniform(space.low, space.high, (sizes["sac_envs"], *space.shape)).astype(np.float32)
            returns += sac.step_env(env, actions, sac_args.action_repeat)[1]
    results["sac"] = (float(returns.mean()), len(returns))
    write_json(path, results)


def write_json(path: str, data):
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


# The table and the curves, from the event files
def summarize_run(name: str, kind: str, run_dir, planned: int, job: dict) -> dict:
    """One row: steps reached, first / last training returns, final evaluation, SPS, finished or not."""
    row = {"run": name, "kind": kind, "game": game_label(run_dir), "planned_steps": planned, "run_dir": run_dir,
           "finished": bool(run_dir and os.path.isfile(os.path.join(run_dir, "final.pt"))),
           "exit_status": job["process"].returncode if job else None, "timed_out": bool(job and job["timed_out"]),
           "seconds": round(job["seconds"], 1) if job else None,
           "steps": 0, "first_return": None, "last_return": None, "episodes": 0, "eval_return": None, "sps": None}
    points = read_points(run_dir) if run_dir else {}
    row["steps"] = max((p[-1][0] for p in points.values() if p), default=0)
    returns = [value for _, _, value in points.get("charts/episodic_return", [])]
    if returns:
        n = max(1, min(10, len(returns) // 5))
        row.update(first_return=float(sum(returns[:n]) / n), last_return=float(sum(returns[-n:]) / n), episodes=len(returns),
                   window=n)
    if points.get(EVAL_TAGS[kind]):
        row["eval_return"] = float(points[EVAL_TAGS[kind]][-1][2])
        row["eval_step"] = int(points[EVAL_TAGS[kind]][-1][0])
    if points.get("charts/SPS"):
        row["sps"] = float(points["charts/SPS"][-1][2])
    return row


def game_label(run_dir) -> str:
    """The game as the run's config.json has it: env id, resolution, and Procgen's mode and width."""
    if not run_dir:
        return "–"
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    procgen = f"{config['distribution_mode']}, width {config['width']}, " if "distribution_mode" in config else ""
    return f"{config['env_id']} ({procgen}{config['resolution']}x{config['resolution']})"


def table_lines(rows, random_returns: dict) -> list:
    """Markdown table: game, steps reached / planned, first vs last return, final evaluation, random policy, SPS."""
    number = lambda value, digits=1: "–" if value is None else f"{value:.{digits}f}"  # noqa: E731
    lines = ["| run | game | steps reached / planned | first → last training return | final eval return | "
             "random policy | SPS | final.pt |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        random_return = random_returns.get(row["kind"])
        status = "yes" if row["finished"] else ("no (timed out)" if row["timed_out"] else f"no (exit {row['exit_status']})")
        lines.append(f"| {row['run']} | {row['game']} | {row['steps']:,} / {row['planned_steps']:,} | "
                     f"{number(row['first_return'])} → {number(row['last_return'])} | {number(row['eval_return'])} | "
                     f"{number(random_return[0] if random_return else None)} | {number(row['sps'], 0)} | {status} |")
    return lines + ["", "First / last training return: mean of the first / last n `charts/episodic_return` points (n = "
                    "episodes / 5, 1 to 10; PPO logs one mean per iteration, on its 200 training levels). Final eval: "
                    "the last `eval/test_levels/return` (PPO, full level distribution) or `eval/return` (DQN: whole games "
                    "at epsilon 0.01; SAC: mean action). Random policy: the same environments and evaluation with "
                    "uniform actions. SPS: the last `charts/SPS`."]


def plot_curves(path: str, rows, random_returns: dict):
    """One panel per game: training returns against steps, final evaluation as a star, random policy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(row["kind"] for row in rows))
    figure, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.8), squeeze=False)
    for axis, kind in zip(axes[0], kinds):
        for row in (r for r in rows if r["kind"] == kind and r["run_dir"]):
            points = read_points(row["run_dir"])
            curve = points.get("charts/episodic_return", [])
            line, = axis.plot([p[0] for p in curve], [p[2] for p in curve], alpha=0.8, label=row["run"])
            evals = points.get(EVAL_TAGS[kind], [])
            if evals:
                axis.plot([p[0] for p in evals], [p[2] for p in evals], "*", markersize=10, color=line.get_color(),
                          label=f"{row['run']} eval")
        if kind in random_returns:
            axis.axhline(random_returns[kind][0], linestyle="--", color="grey", label="random policy")
        axis.set(title=next((r["game"] for r in rows if r["kind"] == kind), kind), xlabel="environment steps",
                 ylabel="episodic return")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def pack(out: str, pack_dir: str, files) -> list:
    """DIR/evidence.tar.gz (the out tree without checkpoints) and copies of the few top-level results."""
    os.makedirs(pack_dir, exist_ok=True)
    archive_path = os.path.join(pack_dir, "evidence.tar.gz")
    with tarfile.open(archive_path, "w:gz") as archive:
        archive.add(out, arcname=os.path.basename(os.path.normpath(out)),
                    filter=lambda info: None if info.name.endswith(".pt") else info)
    written = [archive_path]
    for path in files:
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(pack_dir, os.path.basename(path)))
            written.append(os.path.join(pack_dir, os.path.basename(path)))
    if os.path.getsize(archive_path) > 16 * 2**20:
        print(f"warning: {archive_path} is {os.path.getsize(archive_path) / 2**20:.1f} MiB, over the 16 MiB a device "
              "call returns per file", flush=True)
    return written


# Main: bad input, unpack, calibrate, run, analyse, table
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny fixed budgets: the whole pipeline on a CPU in minutes")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the whole command (gpu 9, smoke 5)")
    parser.add_argument("--out", default=None, help="output folder (default runs/gpu_evidence, runs/gpu_evidence_smoke)")
    parser.add_argument("--pack", default=os.environ.get("OUT", ""), help="also write evidence.tar.gz and the results "
                        "here (default $OUT when set)")
    parser.add_argument("--bundle", default="", help="gpu_carry.py's bundle to unpack first (the lent GPU machine)")
    parser.add_argument("--prefix", default="/tmp/cleanrl_pool_carry", help="where --bundle is unpacked")
    parser.add_argument("--check", action="store_true", help="only unpack, import and play each game with a random "
                        "policy (a minute), to try a fresh machine before the long command")
    parser.add_argument("--random-policy", default="", help=argparse.SUPPRESS)  # internal: write random returns as JSON
    args = parser.parse_args(argv)
    args.size = "smoke" if args.smoke else "gpu"
    args.minutes = SIZES[args.size]["minutes"] if args.minutes is None else args.minutes
    args.out = os.path.abspath(args.out or os.path.join(REPO, "runs", "gpu_evidence" + ("_smoke" if args.smoke else "")))
    if not (math.isfinite(args.minutes) and 2 <= args.minutes <= 60):
        fail(f"--minutes {args.minutes} must be from 2 to 60 (the calibration alone takes about a minute)")
    if args.bundle and not os.path.isfile(args.bundle):
        fail(f"--bundle {args.bundle!r} is no file; build it with benchmark/gpu_carry.py")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or
                                     (os.listdir(args.out) and not os.path.exists(os.path.join(args.out, MARKER)))):
        fail(f"--out {args.out!r} exists and was not made by this script; choose an empty or new folder")
    parent = os.path.dirname(args.out)
    if not os.access(parent if os.path.isdir(parent) else os.path.dirname(parent), os.W_OK):
        fail(f"--out {args.out!r} cannot be written by this user")
    if args.pack and os.path.abspath(args.pack).startswith(args.out + os.sep):
        fail(f"--pack {args.pack!r} must not lie inside --out")
    if args.pack and (os.path.exists(args.pack) and not os.path.isdir(args.pack) or not os.access(
            args.pack if os.path.isdir(args.pack) else os.path.dirname(os.path.abspath(args.pack)), os.W_OK)):
        fail(f"--pack {args.pack!r} is no folder this user can write")
    return args


def run_flags(args, name: str, kind: str, total: int, phase: str, extra_flags: dict, threads: int) -> dict:
    """A child's flags: the kind's, the run's, the size's, then the phase's (the last one wins)."""
    return {**KIND_FLAGS[kind], "--torch-threads": threads, **RUNS_BY_NAME[name][3], **SIZES[args.size][kind]["flags"],
            "--runs-dir": os.path.join(args.out, phase, name), "--total-timesteps": total, **extra_flags}


def run_command(args, name: str, kind: str, total: int, phase: str, extra_flags: dict, threads: int) -> list:
    flags = run_flags(args, name, kind, total, phase, extra_flags, threads)
    return [sys.executable, os.path.join(SCRIPTS_DIR, SCRIPTS[kind]), *flag_list(flags)]


def run_phase(args, phase: str, plans: dict, extra: dict, cores: dict, threads: dict, deadline: float) -> dict:
    """Launch every planned run of `phase` at once, each on its CPU share; wait until done or the deadline."""
    jobs = {}
    for name, plan in plans.items():
        command = run_command(args, name, plan["kind"], plan["total"], phase, plan["flags"], threads[name])
        jobs[name] = launch(command, os.path.join(args.out, "logs", f"{phase}_{name}.log"),
                            child_environment(extra, threads[name]), cores[name])
    wait_all(jobs, deadline)
    for name, job in jobs.items():
        print(f"{phase} {name}: exit {job['process'].returncode}{' (timed out)' if job['timed_out'] else ''}, "
              f"{job['seconds']:.0f} s", flush=True)
    return jobs


def calibrate(args, jobs: dict) -> dict:
    """Per run: steps/s once learning runs, start-up seconds, and whether it may go on (crashed: no)."""
    measured = {}
    for name, kind, _, _ in RUNS:
        job, run_dir = jobs[name], run_folder(os.path.join(args.out, "calibration", name))
        points = read_points(run_dir) if run_dir else {}
        rate = training_rate(points.get("charts/SPS", []), SIZES[args.size][kind]["calibration"][2])
        first_wall = min((p[0][1] for p in points.values() if p), default=None)
        startup = first_wall - job["start"] if first_wall else job["seconds"]
        # stopped by us while training is no failure (its floor is planned); a crash or a hang before any step is
        ok = job["process"].returncode == 0 or (job["timed_out"] and rate is not None)
        measured[name] = {"kind": kind, "rate": rate, "startup_s": startup, "ok": ok}
        print(f"calibration {name}: start-up {startup:.0f} s, {rate or 0:.1f} steps/s"
              + ("" if ok else f" -> skipped; see {job['log_path']}"), flush=True)
    return measured


def plan_runs(args, measured: dict, seconds_left: float) -> dict:
    """The real budgets: what fits in `seconds_left`; the PPO pair gets the same steps (the slower one's)."""
    plans = {}
    for name, m in measured.items():
        if m["ok"]:
            total = plan_steps(m["rate"], m["startup_s"], seconds_left, SIZES[args.size][m["kind"]])
            plans[name] = {"kind": m["kind"], "total": total}
    ppo_totals = [plan["total"] for plan in plans.values() if plan["kind"] == "ppo"]
    for name, plan in plans.items():
        if plan["kind"] == "ppo":
            plan["total"] = min(ppo_totals)
        plan["flags"] = {"--eval-every": eval_interval(plan["total"], SIZES[args.size][plan["kind"]])}
        print(f"plan {name}: {plan['total']:,} steps, evaluation every {plan['flags']['--eval-every']:,}", flush=True)
    return plans


def main(argv=None):
    args = parse_args(argv)
    if args.random_policy:
        random_policy_returns(args.size, args.random_policy)
        return
    start, size = time.time(), SIZES[args.size]
    deadline = start + 60 * args.minutes - size["reserve_s"]  # every run ends by then; analysis and table after
    shutil.rmtree(args.out, ignore_errors=True)
    for folder in ("logs", "runs", "calibration"):
        os.makedirs(os.path.join(args.out, folder))
    open(os.path.join(args.out, MARKER), "w").close()
    print(f"gpu_evidence: size {args.size}, {args.minutes:g} minutes, out {args.out}", flush=True)

    # Set-up: the bundle, one CPU share per run, a preflight that says what the children will find
    extra = unpack_bundle(args.bundle, args.prefix) if args.bundle else {}
    available = sorted(os.sched_getaffinity(0))
    cores = dict(zip(RUNS_BY_NAME, split_cores(available, [weight for _, _, weight, _ in RUNS])))
    threads = {name: len(share) if len(available) >= len(RUNS) else 1 for name, share in cores.items()}
    check = subprocess.run([sys.executable, "-c", PREFLIGHT], env=child_environment(extra, 1), capture_output=True, text=True,
                           timeout=120)
    print(f"preflight: {' | '.join((check.stdout + check.stderr).strip().splitlines()[-2:])}", flush=True)

    # Calibration: the four runs for a few iterations, concurrently, beside the random-policy measurement
    random_path = os.path.join(args.out, "random_policy.json")
    random_job = launch([sys.executable, os.path.abspath(__file__), "--random-policy", random_path, "--out", args.out]
                        + (["--smoke"] if args.smoke else []), os.path.join(args.out, "logs", "random_policy.log"),
                        child_environment(extra, 1), available)
    if args.check:  # every game made and played by the scripts' own code, then stop
        wait_all({"random_policy": random_job}, time.time() + 240)
        print(open(random_job["log_path"]).read()[-3000:], flush=True)
        found = json.load(open(random_path)) if os.path.isfile(random_path) else {}
        print(f"check: random-policy returns {found}; {'ok' if len(found) == 3 else 'FAILED'}", flush=True)
        sys.exit(0 if len(found) == 3 else 1)
    calibration = {name: {"kind": kind, "total": size[kind]["calibration"][0], "flags": size[kind]["calibration"][1]}
                   for name, kind, _, _ in RUNS}
    calibration_deadline = min(deadline, time.time() + size["calibration_timeout_s"])
    jobs = run_phase(args, "calibration", calibration, extra, cores, threads, calibration_deadline)
    plans = plan_runs(args, calibrate(args, jobs), deadline - time.time())

    # The real runs, concurrently, each stopped at the deadline if it has not finished
    jobs = run_phase(args, "runs", plans, extra, cores, threads, deadline)
    wait_all({"random_policy": random_job}, time.time() + 30)
    random_returns = {}
    if os.path.isfile(random_path):
        with open(random_path) as f:
            random_returns = json.load(f)
    else:
        print(f"random policy: not measured; see {random_job['log_path']}", flush=True)

    # Analysis (benchmark/analyze.py), the curves and the table, from the event files
    analysis = os.path.join(args.out, "analysis")
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "analyze.py"), os.path.join(args.out, "runs"),
                             "--out", analysis, "--include-unfinished", "--reps", "2000", "--curve-reps", "200"],
                            env=child_environment(extra, 1), capture_output=True, text=True, timeout=size["analyze_timeout_s"])
    print(f"analyze: exit {result.returncode} {(result.stdout + result.stderr).strip().splitlines()[-1:]}", flush=True)
    rows = [summarize_run(name, kind, run_folder(os.path.join(args.out, "runs", name)), plans.get(name, {}).get("total", 0),
                          jobs.get(name)) for name, kind, _, _ in RUNS]
    curves_path = os.path.join(args.out, "training_curves.png")
    plot_curves(curves_path, rows, random_returns)
    lines = table_lines(rows, random_returns)
    header = [f"# GPU evidence ({args.size}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(start))}", "",
              f"Command: `{' '.join(sys.argv)}`; wall time {time.time() - start:.0f} s; {check.stdout.strip()}", ""]
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n".join(header + lines) + "\n")
    with open(os.path.join(args.out, "table.json"), "w") as f:
        json.dump({"rows": rows, "random_policy": random_returns, "plans": plans, "size": args.size}, f, indent=1)
    if args.pack:
        results = [os.path.join(args.out, "table.md"), curves_path, os.path.join(analysis, "summary.md")]
        written = pack(args.out, args.pack, results)
        print(f"packed: {', '.join(written)}", flush=True)
    print(f"wall time {time.time() - start:.0f} s; everything is in {args.out}\n", flush=True)
    print("\n".join(lines[:-2]), flush=True)

if __name__ == "__main__":
    main()
