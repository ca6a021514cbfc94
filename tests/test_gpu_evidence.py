"""benchmark/gpu_evidence.py and benchmark/gpu_carry.py: the budget arithmetic, the CPU shares, every flag the
GPU and smoke sizes pass (parsed and checked by each script), the bundle's unpacking and size check, the table
from real event files, bad input; and, marked slow, the whole --smoke pipeline for real."""
import glob
import importlib
import json
import os
import subprocess
import sys
import tarfile
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import gpu_carry  # noqa: E402
import gpu_evidence  # noqa: E402


# CPU shares and budgets
def test_sixteen_cores_split_five_five_three_three_disjoint():
    shares = gpu_evidence.split_cores(range(16), [5, 5, 3, 3])
    assert [len(share) for share in shares] == [5, 5, 3, 3]
    assert sorted(core for share in shares for core in share) == list(range(16))


def test_fewer_cores_than_runs_share_all_and_four_cores_give_one_each():
    assert gpu_evidence.split_cores([0, 1], [5, 5, 3, 3]) == [[0, 1]] * 4
    assert gpu_evidence.split_cores([3, 1, 2, 0], [5, 5, 3, 3]) == [[0], [1], [2], [3]]


def test_training_rate_is_steps_over_wall_time_after_learning_starts_without_the_first_interval():
    points = [(100, 0.0, 9e9), (200, 10.0, 9e9), (300, 11.0, 9e9), (500, 13.0, 9e9)]  # (step, wall time, SPS)
    assert gpu_evidence.training_rate(points, learning_starts=100) == pytest.approx((500 - 300) / (13.0 - 11.0))
    assert gpu_evidence.training_rate(points[:1], learning_starts=0) == 9e9  # one point: its logged SPS
    assert gpu_evidence.training_rate([], learning_starts=0) is None


def test_plan_steps_fits_the_time_left_rounded_down_and_clamped():
    spec = {"unit": 1000, "floor": 40000, "cap": 500000, "eval_reserve_s": 30}
    # 0.9 x 1000 steps/s x (400 - 1.25 x 20 - 30 - 10) s = 301,500 -> 301,000
    assert gpu_evidence.plan_steps(1000.0, 20.0, 400.0, spec) == 301000
    assert gpu_evidence.plan_steps(1e6, 20.0, 400.0, spec) == 500000
    assert gpu_evidence.plan_steps(1.0, 20.0, 400.0, spec) == 40000
    assert gpu_evidence.plan_steps(None, 20.0, 400.0, spec) == 40000


def test_eval_interval_gives_the_number_of_evaluations_in_units():
    spec = {"unit": 16384, "evals": 4}
    assert gpu_evidence.eval_interval(2_000_000, spec) == 31 * 16384
    assert gpu_evidence.eval_interval(16384, spec) == 16384


# Every flag of every size and phase, parsed and checked by its own script
def phase_flags(size, kind):
    calibration = gpu_evidence.SIZES[size][kind]["calibration"]
    real = ("runs", gpu_evidence.SIZES[size][kind]["floor"], {"--eval-every": 1000})
    return [("calibration", calibration[0], calibration[1]), real]


@pytest.mark.parametrize("size", sorted(gpu_evidence.SIZES))
@pytest.mark.parametrize("name", [run[0] for run in gpu_evidence.RUNS])
def test_every_flag_parses_with_its_script_and_passes_its_checks(size, name, monkeypatch, tmp_path):
    """A renamed flag or a value a script refuses would otherwise show only on the lent GPU."""
    kind = gpu_evidence.RUNS_BY_NAME[name][1]
    monkeypatch.syspath_prepend(os.path.join(REPO, "cleanrl_pool"))
    module = importlib.import_module(gpu_evidence.SCRIPTS[kind][:-3])
    args = types.SimpleNamespace(size=size, out=str(tmp_path))
    for phase, total, extra in phase_flags(size, kind):
        flags = gpu_evidence.run_flags(args, name, kind, total, phase, extra, threads=3)
        monkeypatch.setattr(sys, "argv", gpu_evidence.run_command(args, name, kind, total, phase, extra, threads=3)[1:])
        parsed = module.parse_args() if hasattr(module, "parse_args") else module.tyro.cli(module.Args)
        for flag, value in flags.items():
            field, expected = (flag[5:], False) if flag.startswith("--no-") else (flag[2:], True if value is None else value)
            assert getattr(parsed, field.replace("-", "_")) == expected, flag
        assert parsed.total_timesteps == total and parsed.pool == gpu_evidence.RUNS_BY_NAME[name][3]["--pool"]
        if hasattr(module, "check_args"):
            module.check_args(parsed)


def test_ppo_pair_differs_only_in_pool_and_name(tmp_path):
    args = types.SimpleNamespace(size="gpu", out=str(tmp_path))
    flatten, avg = (gpu_evidence.run_command(args, name, "ppo", 16384, "runs", {}, 5) for name in ("ppo_flatten", "ppo_avg"))
    differing = {(a, b) for a, b in zip(flatten, avg) if a != b}
    assert differing == {("flatten", "avg"), ("ppo_evidence-flatten", "ppo_evidence-avg"),
                         (os.path.join(str(tmp_path), "runs", "ppo_flatten"), os.path.join(str(tmp_path), "runs", "ppo_avg"))}


# The bundle: unpacking, and the builder's trim, library list and size check
def make_bundle(path, libraries):
    stage = os.path.dirname(path)
    for folder in ("site", "lib", "debs"):
        os.makedirs(os.path.join(stage, "stage", folder), exist_ok=True)
    for name in libraries:
        open(os.path.join(stage, "stage", "lib", name), "w").close()
    with tarfile.open(path, "w:xz") as archive:
        for folder in ("site", "lib", "debs"):
            archive.add(os.path.join(stage, "stage", folder), arcname=folder)


def test_unpack_puts_only_the_missing_libraries_on_the_path(tmp_path, monkeypatch):
    bundle = str(tmp_path / "bundle.tar.xz")
    make_bundle(bundle, ["libQt5Core.so.5", "libz.so.1"])
    monkeypatch.setattr(gpu_evidence, "system_sonames", lambda: {"libz.so.1", *gpu_evidence.GL_SONAMES})
    monkeypatch.setenv("LD_LIBRARY_PATH", "/existing")
    env = gpu_evidence.unpack_bundle(bundle, str(tmp_path / "prefix"))
    missing = tmp_path / "prefix" / "lib-missing"
    assert os.listdir(missing) == ["libQt5Core.so.5"]
    assert env["LD_LIBRARY_PATH"] == f"{missing}{os.pathsep}/existing"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "prefix" / "site")


def test_envpool_trim_keeps_atari_and_dmc_and_stubs_the_other_families():
    assert gpu_carry.envpool_keeps("envpool/atari/atari_envpool.so")
    assert gpu_carry.envpool_keeps("envpool/mujoco/mujoco_dmc_envpool.so")
    assert gpu_carry.envpool_keeps("envpool/python/protocol.py")
    assert gpu_carry.envpool_keeps("envpool.libs/libEGL-48f73270.so.1.1.0")
    assert not gpu_carry.envpool_keeps("envpool/procgen/procgen_envpool.so")
    assert not gpu_carry.envpool_keeps("envpool/mujoco/mujoco_gym_envpool.so")
    assert gpu_carry.envpool_stubbed("envpool/vizdoom/registration.py")
    assert gpu_carry.envpool_stubbed("envpool/box2d/__init__.py")
    assert not gpu_carry.envpool_stubbed("envpool/atari/__init__.py") and not gpu_carry.envpool_stubbed("envpool/__init__.py")
    assert gpu_carry.assets_keeps("envpool_assets/mujoco/assets_dmc/cartpole.xml")
    assert not gpu_carry.assets_keeps("envpool_assets/mujoco/assets_dmc/dog_assets/skin.skn")
    assert not gpu_carry.assets_keeps("envpool_assets/procgen/assets/kenney/a.png")


def test_carried_libraries_of_libenv_are_qt_without_the_c_runtime_or_libglvnd():
    import procgen_hd

    names = [name for name, _ in gpu_carry.carried_libraries(os.path.join(procgen_hd.PACKAGE_DIR, "libenv.so"))]
    assert "libQt5Core.so.5" in names and "libQt5Gui.so.5" in names and "libicudata.so.72" in names
    assert not [name for name in names if name.startswith(("libc.so", "libstdc++", "libGL.so", "libGLX", "libGLdispatch"))]


def test_bundle_over_the_travel_limit_fails_loudly(capsys):
    assert gpu_carry.check_size(40 * 2**20, 2**20) == pytest.approx(41.0)
    with pytest.raises(SystemExit) as exit_info:
        gpu_carry.check_size(63 * 2**20, 2 * 2**20)
    assert exit_info.value.code == 1 and "over the 64 MiB" in capsys.readouterr().err


def test_summary_lines_group_files_by_package():
    lines = gpu_carry.summary_lines({"site": {"tyro/a.py": 2**20, "tyro/b.py": 2**20}, "lib": {"libz.so.1": 2**19}})
    assert any("tyro" in line and "2 files" in line and "2.00 MiB" in line for line in lines)
    assert any(line.split()[0] == "lib" and "0.50 MiB" in line for line in lines)


# The table, from real event files
def write_run(run_dir, returns, evals, sps):
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"env_id": "Breakout", "resolution": 84}, f)
    writer = SummaryWriter(run_dir)
    for step, value in returns:
        writer.add_scalar("charts/episodic_return", value, step)
    for step, value in evals:
        writer.add_scalar("eval/return", value, step)
    writer.add_scalar("charts/SPS", sps, returns[-1][0])
    writer.close()
    open(os.path.join(run_dir, "final.pt"), "w").close()


def test_table_row_reads_steps_first_and_last_returns_eval_and_sps_from_events(tmp_path):
    run_dir = str(tmp_path / "Breakout__dqn__1__1")
    write_run(run_dir, [(1000 * i, float(i)) for i in range(1, 21)], [(10000, 3.0), (20000, 7.5)], 1234.0)
    job = {"process": types.SimpleNamespace(returncode=0), "timed_out": False, "seconds": 12.0}
    row = gpu_evidence.summarize_run("dqn_avg", "dqn", run_dir, 20000, job)
    # 20 episodes -> windows of 4: first 1..4 (mean 2.5), last 17..20 (mean 18.5)
    assert (row["steps"], row["first_return"], row["last_return"], row["eval_return"]) == (20000, 2.5, 18.5, 7.5)
    assert row["sps"] == 1234.0 and row["finished"] and row["game"] == "Breakout (84x84)"
    lines = gpu_evidence.table_lines([row], {"dqn": [1.7, 10]})
    assert "| dqn_avg | Breakout (84x84) | 20,000 / 20,000 | 2.5 → 18.5 | 7.5 | 1.7 | 1234 | yes |" in lines


def test_pack_leaves_checkpoints_out(tmp_path):
    out, packed = tmp_path / "out", tmp_path / "packed"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "final.pt").write_text("x")
    (out / "table.md").write_text("| table |")
    written = gpu_evidence.pack(str(out), str(packed), [str(out / "table.md")])
    with tarfile.open(written[0]) as archive:
        names = archive.getnames()
    assert "out/table.md" in names and not [name for name in names if name.endswith(".pt")]
    assert (packed / "table.md").read_text() == "| table |"


# Bad input: one line on stderr, exit 2
@pytest.mark.parametrize("flags, named", [
    (["--minutes", "1"], "--minutes"), (["--minutes", "nan"], "--minutes"),
    (["--bundle", "/no/such/bundle.tar.xz"], "--bundle"),
])
def test_bad_input_is_refused_with_one_line(flags, named, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "gpu_evidence.py"), "--smoke",
                             "--out", str(tmp_path / "out"), *flags], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and named in result.stderr, result.stderr


def test_a_pack_target_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "gpu_evidence.py"), "--smoke",
                             "--out", str(tmp_path / "out"), "--pack", str(tmp_path / "file")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--pack" in result.stderr, result.stderr


def test_an_out_folder_it_did_not_make_is_refused_and_left_alone(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "gpu_evidence.py"), "--smoke",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--out" in result.stderr and (tmp_path / "mine.txt").read_text() == "keep"


def test_check_plays_every_game_with_a_random_policy_and_stops(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "gpu_evidence.py"), "--smoke", "--check",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OUT=""))
    assert result.returncode == 0 and result.stdout.rstrip().endswith("ok"), result.stdout[-2000:] + result.stderr[-2000:]
    assert set(json.loads((tmp_path / "out" / "random_policy.json").read_text())) == {"ppo", "dqn", "sac"}
    assert not os.listdir(tmp_path / "out" / "runs")


# The whole pipeline, tiny, for real (about 75 s on 2 cores)
@pytest.mark.slow
def test_smoke_pipeline_writes_table_png_runs_and_pack(tmp_path):
    out, packed = tmp_path / "out", tmp_path / "packed"
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "gpu_evidence.py"), "--smoke", "--out", str(out),
                             "--pack", str(packed)], capture_output=True, text=True, timeout=400, env=dict(os.environ, OUT=""))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())
    assert [row["run"] for row in table["rows"]] == ["ppo_flatten", "ppo_avg", "dqn_avg", "sac_avg"]
    for row in table["rows"]:
        assert row["finished"] and row["steps"] == row["planned_steps"] and row["eval_return"] is not None, row
        assert os.path.isfile(os.path.join(row["run_dir"], "final.pt"))
    assert set(table["random_policy"]) == {"ppo", "dqn", "sac"}
    assert table["rows"][0]["steps"] == table["rows"][1]["steps"]  # the PPO pair: the same number of steps
    assert result.stdout.rstrip().splitlines()[-1].startswith("| sac_avg |")  # the table is printed last
    assert (out / "training_curves.png").stat().st_size > 10_000
    assert glob.glob(str(out / "analysis" / "*learning_curves.png")) and (out / "analysis" / "summary.md").is_file()
    assert sorted(os.listdir(packed)) == ["evidence.tar.gz", "summary.md", "table.md", "training_curves.png"]
