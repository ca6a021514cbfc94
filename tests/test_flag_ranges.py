"""Every script refuses a numeric flag outside its range (NaN and inf included) and the cross-flag rules,
with one line on stderr and exit 2, before any work; utils.check_ranges against hand-made intervals."""

import dataclasses
import importlib
import os
import sys

import pytest

import utils

CASES = {
    "ppo_procgen_impoola": [
        (["--gamma", "1.5"], "--gamma 1.5 is outside [0, 1]"),
        (["--gae-lambda", "2"], "--gae-lambda 2.0 is outside [0, 1]"),
        (["--max-grad-norm", "-1"], "--max-grad-norm -1.0 is outside (0, inf)"),
        (["--learning-rate", "inf"], "--learning-rate inf"),
        (["--learning-rate", "nan"], "--learning-rate nan"), (["--reward-clip", "-1"], "--reward-clip -1.0"),
        (["--target-kl", "nan"], "--target-kl nan"), (["--seed", "-1"], "--seed -1"),
        (["--eval-episodes", "0", "--eval-every", "64"], "--eval-episodes 0 with --eval-every 64"),
        (["--start-level", "3000000000"], "--start-level 3000000000"),
        (["--runs-dir", "a_file"], "--runs-dir 'a_file'"), (["--runs-dir", ""], "--runs-dir ''"),
        (["--num-steps", "1", "--num-minibatches", "2"], "--num-minibatches 2 leaves minibatches of 1 step"),
    ],
    "dqn_atari_gap": [
        (["--gamma", "nan"], "--gamma nan"), (["--learning-rate", "inf"], "--learning-rate inf"),
        (["--seed", "4294967296"], "--seed 4294967296 is outside [0, 4294967295]"),
        (["--eval-epsilon", "inf"], "--eval-epsilon inf"),
        (["--learning-starts", "5000", "--total-timesteps", "4000"], "--learning-starts 5000 must be below --total-timesteps"),
        (["--tau", "0"], "--tau 0.0 is outside (0, 1]"), (["--runs-dir", "a_file"], "--runs-dir 'a_file'"),
        (["--sparsity-method", "prune", "--sparsity", "1"], "--sparsity 1.0 is outside (0, 1)"),
        (["--sparsity-method", "magnitude"], "--sparsity-method 'magnitude' is not allowed"),
    ],
    "rainbow_atari_gap": [
        (["--v-min", "-inf"], "--v-min -inf is outside (-inf, inf)"),
        (["--priority-exponent", "nan"], "--priority-exponent nan"),
        (["--adam-eps", "inf"], "--adam-eps inf"), (["--importance-exponent", "-1"], "--importance-exponent -1.0"),
        (["--sparsity-method", "rigl", "--sparsity", "0"], "--sparsity 0.0 is outside (0, 1)"),
        (["--sparsity-scope", "encoder"], "--sparsity-scope 'encoder' is not allowed"),
        (["--sparsity-distribution", "er"], "--sparsity-distribution 'er' is not allowed"),
        (["--drop-fraction", "1.5"], "--drop-fraction 1.5 is outside [0, 1]"),
        (["--sparsity-start", "0.9", "--sparsity-end", "0.5"], "--sparsity-start 0.9 must not be above --sparsity-end 0.5"),
        (["--learning-starts", "5000", "--total-timesteps", "4000"], "--learning-starts 5000 must be below --total-timesteps"),
        (["--runs-dir", "a_file"], "--runs-dir 'a_file'"),
    ],
    "sac_dmc_gap": [
        (["--log-std-min", "nan"], "--log-std-min nan"), (["--init-temperature", "inf"], "--init-temperature inf"),
        (["--tau", "nan"], "--tau nan"), (["--reward-scale", "0"], "--reward-scale 0.0 is outside (0, inf)"),
        (["--learning-starts", "200", "--total-timesteps", "100"], "--learning-starts 200 must be below --total-timesteps"),
    ],
}
SMALL = {  # a run small enough that only the flag under test can stop it
    "ppo_procgen_impoola": ["--num-envs", "2", "--num-steps", "8", "--num-minibatches", "1", "--total-timesteps", "16"],
    "dqn_atari_gap": ["--buffer-size", "1000", "--learning-starts", "100", "--total-timesteps", "500", "--batch-size", "8"],
    "rainbow_atari_gap": ["--buffer-size", "1000", "--learning-starts", "100", "--total-timesteps", "500",
                          "--batch-size", "8"],
    "sac_dmc_gap": ["--buffer-size", "1000", "--learning-starts", "10", "--total-timesteps", "50", "--batch-size", "8"],
}


@pytest.mark.parametrize("script,flags,message", [(s, f, m) for s, cases in CASES.items() for f, m in cases])
def test_a_flag_outside_its_range_exits_2_with_one_line_before_any_work(script, flags, message, tmp_path, monkeypatch, capsys):
    module = importlib.import_module(script)
    (tmp_path / "a_file").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script + ".py", *SMALL[script], "--runs-dir", "runs", *flags])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert os.listdir(tmp_path) == ["a_file"]  # nothing left behind


@dataclasses.dataclass
class Flags:
    rate: float = 0.5
    count: int = 3
    optional: float = None


@pytest.mark.parametrize("interval,value,inside", [
    ("[0, 1]", 0.0, True), ("[0, 1]", 1.0, True), ("(0, 1]", 0.0, False), ("[0, 1)", 1.0, False),
    ("(0, inf)", float("inf"), False), ("[0, inf]", float("inf"), True), ("(-inf, inf)", float("-inf"), False),
    ("[0, 1]", float("nan"), False), ("(-inf, inf)", float("nan"), False), ("[1, inf)", 10**30, True),
])
def test_check_ranges_reads_interval_notation(interval, value, inside, capsys):
    if inside:
        utils.check_ranges(Flags(rate=value), {"rate": interval, "optional": "(0, 1)"})
        return
    with pytest.raises(SystemExit):
        utils.check_ranges(Flags(rate=value), {"rate": interval})
    assert capsys.readouterr().err == f"error: --rate {value!r} is outside {interval}\n"


def test_every_numeric_flag_of_every_script_has_a_range():
    for script in CASES:
        module = importlib.import_module(script)
        numeric = {f.name for f in dataclasses.fields(module.Args) if f.type in (int, float, "int", "float")
                   or "Optional[float]" in str(f.type) or "Optional[int]" in str(f.type)}
        assert len(numeric) > 20 and numeric - set(module.FLAG_RANGES) == set(), script
