"""dqn_atari_gap.py run for real in a subprocess, what only it does (the rest: test_atari_smoke.py)."""

import json
import os

import pytest

from conftest import run_script
from test_atari_smoke import TINY, smoke_run

SCRIPT = "dqn_atari_gap.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return smoke_run(tmp_path_factory, "dqn")


def test_config_json_holds_every_resolved_argument(smoke):
    _, run_dir, _ = smoke
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["env_id"] == "Breakout" and config["n_step"] == 3 and config["double"] is True
    assert config["pool"] == "avg" and config["encoder"] == "nature" and config["exp_name"] == "dqn_atari_gap"
    assert (config["tau"], config["diag_batch_size"], config["progress"]) == (1.0, 256, True)
    assert os.path.basename(run_dir).startswith("Breakout__dqn_atari_gap__1__")


def test_a_frame_too_small_for_the_valid_padded_nature_encoder_is_refused_with_the_smallest_that_works(tmp_path):
    result = run_script(SCRIPT, *TINY, "--resolution", "32", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and "--resolution 32" in result.stderr and "at least 36" in result.stderr
    assert not os.path.exists(tmp_path / "runs")
