# Ported from openai/procgen (MIT, commit 37b521d): procgen/env_test.py and procgen/state_test.py, on our binding.
"""openai/procgen's own tests on procgen_hd: same games, seeds, steps and assertions, at resolutions 64 and 128.

Mapping: ProcgenGym3Env(num, env_name, rand_seed) -> ProcgenHDEnv(game, num, resolution, seed); its first observe()
-> reset(); act + observe -> step; callmethod("get_state"/"set_state") -> get_state/set_state. Each rollout runs in a
spawned process, as upstream's state test does (here also because the fork draws one size per process). The state
test keeps digests of each step's frames and states instead of the arrays (10,001 steps of 128 x 128 frames would be
GBs); equal digests are equal data. Actions are int32 (upstream passes float zeros, which procgen_hd refuses).
The full state test (16 games, ~1 min each on 2 cores) is marked slow; a 500-step version runs by default.
"""

import hashlib
import multiprocessing as mp

import numpy as np
import procgen_hd
import pytest

ENV_NAMES = list(procgen_hd.GAMES)
NUM_STEPS = 10000
RESOLUTIONS = [64, 128]


def run_in_subproc(fn, **kwargs):
    """fn(**kwargs) in a spawned process; its result, or its error as a RuntimeError here."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, kwds=kwargs)


def make_env(**kwargs):
    kwargs = dict(kwargs)
    return procgen_hd.ProcgenHDEnv(kwargs.pop("env_name"), kwargs.pop("num"), kwargs.pop("resolution"),
                                   seed=kwargs.pop("rand_seed", 0), **kwargs)


# env_test.py


def seeding_observations(env_name, resolution):
    num_envs = 1
    envs = [make_env(num=num_envs, env_name=env_name, num_levels=1, start_level=level_num, resolution=resolution)
            for level_num in (0, 0, 1)]
    for env in envs:
        env.reset()
    return [env.step(np.zeros(num_envs, dtype=np.int32))[0] for env in envs]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("env_name", ["coinrun", "starpilot"])
def test_seeding(env_name, resolution):
    obs1, obs2, obs3 = run_in_subproc(seeding_observations, env_name=env_name, resolution=resolution)
    assert np.array_equal(obs1, obs2)
    assert not np.array_equal(obs1, obs3)


def collect_observations_twice(env_name, resolution):
    def collect_observations():
        rng = np.random.RandomState(0)
        env = make_env(num=2, env_name=env_name, rand_seed=23, resolution=resolution)
        obs, _ = env.reset()
        obses = [obs]
        for _ in range(128):
            obs = env.step(rng.randint(low=0, high=env.num_actions, size=(env.num_envs,), dtype=np.int32))[0]
            obses.append(obs)
        env.close()
        return np.array(obses)

    return collect_observations(), collect_observations()


@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("env_name", ["coinrun", "starpilot"])
def test_determinism(env_name, resolution):
    obs1, obs2 = run_in_subproc(collect_observations_twice, env_name=env_name, resolution=resolution)
    assert obs1.shape == (129, 2, 3, resolution, resolution)
    assert np.array_equal(obs1, obs2)


@pytest.mark.parametrize("env_name", ENV_NAMES)
@pytest.mark.parametrize("num_envs", [1, 2, 16])
def test_multi_speed(env_name, num_envs):
    """Upstream times this with pytest-benchmark; here it is a 1,000-step run of every game (64 x 64, in process)."""
    env = make_env(num=num_envs, env_name=env_name, resolution=64)
    actions = np.zeros([env.num_envs], dtype=np.int32)
    env.reset()
    for _ in range(1000):
        obs = env.step(actions)[0]
    assert obs.shape == (num_envs, 3, 64, 64)
    env.close()


# state_test.py


def digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def record(obs, rew, first, info, env, get_state):
    result = dict(ob=(digest(np.asarray(rew, np.float32)), {"rgb": digest(obs)}, digest(np.asarray(first, bool))),
                  info=[{name: values[i].item() for name, values in info.items()} for i in range(env.num_envs)])
    if get_state:
        result["state"] = env.get_state()
    return result


def gather_rollouts(env_kwargs, actions, state=None, get_state=False, set_state_every_step=False):
    env = make_env(**env_kwargs)
    obs, info = env.reset() if state is None else env.set_state(state)
    # gym3's first observe() also gives the reward and first flag libenv holds (after set_state: the restored step's)
    result = [record(obs, env._rewards.copy(), env._firsts.copy(), info, env, get_state)]
    if set_state_every_step:
        env.set_state(result[-1]["state"])
    for act in actions:
        obs, rew, first, info = env.step(act)
        result.append(record(obs, rew, first, info, env, get_state))
        if set_state_every_step:
            env.set_state(result[-1]["state"])
    return result


def assert_rollouts_identical(a_rollout, b_rollout):
    assert len(a_rollout) == len(b_rollout)
    for a, b in zip(a_rollout, b_rollout):
        assert a["info"] == b["info"]
        a_rew, a_ob, a_first = a["ob"]
        b_rew, b_ob, b_first = b["ob"]
        assert a_rew == b_rew
        assert a_first == b_first
        assert sorted(a_ob.keys()) == sorted(b_ob.keys())
        for k in sorted(a_ob.keys()):
            assert a_ob[k] == b_ob[k]
        if "state" in a and "state" in b:
            assert a["state"] == b["state"]


@pytest.mark.slow
@pytest.mark.parametrize("resolution", RESOLUTIONS)
@pytest.mark.parametrize("env_name", ENV_NAMES)
def test_state(env_name, resolution):
    run_state_test(env_name, resolution)


@pytest.mark.parametrize("env_name,resolution", [("coinrun", 64), ("starpilot", 128)])
def test_state_500_steps(env_name, resolution):
    """test_state shortened to 500 steps, for the default run."""
    run_state_test(env_name, resolution, num_steps=500)


def run_state_test(env_name, resolution, num_steps=NUM_STEPS):
    env_kwargs = dict(num=2, env_name=env_name, rand_seed=0, resolution=resolution)
    rng = np.random.RandomState(0)
    actions = [rng.randint(0, procgen_hd.NUM_ACTIONS, size=(2,), dtype=np.int32) for _ in range(num_steps)]
    ref_rollouts = run_in_subproc(gather_rollouts, env_kwargs=env_kwargs, actions=actions)
    assert len(ref_rollouts) == num_steps + 1

    # run the same thing a second time
    basic_rollouts = run_in_subproc(gather_rollouts, env_kwargs=env_kwargs, actions=actions)
    assert_rollouts_identical(ref_rollouts, basic_rollouts)

    # run but save states
    state_rollouts = run_in_subproc(gather_rollouts, env_kwargs=env_kwargs, actions=actions, get_state=True)
    assert_rollouts_identical(ref_rollouts, state_rollouts)

    # make sure states are the same
    state_rollouts_2 = run_in_subproc(gather_rollouts, env_kwargs=env_kwargs, actions=actions, get_state=True)
    assert_rollouts_identical(ref_rollouts, state_rollouts_2)
    assert_rollouts_identical(state_rollouts, state_rollouts_2)

    # save and restore at each timestep
    state_rollouts_3 = run_in_subproc(gather_rollouts, env_kwargs=env_kwargs, actions=actions, get_state=True,
                                      set_state_every_step=True)
    assert_rollouts_identical(ref_rollouts, state_rollouts_3)
    assert_rollouts_identical(state_rollouts, state_rollouts_3)

    # restore a point in the middle of the rollout and make sure that the remainder of the data looks the same
    offset = num_steps // 2
    state_restore_rollouts = run_in_subproc(gather_rollouts, env_kwargs={**env_kwargs, "rand_seed": 1},
                                            actions=actions[offset:], state=state_rollouts[offset]["state"],
                                            get_state=True)
    assert_rollouts_identical(ref_rollouts[offset:], state_restore_rollouts)
    assert_rollouts_identical(state_rollouts[offset:], state_restore_rollouts)
