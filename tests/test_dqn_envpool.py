"""dqn_atari_gap.py with a real EnvPool Atari rollout: what the replay rebuilds is what EnvPool returned."""

import numpy as np
import pytest
import torch

import dqn_atari_gap as dqn
import utils


@pytest.fixture(scope="module")
def rollout():
    """Random play in Breakout with a short time limit so that life losses, game ends and
    truncations all happen; stored by the training loop's own `store_env_step`."""
    args = dqn.Args(env_id="Breakout", max_episode_steps=40, num_envs=2)
    envs = dqn.make_env(args, 2, seed=3)
    obs, info = envs.reset()
    observations, elapsed, records = [obs], [info["elapsed_step"]], []
    replay = dqn.make_replay(2, 400, 84, "cpu")
    dqn.store_reset(replay, 0, torch.tensor(obs), info)
    episode_done = np.zeros(2, dtype=bool)
    episode_return, games = np.zeros(2), []
    rng = np.random.default_rng(0)
    for t in range(300):
        actions = rng.integers(envs.action_space.n, size=2)
        obs, rewards, terminated, truncated, info = envs.step(actions)
        episode_done = dqn.store_env_step(replay, t, actions, rewards, terminated, truncated, info, torch.tensor(obs),
                                          episode_done)
        games += utils.finished_games(episode_return, info, truncated)
        observations.append(obs)
        elapsed.append(info["elapsed_step"])
        records.append(dict(rewards=rewards, raw=info["reward"], terminated=terminated, truncated=truncated,
                            game_over=info["terminated"]))
    envs.close()
    return replay, np.stack(observations), np.stack(elapsed), records, games


def test_the_rollout_has_life_losses_truncations_and_resets(rollout):
    _, _, elapsed, records, _ = rollout
    assert sum(r["terminated"].sum() for r in records) >= 4
    assert sum(r["truncated"].sum() for r in records) >= 2
    assert (elapsed[1:] == 0).sum() >= 2


def test_rebuilt_stacks_equal_envpool_observations_at_every_slot(rollout):
    replay, observations, _, _, _ = rollout
    steps = len(observations)
    for env in range(2):
        rebuilt = dqn.stack_frames(replay, torch.full((steps,), env), torch.arange(steps), 4)
        assert np.array_equal(rebuilt.numpy(), observations[:, env])


def test_valid_slots_are_exactly_the_steps_that_advanced_the_game(rollout):
    # independent of the done flags: a real step advances EnvPool's elapsed_step by one; its
    # auto-reset step keeps it (after a life loss) or restarts it at 0 (a new game)
    replay, _, elapsed, _, _ = rollout
    advanced = elapsed[1:] == elapsed[:-1] + 1
    assert np.array_equal(replay["valid"][:, : len(advanced)].numpy(), advanced.T)


def test_rewards_are_clipped_for_training_while_info_keeps_the_raw_score(rollout):
    replay, _, _, records, _ = rollout
    raw = np.stack([r["raw"] for r in records])
    clipped = np.stack([r["rewards"] for r in records])
    assert np.array_equal(clipped, np.sign(raw))
    assert np.array_equal(replay["rewards"][:, : len(records)].numpy(), clipped.T)


def test_evaluation_defaults_are_what_cleanrls_dqn_atari_runs():
    """vwxyzjn/cleanrl@fe8d8a03 cleanrl/dqn_atari.py:250-258 calls dqn_eval's evaluate with eval_episodes=10 and
    epsilon=args.end_e, which is 0.01 (line 72); dqn_eval.py:17's own default 0.05 is not used (since a00e71b8)."""
    args = dqn.Args()
    assert (args.eval_episodes, args.eval_epsilon, args.end_e) == (10, 0.01, 0.01)


def test_evaluation_plays_the_training_env_and_sums_raw_rewards_of_all_lives_until_game_over():
    """As CleanRL's dqn_eval: life-loss resets as in training, whole-game raw returns. The reference
    replays the same env seed and the same random draws (epsilon 1 never calls the network)."""
    args = dqn.Args(env_id="Breakout", max_episode_steps=2000, eval_epsilon=1.0)
    torch.manual_seed(0)
    returns, _ = dqn.evaluate(None, dqn.make_env(args, 2, seed=5), args.eval_epsilon, 4, "cpu", False)
    envs = dqn.make_env(args, 2, seed=5)
    envs.reset()
    torch.manual_seed(0)
    expected, finished, life_losses = np.zeros(2), np.zeros(2, dtype=bool), 0
    while not finished.all():
        torch.rand(2)  # the coins (all heads at epsilon 1), then the random actions, drawn by torch as select_actions
        _, rewards, terminated, truncated, info = envs.step(torch.randint(4, (2,)).numpy())
        assert np.array_equal(rewards, np.sign(info["reward"])), "the training env clips rewards"
        expected += info["reward"] * ~finished
        life_losses += int((terminated & ~info["terminated"].astype(bool) & ~finished).sum())
        finished |= info["terminated"].astype(bool) | truncated
    assert life_losses >= 4, "the evaluated games went on through life-loss resets"
    assert np.array_equal(returns, expected) and expected.sum() > 0


def test_logged_episodes_are_whole_games_with_raw_returns_over_all_lives(rollout):
    # independent of the done flags: a new game is where EnvPool's elapsed_step restarts at 0;
    # game k's raw rewards are those of the steps between its first observation and the next game's
    _, _, elapsed, records, games = rollout
    raw = np.stack([r["raw"] for r in records])
    expected = []
    for env in range(2):
        starts = np.flatnonzero(elapsed[:, env] == 0)
        for start, next_start in zip(starts[:-1], starts[1:]):
            # steps start .. next_start - 2 played the game; step next_start - 1 was the auto-reset step
            expected.append((env, raw[start : next_start - 1, env].sum(), elapsed[next_start - 1, env]))
    assert len(games) == len(expected) >= 2
    assert sorted((float(r), int(n)) for r, n in games) == sorted((float(r), int(n)) for _, r, n in expected)
    assert sum((r["terminated"] | r["truncated"]).sum() for r in records) > len(games), "life losses are not game ends"
