"""Run a grid of cleanrl_pool runs: locally as a queue over GPU slots (or CPU processes), or on a
cluster as a Slurm job array.

    python benchmark/sweep.py --grid procgen_hd --only env-id=bigfish,starpilot --only seed=1
    python benchmark/sweep.py --grid gap_atari --slurm --slurm-time 48:00:00          # sbatch
    python benchmark/sweep.py --grid my_grid.json --slurm --dry-run                   # print only

Every run gets a deterministic `--exp-name` ({script}-{flag}_{value}-...) from the flags the grid
varies and the `--set` overrides, so a run folder `{env_id}__{exp_name}__{seed}__{time}` says
which grid point it is. A run whose folder holds final.pt is skipped; every other run is started
with `--resume auto`, which continues an unfinished one from its latest checkpoint.

Before anything starts, every flag of the grid, `--only` and `--set` is checked against the fields of
the script's `Args` dataclass (read from its source: no import, so a login node needs no simulator),
with the field's type, and each env id is spelled as the script spells it for its run folder
(`Breakout-v5` -> `Breakout`), so a finished run is found whichever spelling the grid uses.
"""

import argparse
import ast
import difflib
import glob
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "cleanrl_pool"))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import utils  # noqa: E402
from grids import GRIDS  # noqa: E402


SWEEP_FLAGS = ("exp-name", "runs-dir", "resume")  # every command gets these from the sweep itself
GRID_KEYS = ("script", "fixed", "vary", "about")


# Grid -> runs
def load_grid(name_or_path: str) -> dict:
    if name_or_path in GRIDS:
        grid = dict(GRIDS[name_or_path], name=name_or_path)
    else:
        if not name_or_path.endswith(".json") or not os.path.isfile(name_or_path):
            utils.fail(f"--grid {name_or_path!r} is neither a ready-made grid ({', '.join(GRIDS)}) nor a .json file")
        with open(name_or_path) as f:
            try:
                grid = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                utils.fail(f"--grid {name_or_path!r} is not valid JSON ({error})")
        if not isinstance(grid, dict) or "script" not in grid or "vary" not in grid:
            utils.fail(f"--grid {name_or_path!r} needs the keys 'script' and 'vary' (and optionally 'fixed')")
        grid = dict(grid, name=os.path.splitext(os.path.basename(name_or_path))[0])
    check_grid(grid)
    return grid


def check_grid(grid):
    """The grid's shape: a script name, `fixed` a dict of flag -> value, `vary` a dict (or a non-empty
    list of dicts) of flag -> non-empty list of values; values are strings, numbers or booleans."""
    unknown = sorted(set(grid) - set(GRID_KEYS) - {"name"})
    if unknown:
        utils.fail(f"--grid: unknown key {unknown[0]!r}; a grid has: {', '.join(GRID_KEYS)}")
    if not isinstance(grid["script"], str) or not grid["script"].strip():
        utils.fail(f"--grid: 'script' must be a script of cleanrl_pool/ or a path, not {grid['script']!r}")
    if not isinstance(grid.get("fixed", {}), dict):
        utils.fail(f"--grid: 'fixed' must be an object of flag: value, not {grid['fixed']!r}")
    subgrids = grid["vary"] if isinstance(grid["vary"], list) else [grid["vary"]]
    if not subgrids or not all(isinstance(subgrid, dict) for subgrid in subgrids):
        utils.fail(f"--grid: 'vary' must be an object of flag: [values] or a non-empty list of them, not {grid['vary']!r}")
    for flag, value in grid.get("fixed", {}).items():
        check_value("--grid: 'fixed'", flag, value)
    for subgrid in subgrids:
        for flag, values in subgrid.items():
            if not isinstance(values, list) or not values:
                utils.fail(f"--grid: 'vary' {flag!r} must be a non-empty list of values, not {values!r}")
            for value in values:
                check_value("--grid: 'vary'", flag, value)


def check_value(where: str, flag, value):
    if not isinstance(flag, str) or not flag.strip("-"):
        utils.fail(f"{where}: {flag!r} is not a flag name")
    if not isinstance(value, (str, int, float, bool)):
        utils.fail(f"{where} {flag!r}: {value!r} is not a string, number or boolean")


def flag_name(flag: str) -> str:
    """'--total_timesteps' -> 'total-timesteps': one spelling (tyro's) everywhere."""
    return flag.strip().lstrip("-").replace("_", "-")


def beside_utils(script: str):
    """The parsed utils.py beside a script (what it imports as `utils`); fails with one line when it cannot be read."""
    path = os.path.join(os.path.dirname(os.path.abspath(script)), "utils.py")
    try:
        with open(path) as f:
            return ast.parse(f.read(), path)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as error:
        utils.fail(f"--grid: {script} uses the utils.py beside it, but {path} cannot be read ({error})")


def args_fields(tree, script: str):
    """The annotated fields (ast.AnnAssign) of the `Args` dataclass of a parsed script, with those of `utils.RunArgs`
    first when Args extends it (read from the utils.py beside the script); None when the script has no Args."""
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    if "Args" not in classes:
        return None
    bodies = [classes["Args"].body]
    if any(ast.unparse(base) == "utils.RunArgs" for base in classes["Args"].bases):
        bodies.insert(0, next((node.body for node in beside_utils(script).body
                               if isinstance(node, ast.ClassDef) and node.name == "RunArgs"), []))
    return [item for body in bodies for item in body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)]


def script_arguments(script: str):
    """({flag: type name ("int", "float", "bool", "str") or None}, env-id spelling function) of a script,
    from its source: the fields of its `Args` dataclass, and the function it applies to `args.env_id`
    before naming its run folder (`args.env_id = utils.atari_game(args.env_id)`), or the identity."""
    try:
        with open(script) as f:
            tree = ast.parse(f.read(), script)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as error:
        utils.fail(f"--grid: {script} cannot be read as Python ({error})")
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    items = args_fields(tree, script)
    if items is None:
        utils.fail(f"--grid: {script} has no `Args` dataclass to check the grid's flags against")
    fields = {flag_name(item.target.id): item.annotation.id if isinstance(item.annotation, ast.Name) else None
              for item in items}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute)
                and node.targets[0].attr == "env_id" and isinstance(node.value, ast.Call)):
            name = ast.unparse(node.value.func)  # the script's own function, or one of the utils.py beside it
            source = functions if not name.startswith("utils.") else {
                f"utils.{function.name}": function for function in beside_utils(script).body
                if isinstance(function, ast.FunctionDef)}
            if name not in source:
                continue
            function, namespace = source[name], {}  # the function alone: it needs nothing but builtins
            try:
                exec(compile(ast.Module(body=[function], type_ignores=[]), script, "exec"), namespace)
            except Exception as error:
                utils.fail(f"--grid: {script}'s env-id spelling {name}() cannot be read alone ({error!r})")

            def spell_env_id(env_id):
                try:
                    return namespace[function.name](env_id)
                except Exception as error:
                    utils.fail(f"--grid: {os.path.basename(script)}'s {name}({env_id!r}) fails ({error!r})")
            return fields, spell_env_id
    return fields, lambda env_id: env_id


def check_flags(runs, fields: dict, script: str):
    """Every flag of every run is a field of the script's Args, with a value of the field's type."""
    for run in runs:
        for flag, value in run["flags"].items():
            if flag in SWEEP_FLAGS:
                utils.fail(f"--grid/--set {flag!r}: the sweep sets it for every run (--exp-suffix, --runs-dir)")
            if flag not in fields:
                close = difflib.get_close_matches(flag, fields, n=1)
                utils.fail(f"--grid/--set {flag!r} is no flag of {os.path.basename(script)}"
                           + (f" (did you mean {close[0]!r}?)" if close else "") + f"; it has: {', '.join(sorted(fields))}")
            kind = fields[flag]
            wrong = ((kind == "bool" and not isinstance(value, bool))
                     or (kind == "int" and (isinstance(value, bool) or not isinstance(value, int)))
                     or (kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float)))))
            if wrong:
                field = flag.replace("-", "_")
                utils.fail(f"--grid/--set {flag} {value!r}: {os.path.basename(script)} declares {field}: {kind}")


def parse_value(text: str):
    """'64' -> 64, '0.5' -> 0.5, 'true' -> True, anything else stays a string (as JSON reads it)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, (str, int, float, bool)) else text


def parse_assignments(items, flag, single=False):
    """['pool=avg,flatten', ...] -> {'pool': ['avg', 'flatten']}; a flag given twice gets both lists."""
    result = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not flag_name(key):
            utils.fail(f"--{flag} {item!r} must look like FLAG=VALUE" + ("" if single else "[,VALUE...]"))
        if single and "," in values:
            utils.fail(f"--{flag} {item!r}: one value per flag (pick several of a varied flag with --only)")
        parsed = [values] if single else values.split(",")
        result.setdefault(flag_name(key), []).extend(parse_value(v) for v in parsed)
    return result


def script_path(grid) -> str:
    script = grid["script"]
    path = script if os.sep in script else os.path.join(REPO, "cleanrl_pool", script)
    return os.path.abspath(path)


def exp_name_of(stem: str, named_flags: dict, suffix: str) -> str:
    """{script stem}-{flag}_{value}-... ; flags in the order given; no '__' (the run-folder separator)."""
    parts = [stem] + [f"{flag.replace('-', '_')}_{value}" for flag, value in named_flags.items()]
    name = "-".join(parts) + (f"-{suffix}" if suffix else "")
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.+-]", "_", name))


def expand_grid(grid, only=None, overrides=None, exp_suffix="", spell_env_id=None):
    """Every run of the grid as {"flags": {flag: value}, "exp_name": str}, in a fixed order; flags spelled
    with dashes, env ids as `spell_env_id` (the script's own spelling) writes them."""
    spell = spell_env_id or (lambda env_id: env_id)

    def spelled(flag, values):
        return [spell(v) if flag == "env-id" and isinstance(v, str) else v for v in values]

    only = {flag: spelled(flag, values) for flag, values in (only or {}).items()}
    overrides = {flag: spelled(flag, values) for flag, values in (overrides or {}).items()}
    fixed = {flag_name(flag): spelled(flag_name(flag), [value])[0] for flag, value in grid.get("fixed", {}).items()}
    stem = os.path.splitext(os.path.basename(grid["script"]))[0]
    subgrids = [{flag_name(flag): spelled(flag_name(flag), values) for flag, values in subgrid.items()}
                for subgrid in (grid["vary"] if isinstance(grid["vary"], list) else [grid["vary"]])]
    varied_flags = sorted({flag for subgrid in subgrids for flag in subgrid})
    for subgrid in subgrids:
        if "env-id" not in subgrid and "env-id" not in fixed and "env-id" not in overrides:
            utils.fail("--grid: every run needs an env-id (in 'fixed' or 'vary'): the run folder is named after it")
    for flag, wanted in only.items():
        if flag not in varied_flags:
            utils.fail(f"--only {flag!r}: the grid does not vary it; it varies {', '.join(varied_flags)}")
        values = [v for subgrid in subgrids for v in subgrid.get(flag, [])]
        for value in wanted:
            if not any(value == v or str(value) == str(v) for v in values):
                utils.fail(f"--only {flag}={value}: not a value of the grid; "
                           f"it has {', '.join(map(str, dict.fromkeys(values)))}")
    runs, seen = [], {}
    for subgrid in subgrids:
        axes = {flag: [v for v in values if flag not in only or v in only[flag] or str(v) in map(str, only[flag])]
                for flag, values in subgrid.items()}
        for point in itertools.product(*axes.values()):
            varied = dict(zip(axes, point))
            for flag in overrides:
                if flag in varied:
                    utils.fail(f"--set {flag!r}: the grid varies it; pick its values with --only {flag}=...")
            flags = {**fixed, **{f: v[0] for f, v in overrides.items()}, **varied}
            named = {f: v for f, v in varied.items() if f not in ("env-id", "seed")}
            named.update({f: v[0] for f, v in overrides.items()})
            run = {"flags": flags, "exp_name": exp_name_of(stem, named, exp_suffix)}
            folder = run_name(run)
            if folder in seen:
                utils.fail(f"--grid: runs {seen[folder]} and {len(runs)} are the same run ({folder}): "
                           "a value listed twice, or one game spelled two ways")
            seen[folder] = len(runs)
            runs.append(run)
    return runs


def folder_prefix(run, runs_dir: str) -> str:
    """{runs_dir}/{env_id}__{exp_name}__{seed}__: the run's folders, as utils.run_prefix names them (seed 1 when
    the grid leaves it to the script's default)."""
    args = types.SimpleNamespace(runs_dir=runs_dir, env_id=run["flags"]["env-id"], exp_name=run["exp_name"],
                                 seed=run["flags"].get("seed", 1))
    return utils.run_prefix(args)


def run_name(run) -> str:
    """{env_id}__{exp_name}__{seed}: the run folder's name without its start time."""
    return folder_prefix(run, "").removesuffix("__")


def command_of(run, script: str, runs_dir: str, python: str):
    command = [python, script]
    for flag, value in run["flags"].items():
        if isinstance(value, bool):  # tyro spells booleans --flag / --no-flag
            command.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            command += [f"--{flag}", str(value)]
    return command + ["--exp-name", run["exp_name"], "--runs-dir", runs_dir, "--resume", "auto"]


# Which runs are done: final.pt in a folder of the same env id, experiment name and seed
def run_status(run, runs_dir: str):
    """("finished" | "unfinished" | "new" | "conflict", run folder or None, message)."""
    prefix = folder_prefix(run, runs_dir)
    folders = sorted((d for d in glob.glob(glob.escape(prefix) + "*") if d[len(prefix):].isdigit()), reverse=True)
    for folder in folders:
        if os.path.isfile(os.path.join(folder, "final.pt")):
            differences = config_differences(run, folder)
            if differences:
                return "conflict", folder, f"{folder} has the same experiment name but {differences}"
            return "finished", folder, ""
    for folder in folders:
        if glob.glob(os.path.join(folder, "checkpoints", "step_*.pt")):
            differences = config_differences(run, folder)
            if differences:  # resuming would continue it under other settings
                return "conflict", folder, f"{folder} has the same experiment name but {differences}"
            return "unfinished", folder, ""
    return "new", None, ""


def config_differences(run, folder) -> str:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError):
        return ""
    differences = []
    for flag, value in run["flags"].items():
        key = flag.replace("-", "_")
        if key in config and config[key] != value and str(config[key]) != str(value):
            differences.append(f"{flag}={config[key]!r} (grid: {value!r})")
    return ", ".join(differences)


# Local queue: one run per GPU slot (CUDA_VISIBLE_DEVICES), or N CPU processes
def gpu_slots(gpus, jobs_per_gpu: int, cpu_jobs: int):
    """A list with one entry per parallel job: the GPU id it sees, or None for a CPU job."""
    if gpus is None:
        import torch

        gpus = list(range(torch.cuda.device_count()))
    if not gpus:
        return [None] * cpu_jobs
    return [gpu for gpu in gpus for _ in range(jobs_per_gpu)]


def run_local(todo, slots, log_dir, poll_seconds=0.2):
    """Run the commands, at most one per slot at a time; returns {run index: exit status}."""
    os.makedirs(log_dir, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // len(slots)))
    pending, running, statuses = list(todo), {}, {}
    try:
        while pending or running:
            for slot, gpu in enumerate(slots):
                if slot not in running and pending:
                    index, run, command = pending.pop(0)
                    env = dict(os.environ)
                    env.setdefault("OMP_NUM_THREADS", threads)
                    if gpu is not None:
                        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
                    log_path = os.path.join(log_dir, run_name(run) + ".log")
                    with open(log_path, "a") as log:
                        log.write(f"$ {shlex.join(command)}\n")
                        log.flush()
                        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
                    running[slot] = (index, process, log_path)
                    where = f"GPU {gpu}" if gpu is not None else "CPU"
                    print(f"[{time.strftime('%H:%M:%S')}] start  {index}: {run['exp_name']} {run['flags']['env-id']} "
                          f"seed {run['flags'].get('seed', 1)} on {where}", flush=True)
            for slot, (index, process, log_path) in list(running.items()):
                if process.poll() is not None:
                    statuses[index] = process.returncode
                    del running[slot]
                    state = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode}, log {log_path})"
                    print(f"[{time.strftime('%H:%M:%S')}] {state} {index}", flush=True)
            time.sleep(poll_seconds)
    finally:  # on Ctrl-C, stop what this sweep started; `--resume auto` picks them up next time
        for _, process, _ in running.values():
            process.terminate()
    return statuses


# Slurm: one job-array task per run
def slurm_script(todo, args, grid_name: str, log_dir: str) -> str:
    lines = [
        "#!/bin/bash",
        f"# Written by benchmark/sweep.py --grid {grid_name} --slurm: one array task per run not finished yet.",
        f"#SBATCH --job-name={grid_name}",
        f"#SBATCH --array=0-{len(todo) - 1}%{args.slurm_max_parallel}",
        f"#SBATCH --gres=gpu:{args.slurm_gpus}",
        f"#SBATCH --cpus-per-task={args.slurm_cpus}",
        f"#SBATCH --mem={args.slurm_mem}",
        f"#SBATCH --time={args.slurm_time}",
        f"#SBATCH --output={log_dir}/%x_%A_%a.out",
    ]
    if args.slurm_partition:
        lines.append(f"#SBATCH --partition={args.slurm_partition}")
    lines += [f"#SBATCH --{line.lstrip('-')}" for line in args.sbatch_line]
    lines += ["set -euo pipefail", f"cd {shlex.quote(REPO)}",
              'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"  # torch takes every core of the node otherwise',
              'case "$SLURM_ARRAY_TASK_ID" in']
    for task, (index, run, command) in enumerate(todo):
        lines.append(f"  {task}) exec {shlex.join(command)} ;;  # run {index}")
    lines += ['  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;', "esac", ""]
    return "\n".join(lines)


def check_sweep_args(args):
    """The sweep's own flags, before the grid is read: one line and exit 2 for a bad one."""
    for flag in ("jobs_per_gpu", "jobs", "slurm_max_parallel", "slurm_max_array", "slurm_gpus", "slurm_cpus"):
        if not getattr(args, flag) > 0:
            utils.fail(f"--{flag.replace('_', '-')} {getattr(args, flag)!r} must be positive")
    gpu_ids = [] if args.gpus is None else [g.strip() for g in args.gpus.split(",") if g.strip()]
    if not all(g.isascii() and g.isdigit() for g in gpu_ids):
        utils.fail(f"--gpus {args.gpus!r} must be comma-separated GPU ids (0, 1, ...), or empty for none")
    if not re.fullmatch(r"(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2}|UNLIMITED|INFINITE)", args.slurm_time):
        utils.fail(f"--slurm-time {args.slurm_time!r} is not a Slurm time: MINUTES, HH:MM:SS, D-HH, D-HH:MM:SS, ...")
    if not re.fullmatch(r"\d+[KMGT]?", args.slurm_mem, re.IGNORECASE):
        utils.fail(f"--slurm-mem {args.slurm_mem!r} is not a Slurm memory size: a number with K, M, G or T (32G)")
    if re.search(r"\s", args.slurm_partition):
        utils.fail(f"--slurm-partition {args.slurm_partition!r} must be one partition name (no spaces)")
    for line in args.sbatch_line:
        if "\n" in line or "\r" in line or not line.strip("- "):
            utils.fail(f"--sbatch-line {line!r} must be one #SBATCH option on one line (account=abc)")
    if args.slurm_script and os.path.isdir(args.slurm_script):
        utils.fail(f"--slurm-script {args.slurm_script!r} is a folder; give the file to write")


def main(argv=None):
    epilog = "ready-made grids:\n" + "\n".join(f"  {name}: {g['about']}" for name, g in GRIDS.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="a ready-made grid name (see below) or a .json file")
    parser.add_argument("--only", action="append", default=[],
                        help="FLAG=V1,V2: keep only these values of a varied flag (repeatable)")
    parser.add_argument("--set", action="append", default=[],
                        help="FLAG=VALUE: add or override a fixed flag (repeatable; part of the exp name)")
    parser.add_argument("--exp-suffix", default="", help="appended to every experiment name (a second sweep of the same grid)")
    parser.add_argument("--runs-dir", default="runs", help="folder of the run folders (passed to every script)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the scripts")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would run (and write the Slurm script) without running it")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU ids to use (default: every GPU torch sees)")
    parser.add_argument("--jobs-per-gpu", type=int, default=1, help="parallel runs per GPU")
    parser.add_argument("--jobs", type=int, default=1, help="parallel runs when there is no GPU")
    parser.add_argument("--slurm", action="store_true", help="write a Slurm job-array script and submit it with sbatch")
    parser.add_argument("--slurm-script", default="", help="where to write it (default: RUNS_DIR/slurm/GRID.sbatch)")
    parser.add_argument("--slurm-max-parallel", type=int, default=64, help="array tasks running at once (%%N)")
    parser.add_argument("--slurm-max-array", type=int, default=1000,
                        help="tasks per array at most (cluster's MaxArraySize); more runs -> several scripts")
    parser.add_argument("--slurm-time", default="24:00:00", help="time limit per run")
    parser.add_argument("--slurm-gpus", type=int, default=1, help="GPUs per run (--gres=gpu:N)")
    parser.add_argument("--slurm-cpus", type=int, default=8, help="CPU cores per run")
    parser.add_argument("--slurm-mem", default="32G", help="memory per run")
    parser.add_argument("--slurm-partition", default="", help="partition (default: the cluster's)")
    parser.add_argument("--sbatch-line", action="append", default=[],
                        help="extra #SBATCH option, e.g. account=abc (repeatable)")
    parser.error = utils.fail  # a wrong or unknown flag: one line, exit 2
    args = parser.parse_args(argv)
    check_sweep_args(args)

    grid = load_grid(args.grid)
    script = script_path(grid)
    if not os.path.isfile(script):
        utils.fail(f"--grid {args.grid!r} runs {grid['script']!r}, which is not at {script}")
    fields, spell_env_id = script_arguments(script)
    runs_dir = os.path.abspath(args.runs_dir)
    runs = expand_grid(grid, parse_assignments(args.only, "only"), parse_assignments(args.set, "set", single=True),
                       args.exp_suffix, spell_env_id)
    if not runs:
        utils.fail("--only leaves no run of the grid")
    check_flags(runs, fields, script)
    if not args.dry_run and not shutil.which(args.python):
        utils.fail(f"--python {args.python!r} is not an executable on this machine")
    if not args.dry_run or args.slurm:  # runs write to the runs folder; --slurm writes its script there (or at --slurm-script)
        utils.check_writable_folder("runs-dir", args.runs_dir)
        if args.slurm_script:
            utils.check_writable_folder("slurm-script", os.path.dirname(os.path.abspath(args.slurm_script)))
    elif os.path.exists(args.runs_dir) and not os.path.isdir(args.runs_dir):
        utils.fail(f"--runs-dir {args.runs_dir!r} is a file, not a folder")
    todo, counts = [], {"finished": 0, "unfinished": 0, "new": 0, "conflict": 0}
    for index, run in enumerate(runs):
        status, folder, message = run_status(run, runs_dir)
        counts[status] += 1
        if status == "conflict":
            print(f"skip {index}: {message}; rename with --exp-suffix or move the folder", file=sys.stderr)
        elif status != "finished":
            todo.append((index, run, command_of(run, script, runs_dir, args.python)))
    print(f"grid {grid['name']}: {len(runs)} runs; {counts['finished']} finished (skipped), {counts['unfinished']} to resume, "
          f"{counts['new']} new" + (f", {counts['conflict']} in conflict (skipped)" if counts["conflict"] else ""), flush=True)

    log_dir = os.path.join(runs_dir, "sweep_logs")
    if args.slurm:
        if not todo:
            return 0
        base = args.slurm_script or os.path.join(runs_dir, "slurm", f"{grid['name']}.sbatch")
        chunks = [todo[i:i + args.slurm_max_array] for i in range(0, len(todo), args.slurm_max_array)]
        for part, chunk in enumerate(chunks):
            path = base if len(chunks) == 1 else f"{os.path.splitext(base)[0]}_part{part}.sbatch"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.makedirs(log_dir, exist_ok=True)
            text = slurm_script(chunk, args, grid["name"], log_dir)
            with open(path, "w") as f:
                f.write(text)
            if args.dry_run:
                print(f"# {path} (not submitted: --dry-run)\n{text}")
            else:
                try:
                    result = subprocess.run(["sbatch", path], capture_output=True, text=True)
                except FileNotFoundError:
                    utils.fail(f"--slurm: sbatch is not on PATH; the script is written at {path}")
                print(result.stdout.strip() or result.stderr.strip())
                if result.returncode != 0:
                    return result.returncode
        return 0
    if args.dry_run:
        for index, run, command in todo:
            print(f"{index}: {shlex.join(command)}")
        return 0
    gpus = None if args.gpus is None else [int(g) for g in args.gpus.split(",") if g.strip()]  # checked above
    slots = gpu_slots(gpus, args.jobs_per_gpu, args.jobs)
    statuses = run_local(todo, slots, log_dir)
    failed = [index for index, status in statuses.items() if status != 0]
    print(f"{len(statuses) - len(failed)} runs done, {len(failed)} failed"
          + (f": {failed} (logs in {log_dir})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
