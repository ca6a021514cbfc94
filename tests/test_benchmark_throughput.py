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
def test_procgen_env_rate_steps_the_scripts_envs_with_hd_rendering(resolution, monkeypatch):
    calls = []
    module = throughput.import_script("ppo_procgen_impoola")
    original = module.observe
    monkeypatch.setattr(module, "observe", lambda *a: calls.append(original(*a)) or calls[-1])
    rate = throughput.env_rate("ppo_procgen_impoola", {"env-id": "bigfish", "resolution": resolution, "num-envs": 2}, 0.3)
    assert rate > 0 and len(calls) > 5
    assert tuple(calls[-1].shape) == (2, 3, resolution, resolution)  # what the network sees, re-rendered at 96


def test_table_has_one_row_per_configuration_with_ratio_and_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(throughput, "env_rate", lambda script, flags, seconds: 1000.0 * flags["resolution"] / 64)
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


def test_unknown_script_is_refused_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        throughput.main(["--scripts", "ppo_atari"])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1
