"""Each script's real main() learns a small pixel task (tests/toy_envs.py) on a CPU.

Flags are parsed, networks built, the loop trained, evaluated and saved exactly as a user's run; only the
environments are the toy tasks, injected where the script builds them (`envpool.make`,
`procgen_hd.ProcgenHDEnv`). Each test reads the run's TensorBoard events and final.pt and asserts that
the final evaluation beats a uniformly random policy, measured on the same task, by a wide margin.
Thresholds hold with margin over seeds 1-5 (README: "Does it learn?").
"""

import os
import sys

import numpy as np
import pytest
import torch

import toy_envs
from conftest import read_scalars

COMMON = ("--no-cuda", "--no-progress", "--torch-threads", "1")
# script -> the flags of its learning run: small networks and buffers, the paper's algorithm otherwise
FLAGS = {
    "ppo": ("--env-id", "bigfish", "--resolution", "32", "--width", "1", "--num-envs", "16", "--num-steps", "32",
            "--num-minibatches", "4", "--total-timesteps", "12288", "--eval-every", "0", "--final-eval-episodes", "96",
            "--eval-num-envs", "32", "--save-every", "0", "--diag-every", "0"),
    "dqn": ("--env-id", "Breakout", "--resolution", "36", "--total-timesteps", "3000", "--learning-starts", "300",
            "--buffer-size", "3000", "--train-frequency", "1", "--target-network-frequency", "250",
            "--exploration-fraction", "0.5", "--end-e", "0.05", "--learning-rate", "5e-4", "--eval-episodes", "32",
            "--eval-every", "0", "--save-every", "0", "--diag-every", "0", "--log-every", "500"),
    "rainbow": ("--preset", "der", "--env-id", "Breakout", "--resolution", "36", "--total-timesteps", "1600",
                "--learning-starts", "500", "--buffer-size", "1600", "--target-network-frequency", "250",
                "--learning-rate", "5e-4", "--noisy-std", "0.5", "--eval-episodes", "32", "--iteration-steps", "1000",
                "--eval-every", "0", "--save-every", "0", "--diag-every", "0", "--log-every", "500"),
    "sac": ("--env-id", "cartpole-swingup", "--resolution", "24", "--action-repeat", "20", "--total-timesteps", "1500",
            "--learning-starts", "200", "--buffer-size", "1500", "--batch-size", "32", "--hidden-dim", "64",
            "--image-pad", "2", "--eval-episodes", "8", "--eval-every", "0", "--save-every", "0", "--diag-every", "0",
            "--log-every", "250"),
}
SCRIPTS = {"ppo": "ppo_procgen_impoola", "dqn": "dqn_atari_gap", "rainbow": "rainbow_atari_gap", "sac": "sac_dmc_gap"}


def train(name: str, tmp_path, monkeypatch, *flags) -> str:
    """Run script `name`'s main() on its toy task in this process; returns the run folder."""
    script = __import__(SCRIPTS[name])
    if name == "ppo":
        monkeypatch.setattr(script.procgen_hd, "ProcgenHDEnv", toy_envs.ToyProcgen)
    else:
        monkeypatch.setattr(script.envpool, "make", toy_envs.make)
    runs_dir = os.path.join(tmp_path, "runs")
    monkeypatch.setattr(sys, "argv", [script.__file__, *FLAGS[name], *COMMON, "--runs-dir", runs_dir, *flags])
    script.main()
    (run,) = os.listdir(runs_dir)
    return os.path.join(runs_dir, run)


def final(run_dir: str, tag: str) -> float:
    """The tag's last value in the run's events; the run must have finished (final.pt written)."""
    assert os.path.isfile(os.path.join(run_dir, "final.pt"))
    return read_scalars(run_dir)[tag][-1][1]


def random_return(env, episodes: int, seed: int = 0) -> float:
    """Mean return of whole episodes (games: until info['terminated']) of uniformly random actions."""
    rng, returns = np.random.default_rng(seed), []
    obs, info = env.reset()
    running = np.zeros(env.num_envs)
    while len(returns) < episodes:
        actions = rng.integers(15 if isinstance(env, toy_envs.ToyProcgen) else env.action_space.n, size=env.num_envs)
        step = env.step(actions)
        if isinstance(env, toy_envs.ToyProcgen):
            running += step[1]
            ended = step[2]
        else:
            running += step[4]["reward"]
            ended = step[4]["terminated"].astype(bool) | step[3]
        returns += list(running[ended])
        running[ended] = 0
    return float(np.mean(returns))


def random_reach_return(action_repeat: int, episodes: int = 8) -> float:
    """One episode per env of uniform actions, stepped by the SAC script's own action repeat and reward twin."""
    import sac_dmc_gap as sac

    env = (toy_envs.make("CartpoleSwingup-v1", env_type="gymnasium", num_envs=episodes, seed=0, from_pixels=True,
                         render_width=24, render_height=24, frame_skip=action_repeat,
                         max_episode_steps=toy_envs.REACH_CONTROL_STEPS // action_repeat, frame_stack=3),
           toy_envs.make("CartpoleSwingup-v1", env_type="gymnasium", num_envs=episodes, seed=0, frame_skip=1))
    sac.reset_env(env)
    rng, total = np.random.default_rng(0), np.zeros(episodes)
    for _ in range(toy_envs.REACH_CONTROL_STEPS // action_repeat):
        total += sac.step_env(env, rng.uniform(-1, 1, (episodes, 1)), action_repeat)[1]
    return float(total.mean())


@pytest.mark.parametrize("pool", ["avg", "flatten"])
def test_ppo_learns_the_cue_task_through_main(tmp_path, monkeypatch, pool):
    run_dir = train("ppo", tmp_path, monkeypatch, "--pool", pool)
    random = random_return(toy_envs.ToyProcgen("bigfish", 32, 32, seed=7), 300)  # 3 rounds x 10 / 15 actions = 2
    assert final(run_dir, "eval/test_levels/return") >= random + 22.0  # of 30
    assert final(run_dir, "eval/train_levels/return") >= random + 22.0


def test_dqn_learns_the_cue_task_through_main(tmp_path, monkeypatch):
    run_dir = train("dqn", tmp_path, monkeypatch)
    env = toy_envs.make("Breakout-v5", env_type="gymnasium", num_envs=16, seed=7, img_height=36, img_width=36,
                        episodic_life=True, reward_clip=True)
    random = random_return(env, 300)  # 3 lives x 2 / 4 actions = 1.5
    assert final(run_dir, "eval/return") >= random + 2.5  # of 6


def test_rainbow_der_learns_the_cue_task_through_main(tmp_path, monkeypatch):
    run_dir = train("rainbow", tmp_path, monkeypatch)
    env = toy_envs.make("Breakout-v5", env_type="gymnasium", num_envs=16, seed=7, img_height=36, img_width=36)
    random = random_return(env, 300)
    assert final(run_dir, "eval/return") >= random + 2.5
    assert final(run_dir, "charts/iteration_return") > random


def test_sac_learns_the_reach_task_through_main(tmp_path, monkeypatch):
    run_dir = train("sac", tmp_path, monkeypatch)
    random = random_reach_return(action_repeat=20)
    assert final(run_dir, "eval/return") >= random + 250.0  # of about 900
    checkpoint = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    assert checkpoint["global_step"] == 1500


def test_every_learning_mutation_still_applies_to_its_script():
    """tests/learning_mutations.py's proof needs each mutated text exactly once in its file: a refactor that moves it
    would silently turn a mutation into "DOES NOT APPLY" until someone runs the 20-minute proof."""
    import learning_mutations

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, _, path, text, _ in learning_mutations.MUTATIONS:
        with open(os.path.join(root, path)) as f:
            assert f.read().count(text) == 1, f"{name}: its text is no longer exactly once in {path}"
