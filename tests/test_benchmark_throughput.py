"""benchmark/throughput.py: the steady training rate read from charts/SPS wall times, the raw env
rate through the script's own construction (HD rendering included), and the table it writes."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import throughput  # noqa: E402

# Writes a run folder whose charts/SPS points sit at known steps and wall times.
FAKE_TRAINING = """
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
writer = EventFileWriter("runs/x__y__1__1")
for step, wall in [(100, 1000.0), (300, 1001.0), (700, 1003.0)]:
    value = Summary.Value(tag="charts/SPS", simple_value=5.0)
    writer.add_event(Event(wall_time=wall, step=step, summary=Summary(value=[value])))
writer.close()
"""


def test_training_rate_is_steps_over_wall_time_between_first_and_last_sps_point(tmp_path):
    steady, logged, memory, wall = throughput.training_rate([sys.executable, "-c", FAKE_TRAINING], str(tmp_path), False, 120)
    assert steady == pytest.approx((700 - 100) / (1003.0 - 1000.0))
    assert logged == 5.0 and memory is None and wall > 0


def test_training_rate_reports_a_failing_run(tmp_path):
    with pytest.raises(RuntimeError, match="exit 3"):
        throughput.training_rate([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], str(tmp_path), False, 60)


@pytest.mark.parametrize("resolution", [64, 96])
def test_procgen_env_rate_steps_the_scripts_own_procgen_hd_envs_in_a_child_process(resolution):
    """A child per measurement: Procgen-HD draws one size per process, so 64 and 96 cannot share one."""
    flags = {"env-id": "bigfish", "resolution": resolution, "num-envs": 2}
    rate = throughput.env_rate_in_child("ppo_procgen_impoola", flags, 0.3)
    assert rate > 100


def test_envpool_comparison_steps_and_renders():
    assert throughput.envpool_procgen_rate("bigfish", 2, 96, 0.3) > 10


def test_table_has_one_row_per_configuration_with_ratio_and_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(throughput, "env_rate_in_child", lambda script, flags, seconds: 1000.0 * flags["resolution"] / 64)
    monkeypatch.setattr(throughput, "envpool_procgen_rate", lambda game, num_envs, resolution, seconds: 4000.0)
    monkeypatch.setattr(throughput, "training_rate", lambda command, runs_dir, on_gpu, timeout: (250.0, 200.0, None, 1.0))
    out = tmp_path / "table.md"
    throughput.main(["--scripts", "ppo_procgen_impoola", "--resolutions", "64,128", "--pools", "flatten,avg",
                     "--widths", "1,2", "--out", str(out), "--note", "test"])
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ppo_procgen_impoola |")]
    assert len(rows) == 2 * 2 * 2
    assert "| ppo_procgen_impoola | bigfish | 128 | 2 | avg | 2,000 | 250 | 0.125 | 200 | – |" in rows
    assert "| ppo_procgen_impoola | bigfish | 64 | 1 | flatten | 1,000 | 250 | 0.25 | 200 | – |" in rows
    assert "- date: " in text and "- device: " in text and "Conditions: test" in text
    assert "python cleanrl_pool/ppo_procgen_impoola.py --env-id bigfish --resolution 128" in text
    assert "| 128 | 2,000 | 4,000 | 0.5 |" in text  # Procgen-HD against EnvPool's step + render, 64 envs


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
])
def test_bad_input_is_refused_with_one_line_before_measuring(flags, named, capsys, monkeypatch):
    monkeypatch.setattr(throughput, "env_rate_in_child", lambda *a: pytest.fail("measured before checking the input"))
    with pytest.raises(SystemExit) as exit_:
        throughput.main(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and named in err


def test_out_that_is_a_folder_or_below_a_file_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(throughput, "env_rate_in_child", lambda *a: pytest.fail("measured before checking the input"))
    (tmp_path / "file").write_text("")
    for out in (tmp_path, tmp_path / "file" / "table.md"):
        with pytest.raises(SystemExit) as exit_:
            throughput.main(["--scripts", "ppo_procgen_impoola", "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and f"--out {str(out)!r}" in err


def test_raw_rate_that_fails_is_a_failed_row_not_a_traceback(tmp_path, monkeypatch, capsys):
    def raw_rate(script, flags, seconds):
        if flags["resolution"] == 128:
            raise RuntimeError("raw rate of ppo_procgen_impoola failed: ['ValueError: resolution 128 refused']")
        return 1000.0

    monkeypatch.setattr(throughput, "env_rate_in_child", raw_rate)
    monkeypatch.setattr(throughput, "training_rate", lambda command, runs_dir, on_gpu, timeout: (250.0, 200.0, None, 1.0))
    out = tmp_path / "table.md"
    throughput.main(["--scripts", "ppo_procgen_impoola", "--resolutions", "64,128", "--pools", "avg", "--raw-num-envs", "0",
                     "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ppo_procgen_impoola |")]
    assert rows == ["| ppo_procgen_impoola | bigfish | 64 | 1 | avg | 1,000 | 250 | 0.25 | 200 | – |",
                    "| ppo_procgen_impoola | bigfish | 128 | 1 | avg | failed | – | – | – | – |"]
    assert "resolution 128 refused" in capsys.readouterr().err
