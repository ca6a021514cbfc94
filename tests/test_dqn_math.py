"""dqn_atari_gap.py: the DQN math and the frame-once replay against slow, independent references."""

from collections import deque

import numpy as np
import pytest
import torch

import dqn_atari_gap as dqn
import utils


# epsilon schedule
def test_linear_schedule_matches_a_plain_interpolation_then_stays_at_the_end():
    start, end, duration = 1.0, 0.01, 1000.0
    for t in [0, 1, 250, 500, 999, 1000, 1001, 5000]:
        reference = start + (end - start) * min(t / duration, 1.0)
        assert dqn.linear_schedule(start, end, duration, t) == pytest.approx(reference)


# n-step returns
def slow_n_step(rewards, terminated, truncated, gamma):
    """Plain loop: sum until (and including) the first episode end; bootstrap unless terminated."""
    total, discount = 0.0, 1.0
    for k in range(len(rewards)):
        total += discount * rewards[k]
        discount *= gamma
        if terminated[k]:
            return total, k + 1, 0.0
        if truncated[k]:
            return total, k + 1, discount
    return total, len(rewards), discount


def test_n_step_return_stops_at_episode_ends_and_bootstraps_only_when_not_terminated():
    gamma = 0.9
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(64, 5)).astype(np.float32)
    terminated = rng.random((64, 5)) < 0.15
    truncated = (rng.random((64, 5)) < 0.15) & ~terminated
    returns, steps, bootstrap = dqn.n_step_returns(
        torch.tensor(rewards), torch.tensor(terminated), torch.tensor(truncated), gamma)
    for i in range(64):
        reference_return, reference_steps, reference_bootstrap = slow_n_step(rewards[i], terminated[i], truncated[i], gamma)
        assert returns[i].item() == pytest.approx(reference_return, abs=1e-5)
        assert steps[i].item() == reference_steps
        assert bootstrap[i].item() == pytest.approx(reference_bootstrap, abs=1e-6)


def test_one_step_return_is_the_reward_and_gamma_bootstrap():
    returns, steps, bootstrap = dqn.n_step_returns(
        torch.tensor([[2.0], [3.0]]), torch.tensor([[False], [True]]), torch.tensor([[False], [False]]), 0.99)
    assert returns.tolist() == [2.0, 3.0]
    assert steps.tolist() == [1, 1]
    assert bootstrap.tolist() == pytest.approx([0.99, 0.0])


# TD target
def test_td_target_uses_the_max_of_the_target_network():
    returns = torch.tensor([1.0, 0.5])
    bootstrap = torch.tensor([0.99, 0.0])
    next_q_target = torch.tensor([[1.0, 4.0, 2.0], [7.0, 1.0, 0.0]])
    target = dqn.compute_td_target(returns, bootstrap, next_q_target)
    reference = [returns[i].item() + bootstrap[i].item() * max(next_q_target[i].tolist()) for i in range(2)]
    assert target.tolist() == pytest.approx(reference)


def test_double_td_target_evaluates_the_online_argmax_with_the_target_network():
    returns = torch.tensor([1.0, 0.5, 0.0])
    bootstrap = torch.tensor([0.9, 0.81, 1.0])
    next_q_target = torch.tensor([[1.0, 4.0, 2.0], [7.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    next_q_online = torch.tensor([[5.0, 0.0, 1.0], [0.0, 0.0, 9.0], [0.0, 2.0, 1.0]])
    target = dqn.compute_td_target(returns, bootstrap, next_q_target, next_q_online)
    reference = []
    for i in range(3):
        online = next_q_online[i].tolist()
        best = online.index(max(online))
        reference.append(returns[i].item() + bootstrap[i].item() * next_q_target[i, best].item())
    assert target.tolist() == pytest.approx(reference)


# a scripted EnvPool stream: episodes (lives and games) with distinct frames
def scripted_stream(segments, frame_stack=4, side=2):
    """Emulate EnvPool Atari with episodic life and auto-reset on hand-made frames.

    `segments`: (steps, how) per life: how is "life" (life loss, terminated, the game goes on and the
    stack keeps stacking), "game" (game over, terminated) or "time" (truncated). Frame values count up,
    so each observation's newest frame names its time slot. Returns the per-step records the
    training loop sees and the list of real transitions (obs, action, reward, term, trunc, next_obs).
    """
    counter = 0
    stack = deque(maxlen=frame_stack)

    def new_frame():
        nonlocal counter
        frame = np.full((side, side), counter, dtype=np.uint8)
        counter += 1
        return frame

    def observe(push_all):
        frame = new_frame()
        if push_all:
            stack.extend([frame] * frame_stack)
        else:
            stack.append(frame)
        return np.stack(stack)

    first_obs = observe(push_all=True)
    steps, transitions = [], []
    obs, elapsed, pending_reset = first_obs, 0, None
    rng = np.random.default_rng(1)
    for length, how in segments:
        if pending_reset is not None:  # EnvPool's auto-reset step: action ignored, reward 0
            fresh = pending_reset != "life"
            elapsed = 0 if fresh else elapsed
            obs = observe(push_all=fresh)
            steps.append(dict(action=int(rng.integers(4)), reward=0.0, terminated=False, truncated=False, next_obs=obs,
                              elapsed=elapsed))
        for k in range(length):
            action, reward = int(rng.integers(4)), float(rng.integers(-1, 2))
            last = k == length - 1
            terminated, truncated = last and how in ("life", "game"), last and how == "time"
            elapsed += 1
            next_obs = observe(push_all=False)
            steps.append(dict(action=action, reward=reward, terminated=terminated, truncated=truncated, next_obs=next_obs,
                              elapsed=elapsed))
            transitions.append(dict(obs=obs, action=action, reward=reward, terminated=terminated, truncated=truncated,
                                    next_obs=next_obs))
            obs = next_obs
        pending_reset = how
    return first_obs, steps, transitions


def fill_replay(first_obs, steps, capacity):
    """Store a stream with the training loop's own `store_env_step` (one environment)."""
    replay = dqn.make_replay(1, capacity, first_obs.shape[-1], "cpu")
    assert dqn.store_reset(replay, 0, torch.tensor(first_obs[None]), {"elapsed_step": np.array([0])}) == 0
    episode_done = np.array([False])
    for t, step in enumerate(steps):
        episode_done = dqn.store_env_step(replay, t, np.array([step["action"]]), np.array([step["reward"]]),
                                          np.array([step["terminated"]]), np.array([step["truncated"]]),
                                          {"elapsed_step": np.array([step["elapsed"]])}, torch.tensor(step["next_obs"][None]),
                                          episode_done)
    return replay, len(steps)


SEGMENTS = [(6, "life"), (3, "life"), (5, "game"), (4, "time"), (1, "life"), (7, "game"), (2, "time"), (5, "life")]


def test_stack_frames_rebuilds_every_observation_envpool_returned():
    first_obs, steps, _ = scripted_stream(SEGMENTS)
    replay, buffer_time = fill_replay(first_obs, steps, capacity=256)
    observations = [first_obs] + [step["next_obs"] for step in steps]
    env_index = torch.zeros(buffer_time + 1, dtype=torch.long)
    rebuilt = dqn.stack_frames(replay, env_index, torch.arange(buffer_time + 1), 4)
    for t, obs in enumerate(observations):
        assert np.array_equal(rebuilt[t].numpy(), obs), f"slot {t}"


def reference_n_step(transitions, index, n, gamma):
    """From the list of real transitions: n-step return of transition `index`, never past an episode end."""
    total, discount = 0.0, 1.0
    for k in range(n):
        transition = transitions[index + k]
        total += discount * transition["reward"]
        discount *= gamma
        if transition["terminated"]:
            return total, 0.0, transition["next_obs"]
        if transition["truncated"] or k == n - 1:
            return total, discount, transition["next_obs"]


@pytest.mark.parametrize("n_step", [1, 3])
def test_sampled_transitions_are_exactly_the_real_ones_never_the_auto_reset_step(n_step):
    gamma = 0.9
    first_obs, steps, transitions = scripted_stream(SEGMENTS)
    replay, buffer_time = fill_replay(first_obs, steps, capacity=256)
    # the newest n-step windows are not complete yet: only transitions whose window is stored count
    by_newest_frame = {int(tr["obs"][-1, 0, 0]): i for i, tr in enumerate(transitions)}
    torch.manual_seed(0)
    batch = dqn.sample_batch(replay, buffer_time, 4000, n_step, 4, gamma)
    assert bool((batch["weights"] == 1).all())
    seen = set()
    for i in range(4000):
        newest = int(batch["observations"][i, -1, 0, 0])
        assert newest in by_newest_frame, f"slot {newest} is not a real transition (an auto-reset step?)"
        index = by_newest_frame[newest]
        seen.add(index)
        transition = transitions[index]
        expected_return, expected_bootstrap, expected_next = reference_n_step(transitions, index, n_step, gamma)
        assert np.array_equal(batch["observations"][i].numpy(), transition["obs"])
        assert batch["actions"][i].item() == transition["action"]
        assert batch["returns"][i].item() == pytest.approx(expected_return, abs=1e-6)
        assert batch["bootstrap_discount"][i].item() == pytest.approx(expected_bootstrap, abs=1e-6)
        assert np.array_equal(batch["next_observations"][i].numpy(), expected_next)
    complete = {i for i, tr in enumerate(transitions) if int(tr["obs"][-1, 0, 0]) <= buffer_time - n_step}
    assert seen == complete


def test_wrapped_replay_samples_only_transitions_whose_frames_are_still_stored():
    first_obs, steps, transitions = scripted_stream(SEGMENTS)
    capacity = 20
    replay, buffer_time = fill_replay(first_obs, steps, capacity=capacity)
    by_newest_frame = {int(tr["obs"][-1, 0, 0]): tr for tr in transitions}
    torch.manual_seed(0)
    batch = dqn.sample_batch(replay, buffer_time, 2000, 1, 4, 0.99)
    newest = batch["observations"][:, -1, 0, 0].long()
    assert int(newest.min()) >= buffer_time - capacity + 4
    for i in range(2000):
        transition = by_newest_frame[int(newest[i])]
        assert np.array_equal(batch["observations"][i].numpy(), transition["obs"])
        assert np.array_equal(batch["next_observations"][i].numpy(), transition["next_obs"])


def test_resume_cut_ends_stored_episodes_as_time_limits_before_the_new_games():
    first_obs, steps, transitions = scripted_stream([(12, "game")])
    replay, buffer_time = fill_replay(first_obs, steps[:8], capacity=64)  # stopped mid-episode at o_8
    utils.cut_episodes_at_resume(replay, buffer_time)
    fresh = np.full((4, 2, 2), 200, dtype=np.uint8)  # the new game's first observation, as the training loop stores it
    assert dqn.store_reset(replay, buffer_time, torch.tensor(fresh[None]), {"elapsed_step": np.array([0])}) == buffer_time + 1
    assert not replay["valid"][0, buffer_time] and np.array_equal(dqn.stack_frames(
        replay, torch.tensor([0]), torch.tensor([buffer_time + 1]), 4)[0].numpy(), fresh)
    torch.manual_seed(0)
    batch = dqn.sample_batch(replay, buffer_time + 1, 1000, 3, 4, 0.5)
    for i in range(1000):
        newest = int(batch["observations"][i, -1, 0, 0])
        assert newest < 8, "the slot of o_8 (before the new games) is never a transition"
        expected_return, expected_bootstrap, expected_next = reference_n_step(transitions[:8], newest, min(3, 8 - newest), 0.5)
        assert batch["returns"][i].item() == pytest.approx(expected_return)
        assert batch["bootstrap_discount"][i].item() == pytest.approx(expected_bootstrap)
        assert np.array_equal(batch["next_observations"][i].numpy(), expected_next)


# network shapes and parameter counts
@pytest.mark.parametrize("encoder,resolution", [("nature", 84), ("nature", 36), ("nature", 128), ("impala", 84),
                                                ("impala", 64)])
def test_feature_map_shape_matches_the_real_network(encoder, resolution):
    args = dqn.Args(encoder=encoder, resolution=resolution, width=1)
    network = dqn.QNetwork(args, 4)
    channels, side = dqn.feature_map_shape(network.encoder, 4, resolution)
    output = network.encoder(torch.zeros(1, 4, resolution, resolution))
    assert tuple(output.shape) == (1, channels, side, side)
    # VALID padding: (((R - 8) // 4 + 1 - 4) // 2 + 1) - 2; Impala: three stride-2 pools, ceil(R / 8)
    assert side == ((((resolution - 8) // 4 + 1) - 4) // 2 + 1 - 2 if encoder == "nature" else -(-resolution // 8))


def test_a_frame_too_small_for_the_nature_encoder_has_no_feature_map():
    with torch.device("meta"):
        encoder = dqn.nature_encoder(4, 1)
    assert dqn.feature_map_shape(encoder, 4, 35) == (0, 0) and dqn.feature_map_shape(encoder, 4, 36) == (64, 1)


def test_nature_encoder_at_84_gives_7x7x64_and_flatten_bottleneck_has_hwc_times_dense_weights():
    assert dqn.feature_map_shape(dqn.nature_encoder(4, 1), 4, 84) == (64, 7)
    flatten = utils.parameter_counts(dqn.QNetwork(dqn.Args(pool="flatten", dense_scale=2), 4))
    pooled = utils.parameter_counts(dqn.QNetwork(dqn.Args(pool="avg", dense_scale=2), 4))
    assert flatten["bottleneck"] == 7 * 7 * 64 * 1024 + 1024
    assert pooled["bottleneck"] == 64 * 1024 + 1024
    assert flatten["encoder"] == pooled["encoder"] and flatten["head"] == pooled["head"] == 1024 * 4 + 4


@pytest.mark.parametrize("encoder,pool", [("nature", "avg"), ("nature", "flatten"), ("impala", "max")])
def test_feature_norm_is_the_mean_norm_of_the_bottleneck_input(encoder, pool):
    torch.manual_seed(0)
    q_network = dqn.QNetwork(dqn.Args(encoder=encoder, pool=pool, resolution=64), 4)
    obs = torch.randint(0, 256, (6, 4, 64, 64), dtype=torch.uint8)
    diagnostics = utils.network_diagnostics(q_network, obs, 0.025)
    with torch.no_grad():
        feature_map = q_network.encoder(obs.float() / 255.0)
    norms = []
    for i in range(6):
        if pool == "flatten":
            vector = feature_map[i].reshape(-1)
        elif pool == "avg":
            vector = feature_map[i].mean(dim=(1, 2))
        else:
            vector = feature_map[i].amax(dim=(1, 2))
        norms.append(float(vector.pow(2).sum().sqrt()))
    assert diagnostics["diag/feature_norm"] == pytest.approx(sum(norms) / 6, rel=1e-5)
    for part in ("encoder", "bottleneck", "head"):
        assert 0.0 <= diagnostics[f"diag/dormant_fraction/{part}"] <= 1.0


def test_select_actions_is_greedy_at_epsilon_zero_and_skips_the_network_at_one():
    q_values = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 1.0]])
    assert dqn.select_actions(lambda obs: q_values, torch.zeros(2, 4, 8, 8), 0.0, 3).tolist() == [1, 0]

    def no_network(obs):
        raise AssertionError("a fully random step must not run the network")

    actions = dqn.select_actions(no_network, torch.zeros(2, 4, 8, 8), 1.0, 3)  # a host epsilon of 1 (eager acting)
    assert actions.shape == (2,) and set(actions.tolist()) <= {0, 1, 2}


def test_dqn_updates_fit_the_td_targets_of_a_fixed_batch():
    torch.manual_seed(0)
    args = dqn.Args(resolution=36)
    q_network, target_network = dqn.QNetwork(args, 3), dqn.QNetwork(args, 3)
    batch = {
        "observations": torch.randint(0, 256, (16, 4, 36, 36), dtype=torch.uint8),
        "next_observations": torch.randint(0, 256, (16, 4, 36, 36), dtype=torch.uint8),
        "actions": torch.randint(0, 3, (16,)),
        "returns": torch.randn(16),
        "bootstrap_discount": torch.full((16,), 0.99),
        "weights": torch.ones(16),
    }
    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-3)
    first, _ = dqn.dqn_loss(q_network, target_network, batch, double=True)
    for _ in range(50):
        loss, _ = dqn.dqn_loss(q_network, target_network, batch, double=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first.item()


def test_dqn_loss_ignores_transitions_with_weight_zero():
    torch.manual_seed(0)
    args = dqn.Args(resolution=36)
    q_network, target_network = dqn.QNetwork(args, 3), dqn.QNetwork(args, 3)
    batch = {
        "observations": torch.randint(0, 256, (4, 4, 36, 36), dtype=torch.uint8),
        "next_observations": torch.randint(0, 256, (4, 4, 36, 36), dtype=torch.uint8),
        "actions": torch.tensor([0, 1, 2, 0]),
        "returns": torch.tensor([1.0, 2.0, 1e6, 3.0]),
        "bootstrap_discount": torch.tensor([0.99, 0.0, 0.99, 0.99]),
        "weights": torch.tensor([1.0, 1.0, 0.0, 1.0]),
    }
    loss, q_taken = dqn.dqn_loss(q_network, target_network, batch, double=False)
    with torch.no_grad():
        next_max = target_network(batch["next_observations"]).max(dim=1).values
    errors = [(q_taken[i].item()
               - (batch["returns"][i].item() + batch["bootstrap_discount"][i].item() * next_max[i].item())) ** 2
              for i in (0, 1, 3)]
    assert loss.item() == pytest.approx(sum(errors) / 3, rel=1e-5)


def filled_replay():
    """A replay of the scripted stream, as the training loop stores it."""
    first_obs, steps, _ = scripted_stream(SEGMENTS, side=36)
    return fill_replay(first_obs, steps, capacity=256)


def test_learner_step_takes_one_adam_step_on_the_loss_of_a_uniform_batch():
    """sample -> loss -> backward -> step: the loss returned is that of the batch sample_batch draws from the same
    RNG state, measured before the step; the mean Q is that batch's mean Q(s, a); the weights move."""
    torch.manual_seed(0)
    args = dqn.Args(resolution=36, batch_size=16, n_step=3, double=True)
    q_network, target_network = dqn.QNetwork(args, 4), dqn.QNetwork(args, 4)
    replay, buffer_time = filled_replay()
    torch.manual_seed(1)
    batch = dqn.sample_batch(replay, buffer_time, args.batch_size, args.n_step, args.frame_stack, args.gamma)
    expected_loss, q_taken = dqn.dqn_loss(q_network, target_network, batch, double=True)
    before = [p.detach().clone() for p in q_network.parameters()]
    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-3)
    torch.manual_seed(1)
    loss, mean_q = dqn.learner_step(q_network, target_network, optimizer, replay, buffer_time, args)
    assert not loss.requires_grad and not mean_q.requires_grad
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    assert mean_q.item() == pytest.approx(q_taken.mean().item(), rel=1e-6)
    assert any(not torch.equal(b, p) for b, p in zip(before, q_network.parameters()))
    assert optimizer.state_dict()["state"][0]["step"] == 1


def test_soft_update_moves_the_target_by_the_rate_and_copies_it_exactly_at_rate_one():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    start = [p.detach().clone() for p in target.parameters()]
    dqn.soft_update(target, online, 0.25)
    for old, new, source in zip(start, target.parameters(), online.parameters()):
        assert torch.allclose(new, 0.75 * old + 0.25 * source, atol=1e-7)
    dqn.soft_update(target, online, 1.0)
    assert all(torch.equal(new, source) for new, source in zip(target.parameters(), online.parameters()))
