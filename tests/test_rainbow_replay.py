"""rainbow_atari_gap.py's prioritised replay fed by a real EnvPool Atari rollout: what it rebuilds
and samples is what EnvPool returned, and EnvPool's auto-reset step is never a transition."""

import numpy as np
import pytest
import torch

import rainbow_atari_gap as rainbow
import utils

N_STEP, GAMMA, STEPS = 3, 0.99, 300


def record(capacity, episodic_life=True):
    """Random play in Breakout with a short time limit so that life losses, game overs and
    truncations all happen; stored by the training loop's own `store_env_step`. `auto_reset` is
    worked out here from the records (the step after an episode end), not by the script."""
    args = rainbow.Args(env_id="Breakout", max_episode_steps=40, num_envs=2, episodic_life=episodic_life)
    envs = rainbow.make_env(args, 2, seed=3)
    obs, info = envs.reset()
    observations, records = [obs], []
    replay = rainbow.make_replay(2, capacity, 84, "cpu")
    rainbow.store_reset(replay, 0, torch.tensor(obs), info, N_STEP, 4)
    episode_done, previous_end = np.zeros(2, dtype=bool), np.zeros(2, dtype=bool)
    rng = np.random.default_rng(0)
    for t in range(STEPS):
        actions = rng.integers(envs.action_space.n, size=2)
        obs, rewards, terminated, truncated, info = envs.step(actions)
        episode_done = rainbow.store_env_step(replay, t, actions, rewards, terminated, truncated, info, torch.tensor(obs),
                                              episode_done, N_STEP, args.frame_stack)
        records.append(dict(actions=actions, rewards=rewards, terminated=terminated, truncated=truncated,
                            auto_reset=previous_end, elapsed=info["elapsed_step"]))
        previous_end = terminated | truncated
        observations.append(obs)
    envs.close()
    return replay, np.stack(observations), records


def slow_transition(observations, records, env, t):
    """n-step return, bootstrap discount and bootstrap observation, walking the recorded steps."""
    total = 0.0
    for i in range(N_STEP):
        step = records[t + i]
        total += GAMMA**i * step["rewards"][env]
        if step["terminated"][env]:
            return total, 0.0, observations[t + i + 1][env]
        if step["truncated"][env]:
            return total, GAMMA ** (i + 1), observations[t + i + 1][env]
    return total, GAMMA**N_STEP, observations[t + N_STEP][env]


@pytest.fixture(scope="module")
def rollout():
    return record(capacity=400)


def leaf_priorities(replay):
    num_envs, capacity = replay["valid"].shape
    half = replay["sum_tree"].numel() // 2
    return replay["sum_tree"][half: half + num_envs * capacity].view(num_envs, capacity)


def test_the_rollout_has_life_losses_truncations_and_auto_resets(rollout):
    _, _, records = rollout
    assert sum(r["terminated"].sum() for r in records) >= 4
    assert sum(r["truncated"].sum() for r in records) >= 2
    assert sum(r["auto_reset"].sum() for r in records) >= 6


def test_envpool_reset_steps_are_stored_as_not_valid_and_every_real_step_as_valid(rollout):
    """Fails if the training loop's store marks EnvPool's auto-reset step as a transition."""
    replay, _, records = rollout
    auto_reset = np.stack([r["auto_reset"] for r in records]).T
    assert np.array_equal(replay["valid"][:, :STEPS].numpy(), ~auto_reset)
    # independent of the done flags: a real step advances EnvPool's elapsed_step by one, its reset step does not
    elapsed = np.stack([np.zeros(2, dtype=int)] + [r["elapsed"] for r in records])
    assert np.array_equal(replay["valid"][:, :STEPS].numpy(), (elapsed[1:] == elapsed[:-1] + 1).T)


def test_rebuilt_stacks_equal_envpool_observations_at_every_slot(rollout):
    replay, observations, _ = rollout
    for env in range(2):
        rebuilt = rainbow.stack_frames(replay, torch.full((len(observations),), env), torch.arange(len(observations)), 4)
        assert np.array_equal(rebuilt.numpy(), observations[:, env])


def test_exactly_the_real_steps_with_a_stored_window_have_priority(rollout):
    replay, _, records = rollout
    priorities = leaf_priorities(replay)
    for env in range(2):
        for t in range(STEPS):
            sampleable = t + N_STEP <= STEPS and not records[t]["auto_reset"][env]
            assert priorities[env, t].item() == (1.0 if sampleable else 0.0), (env, t)


def test_every_sampleable_transition_matches_the_recorded_n_step_transition(rollout):
    replay, observations, records = rollout
    priorities = leaf_priorities(replay)
    leaves = torch.nonzero(priorities.flatten() > 0).flatten()
    capacity = replay["valid"].shape[1]
    batch = rainbow.gather_batch(replay, leaves // capacity, leaves % capacity, N_STEP, 4, GAMMA)
    for i, leaf in enumerate(leaves.tolist()):
        env, t = divmod(leaf, capacity)
        total, discount, next_obs = slow_transition(observations, records, env, t)
        assert batch["returns"][i].item() == pytest.approx(total, abs=1e-5)
        assert batch["bootstrap_discount"][i].item() == pytest.approx(discount, abs=1e-6)
        assert np.array_equal(batch["next_observations"][i].numpy(), next_obs)
        assert np.array_equal(batch["observations"][i].numpy(), observations[t][env])
        assert batch["actions"][i].item() == records[t]["actions"][env]


def test_prioritised_samples_are_never_auto_reset_steps(rollout):
    replay, _, records = rollout
    torch.manual_seed(0)
    auto_reset = torch.tensor(np.stack([r["auto_reset"] for r in records]).T)
    for _ in range(50):
        batch = rainbow.sample_batch(replay, 32, N_STEP, 4, GAMMA)
        env, t = batch["leaves"] // 400, batch["leaves"] % 400
        assert not auto_reset[env, t].any() and (t + N_STEP <= STEPS).all()
        assert torch.allclose(batch["probabilities"], torch.full((32,), 1.0 / (leaf_priorities(replay) > 0).sum().item()))


def test_wrapped_replay_gives_priority_only_to_transitions_whose_frames_are_still_stored():
    capacity = 64
    replay, observations, records = record(capacity)
    priorities = leaf_priorities(replay)
    # slots hold times STEPS+1-capacity .. STEPS; a transition needs its 3 older frames kept too
    oldest_sampleable = STEPS + 1 - capacity + 3
    for env in range(2):
        for t in range(STEPS + 1 - capacity, STEPS + 1):
            sampleable = oldest_sampleable <= t <= STEPS - N_STEP and not records[t]["auto_reset"][env]
            assert (priorities[env, t % capacity].item() > 0) == sampleable, (env, t)
            if sampleable:
                rebuilt = rainbow.stack_frames(replay, torch.tensor([env]), torch.tensor([t]), 4)
                assert np.array_equal(rebuilt[0].numpy(), observations[t][env])


def test_resume_cut_ends_stored_episodes_before_the_new_games():
    replay, observations, records = record(capacity=400, episodic_life=False)
    utils.cut_episodes_at_resume(replay, STEPS)
    leaves = torch.tensor([STEPS - 2, 400 + STEPS - 2])  # windows that reach the cut
    batch = rainbow.gather_batch(replay, leaves // 400, leaves % 400, N_STEP, 4, GAMMA)
    for i, env in enumerate(range(2)):
        if not (records[STEPS - 2]["terminated"][env] or records[STEPS - 2]["truncated"][env]):
            assert np.array_equal(batch["next_observations"][i].numpy(), observations[STEPS][env])
            assert batch["bootstrap_discount"][i].item() == pytest.approx(GAMMA**2)
