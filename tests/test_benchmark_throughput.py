"""benchmark/throughput.py: the steady training rate read from the log lines of a warmed-up window, the raw env
rate through the script's own construction (HD rendering included), the speed switches on against off, k runs
sharing one GPU, the device budget, and the table it writes."""
import os
import re
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import throughput  # noqa: E402

# Prints log lines like the scripts' `utils.log_scalars`: (step, seconds to wait before it) from argv, then exits 0;
# with `forever` as the last argument it keeps logging 10 steps every 0.1 s after them.
FAKE_RUN = """
import itertools, sys, time
points = [tuple(map(float, item.split(":"))) for item in sys.argv[1].split(",")]
for step, wait in points:
    time.sleep(wait)
    print(f"step {int(step)}: SPS 5, td_loss 0.1", flush=True)
    print(f"step {int(step)}: episodic_return 3", flush=True)  # no SPS: not a rate point
if sys.argv[-1] == "forever":
    for step in itertools.count(int(points[-1][0]) + 10, 10):
        time.sleep(0.1)
        print(f"step {step}: learning_rate 0.1, SPS 7", flush=True)
"""


def fake_run(points: str, *extra) -> list:
    return [sys.executable, "-c", FAKE_RUN, points, *extra]


def test_rate_is_steps_over_time_between_the_first_and_last_point_after_the_warm_up():
    """Step 100 is the warm-up's end (learning-starts 100): the slow second before step 200 is left out."""
    (result,), memory = throughput.measure([fake_run("100:0,200:1.0,300:0.25,400:0.25,500:0.25,600:0.25")], False, 100,
                                           60, 60)
    assert result["rate"] == pytest.approx(400 / 1.0, rel=0.3) and result["sps"] == 5 and memory is None


def test_a_run_that_keeps_going_is_stopped_after_its_window():
    (result,), _ = throughput.measure([fake_run("0:0,10:0.1", "forever")], False, 0, 0.6, 60)
    assert result["rate"] == pytest.approx(100, rel=0.3) and result["sps"] == 7 and result["wall"] < 20


def test_a_failing_run_and_a_run_that_never_warms_up_are_errors_not_rates():
    results, _ = throughput.measure([[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                                     fake_run("0:0", "forever")], False, 1_000_000, 0.5, 2)
    assert results[0]["error"].startswith("exit 3: boom")
    assert "stopped at the 2 s limit with 0 log points after the warm-up" in results[1]["error"]


def test_runs_started_together_are_measured_over_one_window():
    """The second run warms up 1 s later: the window starts then, for the first two; the third one has ended by then
    (a tiny run): it is measured from its own warm-up's end."""
    results, _ = throughput.measure([fake_run("0:0,10:0.1", "forever"), fake_run("0:1.0,10:0.1", "forever"),
                                     fake_run("0:0,10:0.1,20:0.1,30:0.1")], False, 0, 0.6, 60)
    assert [result["rate"] == pytest.approx(100, rel=0.3) for result in results] == [True, True, True]


def test_gpu_memory_is_the_peak_of_nvidia_smis_memory_used_during_the_runs_less_the_value_before(tmp_path, monkeypatch):
    """A stand-in nvidia-smi on PATH: 1000 MiB on the first call (before the runs), 1700 then, 1200 after."""
    (tmp_path / "calls").write_text("")
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho x >> {tmp_path}/calls\nn=$(wc -l < {tmp_path}/calls)\n"
                    "if [ $n -eq 1 ]; then echo 1000; elif [ $n -le 3 ]; then echo 1700; else echo 1200; fi\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    (result,), memory = throughput.measure([fake_run("0:0,10:0.1,20:1.5")], True, 0, 60, 60)
    assert memory == 700 and result["rate"] == pytest.approx(10 / 1.5, rel=0.3)


def test_switches_are_the_scripts_bool_fields_read_from_its_source():
    fields = throughput.script_defaults("dqn_atari_gap")
    assert fields["compile"] == ("bool", False) and fields["width"] == ("int", 1)
    assert throughput.script_switches("dqn_atari_gap", fields)["compile"] is False
    assert throughput.switch_flags({"cuda_graphs": False, "compile": True}) == ["--no-cuda-graphs", "--compile"]


@pytest.mark.parametrize("resolution", [64, 96])
def test_procgen_env_rate_steps_the_scripts_own_procgen_hd_envs_in_a_child_process(resolution):
    """A child per measurement: Procgen-HD draws one size per process, so 64 and 96 cannot share one."""
    flags = {"env-id": "bigfish", "resolution": resolution, "num-envs": 2}
    rate = throughput.env_rate_in_child("ppo_procgen_impoola", flags, 0.3)
    assert rate > 100


def test_envpool_comparison_steps_and_renders():
    assert throughput.envpool_procgen_rate("bigfish", 2, 96, 0.3) > 10


def fake_measure(rates: dict, log: list):
    """measure() stubbed: each command's steps/s = 100 x the factor of each flag in `rates` it has; logs the calls."""
    def measure(commands, on_gpu, warmup_step, window, timeout, threads=0):
        log.append({"commands": commands, "timeout": timeout, "threads": threads, "warmup": warmup_step})
        results = []
        for command in commands:
            rate = 100.0
            for flag, factor in rates.items():
                rate *= factor if flag in command else 1
            results.append({"rate": rate, "sps": 90.0, "wall": 1.0})
        return results, None
    return measure


@pytest.fixture
def table(tmp_path, monkeypatch, capsys):
    """The table of PPO at 64 and 128, widths 1 and 2, both pools, with measurements stubbed: raw rate
    1000 x R / 64, EnvPool 4000, training 250 (charts/SPS 90)."""
    monkeypatch.setattr(throughput, "env_rate_in_child",
                        lambda script, flags, seconds, timeout: 1000.0 * flags["resolution"] / 64)
    monkeypatch.setattr(throughput, "envpool_procgen_rate", lambda game, num_envs, resolution, seconds: 4000.0)
    monkeypatch.setattr(throughput, "measure", fake_measure({"--runs-dir": 2.5}, []))
    out = tmp_path / "table.md"
    throughput.main(["--scripts", "ppo_procgen_impoola", "--resolutions", "64,128", "--pools", "flatten,avg",
                     "--widths", "1,2", "--out", str(out), "--note", "test", "--preset", "cpu", "--raw-num-envs", "16"])
    return out.read_text()


def test_table_has_one_row_per_configuration_with_the_ratio_to_the_raw_rate(table):
    rows = [line for line in table.splitlines() if line.startswith("| ppo_procgen_impoola |")]
    assert len(rows) == 2 * 2 * 2  # no switch rows on a CPU unless asked
    assert "| ppo_procgen_impoola | bigfish | 128 | 2 | avg | 2,000 | 250 | 0.125 | 90 | – |" in rows
    assert "| ppo_procgen_impoola | bigfish | 64 | 1 | flatten | 1,000 | 250 | 0.25 | 90 | – |" in rows


def test_table_says_the_device_date_and_conditions(table):
    assert "- date: " in table and "- device: " in table and "Conditions: test" in table and "- time: " in table


def test_table_lists_the_training_commands(table):
    assert "python cleanrl_pool/ppo_procgen_impoola.py --env-id bigfish --resolution 128" in table


def test_table_compares_procgen_hd_with_envpools_step_and_render(table):
    assert "| 128 | 2,000 | 4,000 | 0.5 |" in table  # Procgen-HD against EnvPool's step + render, 16 envs


def test_the_comparison_at_the_training_runs_number_of_envs_reuses_its_raw_rate(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(throughput, "env_rate_in_child", lambda script, flags, seconds, timeout: calls.append(flags) or 1000.0)
    monkeypatch.setattr(throughput, "envpool_procgen_rate", lambda game, num_envs, resolution, seconds: 4000.0)
    monkeypatch.setattr(throughput, "measure", fake_measure({}, []))
    out = tmp_path / "table.md"
    throughput.main(["--scripts", "ppo_procgen_impoola", "--resolutions", "64", "--out", str(out), "--preset", "cpu",
                     "--raw-num-envs", "8"])  # the cpu preset's 8 envs
    assert [flags["num-envs"] for flags in calls] == [8] and "| 64 | 1,000 | 4,000 | 0.25 |" in out.read_text()


DQN_SWITCHES = {"tf32": ("bool", True), "cuda_graphs": ("bool", True), "compile": ("bool", False)}


def use_dqn_switches(monkeypatch):
    """DQN's Args as if it declared tf32 and cuda_graphs (on by default) and compile (off), and no cudnn_benchmark or
    pinned_staging: the table does not depend on how far the other work on the scripts has got."""
    fields = dict(throughput.script_defaults("dqn_atari_gap"), **DQN_SWITCHES)
    for name in ("cudnn_benchmark", "pinned_staging"):
        fields.pop(name, None)
    monkeypatch.setattr(throughput, "script_defaults", lambda script: fields)


@pytest.fixture
def switch_table(tmp_path, monkeypatch):
    """DQN with use_dqn_switches: tf32 off halves the rate, cuda_graphs off quarters it, compile on makes it 1.5 x;
    k = 1 and 3 runs sharing the GPU."""
    use_dqn_switches(monkeypatch)
    monkeypatch.setattr(throughput, "env_rate_in_child", lambda script, flags, seconds, timeout: 1000.0)
    log = []
    monkeypatch.setattr(throughput, "measure", fake_measure({"--no-tf32": 0.5, "--no-cuda-graphs": 0.25,
                                                             "--compile": 1.5}, log))
    out = tmp_path / "table.md"
    throughput.main(["--scripts", "dqn_atari_gap", "--switches", "all", "--shared-gpu-runs", "1,3", "--out", str(out),
                     "--preset", "cpu"])
    return out.read_text(), log


def rows_of(text: str, script: str) -> dict:
    """{run label: cells} of the switch table's rows."""
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith(f"| {script} | ") and line.count("|") == 9]
    return {cells[1]: cells[2:] for cells in rows}


def test_switch_rows_are_defaults_plain_and_each_switch_flipped_with_both_ratios(switch_table):
    rows = rows_of(switch_table[0], "dqn_atari_gap")
    assert rows["all defaults"] == ["(none)", "100", "0.1", "8", "1", "– |"]
    assert rows["all switches off (plain path)"] == ["`--no-tf32 --no-cuda-graphs --no-compile`", "12.5", "0.0125", "1",
                                                     "0.125", "– |"]
    assert rows["defaults, tf32 off"] == ["`--no-tf32`", "50", "0.05", "4", "0.5", "– |"]
    assert rows["defaults, cuda_graphs off"][:2] == ["`--no-cuda-graphs`", "25"]
    assert rows["defaults, compile on"] == ["`--compile`", "150", "0.15", "12", "1.5", "– |"]
    assert rows["cudnn_benchmark: not in this script"] == rows["pinned_staging: not in this script"] == ["–"] * 5 + ["– |"]


def test_shared_gpu_runs_start_k_seeds_together_and_sum_their_rates(switch_table):
    text, log = switch_table
    assert "| dqn_atari_gap | 1 | 100 | 100 | 1 | – |" in text  # the defaults run itself
    assert "| dqn_atari_gap | 3 | 300 | 100 | 3 | – |" in text
    (group,) = [call for call in log if len(call["commands"]) == 3]
    assert [command[command.index("--seed") + 1] for command in group["commands"]] == ["1", "2", "3"]
    assert group["threads"] == max(1, os.cpu_count() // 3) and group["warmup"] == 100
    assert len(log) == 1 + 1 + 3 + 1  # defaults, plain, three flips, one group: k = 1 is not run again


def test_runs_go_by_priority_defaults_plain_shared_flips_compile_last(switch_table):
    extras = [call["commands"][0][call["commands"][0].index("avg") + 1:-2] for call in switch_table[1]]
    assert extras == [[], ["--no-tf32", "--no-cuda-graphs", "--no-compile"], ["--seed", "1"], ["--no-tf32"],
                      ["--no-cuda-graphs"], ["--compile"]]


def test_every_command_is_listed_under_its_row(switch_table):
    text = switch_table[0]
    block = text[text.index("```"):]
    for label, flags in [("all defaults", "--pool avg --runs-dir runs"), ("defaults, compile on", "--pool avg --compile"),
                         ("all switches off (plain path)", "--no-tf32 --no-cuda-graphs --no-compile --runs-dir runs")]:
        assert re.search(f"# dqn_atari_gap, Breakout 84, width 1, avg: {re.escape(label)}\n"
                         f"python cleanrl_pool/dqn_atari_gap.py --env-id Breakout .*{re.escape(flags)}", block), label
    assert f"OMP_NUM_THREADS={max(1, os.cpu_count() // 3)} python cleanrl_pool/dqn_atari_gap.py" in block
    assert "--seed $seed --runs-dir runs) & done; wait" in block


def test_the_device_budget_skips_the_runs_that_no_longer_fit(tmp_path, monkeypatch):
    """6 runs and 10 s kept for each run after the current one: in a 12 s budget only the last one (compile) fits."""
    use_dqn_switches(monkeypatch)
    monkeypatch.setattr(throughput, "env_rate_in_child", lambda *a: pytest.fail("no time for the raw rate"))
    log = []
    monkeypatch.setattr(throughput, "measure", fake_measure({}, log))
    out = tmp_path / "table.md"
    throughput.main(["--scripts", "dqn_atari_gap", "--switches", "all", "--shared-gpu-runs", "2", "--device-budget", "12",
                     "--out", str(out), "--preset", "cpu"])
    rows = rows_of(out.read_text(), "dqn_atari_gap")
    assert rows["all defaults"][1] == rows["defaults, tf32 off"][1] == "skipped (device budget)"
    assert rows["defaults, compile on"][1] == "100" and len(log) == 1 and 10 <= log[0]["timeout"] <= 12
    assert "| dqn_atari_gap | 2 | skipped (device budget) |" in out.read_text()
    assert "| dqn_atari_gap | Breakout | 84 | 1 | avg | skipped (device budget) | skipped (device budget) |" in out.read_text()
    assert "# dqn_atari_gap, Breakout 84, width 1, avg: all defaults; skipped (device budget)" in out.read_text()


@pytest.mark.parametrize("flags,named", [
    (["--scripts", "ppo_atari"], "--scripts"), (["--pools", "flatten,mean"], "--pools"),
    (["--resolutions", "0"], "--resolutions"), (["--widths", "a"], "--widths"),
    (["--env-seconds", "inf"], "--env-seconds"), (["--timeout", "nan"], "--timeout"),
    (["--raw-num-envs", "-1"], "--raw-num-envs"), (["--scripts", ""], "--scripts ''"), (["--scripts", " , "], "--scripts"),
    (["--preset", "tpu"], "--preset 'tpu'"), (["--bogus"], "unrecognized arguments: --bogus"),
    (["--timeout", "abc"], "--timeout"), (["--env-seconds", "1e9"], "--env-seconds"),
    (["--raw-num-envs", "100000"], "--raw-num-envs"),
    (["--widths", "1,1"], "names a value twice"), (["--pools", "avg,avg"], "names a value twice"),
    (["--note", "two\nlines"], "--note"),
    (["--scripts", "dqn_atari_gap", "--switches", "bf16"], "'bf16' is no switch of dqn_atari_gap"),
    (["--switches", "compile,compile"], "names a value twice"), (["--switches", "all,compile"], "'all' is no switch"),
    (["--shared-gpu-runs", "0"], "--shared-gpu-runs"), (["--shared-gpu-runs", "2,2"], "names a value twice"),
    (["--window", "-1"], "--window"), (["--device-budget", "nan"], "--device-budget"),
    (["--set", "batch-size"], "--set 'batch-size' must look like FLAG=VALUE"),
    (["--set", "compile=true"], "--set compile: a speed switch"), (["--set", "width=2"], "--set width: the benchmark"),
    (["--set", "no-such-flag=1"], "--set 'no-such-flag' is no flag"),
    (["--set", "torch-deterministic=0"], "a bool flag takes true or false"),
    (["--set", "log-every=true"], "true/false is for bool flags"), (["--bundle", "/no/such.tar.xz"], "--bundle"),
])
def test_bad_input_is_refused_with_one_line_before_measuring(flags, named, capsys, monkeypatch):
    monkeypatch.setattr(throughput, "env_rate_in_child", lambda *a: pytest.fail("measured before checking the input"))
    with pytest.raises(SystemExit) as exit_:
        throughput.main(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and named in err


@pytest.mark.parametrize("out", ["", "file/table.md"], ids=["a folder", "below a file"])
def test_out_that_is_a_folder_or_below_a_file_is_refused_before_measuring(tmp_path, capsys, monkeypatch, out):
    monkeypatch.setattr(throughput, "env_rate_in_child", lambda *a: pytest.fail("measured before checking the input"))
    (tmp_path / "file").write_text("")
    out = str(tmp_path / out)
    with pytest.raises(SystemExit) as exit_:
        throughput.main(["--scripts", "ppo_procgen_impoola", "--out", out])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"--out {out!r}" in err


def test_raw_rate_that_fails_is_a_failed_row_not_a_traceback(tmp_path, monkeypatch, capsys):
    def raw_rate(script, flags, seconds, timeout):
        if flags["resolution"] == 128:
            raise RuntimeError("raw rate of ppo_procgen_impoola failed: ['ValueError: resolution 128 refused']")
        return 1000.0

    monkeypatch.setattr(throughput, "env_rate_in_child", raw_rate)
    monkeypatch.setattr(throughput, "measure", fake_measure({"--runs-dir": 2.5}, []))
    out = tmp_path / "table.md"
    throughput.main(["--scripts", "ppo_procgen_impoola", "--resolutions", "64,128", "--pools", "avg",
                     "--raw-num-envs", "0", "--out", str(out), "--preset", "cpu"])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ppo_procgen_impoola |")]
    assert rows == ["| ppo_procgen_impoola | bigfish | 64 | 2 | avg | 1,000 | 250 | 0.25 | 90 | – |",
                    "| ppo_procgen_impoola | bigfish | 128 | 2 | avg | failed | 250 | – | 90 | – |"]
    assert "resolution 128 refused" in capsys.readouterr().err and "128, raw env rate: raw rate of" in out.read_text()


TINY_DQN = ["--window", "1", "--set", "total-timesteps=400", "--set", "learning-starts=40", "--set", "log-every=20",
            "--set", "batch-size=4", "--set", "buffer-size=1000", "--set", "torch-threads=1"]


def test_tiny_real_dqn_runs_give_every_row_a_rate(tmp_path):
    """The real script on the CPU: defaults, plain, tf32 flipped (or listed as missing), and 2 runs at once, each
    stopped 1 s (and one log interval) after its warm-up."""
    out = tmp_path / "table.md"
    throughput.main(["--scripts", "dqn_atari_gap", "--switches", "tf32", "--shared-gpu-runs", "1,2", "--env-seconds", "0.3",
                     "--out", str(out), "--preset", "cpu"] + TINY_DQN)
    text = out.read_text()
    rows = rows_of(text, "dqn_atari_gap")
    switches = throughput.script_switches("dqn_atari_gap", throughput.script_defaults("dqn_atari_gap"))
    measured = ["all defaults", "all switches off (plain path)"] + (["defaults, tf32 off"] if "tf32" in switches else [])
    assert set(rows) == set(measured) | (set() if "tf32" in switches else {"tf32: not in this script"})
    for label in measured:
        rate = float(rows[label][1].replace(",", ""))
        assert rate > 0 and float(rows[label][3]) == pytest.approx(rate / float(rows["all switches off (plain path)"][1]),
                                                                   rel=0.01)
    (shared,) = [line for line in text.splitlines() if line.startswith("| dqn_atari_gap | 2 | ")]
    assert float(shared.split(" | ")[2].replace(",", "")) > 0, text
    assert "Failures:" not in text and "--total-timesteps 400" in text
    assert ("--no-tf32" in text) == ("tf32" in switches)


@pytest.mark.slow
def test_tiny_real_runs_of_every_script_with_every_switch(tmp_path):
    """All four scripts on the CPU preset, every switch (compile included), 2 DQN and Rainbow runs at once."""
    out = tmp_path / "table.md"
    tiny = ["--window", "1", "--set", "total-timesteps=2000", "--set", "learning-starts=40", "--set", "log-every=20",
            "--set", "batch-size=8", "--set", "buffer-size=1000", "--set", "torch-threads=1"]  # a flag to the scripts with it
    declared = {script: throughput.script_switches(script, throughput.script_defaults(script))
                for script in throughput.RECIPES}
    throughput.main(["--switches", "all", "--shared-gpu-runs", "2", "--env-seconds", "0.3", "--resolutions", "64",
                     "--out", str(out), "--preset", "cpu", "--raw-num-envs", "0"] + tiny)
    text = out.read_text()
    assert "Failures:" not in text, text
    for script, switches in declared.items():  # as main read them: other work may be adding switches meanwhile
        rows = rows_of(text, script)
        assert len(rows) == 2 + len(throughput.SWITCHES[script]) and all(cells[1] != "failed" for cells in rows.values())
        assert {label for label in rows if "not in this script" not in label} == (
            {"all defaults", "all switches off (plain path)"}
            | {f"defaults, {name} {'off' if on else 'on'}" for name, on in switches.items()}), text
    for script in throughput.SHARED_GPU_SCRIPTS:
        (shared,) = [line for line in text.splitlines() if line.startswith(f"| {script} | 2 | ")]
        assert float(shared.split(" | ")[2].replace(",", "")) > 0, text
