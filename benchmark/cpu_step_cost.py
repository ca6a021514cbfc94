"""CPU seconds per training step of a script, measured as the difference of two runs that differ only in length,
and the hours a full run would take on one core: what a CPU-sized learning run can afford.

    python benchmark/cpu_step_cost.py rainbow_atari_gap --short 1800 --long 2600 --project 100000 -- --preset der --pool avg

Both runs share every flag after `--` (plus one torch thread, no progress, no evaluation or checkpoint until the end),
so their difference is `long - short` steps of the training loop alone: set-up, warm-up below --short and the final
evaluation cancel. CPU time (user + system of the child) does not depend on what else the machine runs; one core
per run is what it measures.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile

SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cleanrl_pool")


def child_cpu_seconds(command: list) -> float:
    """User + system CPU seconds of one child process run to its end (exit status checked)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode:
        print(result.stderr[-2000:], file=sys.stderr)
        sys.exit(f"error: {' '.join(command[1:3])} ... exited with {result.returncode}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", help="a script of cleanrl_pool/, without .py")
    parser.add_argument("--short", type=int, required=True, help="--total-timesteps of the short run")
    parser.add_argument("--long", type=int, required=True, help="--total-timesteps of the long run")
    parser.add_argument("--project", type=int, default=0, help="steps of a full run to project the hours of (0: none)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, flags = parser.parse_args(argv[:split]), argv[split + 1 :]  # after `--`: the script's flags, for both runs
    path = os.path.join(SCRIPTS_DIR, args.script + ".py")
    if not os.path.isfile(path):
        parser.error(f"no script {path}")
    if not 0 < args.short < args.long:
        parser.error("0 < --short < --long")
    seconds = {}
    with tempfile.TemporaryDirectory() as runs_dir:
        for total in (args.short, args.long):
            seconds[total] = child_cpu_seconds([sys.executable, path, *flags, "--total-timesteps", str(total),
                                                "--torch-threads", "1", "--no-progress", "--eval-every", "0",
                                                "--save-every", "0", "--runs-dir", runs_dir, "--exp-name", f"cost{total}"])
    per_step = (seconds[args.long] - seconds[args.short]) / (args.long - args.short)
    line = (f"{args.script} {' '.join(flags)}: {seconds[args.short]:.1f} s CPU for {args.short} steps, "
            f"{seconds[args.long]:.1f} s for {args.long}: {per_step * 1000:.1f} ms per training step, "
            f"{1 / per_step:.1f} steps/s on one core")
    if args.project:
        line += f"; {args.project:,} steps: {args.project * per_step / 3600:.1f} h"
    print(line)


if __name__ == "__main__":
    main()
