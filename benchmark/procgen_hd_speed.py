"""Steps/s of procgen_hd's two interfaces against EnvPool's Procgen step + render at R (a resize of the 64 x 64 frame):
the batched ProcgenHDEnv (what the PPO script steps), the Gymnasium vector env (make_vec, vector_entry_point), each
in its own process (one frame size per process), random actions, rounds interleaved so shared-machine load hits all.

    python benchmark/procgen_hd_speed.py                      # bigfish, 64 envs, R 64/128/192, 5 s, 3 rounds
    python benchmark/procgen_hd_speed.py --resolutions 64 --seconds 1 --rounds 1 --out /tmp/speed.md
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INTERFACES = ("batched", "gymnasium", "envpool")


def rate(interface: str, game: str, num_envs: int, resolution: int, seconds: float) -> float:
    """Agent steps per second (all envs together) of one interface under random actions."""
    if interface == "envpool":
        sys.path.insert(0, HERE)
        import throughput

        return throughput.envpool_procgen_rate(game, num_envs, resolution, seconds)
    import procgen_hd

    if interface == "batched":
        envs = procgen_hd.ProcgenHDEnv(game, num_envs, resolution, num_levels=200)
    else:
        import gymnasium as gym

        envs = gym.make_vec(f"procgen_hd/{game}-v0", num_envs=num_envs, vectorization_mode="vector_entry_point",
                            resolution=resolution, num_levels=200)
    envs.reset()
    for _ in range(5):  # warm-up
        envs.step(np.random.randint(0, 15, num_envs))
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        envs.step(np.random.randint(0, 15, num_envs))
        steps += num_envs
    return steps / (time.perf_counter() - start)


def rate_in_child(*args) -> float:
    code = f"import sys; sys.path.insert(0, {HERE!r}); import procgen_hd_speed; print(procgen_hd_speed.rate(*{args!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=args[-1] + 300)
    if result.returncode != 0:
        raise RuntimeError(f"{args[0]} at {args[3]} failed: {result.stderr.strip().splitlines()[-1:]}")
    return float(result.stdout.split()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--game", default="bigfish")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--resolutions", default="64,128,192")
    parser.add_argument("--seconds", type=float, default=5.0, help="stepping time per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per cell; the table shows their median")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "procgen_hd_speed_cpu.md"))
    args = parser.parse_args(argv)
    resolutions = [int(r) for r in args.resolutions.split(",")]
    load = os.getloadavg()[0]
    rates = {(i, r): [] for i in INTERFACES for r in resolutions}
    for _ in range(args.rounds):
        for resolution in resolutions:
            for interface in INTERFACES:
                rates[interface, resolution].append(
                    rate_in_child(interface, args.game, args.num_envs, resolution, args.seconds))
                print(interface, resolution, round(rates[interface, resolution][-1]), flush=True)
    median = {key: float(np.median(values)) for key, values in rates.items()}
    every = json.dumps({f"{i} {r}": [round(v) for v in vs] for (i, r), vs in rates.items()})
    lines = ["# procgen_hd speed", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPU cores; 1-minute load "
             f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above the core count: shared)",
             f"- command: `{' '.join(['python benchmark/procgen_hd_speed.py', *(sys.argv[1:] if argv is None else argv)])}`",
             f"- {args.game}, {args.num_envs} envs, random actions, {args.seconds:g} s a measurement, median of "
             f"{args.rounds} interleaved rounds; every rate: {every}",
             "", "| resolution | ProcgenHDEnv (batched) steps/s | Gymnasium vector env steps/s "
             "| EnvPool step + render steps/s | batched / EnvPool |", "|---|---|---|---|---|"]
    for r in resolutions:
        cells = [f"{median[i, r]:,.0f}" for i in INTERFACES] + [f"{median['batched', r] / median['envpool', r]:.2f}"]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
