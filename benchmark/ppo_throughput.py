"""Throughput of ppo_procgen_impoola.py next to the raw EnvPool step (+ render) rate, same envs, one run.

python benchmark/ppo_throughput.py --num-envs 8 --num-steps 16 --resolutions 64 128 192
Prints a Markdown table: raw env steps/s, PPO steps/s (rollout + update, the script's charts/SPS
after its first iteration) and their ratio, per resolution.
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

import envpool
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_env_rate(env_id, num_envs, resolution, steps):
    """Steps/s of EnvPool Procgen with random actions, rendering every env at R when R != 64."""
    kwargs = {} if resolution == 64 else dict(render_mode="rgb_array", render_width=resolution, render_height=resolution)
    envs = envpool.make(env_id, env_type="gymnasium", num_envs=num_envs, seed=0, **kwargs)
    envs.reset()
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 15, (steps, num_envs))
    start = time.perf_counter()
    for action in actions:
        _, _, _, _, info = envs.step(action)
        if resolution != 64:
            envs.render(env_ids=info["env_id"])
    return num_envs * steps / (time.perf_counter() - start)


def ppo_rate(game, num_envs, num_steps, iterations, resolution, extra, cwd):
    flags = ["--env-id", game, "--resolution", str(resolution), "--num-envs", str(num_envs), "--num-steps", str(num_steps),
             "--total-timesteps", str(num_envs * num_steps * iterations), "--eval-every", "0", "--final-eval-episodes", "0",
             "--save-every", "0", "--diag-every", "0", "--runs-dir", os.path.join(cwd, "runs"), *extra]
    result = subprocess.run([sys.executable, os.path.join(ROOT, "cleanrl_pool", "ppo_procgen_impoola.py"), *flags],
                            capture_output=True, text=True, check=True)
    return float(re.findall(r"SPS ([\d.]+)", result.stdout)[-1]), result.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="bigfish")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--raw-steps", type=int, default=200, help="env steps per env for the raw rate")
    parser.add_argument("--tmp", default="/tmp/ppo_throughput")
    parser.add_argument("extra", nargs="*", help="more flags for the script, after --")
    args = parser.parse_args()
    device_line = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU')"],
                                 capture_output=True, text=True).stdout.strip()
    print(f"| resolution | raw EnvPool step{'+render' if any(r != 64 for r in args.resolutions) else ''} (steps/s) | PPO (steps/s) | PPO / raw |")
    print("|---|---|---|---|")
    for resolution in args.resolutions:
        raw = raw_env_rate(f"{args.env_id.capitalize()}Easy-v0", args.num_envs, resolution, args.raw_steps)
        sps, _ = ppo_rate(args.env_id, args.num_envs, args.num_steps, args.iterations, resolution, args.extra, args.tmp)
        print(f"| {resolution} | {raw:,.0f} | {sps:,.1f} | {sps / raw:.2e} |", flush=True)
    print(f"\n{args.env_id}, {args.num_envs} envs x {args.num_steps} steps, {args.iterations} iteration(s), device {device_line}, "
          f"{os.cpu_count()} CPUs, {platform.python_version()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


if __name__ == "__main__":
    main()
