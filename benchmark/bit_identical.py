"""Do two checkouts train the same? Seeded tiny CPU runs of the four scripts (and their presets, and a resume),
then every tensor and value of every checkpoint, every TensorBoard scalar (charts/SPS aside: it is a clock),
config.json, `--help` (its lines, in any order) and a few exit-2 lines compared between the two: a refactoring must
leave them bit-identical.

    python benchmark/bit_identical.py record OUT_BEFORE --repo /path/to/the/old/checkout
    python benchmark/bit_identical.py record OUT_AFTER                # this checkout
    python benchmark/bit_identical.py compare OUT_BEFORE OUT_AFTER    # exit 0: identical; else each difference
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATARI = ["--env-id", "Breakout", "--num-envs", "2", "--buffer-size", "400", "--learning-starts", "100", "--batch-size", "8",
         "--max-episode-steps", "150", "--target-network-frequency", "50", "--eval-episodes", "2", "--log-every", "100",
         "--total-timesteps", "400", "--eval-every", "200", "--diag-every", "200", "--save-every", "200", "--save-buffer"]
SAC = ["--env-id", "cartpole-swingup", "--resolution", "24", "--cheap-visuals-for-tests", "--batch-size", "16",
       "--hidden-dim", "32", "--eval-episodes", "1", "--total-timesteps", "250", "--learning-starts", "200",
       "--buffer-size", "400", "--eval-every", "125", "--save-every", "125", "--diag-every", "125", "--log-every", "50",
       "--save-buffer"]
# run name: (script, flags, resumed from the checkpoint of this step with these flags, or None)
RUNS = {
    "ppo": ("ppo_procgen_impoola.py", ["--env-id", "bossfight", "--width", "1", "--num-envs", "4", "--num-steps", "16",
                                       "--num-minibatches", "2", "--update-epochs", "2", "--total-timesteps", "128",
                                       "--eval-every", "64", "--eval-episodes", "2", "--final-eval-episodes", "2",
                                       "--eval-num-envs", "2", "--save-every", "64", "--diag-every", "64",
                                       "--diag-batch-size", "8", "--clip-vloss", "--target-kl", "1.0"],
            (64, ["--total-timesteps", "192"])),
    "dqn": ("dqn_atari_gap.py", ATARI + ["--n-step", "3", "--double"], (200, ["--total-timesteps", "500"])),
    "rainbow": ("rainbow_atari_gap.py", ATARI + ["--iteration-steps", "200"], (200, ["--total-timesteps", "500"])),
    "rainbow_der": ("rainbow_atari_gap.py", ["--preset", "der", "--encoder", "impala", "--dense-scale", "2"] + ATARI, None),
    # sparse training's mask updates (outside the captured learner step) and their resume
    "dqn_rigl": ("dqn_atari_gap.py", ATARI + ["--pool", "avg", "--sparsity-method", "rigl", "--mask-update-every", "10"],
                 (200, [])),
    "rainbow_prune": ("rainbow_atari_gap.py", ATARI + ["--iteration-steps", "200", "--sparsity-method", "prune",
                                                       "--mask-update-every", "10"], (200, [])),
    "sac": ("sac_dmc_gap.py", SAC + ["--pool", "avg", "--reward-scale", "0.5"], (125, ["--total-timesteps", "300"])),
    "sac_dopamine": ("sac_dmc_gap.py", ["--preset", "dopamine"] + SAC, (125, ["--total-timesteps", "300"])),
}
BAD_INPUT = [("ppo_procgen_impoola.py", ["--num-minibatches", "7"]), ("ppo_procgen_impoola.py", ["--pool", "mean"]),
             ("dqn_atari_gap.py", ["--resolution", "32"]), ("dqn_atari_gap.py", ["--gamma", "nan"]),
             ("rainbow_atari_gap.py", ["--preset", "x"]), ("rainbow_atari_gap.py", ["--num-atoms", "1"]),
             ("sac_dmc_gap.py", ["--action-repeat", "3"]), ("sac_dmc_gap.py", ["--batch-size", "1000", "--buffer-size", "9"])]


def run(repo, script, flags, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", COLUMNS="120")
    command = [sys.executable, os.path.join(repo, "cleanrl_pool", script), *flags, "--torch-threads", "1", "--no-progress"]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def record(out: str, repo: str, only=None):
    os.makedirs(out, exist_ok=True)
    for script in sorted({script for script, _, _ in RUNS.values()}) if only is None else []:
        help_text = run(repo, script, ["--help"], out).stdout.replace(repo, "REPO")  # the usage line names the path
        open(os.path.join(out, f"help_{script}.txt"), "w").write(help_text)
    if only is None:
        bad = [run(repo, script, flags + ["--runs-dir", "runs"], out) for script, flags in BAD_INPUT]
        json.dump([[r.returncode, r.stderr] for r in bad], open(os.path.join(out, "bad_input.json"), "w"), indent=1)
    for name, (script, flags, resume) in RUNS.items() if only is None else ((name, RUNS[name]) for name in only):
        cwd = os.path.join(out, name)
        shutil.rmtree(cwd, ignore_errors=True)
        os.makedirs(cwd)
        result = run(repo, script, flags + ["--runs-dir", "runs"], cwd)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        print(f"recorded {name}", flush=True)
        if resume:  # a copy of the run folder (its name kept) continued from an earlier checkpoint, in that copy
            step, more = resume
            (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
            copy = os.path.join(out, f"{name}_resumed", "runs", os.path.basename(run_dir))
            shutil.rmtree(os.path.dirname(os.path.dirname(copy)), ignore_errors=True)
            shutil.copytree(run_dir, copy)
            checkpoint = os.path.join("runs", os.path.basename(run_dir), "checkpoints", f"step_{step:012d}.pt")  # relative
            result = run(repo, script, flags + more + ["--runs-dir", "runs", "--resume", checkpoint],
                         os.path.join(out, f"{name}_resumed"))
            assert result.returncode == 0, f"{name} resumed: {result.stderr[-3000:]}"
            print(f"recorded {name}_resumed", flush=True)


def differences(a, b, where: str) -> list:
    """Every place where two loaded checkpoints (nested dicts, lists, tensors, values) differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}.{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} != {b!r}"]


def run_files(out: str) -> dict:
    """{path relative to the runs folder, the run's own folder name left out: absolute path} of a recording."""
    files = {}
    for path in glob.glob(os.path.join(out, "*", "runs", "*", "**", "*"), recursive=True):
        parts = os.path.relpath(path, out).split(os.sep)
        if path.endswith((".pt", ".json")):
            files[os.path.join(parts[0], *parts[3:])] = path
    return files


def scalars(run_dir: str) -> dict:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from conftest import read_scalars

    return {tag: values for tag, values in read_scalars(run_dir).items() if tag != "charts/SPS"}


def without_time(resume):
    """--resume's path with the unix time of the run folder's name left out."""
    return re.sub(r"__\d+/", "__TIME/", resume) if isinstance(resume, str) else resume


def compare(before: str, after: str) -> list:
    """Differences between two recordings, over what AFTER holds (a `record --only` compares only those runs)."""
    found, names = [], sorted(set(os.listdir(before)) & set(os.listdir(after)))
    print("compared:", " ".join(name for name in names if not name.endswith(".log")), flush=True)
    for name in names:
        texts = [open(os.path.join(folder, name)).read() for folder in (before, after) if name.endswith((".txt", ".json"))]
        if name.startswith("help_"):  # the same lines: every flag with its default and help, in any order
            texts = [sorted(text.splitlines()) for text in texts]
        found += [f"{name} differs"] * (len(texts) == 2 and texts[0] != texts[1])
    files_before, files_after = run_files(before), run_files(after)
    files_before = {path: full for path, full in files_before.items() if path.split(os.sep)[0] in names}
    if set(files_before) != set(files_after):
        found.append(f"files differ: {sorted(set(files_before) ^ set(files_after))}")
    for path in sorted(set(files_before) & set(files_after)):
        a, b = files_before[path], files_after[path]
        if path.endswith(".pt"):
            loaded = [torch.load(p, weights_only=True) for p in (a, b)]
            for payload in loaded:
                payload.pop("run_name", None)  # the run folder's name holds the unix time
                if isinstance(payload.get("args"), dict):
                    payload["args"]["resume"] = without_time(payload["args"].get("resume"))
            found += differences(*loaded, path)
        elif path.endswith("config.json"):
            configs = [json.load(open(path)) for path in (a, b)]
            for config in configs:
                config["resume"] = without_time(config.get("resume"))
            found += [f"{path} differs"] * (configs[0] != configs[1])
    for name in names:
        for run_dir, other in zip(*(glob.glob(os.path.join(folder, name, "runs", "*")) for folder in (before, after))):
            found += [f"{name}: TensorBoard scalars differ"] * (scalars(run_dir) != scalars(other))
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    record_parser = commands.add_parser("record", help="run the tiny runs of a checkout into OUT")
    record_parser.add_argument("out")
    record_parser.add_argument("--repo", default=REPO, help="the checkout whose scripts run (default: this one)")
    record_parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="only these runs (no help, no bad input)")
    compare_parser = commands.add_parser("compare", help="compare two recordings")
    compare_parser.add_argument("before")
    compare_parser.add_argument("after")
    options = parser.parse_args()
    if options.command == "record":
        record(options.out, os.path.abspath(options.repo), options.only)
    else:
        found = compare(options.before, options.after)
        print("\n".join(found) if found else "bit-identical: every checkpoint, scalar, config, help and exit-2 line")
        sys.exit(1 if found else 0)
