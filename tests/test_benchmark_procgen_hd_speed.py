"""benchmark/procgen_hd_speed.py: one row per resolution with the batched env, the Gymnasium vector env and EnvPool's
step + render, each measured in its own process, and the command that made the table."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_speed_table_has_a_row_of_three_rates_per_resolution(tmp_path):
    out = tmp_path / "speed.md"
    command = [sys.executable, os.path.join(REPO, "benchmark", "procgen_hd_speed.py"), "--resolutions", "64,32",
               "--num-envs", "4", "--seconds", "0.2", "--rounds", "1", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "- command: `python benchmark/procgen_hd_speed.py --resolutions 64,32 --num-envs 4" in text
    rows = re.findall(r"^\| (\d+) \| ([\d,]+) \| ([\d,]+) \| ([\d,]+) \| ([\d.]+) \|$", text, re.M)
    assert [row[0] for row in rows] == ["64", "32"]  # 32: another size, so each measurement had its own process
    assert all(float(rate.replace(",", "")) > 100 for row in rows for rate in row[1:4])
