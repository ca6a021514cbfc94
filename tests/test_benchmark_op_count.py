"""benchmark/op_count.py: ops per agent step are the extra ops of the longer run over its extra steps."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmark"))
import op_count  # noqa: E402


def test_per_step_counts_leave_the_fixed_cost_of_a_run_out(monkeypatch):
    def fake_count(script, steps, workdir):  # 1,000 ops of set-up, 7 ops and 0.5 syncs per step
        return {"ops": 1000 + 7 * steps, "syncs": 3 + steps // 2, "by_name": {"aten::mm": 2 * steps, "aten::relu": 5 * steps},
                "graph_ops": 0, "graph_calls": 0}

    monkeypatch.setattr(op_count, "count", fake_count)
    result = op_count.measure("dqn_atari_gap")
    assert result["ops_per_step"] == pytest.approx(7.0) and result["syncs_per_step"] == pytest.approx(0.5)
    assert result["top"] == [("aten::relu", 5.0), ("aten::mm", 2.0)]
    assert "graphed_per_step" not in op_count.measure("sac_dmc_gap")


def test_the_graph_projection_counts_the_ops_outside_the_captured_calls_plus_one_replay_per_call(monkeypatch):
    def fake_count(script, steps, workdir):  # per step: 40 ops, 30 of them in 2 captured calls
        return {"ops": 500 + 40 * steps, "syncs": 0, "by_name": {}, "graph_ops": 100 + 30 * steps,
                "graph_calls": 1 + 2 * steps}

    monkeypatch.setattr(op_count, "count", fake_count)
    assert op_count.measure("rainbow_atari_gap")["graphed_per_step"] == pytest.approx(12.0)


def test_counter_sees_forward_backward_and_item_syncs_but_not_evaluation(tmp_path):
    """A real DQN run counted in-process: optimiser ops are dispatched, and .item() counts as a sync."""
    flags, short, _ = op_count.RECIPES["dqn_atari_gap"]
    result = op_count.count("dqn_atari_gap", short, str(tmp_path))
    assert result["ops"] > short and result["syncs"] > 0
    assert result["by_name"].get("aten::convolution", 0) > 0 and result["by_name"].get("aten::addcmul_", 0) > 0
    # acting and the store at every step, a learner step per 4 after learning starts; evaluation's acting not counted
    learning = (short - 100) // 4
    assert result["graph_calls"] == short + short + learning  # (a fresh replay's reset stores no step)
    assert 0 < result["graph_ops"] < result["ops"]


def test_an_unknown_script_exits_2_with_one_line():
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmark", "op_count.py"), "--scripts", "dqn,ppo"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--scripts" in result.stderr
