"""benchmark/sweep.py: the ready-made grids, deterministic experiment names, the local queue
(skip finished, resume unfinished, GPU slots) with a stand-in script that keeps the run-folder
contract, and the Slurm job array (--slurm --dry-run, checked with bash -n and by content)."""
import collections
import contextlib
import glob
import io
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import sweep  # noqa: E402
import utils  # noqa: E402
from grids import GRIDS  # noqa: E402

# A stand-in for a cleanrl_pool script: the same run folder, checkpoints, --resume auto and
# final.pt, ten steps per checkpoint; it crashes after its first checkpoint when
# FAKE_CRASH_SEED names its seed, as a killed run would.
FAKE_SCRIPT = f'''
import json, os, sys
from dataclasses import dataclass
sys.path.insert(0, {os.path.join(REPO, "cleanrl_pool")!r})
import torch, tyro, utils

@dataclass
class Args:
    env_id: str = "Pong"
    seed: int = 1
    exp_name: str = "fake"
    runs_dir: str = "runs"
    resume: str = ""
    track: bool = False
    pool: str = "flatten"
    width: int = 1
    total_timesteps: int = 30

args = tyro.cli(Args)
run_dir, checkpoint = utils.resolve_run(args)
start = 0 if checkpoint is None else torch.load(checkpoint, weights_only=True)["global_step"]
writer = utils.start_run(args, run_dir)
with open(os.path.join(run_dir, "started_at.txt"), "a") as f:
    f.write(f"{{start}}\\n")
with open(os.path.join(run_dir, "env.json"), "w") as f:
    json.dump({{k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}}, f)
for step in range(start + 10, args.total_timesteps + 1, 10):
    utils.save_checkpoint(utils.checkpoint_path(run_dir, step), {{"global_step": step}})
    if os.environ.get("FAKE_CRASH_SEED") == str(args.seed):
        sys.exit(1)
writer.add_scalar("eval/return", 1.0, args.total_timesteps)
writer.close()
utils.save_checkpoint(os.path.join(run_dir, "final.pt"), {{"global_step": args.total_timesteps}})
'''


def write_fake_grid(tmp_path, vary):
    script = tmp_path / "fake_script.py"
    script.write_text(FAKE_SCRIPT)
    grid = tmp_path / "fake_grid.json"
    grid.write_text(json.dumps({"script": str(script), "fixed": {"total-timesteps": 30}, "vary": vary}))
    return str(grid)


def run_sweep(capsys, *flags):
    """sweep.main in this process (the runs it starts are subprocesses): (exit status, stdout, stderr)."""
    try:
        status = sweep.main(list(flags))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def run_folders(runs_dir):
    return sorted(glob.glob(os.path.join(runs_dir, "*__*__*__*")))


# Ready-made grids
def test_procgen_hd_grid_is_16_games_5_seeds_2_pools_5_resolutions_3_widths():
    runs = sweep.expand_grid(GRIDS["procgen_hd"])
    assert len(runs) == 16 * 5 * 2 * 5 * 3
    assert {r["flags"]["resolution"] for r in runs} == {48, 64, 80, 96, 112}
    assert {r["flags"]["width"] for r in runs} == {2, 3, 4}
    assert {r["flags"]["env-id"] for r in runs} == set(utils.PROCGEN_SCORE_RANGES)


def test_procgen_hd_grid_gives_every_run_its_own_folder():
    runs = sweep.expand_grid(GRIDS["procgen_hd"])
    assert len({(r["flags"]["env-id"], r["exp_name"], r["flags"]["seed"]) for r in runs}) == len(runs)


def test_impoola_width_grid_is_impala_widths_1_to_3_and_impoola_1_to_4():
    runs = sweep.expand_grid(GRIDS["impoola_width"])
    per_pool = collections.Counter((r["flags"]["pool"], r["flags"]["width"]) for r in runs)
    assert per_pool == {(pool, width): 16 * 5 for pool, width in
                        [("flatten", 1), ("flatten", 2), ("flatten", 3), ("avg", 1), ("avg", 2), ("avg", 3), ("avg", 4)]}


def test_gap_atari_grid_is_the_papers_20_games():
    games = {r["flags"]["env-id"] for r in sweep.expand_grid(GRIDS["gap_atari"])}
    assert games == {"Asterix", "SpaceInvaders", "Breakout", "Pong", "Qbert", "DemonAttack", "Seaquest", "WizardOfWor",
                     "RoadRunner", "BeamRider", "Frostbite", "CrazyClimber", "Assault", "Krull", "Boxing", "Jamesbond",
                     "Kangaroo", "UpNDown", "Gopher", "Hero"}  # REFERENCE §7


def test_gap_atari_games_all_have_human_normalisation_scores():
    games = {r["flags"]["env-id"] for r in sweep.expand_grid(GRIDS["gap_atari"])}
    assert games <= set(utils.ATARI_RANDOM_HUMAN)


def test_gap_atari_grid_is_games_by_seeds_by_pool_by_dense_scale():
    runs = sweep.expand_grid(GRIDS["gap_atari"])
    assert len(runs) == 20 * 5 * 2 * 4 and {r["flags"]["dense-scale"] for r in runs} == {1, 2, 4, 8}


GAP_COMPARISON_METHODS = [  # (pool, sparsity-method, weight-decay, layer-norm, encoder-blocks, dense-layers)
    ("flatten", None, None, None, None, None), ("avg", None, None, None, None, None),
    ("softmoe", None, None, None, None, None), ("tokens", None, None, None, None, None),
    ("flatten", "prune", None, None, None, None), ("flatten", "static", None, None, None, None),
    ("flatten", "rigl", None, None, None, None), ("flatten", None, 1e-5, None, None, None),
    ("flatten", None, None, True, None, None),
    ("flatten", None, None, None, 4, None), ("avg", None, None, None, 4, None),
    ("flatten", None, None, None, None, 2), ("avg", None, None, None, None, 2),
]


def method_of(run):
    flags = run["flags"]
    return tuple(flags.get(flag) for flag in ("pool", "sparsity-method", "weight-decay", "layer-norm", "encoder-blocks",
                                              "dense-layers"))


def test_gap_comparison_grid_is_the_20_games_by_5_seeds_by_the_13_methods_at_dense_scale_4():
    runs = sweep.expand_grid(GRIDS["gap_comparison"])
    assert len(runs) == 20 * 5 * 13
    assert collections.Counter(method_of(run) for run in runs) == {method: 100 for method in GAP_COMPARISON_METHODS}
    assert {run["flags"]["env-id"] for run in runs} == set(GRIDS["gap_atari"]["vary"]["env-id"])  # the paper's 20
    assert all((r["flags"]["preset"], r["flags"]["encoder"], r["flags"]["dense-scale"], r["flags"]["total-timesteps"])
               == ("rainbow", "impala", 4, 50_000_000) for r in runs)


def test_gap_comparison_reuses_gap_ataris_flatten_and_gap_runs_at_dense_scale_4():
    runs = {sweep.run_name(run): run for run in sweep.expand_grid(GRIDS["gap_comparison"])}
    gap_atari = {sweep.run_name(run): run for run in sweep.expand_grid(GRIDS["gap_atari"]) if run["flags"]["dense-scale"] == 4}
    assert set(gap_atari) <= set(runs)  # the same folders: a finished gap_atari run is skipped, not run twice
    assert all(runs[name]["flags"] == gap_atari[name]["flags"] for name in gap_atari)


def test_gap_comparison_names_each_method_in_its_experiment_name():
    names = {run["exp_name"] for run in sweep.expand_grid(GRIDS["gap_comparison"], only={"env-id": ["Pong"], "seed": [1]})}
    assert "rainbow_atari_gap-pool_flatten-dense_scale_4-sparsity_method_rigl" in names
    assert "rainbow_atari_gap-pool_flatten-dense_scale_4-weight_decay_1e-05" in names
    assert "rainbow_atari_gap-pool_avg-dense_scale_4-encoder_blocks_4" in names and len(names) == 13


def test_gap_comparison_dry_run_lists_every_run(tmp_path, capsys, monkeypatch):
    """The listing itself, whether or not the script has the flags yet (the flag check is the next test's)."""
    monkeypatch.setattr(sweep, "check_flags", lambda *args: None)
    status, out, err = run_sweep(capsys, "--grid", "gap_comparison", "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0] == "grid gap_comparison: 1300 runs; 0 finished (skipped), 0 to resume, 1300 new" and len(lines) == 1301
    assert any(" --pool flatten --dense-scale 4 --sparsity-method rigl --exp-name " in line for line in lines)
    assert any(" --pool flatten --dense-scale 4 --layer-norm --exp-name " in line for line in lines)
    assert any(" --pool avg --dense-scale 4 --dense-layers 2 --exp-name " in line for line in lines)


def test_gap_comparison_dry_run_passes_the_flag_check_of_rainbow_atari_gap(tmp_path, capsys):
    status, out, err = run_sweep(capsys, "--grid", "gap_comparison", "--dry-run", "--runs-dir", str(tmp_path / "runs"))
    assert status == 0, err
    assert len(out.splitlines()) == 1301


# Experiment names
def test_exp_name_encodes_varied_flags_but_not_filters():
    grid = GRIDS["procgen_hd"]
    all_names = {r["exp_name"] for r in sweep.expand_grid(grid)}
    filtered = sweep.expand_grid(grid, only={"env-id": ["bigfish"], "pool": ["avg"], "resolution": [96], "width": [3]})
    assert {r["exp_name"] for r in filtered} == {"ppo_procgen_impoola-pool_avg-resolution_96-width_3"} <= all_names
    assert len(filtered) == 5  # the five seeds


def test_exp_name_encodes_set_overrides_and_the_run_gets_them():
    tiny = sweep.expand_grid(GRIDS["procgen_hd"], only={"pool": ["avg"], "resolution": [96], "width": [3]},
                             overrides={"total-timesteps": [64]})
    assert tiny[0]["exp_name"] == "ppo_procgen_impoola-pool_avg-resolution_96-width_3-total_timesteps_64"
    assert tiny[0]["flags"]["total-timesteps"] == 64


def test_command_passes_every_flag_exp_name_runs_dir_and_resume_auto():
    run = {"flags": {"env-id": "Pong", "seed": 2, "pool": "avg", "noisy": True, "dueling": False},
           "exp_name": "x-pool_avg"}
    command = sweep.command_of(run, "/s.py", "/runs", "python")
    assert command == ["python", "/s.py", "--env-id", "Pong", "--seed", "2", "--pool", "avg", "--noisy", "--no-dueling",
                       "--exp-name", "x-pool_avg", "--runs-dir", "/runs", "--resume", "auto"]


def test_gpu_slots_are_each_gpu_jobs_per_gpu_times():
    assert sweep.gpu_slots([0, 1], 2, 5) == [0, 0, 1, 1]


def test_gpu_slots_without_a_gpu_are_the_cpu_jobs():
    assert sweep.gpu_slots([], 2, 3) == [None, None, None]


# Local queue, end to end with the stand-in script
def sweep_quietly(*flags):
    """sweep.main in this process with its stdout and stderr captured (for a module fixture, where
    capsys cannot go): (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = sweep.main(list(flags))
        except SystemExit as exit_:
            status = exit_.code
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def crash_then_rerun(tmp_path_factory):
    """One grid swept three times: seed 2 crashing after its first checkpoint, then again without the
    crash (seed 1 finished, seed 2 to resume), then once more (both finished). Each sweep's answer,
    and the run folders as each sweep left them."""
    tmp_path = tmp_path_factory.mktemp("crash_then_rerun")
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1, 2], "pool": ["avg"]})
    runs_dir = str(tmp_path / "runs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("FAKE_CRASH_SEED", "2")
        crashed = sweep_quietly("--grid", grid, "--runs-dir", runs_dir, "--jobs", "2")
    after_crash = run_folders(runs_dir)
    finished_after_crash = [os.path.isfile(os.path.join(f, "final.pt")) for f in after_crash]
    resumed = sweep_quietly("--grid", grid, "--runs-dir", runs_dir, "--jobs", "2")
    after_resume = run_folders(runs_dir)
    return {
        "crashed": crashed, "after_crash": after_crash, "finished_after_crash": finished_after_crash,
        "resumed": resumed, "after_resume": after_resume,
        "finished_after_resume": [os.path.isfile(os.path.join(f, "final.pt")) for f in after_resume],
        "started_at": [open(os.path.join(f, "started_at.txt")).read().split() for f in after_resume],
        "seed_2_log": open(glob.glob(os.path.join(runs_dir, "sweep_logs", "Pong__*__2.log"))[0]).read(),
        "again": sweep_quietly("--grid", grid, "--runs-dir", runs_dir),
    }


def test_a_crashed_run_fails_the_sweep_and_keeps_its_folder(crash_then_rerun):
    status, out, err = crash_then_rerun["crashed"]
    assert status == 1 and "1 runs done, 1 failed" in out, out + err
    assert crash_then_rerun["finished_after_crash"] == [True, False]  # seed 1 finished, seed 2 crashed
    assert [os.path.basename(f).split("__")[:3] for f in crash_then_rerun["after_crash"]] == [
        ["Pong", "fake_script-pool_avg", "1"], ["Pong", "fake_script-pool_avg", "2"]]


def test_rerun_resumes_the_crashed_run_in_its_folder_from_its_checkpoint(crash_then_rerun):
    status, out, err = crash_then_rerun["resumed"]
    assert status == 0 and "2 runs; 1 finished (skipped), 1 to resume, 0 new" in out, out + err
    assert crash_then_rerun["after_resume"] == crash_then_rerun["after_crash"]  # resumed in the same folder
    assert all(crash_then_rerun["finished_after_resume"])
    assert crash_then_rerun["started_at"][1] == ["0", "10"]  # continued from step 10
    assert "--resume auto" in crash_then_rerun["seed_2_log"]


def test_rerun_skips_a_finished_run_without_starting_it(crash_then_rerun):
    assert crash_then_rerun["started_at"][0] == ["0"]  # not run again by the second sweep
    status, out, err = crash_then_rerun["again"]
    assert status == 0 and "2 runs; 2 finished (skipped), 0 to resume, 0 new" in out and "0 runs done" in out


def test_local_sweep_gives_each_gpu_slot_its_device(tmp_path, capsys):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1, 2]})
    runs_dir = str(tmp_path / "runs")
    status, out, err = run_sweep(capsys, "--grid", grid, "--runs-dir", runs_dir, "--gpus", "0,1")
    assert status == 0, out + err
    devices = [json.load(open(os.path.join(f, "env.json")))["CUDA_VISIBLE_DEVICES"] for f in run_folders(runs_dir)]
    assert sorted(devices) == ["0", "1"] and "on GPU 1" in out


def write_run_folder(tmp_path, config, checkpoint=False, final=False):
    """A run folder Pong__fake__1__123 with this config.json, a checkpoint and/or final.pt."""
    folder = tmp_path / "Pong__fake__1__123"
    (folder / "checkpoints").mkdir(parents=True)
    if checkpoint:
        (folder / "checkpoints" / "step_000000000010.pt").write_bytes(b"")
    if final:
        (folder / "final.pt").write_bytes(b"")
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


FINISHED_RUN = {"flags": {"env-id": "Pong", "seed": 1, "total-timesteps": 30}, "exp_name": "fake"}
UNFINISHED_RUN = {"flags": {"env-id": "Pong", "seed": 1, "learning-rate": 1e-4}, "exp_name": "fake"}


def test_finished_folder_with_other_flags_is_a_conflict_not_a_skip(tmp_path):
    folder = write_run_folder(tmp_path, {"env_id": "Pong", "seed": 1, "total_timesteps": 1000}, final=True)
    status, found, message = sweep.run_status(FINISHED_RUN, str(tmp_path))
    assert status == "conflict" and found == folder and "total-timesteps=1000" in message


def test_finished_folder_with_the_same_flags_is_skipped(tmp_path):
    write_run_folder(tmp_path, {"env_id": "Pong", "seed": 1, "total_timesteps": 30}, final=True)
    assert sweep.run_status(FINISHED_RUN, str(tmp_path))[0] == "finished"


def test_folder_of_seed_1_is_not_taken_for_seed_11(tmp_path):
    write_run_folder(tmp_path, {"env_id": "Pong", "seed": 1, "total_timesteps": 30}, final=True)
    seed_11 = dict(FINISHED_RUN, flags=dict(FINISHED_RUN["flags"], seed=11))
    assert sweep.run_status(seed_11, str(tmp_path))[0] == "new"  # seed 1 is not seed 11


def test_unfinished_folder_with_other_flags_is_a_conflict_not_a_resume(tmp_path):
    folder = write_run_folder(tmp_path, {"env_id": "Pong", "seed": 1, "learning_rate": 3e-4}, checkpoint=True)
    status, found, message = sweep.run_status(UNFINISHED_RUN, str(tmp_path))
    assert status == "conflict" and found == folder and "learning-rate=0.0003" in message


def test_unfinished_folder_with_the_same_flags_is_resumed(tmp_path):
    folder = write_run_folder(tmp_path, {"env_id": "Pong", "seed": 1, "learning_rate": 1e-4}, checkpoint=True)
    assert sweep.run_status(UNFINISHED_RUN, str(tmp_path))[:2] == ("unfinished", folder)


# Slurm job array
@pytest.fixture
def slurm_dry_run(tmp_path, capsys, monkeypatch):
    """--slurm --dry-run of 8 runs, one of them finished, with no sbatch on PATH: (exit status, stdout,
    stderr, the script's path, its text, the runs folder)."""
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong", "Breakout"], "seed": [1, 2], "pool": ["flatten", "avg"]})
    runs_dir = tmp_path / "runs"
    finished = runs_dir / "Pong__fake_script-pool_avg__2__100"
    finished.mkdir(parents=True)
    (finished / "final.pt").write_bytes(b"")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere: --dry-run must not call it
    status, out, err = run_sweep(capsys, "--grid", grid, "--runs-dir", str(runs_dir), "--slurm", "--dry-run",
                                 "--slurm-max-parallel", "3", "--slurm-time", "2:00:00", "--slurm-partition", "gpu",
                                 "--sbatch-line", "account=abc")
    monkeypatch.undo()
    path = runs_dir / "slurm" / "fake_grid.sbatch"
    return status, out, err, path, path.read_text() if path.is_file() else "", runs_dir


def test_slurm_dry_run_writes_a_valid_script_and_prints_it_without_submitting(slurm_dry_run):
    status, out, err, path, text, _ = slurm_dry_run
    assert status == 0, err
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "not submitted: --dry-run" in out and text in out


def test_slurm_script_has_the_array_and_the_sbatch_options_asked_for(slurm_dry_run):
    _, _, _, _, text, runs_dir = slurm_dry_run
    for line in ["#SBATCH --array=0-6%3", "#SBATCH --gres=gpu:1", "#SBATCH --time=2:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=abc", f"#SBATCH --output={runs_dir}/sweep_logs/%x_%A_%a.out",
                 'case "$SLURM_ARRAY_TASK_ID" in',
                 'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"  # torch takes every core of the node otherwise']:
        assert line in text.splitlines()


def test_slurm_script_has_one_resuming_task_per_run_not_finished(slurm_dry_run):
    _, _, _, _, text, runs_dir = slurm_dry_run
    tasks = [line for line in text.splitlines() if line.startswith("  ") and ") exec " in line]
    assert [t.split(")")[0].strip() for t in tasks] == [str(i) for i in range(7)]  # 8 runs, 1 finished
    assert all("--resume auto" in t and f"--runs-dir {runs_dir}" in t for t in tasks)
    assert not any("--env-id Pong --seed 2 --pool avg" in t for t in tasks)


def test_slurm_array_is_split_at_the_maximum_array_size(tmp_path, capsys):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1, 2, 3, 4, 5]})
    script = tmp_path / "arr.sbatch"
    status, out, err = run_sweep(capsys, "--grid", grid, "--runs-dir", str(tmp_path / "runs"), "--slurm", "--dry-run",
                                 "--slurm-max-array", "2", "--slurm-script", str(script))
    assert status == 0, err
    parts = sorted(glob.glob(str(tmp_path / "arr_part*.sbatch")))
    assert [os.path.basename(p) for p in parts] == ["arr_part0.sbatch", "arr_part1.sbatch", "arr_part2.sbatch"]
    assert "#SBATCH --array=0-0%64" in open(parts[2]).read() and "--seed 5" in open(parts[2]).read()


def test_unknown_grid_is_refused_with_one_line(capsys):
    status, out, err = run_sweep(capsys, "--grid", "procgen_hdd", "--dry-run")
    assert status == 2 and err.count("\n") == 1 and "procgen_hd" in err


def test_only_on_a_flag_the_grid_does_not_vary_is_refused(tmp_path, capsys):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1]})
    status, out, err = run_sweep(capsys, "--grid", grid, "--only", "width=2", "--dry-run")
    assert status == 2 and err.count("\n") == 1 and "does not vary it" in err


def test_grid_without_env_id_is_refused(tmp_path, capsys):
    grid = write_fake_grid(tmp_path, {"seed": [1]})
    status, out, err = run_sweep(capsys, "--grid", grid, "--dry-run")
    assert status == 2 and err.count("\n") == 1 and "needs an env-id" in err


def test_grid_with_a_scalar_axis_is_refused(tmp_path, capsys):
    grid = write_fake_grid(tmp_path, {"env-id": "Pong"})
    status, out, err = run_sweep(capsys, "--grid", grid, "--dry-run")
    assert status == 2 and err.count("\n") == 1 and "must be a non-empty list" in err


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_every_ready_made_grid_point_parses_with_its_script(grid_name, monkeypatch):
    """Every flag a ready-made grid passes (fixed, varied and the sweep's own) is one its script
    accepts, with the grid's value: a renamed flag would otherwise fail only on the cluster."""
    import importlib

    grid = sweep.load_grid(grid_name)
    script = grid["script"].removesuffix(".py")
    monkeypatch.syspath_prepend(os.path.join(REPO, "cleanrl_pool"))
    module = importlib.import_module(script)
    runs = sweep.expand_grid(grid)
    for run in (runs[0], runs[-1]):
        flags = sweep.command_of(run, sweep.script_path(grid), "runs", sys.executable)[2:]
        monkeypatch.setattr(sys, "argv", [script + ".py", *flags])
        args = module.parse_args() if hasattr(module, "parse_args") else module.tyro.cli(module.Args)
        for flag, value in run["flags"].items():
            assert getattr(args, flag.replace("-", "_")) == value, flag
        assert (args.exp_name, args.resume) == (run["exp_name"], "auto")


# Bad input: one line and exit 2 before anything is launched
@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.setattr(sweep, "run_local", lambda *a, **k: pytest.fail("launched before checking the input"))
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail("submitted before checking the input"))


def assert_refused(capsys, named, *flags):
    status, out, err = run_sweep(capsys, *flags)
    assert status == 2 and err.count("\n") == 1 and named in err, err
    return err


def test_grid_flag_that_the_script_does_not_have_is_refused_before_launching(tmp_path, capsys, no_launch):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1], "poool": ["avg"]})
    err = assert_refused(capsys, "'poool' is no flag of fake_script.py (did you mean 'pool'?)", "--grid", grid,
                         "--runs-dir", str(tmp_path / "runs"), "--slurm")
    assert "total-timesteps" in err  # the script's flags, read from its Args
    assert not (tmp_path / "runs").exists()


def test_set_flag_that_the_script_does_not_have_is_refused(tmp_path, capsys, no_launch):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1]})
    assert_refused(capsys, "'learning-rate' is no flag of fake_script.py", "--grid", grid, "--set", "learning-rate=1e-4",
                   "--runs-dir", str(tmp_path / "runs"))


@pytest.mark.parametrize("assignment,named", [
    ("width=abc", "width 'abc': fake_script.py declares width: int"), ("width=1.5", "width 1.5"),
    ("total-timesteps=true", "total-timesteps True"),
    ("exp-name=x", "the sweep sets it"), ("resume=auto", "the sweep sets it"),
])
def test_set_value_the_script_cannot_take_is_refused(tmp_path, capsys, no_launch, assignment, named):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1]})
    assert_refused(capsys, named, "--grid", grid, "--set", assignment, "--runs-dir", str(tmp_path / "runs"))


def test_real_scripts_boolean_flag_takes_only_a_boolean(tmp_path, capsys, no_launch):
    assert_refused(capsys, "cuda 1: ppo_procgen_impoola.py declares cuda: bool", "--grid", "procgen_hd", "--set", "cuda=1",
                   "--runs-dir", str(tmp_path / "runs"))


@pytest.mark.parametrize("grid,named", [
    ({"script": "dqn_atari_gap.py", "vary": 5}, "'vary' must be an object"),
    ({"script": "dqn_atari_gap.py", "vary": []}, "'vary' must be an object"),
    ({"script": "dqn_atari_gap.py", "vary": [5]}, "'vary' must be an object"),
    ({"script": "dqn_atari_gap.py", "vary": {"env-id": [["Pong"]]}}, "['Pong'] is not a string, number or boolean"),
    ({"script": "dqn_atari_gap.py", "vary": {"env-id": ["Pong"], "seed": [None]}}, "None is not a string, number or boolean"),
    ({"script": "dqn_atari_gap.py", "fixed": 3, "vary": {"env-id": ["Pong"]}}, "'fixed' must be an object"),
    ({"script": 3, "vary": {"env-id": ["Pong"]}}, "'script' must be"),
    ({"script": "dqn_atari_gap.py", "fix": {"seed": 1}, "vary": {"env-id": ["Pong"]}}, "unknown key 'fix'"),
])
def test_malformed_grid_is_refused_with_one_line(tmp_path, capsys, no_launch, grid, named):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(grid))
    assert_refused(capsys, named, "--grid", str(path), "--dry-run")


@pytest.mark.parametrize("flags,named", [
    (["--only", "seed"], "must look like FLAG=VALUE"), (["--only", "=1"], "must look like FLAG=VALUE"),
    (["--only", "seed=9"], "--only seed=9: not a value of the grid; it has 1, 2"),
    (["--only", "seed=1,9"], "--only seed=9"), (["--set", "width=1,2"], "one value per flag"),
])
def test_malformed_only_or_set_is_refused_with_one_line(tmp_path, capsys, no_launch, flags, named):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1, 2]})
    assert_refused(capsys, named, "--grid", grid, "--dry-run", *flags)


@pytest.mark.parametrize("flags,named", [
    (["--gpus", "a"], "--gpus 'a'"), (["--gpus", "0,-1"], "--gpus '0,-1'"),
    (["--jobs", "a"], "--jobs"), (["--jobs", "0"], "--jobs"),
    (["--bogus"], "unrecognized arguments: --bogus"), (["--slurm-time", "1h"], "--slurm-time '1h'"),
    (["--slurm-mem", "32GB"], "--slurm-mem '32GB'"), (["--sbatch-line", "account=a\nmem=1G"], "--sbatch-line"),
    (["--slurm-partition", "gpu a100"], "--slurm-partition"), (["--python", "/no/such/python"], "--python '/no/such/python'"),
])
def test_bad_sweep_flag_is_refused_with_one_line(tmp_path, capsys, no_launch, flags, named):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1]})
    assert_refused(capsys, named, "--grid", grid, "--runs-dir", str(tmp_path / "runs"), *flags)


@pytest.mark.parametrize("runs_dir", ["file", "file/runs"], ids=["a file", "below a file"])
def test_runs_dir_that_cannot_be_a_folder_is_refused(tmp_path, capsys, no_launch, runs_dir):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1]})
    (tmp_path / "file").write_text("")
    assert_refused(capsys, "--runs-dir", "--grid", grid, "--runs-dir", str(tmp_path / runs_dir))


def test_slurm_script_that_is_a_folder_is_refused(tmp_path, capsys, no_launch):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1]})
    assert_refused(capsys, "--slurm-script", "--grid", grid, "--slurm", "--slurm-script", str(tmp_path))


def test_slurm_script_below_a_file_is_refused(tmp_path, capsys, no_launch):
    grid = write_fake_grid(tmp_path, {"env-id": ["Pong"], "seed": [1]})
    (tmp_path / "file").write_text("")
    assert_refused(capsys, "--slurm-script", "--grid", grid, "--slurm", "--dry-run", "--runs-dir", str(tmp_path / "runs"),
                   "--slurm-script", str(tmp_path / "file" / "x.sbatch"))


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_every_ready_made_grid_passes_the_flag_check_of_its_script(name):
    grid = sweep.load_grid(name)
    fields, spell_env_id = sweep.script_arguments(sweep.script_path(grid))
    sweep.check_flags(sweep.expand_grid(grid, spell_env_id=spell_env_id), fields, grid["script"])  # no SystemExit


def test_grid_flags_spelled_with_underscores_are_passed_with_dashes():
    grid = {"script": "x.py", "fixed": {"total_timesteps": 10}, "vary": {"env_id": ["Pong"], "--dense_scale": [1]}}
    (run,) = sweep.expand_grid(grid)
    assert run["flags"] == {"total-timesteps": 10, "env-id": "Pong", "dense-scale": 1} and run["exp_name"] == "x-dense_scale_1"


# Game spellings: the run folder is named after the script's own spelling
def test_env_id_spelling_is_read_from_each_scripts_source():
    spelling = {name: sweep.script_arguments(os.path.join(REPO, "cleanrl_pool", name + ".py"))[1]
                for name in ("dqn_atari_gap", "rainbow_atari_gap", "ppo_procgen_impoola", "sac_dmc_gap")}
    assert spelling["dqn_atari_gap"]("Breakout-v5") == spelling["rainbow_atari_gap"]("Breakout-v5") == "Breakout"
    assert spelling["dqn_atari_gap"]("Breakout") == "Breakout"
    assert spelling["ppo_procgen_impoola"]("bigfish") == "bigfish" and spelling["sac_dmc_gap"]("cheetah-run") == "cheetah-run"


def test_grid_spelling_a_game_with_v5_skips_the_finished_run_of_its_plain_name(tmp_path, capsys, no_launch):
    runs_dir = tmp_path / "runs"
    finished = runs_dir / "Breakout__dqn_atari_gap__1__100"  # what dqn_atari_gap.py --env-id Breakout-v5 writes
    finished.mkdir(parents=True)
    (finished / "final.pt").write_bytes(b"")
    (finished / "config.json").write_text(json.dumps({"env_id": "Breakout", "seed": 1, "total_timesteps": 1000}))
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"script": "dqn_atari_gap.py", "fixed": {"total-timesteps": 1000},
                                "vary": {"env-id": ["Breakout-v5", "Pong-v5"], "seed": [1]}}))
    status, out, err = run_sweep(capsys, "--grid", str(grid), "--runs-dir", str(runs_dir), "--dry-run")
    assert status == 0 and "2 runs; 1 finished (skipped), 0 to resume, 1 new" in out, out + err
    assert "--env-id Pong --seed 1" in out and "Breakout" not in out.split("new")[1]


def test_one_game_spelled_two_ways_is_refused_as_the_same_run(tmp_path, capsys, no_launch):
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"script": "dqn_atari_gap.py", "vary": {"env-id": ["Breakout", "Breakout-v5"]}}))
    assert_refused(capsys, "are the same run (Breakout__dqn_atari_gap__1)", "--grid", str(grid), "--dry-run")


def test_only_accepts_the_scripts_other_spelling_of_a_game(capsys):
    status, out, err = run_sweep(capsys, "--grid", "gap_atari", "--only", "env-id=Breakout-v5", "--only", "seed=1",
                                 "--only", "pool=avg", "--only", "dense-scale=1", "--dry-run")
    assert status == 0 and "1 runs;" in out and "--env-id Breakout --seed 1" in out, err


def test_script_that_is_not_python_is_refused_with_one_line(tmp_path, capsys, no_launch):
    script = tmp_path / "broken.py"
    script.write_text("def f(:\n")
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"script": str(script), "vary": {"env-id": ["Pong"]}}))
    assert_refused(capsys, "cannot be read as Python", "--grid", str(grid), "--dry-run")
