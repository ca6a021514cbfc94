"""Throughput on this machine: for each script and each resolution / width / pool, the raw environment
rate (the script's own environment construction, random actions: Procgen-HD drawing natively at R for
PPO, EnvPool for the others), the training rate of the script itself, their ratio, and the GPU memory
the run took. For PPO also Procgen-HD against EnvPool's Procgen step + render at R (a resize of the
64 x 64 frame), with `--raw-num-envs` envs, as the cost of the native picture.

    python benchmark/throughput.py                                   # every script, preset by device
    python benchmark/throughput.py --scripts ppo_procgen_impoola --resolutions 64,128 --pools flatten,avg

Training rate = environment steps per second of a short real run of the script (its own
`charts/SPS` points: steps between the first and the last point divided by the wall time between
them, so start-up, warm-up before learning starts and the final evaluation are left out).
GPU memory = the largest `used_memory` nvidia-smi reports for the run's process (CUDA context
included). Writes a Markdown table with the device, the date and every command.
"""

import argparse
import datetime
import glob
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "cleanrl_pool"))
import utils  # noqa: E402

NEVER = "1000000000"  # an interval longer than any measurement run
# Per script: the game/task, default resolutions, and the flags of the short training run on a CPU
# (small, so a 2-core machine finishes) and on a GPU (the papers' batch shapes).
RECIPES = {
    "ppo_procgen_impoola": {
        "env_id": "bigfish", "resolutions": [64, 128, 192],
        "cpu": {"num-envs": 8, "num-steps": 32, "num-minibatches": 2, "total-timesteps": 512},
        "gpu": {"num-envs": 64, "num-steps": 256, "num-minibatches": 8, "total-timesteps": 65536},
        "quiet": {"eval-every": NEVER, "eval-episodes": 1, "final-eval-episodes": 1, "eval-num-envs": 1,
                  "save-every": NEVER, "diag-every": NEVER},
    },
    "dqn_atari_gap": {
        "env_id": "Breakout", "resolutions": [84],
        "cpu": {"learning-starts": 100, "total-timesteps": 500, "buffer-size": 10000, "log-every": 100},
        "gpu": {"learning-starts": 5000, "total-timesteps": 30000, "buffer-size": 100000, "log-every": 2500},
        "quiet": {"eval-every": NEVER, "eval-episodes": 1, "max-episode-steps": 2000, "save-every": NEVER, "diag-every": NEVER},
    },
    "rainbow_atari_gap": {
        "env_id": "Breakout", "resolutions": [84],
        "cpu": {"learning-starts": 100, "total-timesteps": 500, "buffer-size": 10000, "log-every": 100},
        "gpu": {"learning-starts": 5000, "total-timesteps": 30000, "buffer-size": 100000, "log-every": 2500},
        "quiet": {"eval-every": NEVER, "eval-episodes": 1, "max-episode-steps": 2000, "save-every": NEVER, "diag-every": NEVER},
    },
    "sac_dmc_gap": {
        "env_id": "cheetah-run", "resolutions": [84],
        # a CPU renders DMC at ~30 frames/s with the real visuals, and one update of batch 512 takes ~20 s
        # on 2 cores: the CPU preset uses the test visuals, DrQ's config-file batch 128 and a small replay
        "cpu": {"learning-starts": 100, "total-timesteps": 160, "log-every": 20, "cheap-visuals-for-tests": True,
                "batch-size": 128, "buffer-size": 10000},
        "gpu": {"learning-starts": 1000, "total-timesteps": 6000, "log-every": 1000},
        "quiet": {"eval-every": NEVER, "eval-episodes": 1, "save-every": NEVER, "diag-every": NEVER},
    },
}


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


def env_rate_in_child(script: str, flags: dict, seconds: float) -> float:
    """`env_rate` in a fresh process: Procgen-HD draws one frame size per process, and no measurement
    inherits another's threads or memory."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import throughput; "
            f"print(throughput.env_rate({script!r}, json.loads({json.dumps(flags)!r}), {seconds!r}))")
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 600)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"raw rate of {script} took over {seconds + 600:g} s") from None
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


# Training rate of the script, and its GPU memory
def gpu_memory_poller(pid_holder: list, peak: list, stop: threading.Event):
    """Poll nvidia-smi twice a second; keep the largest memory (MiB) of the process in pid_holder."""
    while not stop.is_set():
        try:
            out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            for line in out.splitlines():
                pid, memory = [part.strip() for part in line.split(",")[:2]]
                if pid_holder and int(pid) == pid_holder[0]:
                    peak[0] = max(peak[0] or 0, int(memory))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
        stop.wait(0.5)


def training_rate(command, runs_dir: str, on_gpu: bool, timeout: float):
    """Run the command; return (steady steps/s, the script's last charts/SPS, peak GPU MiB or None, wall s)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pid_holder, peak, stop = [], [None], threading.Event()  # None: nvidia-smi never reported the process
    poller = threading.Thread(target=gpu_memory_poller, args=(pid_holder, peak, stop), daemon=True) if on_gpu else None
    if poller:
        poller.start()
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=runs_dir)
    pid_holder.append(process.pid)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    wall = time.perf_counter() - start
    stop.set()
    if process.returncode != 0:
        raise RuntimeError(f"exit {process.returncode}: {output[-2000:]}")
    events = sorted(glob.glob(os.path.join(runs_dir, "runs", "*", "events.out.tfevents.*")))
    accumulator = EventAccumulator(events[-1], size_guidance={"scalars": 0})
    accumulator.Reload()
    points = accumulator.Scalars("charts/SPS")
    if len(points) < 2:
        raise RuntimeError(f"only {len(points)} charts/SPS points: raise the budget")
    steady = (points[-1].step - points[0].step) / (points[-1].wall_time - points[0].wall_time)
    return steady, points[-1].value, peak[0], wall


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", default=",".join(RECIPES), help="comma-separated scripts to measure")
    parser.add_argument("--resolutions", default="", help="comma-separated sides (default: each script's, Procgen 64,128)")
    parser.add_argument("--widths", default="1", help="comma-separated --width values")
    parser.add_argument("--pools", default="flatten,avg", help="comma-separated --pool values")
    parser.add_argument("--preset", default="", help="cpu or gpu run sizes (default: gpu when CUDA is available)")
    parser.add_argument("--env-seconds", type=float, default=5.0, help="seconds of random-action stepping per raw env rate")
    parser.add_argument("--raw-num-envs", type=int, default=64, help="envs of the Procgen-HD vs EnvPool comparison (0: none)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a training run may take at most")
    parser.add_argument("--out", default="", help="the Markdown file (default: benchmark/results/throughput_{preset}.md)")
    parser.add_argument("--note", default="", help="a line about the conditions (other load, ...) put under the table")
    parser.error = utils.fail  # a wrong or unknown flag: one line, exit 2
    args = parser.parse_args(argv)
    if args.preset:
        utils.check_choice("preset", args.preset, ["cpu", "gpu"])
    scripts = [s.strip().removesuffix(".py") for s in args.scripts.split(",") if s.strip()]
    if not scripts:
        utils.fail(f"--scripts {args.scripts!r} names no script; choose from: {', '.join(RECIPES)}")
    for script in scripts:
        utils.check_choice("scripts", script, list(RECIPES))
        if not os.path.isfile(os.path.join(REPO, "cleanrl_pool", script + ".py")):
            utils.fail(f"--scripts {script!r}: cleanrl_pool/{script}.py does not exist yet")
    for flag, most in (("env_seconds", 3600), ("timeout", 7 * 86400)):
        if not (math.isfinite(getattr(args, flag)) and 0 < getattr(args, flag) <= most):
            utils.fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be a number of seconds above 0, at most {most}")
    if not 0 <= args.raw_num_envs <= 4096:
        utils.fail(f"--raw-num-envs {args.raw_num_envs} must be 0 (no comparison) or from 1 to 4096")
    if "\n" in args.note or "\r" in args.note:
        utils.fail("--note must be one line (it goes under the table)")

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

    widths = int_list("widths", args.widths, 1, 64)
    resolution_lists = {script: int_list("resolutions", args.resolutions, 1, 4096) if args.resolutions
                        else RECIPES[script]["resolutions"] for script in scripts}
    pools = [p.strip() for p in args.pools.split(",")]
    for pool in pools:
        utils.check_choice("pools", pool, ["flatten", "avg", "max"])
    for flag, values in (("scripts", scripts), ("pools", pools)):
        if len(set(values)) != len(values):
            utils.fail(f"--{flag} {','.join(values)!r} names a value twice")
    import torch

    on_gpu = torch.cuda.is_available()
    preset = args.preset or ("gpu" if on_gpu else "cpu")
    out = args.out or os.path.join(REPO, "benchmark", "results", f"throughput_{preset}.md")
    check_out_file(out)

    rows, commands, load_before = [], [], os.getloadavg()[0]
    native_rows = []  # Procgen-HD against EnvPool's step + render, per resolution

    def write_table():  # after every row, so a long measurement that is stopped keeps what it measured
        lines = [f"# Throughput ({preset} preset)", "",
                 f"- device: {device_description(on_gpu)}; torch {torch.__version__}",
                 f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; 1-minute load average "
                 f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the last row (other jobs share the machine when it exceeds the core count)",
                 f"- command: `python benchmark/throughput.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
                 "- raw env: the script's own environment construction (PPO: Procgen-HD drawing natively at R; the others: "
                 f"EnvPool) stepped with random actions, {args.env_seconds:g} s, same number of envs as the training run",
                 "- training: steps/s between the first and last `charts/SPS` point of a short real run (start-up, "
                 "learning-starts warm-up and final evaluation left out); `charts/SPS` = the script's own cumulative number",
                 ""]
        if args.note:
            lines += [f"Conditions: {args.note}", ""]
        lines += ["| script | env | resolution | width | pool | raw env steps/s | training steps/s | training / raw | charts/SPS | GPU memory |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
        if native_rows:
            lines += ["", f"Procgen-HD (native render at R) against EnvPool's Procgen step + render at R (a resize of the 64 x 64 "
                      f"frame), bigfish, {args.raw_num_envs} envs, random actions, {args.env_seconds:g} s each:", "",
                      "| resolution | Procgen-HD steps/s | EnvPool step + render steps/s | Procgen-HD / EnvPool |", "|---|---|---|---|"]
            lines += ["| " + " | ".join(map(str, row)) + " |" for row in native_rows]
        lines += ["", "Training commands (run in an empty folder):", "", "```"] + commands + ["```", ""]
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write("\n".join(lines))

    for script in scripts:
        recipe = RECIPES[script]
        for resolution in resolution_lists[script]:
            base = {"env-id": recipe["env_id"], "resolution": resolution, **recipe[preset], **recipe["quiet"]}
            try:
                raw = env_rate_in_child(script, base, args.env_seconds)
            except RuntimeError as error:  # a size the back end refuses, a missing simulator: a row that says so
                print(f"{script} r{resolution} raw env failed: {error}", file=sys.stderr, flush=True)
                rows += [[script, recipe["env_id"], resolution, width, pool, "failed", "–", "–", "–", "–"]
                         for width in widths for pool in pools]
                write_table()
                continue
            print(f"{script} {recipe['env_id']} {resolution}: raw env {raw:,.0f} steps/s", flush=True)
            if script == "ppo_procgen_impoola" and args.raw_num_envs:
                try:
                    native = env_rate_in_child(script, {**base, "num-envs": args.raw_num_envs}, args.env_seconds)
                    resized = envpool_procgen_rate(recipe["env_id"], args.raw_num_envs, resolution, args.env_seconds)
                except Exception as error:  # EnvPool's Procgen can be missing or refuse a size: the comparison says failed
                    print(f"  {args.raw_num_envs} envs: comparison failed: {error}", file=sys.stderr, flush=True)
                    native_rows.append([resolution, "failed", "–", "–"])
                else:
                    native_rows.append([resolution, rate_text(native), rate_text(resized), f"{native / resized:.3g}"])
                    print(f"  {args.raw_num_envs} envs: Procgen-HD {native:,.0f}, "
                          f"EnvPool step + render {resized:,.0f} steps/s", flush=True)
            for width in widths:
                for pool in pools:
                    flags = {**base, "width": width, "pool": pool}
                    command = [sys.executable, os.path.join(REPO, "cleanrl_pool", script + ".py")]
                    for flag, value in flags.items():
                        command += [f"--{flag}"] if value is True else [f"--{flag}", str(value)]
                    with tempfile.TemporaryDirectory() as runs_dir:
                        try:
                            steady, logged, memory, wall = training_rate(command + ["--runs-dir", "runs"], runs_dir, on_gpu, args.timeout)
                        except RuntimeError as error:
                            print(f"{script} {pool} w{width} r{resolution} failed: {error}", file=sys.stderr, flush=True)
                            rows.append([script, recipe["env_id"], resolution, width, pool, f"{raw:,.0f}", "failed", "–", "–", "–"])
                            write_table()
                            continue
                    print(f"  width {width} pool {pool}: training {rate_text(steady)} steps/s ({steady / raw:.1%} of raw), wall {wall:.0f} s", flush=True)
                    rows.append([script, recipe["env_id"], resolution, width, pool, rate_text(raw), rate_text(steady),
                                 f"{steady / raw:.3g}", rate_text(logged), f"{memory:,} MiB" if memory is not None else "–"])
                    commands.append(shlex.join(["python"] + command[1:] + ["--runs-dir", "runs"]).replace(REPO + "/", ""))
                    write_table()

    print(f"wrote {out}")


if __name__ == "__main__":
    main()
