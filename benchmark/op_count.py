"""Dispatched torch ops and host syncs per agent step of each script's training loop, counted on a CPU.

On a GPU nearly every dispatched op is a kernel launch and every `aten::_local_scalar_dense` (an
`.item()`, `bool(tensor)`, a numpy copy of a CUDA tensor) is a host sync, so these counts are what a
launch-bound script's GPU rate follows (issue 13). Each script runs twice for real, in-process under a
counting dispatch mode, with the same flags but two lengths; the difference divided by the extra agent
steps leaves set-up, warm-up and saving out; evaluation (whose episodes differ in length) is not counted.
View ops (no kernel) are not counted. For DQN and Rainbow the table also projects the launches per agent step
with --cuda-graphs on a GPU: the ops outside what it captures (acting, the store, the learner step), plus one
replay per captured call.

    python benchmark/op_count.py                          # all four scripts, their CPU recipes
    python benchmark/op_count.py --scripts dqn_atari_gap --out benchmark/results/op_count_cpu.md
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "cleanrl_pool")
NEVER = "1000000000"
QUIET = ["--eval-every", "0", "--save-every", "0", "--diag-every", "0", "--torch-threads", "1", "--no-progress"]
# Per script: flags of a steady-state run (learning from the first counted step) and the two lengths (agent steps)
RECIPES = {
    "ppo_procgen_impoola": (["--env-id", "bigfish", "--num-envs", "8", "--num-steps", "32", "--num-minibatches", "4",
                             "--final-eval-episodes", "0", "--eval-episodes", "0"], 512, 1024),
    "dqn_atari_gap": (["--env-id", "Breakout", "--learning-starts", "100", "--buffer-size", "2000", "--log-every", "100",
                       "--eval-episodes", "1"], 300, 700),
    "rainbow_atari_gap": (["--env-id", "Breakout", "--learning-starts", "100", "--buffer-size", "2000", "--log-every", "100",
                           "--eval-episodes", "1"], 300, 700),
    "sac_dmc_gap": (["--env-id", "cartpole-swingup", "--cheap-visuals-for-tests", "--batch-size", "32", "--learning-starts",
                     "100", "--buffer-size", "1000", "--log-every", "50", "--eval-episodes", "1"], 200, 300),
}
# What --cuda-graphs captures, per script: on a GPU each call of these is one graph replay
CAPTURED = {name: ("select_actions", "store_env_step", "learner_step") for name in ("dqn_atari_gap", "rainbow_atari_gap")}


def count_child(script: str, flags: list) -> dict:
    """Run one script's main() in this process under a counting dispatch mode: {ops, syncs, by_name, and the ops
    inside and calls of the functions --cuda-graphs captures}."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.syncs, self.by_name, self.paused = 0, 0, {}, False
            self.graph_ops, self.graph_calls, self.in_graph = 0, 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if self.paused:
                return func(*args, **(kwargs or {}))
            if not func.is_view:
                self.ops += 1
                self.graph_ops += self.in_graph
                self.by_name[func.name()] = self.by_name.get(func.name(), 0) + 1
            if func is torch.ops.aten._local_scalar_dense.default:
                self.syncs += 1
            return func(*args, **(kwargs or {}))

    sys.path.insert(0, SCRIPTS)
    sys.argv = [script + ".py", *flags]
    module = importlib.import_module(script)
    counter = OpCounter()
    evaluate = module.evaluate

    def uncounted_evaluate(*args, **kwargs):
        counter.paused = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            counter.paused = False

    def as_one_replay(function):
        def call(*args, **kwargs):
            outermost = not counter.in_graph and not counter.paused
            counter.graph_calls += outermost
            counter.in_graph |= outermost
            try:
                return function(*args, **kwargs)
            finally:
                counter.in_graph &= not outermost

        return call

    module.evaluate = uncounted_evaluate
    for name in CAPTURED.get(script, ()):
        setattr(module, name, as_one_replay(getattr(module, name)))
    with counter:
        module.main()
    return {"ops": counter.ops, "syncs": counter.syncs, "by_name": counter.by_name,
            "graph_ops": counter.graph_ops, "graph_calls": counter.graph_calls}


def count(script: str, steps: int, workdir: str) -> dict:
    flags, _, _ = RECIPES[script]
    command = [sys.executable, os.path.abspath(__file__), "--child", script, "--",
               *flags, *QUIET, "--total-timesteps", str(steps), "--runs-dir", os.path.join(workdir, f"runs_{steps}")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode != 0:
        sys.exit(f"error: {script} at {steps} steps failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(script: str) -> dict:
    """Ops and syncs per agent step: (count at the long run - count at the short run) / extra steps."""
    _, short, long = RECIPES[script]
    with tempfile.TemporaryDirectory() as workdir:
        first, second = count(script, short, workdir), count(script, long, workdir)
    extra = long - short
    names = {name: (second["by_name"].get(name, 0) - first["by_name"].get(name, 0)) / extra for name in second["by_name"]}
    top = sorted(names.items(), key=lambda item: -item[1])[:5]
    result = {"ops_per_step": (second["ops"] - first["ops"]) / extra,
              "syncs_per_step": (second["syncs"] - first["syncs"]) / extra, "top": top, "steps": (short, long)}
    if script in CAPTURED:
        outside = (second["ops"] - second["graph_ops"]) - (first["ops"] - first["graph_ops"])
        replays = second["graph_calls"] - first["graph_calls"]
        result["graphed_per_step"] = (outside + replays) / extra
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scripts", default=",".join(RECIPES), help="comma-separated script names")
    parser.add_argument("--out", default="", help="also write the Markdown table to this file")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    options, rest = parser.parse_known_args()
    if options.child:
        print(json.dumps(count_child(options.child, [flag for flag in rest if flag != "--"])))
        return
    scripts = [name for name in options.scripts.split(",") if name]
    unknown = [name for name in scripts if name not in RECIPES]
    if unknown:
        print(f"error: --scripts {','.join(unknown)!r}: choose from {', '.join(RECIPES)}", file=sys.stderr)
        sys.exit(2)
    rows = ["| script | ops / agent step | host syncs / agent step | launches / agent step with --cuda-graphs "
            "(projected) | most dispatched (per step) |", "|---|---|---|---|---|"]
    for script in scripts:
        result = measure(script)
        top = ", ".join(f"{name} {value:.1f}" for name, value in result["top"])
        graphed = f"{result['graphed_per_step']:.1f}" if "graphed_per_step" in result else "–"
        rows.append(f"| {script} | {result['ops_per_step']:.1f} | {result['syncs_per_step']:.2f} | {graphed} | {top} |")
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    table = "\n".join([
        f"Dispatched torch ops per agent step (CPU, {platform.processor() or platform.machine()}, "
        f"{datetime.date.today().isoformat()}, commit {commit}; recipe flags in benchmark/op_count.py)",
        f"Command: python benchmark/op_count.py {' '.join(shlex.quote(arg) for arg in sys.argv[1:])}".rstrip(), "", *rows, ""])
    if options.out:
        with open(options.out, "w") as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    main()
