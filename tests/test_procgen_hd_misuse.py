"""procgen_hd refuses misuse with one line instead of letting libenv kill the process (`fassert`, std::length_error,
a freed handle): each case runs in its own Python process, so a crash fails its test instead of the test run."""

import subprocess
import sys
import textwrap

import pytest

PREAMBLE = """
import numpy as np
import procgen_hd
envs = procgen_hd.ProcgenHDEnv("bigfish", 2, 64, num_levels=5, seed=1)
envs.reset()
envs.step(np.array([1, 2]))
state = envs.get_state()[0]
"""


def outcome(setup: str, call: str) -> str:
    """What `call` did in a fresh process after PREAMBLE and `setup`: 'TypeName: message', 'no error', or a crash."""
    code = PREAMBLE + textwrap.dedent(setup) + f"""
try:
    {call}
except Exception as error:
    print(f"{{type(error).__name__}}: {{error}}")
else:
    print("no error")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    died = f"the process died (exit {result.returncode}): {result.stdout[-300:]} {result.stderr[-500:]}"
    assert result.returncode == 0, died
    assert result.stdout.count("\n") == 1, result.stdout
    return result.stdout.strip()


def test_the_subprocess_harness_sees_a_crash():
    """Without procgen_hd's check, a truncated state reaches libenv's fassert, which ends the process: a failure here."""
    with pytest.raises(AssertionError, match="the process died"):
        outcome("", "procgen_hd._lib.set_state(envs._handle, 0, state[:100], 100)")


@pytest.mark.parametrize("call", ["envs.step(np.array([1, 2]))", "envs.reset()", "envs.get_state()",
                                  "envs.set_state([state, state])", "envs.step_async(np.array([1, 2]))",
                                  "envs.step_wait()"])
def test_every_call_on_a_closed_env_raises(call):
    name = call.split("(")[0].split(".")[1]
    assert outcome("envs.close()", call) == (f"RuntimeError: {name}: this Procgen-HD env is closed "
                                             "(libenv has freed its games); make a new one")


def test_closing_twice_is_allowed():
    assert outcome("envs.close()", "envs.close()") == "no error"


@pytest.mark.parametrize("change,message", [
    ("state[: len(state) // 2]", "is truncated or corrupt: "),
    ("b''", "is truncated or corrupt: it needs byte 4 of 0"),
    ("np.random.default_rng(0).bytes(20000)", "is not a Procgen game state (format version"),
    ("state + bytes(4)", "is corrupt: 4 bytes follow its end marker"),
    ("state[:-4] + bytes(4)", "is corrupt: no end marker at byte"),
    ("state[:4] + (2**30).to_bytes(4, 'little') + state[8:]",
     "is truncated or corrupt: a length of 1073741824 at byte 4 runs past its end"),
    ("'a state'", "is a str, not bytes from get_state"),
])
def test_a_damaged_state_is_refused_before_libenv(change, message):
    result = outcome("", f"envs.set_state([state, {change}])")
    assert result.startswith(f"ValueError: set_state: state 1 {message}"), result


def test_a_state_with_a_huge_entity_count_is_refused_not_allocated():
    """libenv would resize its entity vector to the stored count first: std::length_error or bad_alloc, an abort."""
    setup = """
    reader = procgen_hd._StateReader(state)  # walk to the entity count as check_state does
    reader.int(), reader.string(), reader.skip(12 + 5), reader.random_generator(), reader.random_generator()
    reader.skip(15 + 1)
    bad = state[: reader.offset] + (2**31 - 1).to_bytes(4, "little") + state[reader.offset + 4 :]
    """
    result = outcome(setup, "envs.set_state([state, bad])")
    assert result.startswith("ValueError: set_state: state 1 is truncated or corrupt: a length of 2147483647 at byte"), result


def test_a_state_claiming_generated_assets_is_refused():
    """libenv `fassert`s in deserialize when a state has use_generated_assets set (the option's int after the name)."""
    setup = """
    at = 4 + 4 + len("bigfish") + 4  # version, name length, name, paint_vel_info
    bad = state[:at] + (1).to_bytes(4, "little") + state[at + 4 :]
    """
    assert outcome(setup, "envs.set_state([state, bad])") == (
        "ValueError: set_state: state 1 has use_generated_assets set: Procgen cannot restore such a game")


def test_a_state_saved_in_the_middle_of_a_step_is_refused():
    """libenv's act() `fassert`s that no restored game is waiting for a step."""
    setup = """
    reader = procgen_hd._StateReader(state)  # walk to is_waiting_for_step as check_state does
    reader.int(), reader.string(), reader.skip(12 + 5), reader.random_generator(), reader.random_generator()
    reader.skip(14)
    bad = state[: reader.offset] + (1).to_bytes(4, "little") + state[reader.offset + 4 :]
    """
    assert outcome(setup, "envs.set_state([state, bad])") == (
        "ValueError: set_state: state 1 is corrupt: it was saved in the middle of a step")


def test_a_state_of_another_game_is_refused_naming_both_games():
    setup = """
    coinrun = procgen_hd.ProcgenHDEnv("coinrun", 1, 64)
    other = coinrun.get_state()[0]
    """
    assert outcome(setup, "envs.set_state([state, other])") == (
        "ValueError: set_state: state 1 is a state of coinrun, not of bigfish")


def test_a_refused_state_restores_none_of_the_others():
    setup = """
    before = envs.get_state()
    fresh = procgen_hd.ProcgenHDEnv("bigfish", 2, 64, num_levels=5, seed=7)
    fresh.reset()
    try:
        envs.set_state([fresh.get_state()[0], b"garbage"])
    except ValueError:
        pass
    """
    assert outcome(setup, "assert envs.get_state() == before") == "no error"


@pytest.mark.parametrize("states,message", [
    ("[state]", "set_state needs 2 states, got 1"),
    ("state", "set_state needs a list of 2 states (bytes), got a bytes"),
])
def test_a_wrong_number_of_states_is_refused(states, message):
    assert outcome("", f"envs.set_state({states})") == f"ValueError: {message}"


def test_get_state_with_generated_assets_is_refused_not_fatal():
    setup = """
    generated = procgen_hd.ProcgenHDEnv("bigfish", 1, 64, use_generated_assets=True)
    generated.reset()
    """
    assert outcome(setup, "generated.get_state()") == (
        "ValueError: get_state: Procgen cannot save a game with use_generated_assets=True")


@pytest.mark.parametrize("actions,message", [
    ("[0.7, 1]", "actions of dtype float64: need integers in [0, 15) (none is rounded)"),
    ("[-1, 1]", "action -1 of env 0: actions are integers in [0, 15)"),
    ("[3, 15]", "action 15 of env 1: actions are integers in [0, 15)"),
    ("[1, 2**40]", "action 1099511627776 of env 1: actions are integers in [0, 15)"),
    ("[True, False]", "actions of dtype bool: need integers in [0, 15) (none is rounded)"),
    ("[1, 2, 3]", "actions of shape (3,): need one integer per env, shape (2,)"),
    ("5", "actions of shape (): need one integer per env, shape (2,)"),
])
def test_a_non_integer_or_out_of_range_action_is_refused(actions, message):
    assert outcome("", f"envs.step(np.array({actions}))") == f"ValueError: {message}"


def test_step_wait_without_step_async_is_refused():
    assert outcome("", "envs.step_wait()") == "RuntimeError: step_wait: no step is running; start one with step_async"


@pytest.mark.parametrize("call", ["envs.reset()", "envs.get_state()", "envs.set_state([state, state])"])
def test_reset_and_states_during_a_running_step_are_refused(call):
    name = call.split("(")[0].split(".")[1]
    assert outcome("envs.step_async(np.array([1, 2]))", call) == (
        f"RuntimeError: {name}: a step started by step_async is still running; collect it with step_wait first")


def test_a_second_step_async_before_step_wait_is_refused():
    assert outcome("envs.step_async(np.array([1, 2]))", "envs.step_async(np.array([1, 2]))") == (
        "RuntimeError: step_async: a step started by step_async is still running; collect it with step_wait first")


@pytest.mark.parametrize("options,message", [
    ("num_threads=10**6", "num_threads 1000000 starts too many threads; choose from 0 to 1024"),
    ("center_agent='no'", "center_agent 'no' must be True or False"),
    ("use_sequential_levels=2", "use_sequential_levels 2 must be True or False"),
    ("resolution=4096, num_envs=2**20", "num_envs 1048576 at resolution 4096 needs 114688.0 GiB of frames"),
])
def test_options_libenv_would_abort_on_are_refused_at_construction(options, message):
    call = f"procgen_hd.ProcgenHDEnv('bigfish', **dict(dict(num_envs=2, resolution=64), {options}))"
    assert outcome("envs.close()", call).startswith(f"ValueError: {message}")


GYMNASIUM = """
import gymnasium as gym
envs.close()
vector = gym.make_vec("procgen_hd/bigfish-v0", num_envs=2, vectorization_mode="vector_entry_point", render_mode="rgb_array")
single = gym.make("procgen_hd/bigfish-v0", render_mode="rgb_array").unwrapped
vector.reset(seed=1), single.reset(seed=1)
vector.close(), single.close()
"""


@pytest.mark.parametrize("call,message", [
    ("vector.step(np.array([1, 2]))", "step: this Procgen-HD vector env is closed; make a new one"),
    ("vector.reset()", "reset: this Procgen-HD vector env is closed; make a new one"),
    ("vector.render()", "render: this Procgen-HD vector env is closed; make a new one"),
    ("single.step(1)", "step: this Procgen-HD env is closed (libenv has freed its games); make a new one"),
    ("single.reset()", "reset: this Procgen-HD env is closed (libenv has freed its games); make a new one"),
    ("single.render()", "render: this Procgen-HD env is closed (libenv has freed its games); make a new one"),
])
def test_every_call_on_a_closed_gymnasium_env_raises(call, message):
    assert outcome(GYMNASIUM, call) == f"RuntimeError: {message}"
