"""The value-based scripts' fast paths (issue 13), proven on a CPU at function level: the learner step that
--cuda-graphs captures (static in-place tensors, no host value read) equals the plain eager step, and
torch.compile(fullgraph=True) traces its sample -> loss -> priorities without a graph break and equals eager on
fresh inputs; epsilon-greedy runs on the device; the staged store equals the plain one. The CUDA graph replay
itself (CapturedStep) and the pinned, non_blocking copies need a GPU and are not run here."""

import copy

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dqn_atari_gap as dqn
import rainbow_atari_gap as rainbow
from test_dqn_math import filled_replay

SCRIPTS = {"dqn": dqn, "rainbow": rainbow}


class SyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values (`.item()`, `bool(tensor)`): each is a sync on CUDA."""

    syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def rainbow_replay(args, steps: int = 60):
    """A Rainbow replay of random frames stored by the training loop's own store functions, priorities included."""
    generator = np.random.default_rng(0)
    replay = rainbow.make_replay(1, 64, args.resolution, "cpu")
    obs = torch.as_tensor(generator.integers(0, 256, (1, 4, args.resolution, args.resolution), dtype=np.uint8))
    rainbow.store_reset(replay, 0, obs, {"elapsed_step": np.array([0])}, args.n_step, args.frame_stack)
    episode_done = np.zeros(1, dtype=bool)
    for t in range(steps):
        obs = torch.as_tensor(generator.integers(0, 256, (1, 4, args.resolution, args.resolution), dtype=np.uint8))
        terminated = np.array([t % 17 == 16])
        episode_done = rainbow.store_env_step(replay, t, generator.integers(0, 3, 1), generator.normal(size=1),
                                              terminated, np.array([False]), {"elapsed_step": np.array([t % 17])}, obs,
                                              episode_done, args.n_step, args.frame_stack)
    return replay


def learner(name: str):
    """(script, args, q_network, target_network, Adam, replay, the step's last argument: buffer_time | support)."""
    torch.manual_seed(0)
    if name == "dqn":
        args = dqn.Args(resolution=36, batch_size=16, n_step=3, double=True)
        replay, buffer_time = filled_replay()
        extra = buffer_time
    else:
        args = rainbow.Args(encoder="nature", resolution=36, dense_scale=1, batch_size=16, noisy=True, dueling=True,
                            double=True, num_atoms=11)
        replay, extra = rainbow_replay(args), torch.linspace(args.v_min, args.v_max, args.num_atoms)
    q_network, target_network, optimizer = SCRIPTS[name].make_learner(args, 3 if name == "rainbow" else 4, "cpu")
    return SCRIPTS[name], args, q_network, target_network, optimizer, replay, extra


def static_input(name: str, extra):
    """What main() hands the captured step: DQN's buffer_time as a 0-d device tensor, filled in place."""
    return torch.tensor(extra) if name == "dqn" else extra


@pytest.mark.parametrize("name", ["dqn", "rainbow"])
def test_the_captured_learner_step_equals_the_eager_step_and_keeps_every_tensor_in_place(name):
    script, args, q_network, target_network, optimizer, replay, extra = learner(name)
    eager = copy.deepcopy((q_network, target_network, optimizer, replay))
    static = static_input(name, extra)
    for update in range(3):  # the first creates Adam's state; later ones must reuse every buffer (graph replay does)
        torch.manual_seed(10 + update)
        captured_out = script.learner_step(q_network, target_network, optimizer, replay, static, args)
        torch.manual_seed(10 + update)
        eager_out = script.learner_step(*eager, extra, args)
        assert [t.item() for t in captured_out] == [t.item() for t in eager_out]
        addresses = {key: value.data_ptr() for key, value in replay.items()}
        moments = [t.data_ptr() for state in optimizer.state.values() for t in state.values()]
        if update:
            assert addresses == previous_addresses and moments == previous_moments
        previous_addresses, previous_moments = addresses, moments
    for param, eager_param in zip(q_network.parameters(), eager[0].parameters()):
        assert torch.equal(param, eager_param)
    for key in replay:
        assert torch.equal(replay[key], eager[3][key]), key


@pytest.mark.parametrize("name", ["dqn", "rainbow"])
def test_the_learner_step_reads_no_tensor_value_on_the_host(name):
    """No .item() / bool(tensor) / data-dependent shape in sample -> loss -> backward -> step -> priority write
    (SGD: CPU Adam reads its step count, Adam(capturable=True) on CUDA does not)."""
    script, args, q_network, target_network, _, replay, extra = learner(name)
    optimizer = torch.optim.SGD(q_network.parameters(), lr=1e-3)
    counter = SyncCounter()
    with counter:
        script.learner_step(q_network, target_network, optimizer, replay, static_input(name, extra), args)
    assert counter.syncs == 0


@pytest.mark.parametrize("name", ["dqn", "rainbow"])
def test_compiled_fullgraph_sample_loss_and_priorities_equal_eager_on_fresh_inputs(name):
    """Dynamo traces the capturable part without a graph break (fullgraph=True raises on one); the backward and
    Adam stay out, since Tensor.backward() always breaks a Dynamo graph. aot_eager: tracing, not codegen."""
    script, args, q_network, target_network, _, replay, extra = learner(name)
    torch._dynamo.reset()

    def batch_loss(replay, extra):
        if name == "dqn":
            batch = dqn.sample_batch(replay, extra, args.batch_size, args.n_step, args.frame_stack, args.gamma)
            return dqn.dqn_loss(q_network, target_network, batch, args.double)[0]
        batch = rainbow.sample_batch(replay, args.batch_size, args.n_step, args.frame_stack, args.gamma)
        losses, _ = rainbow.rainbow_loss(q_network, target_network, batch, extra, args.double, args.torch_deterministic)
        priorities = (losses.detach().double() + 1e-10) ** args.priority_exponent
        rainbow.sum_tree_update(replay["sum_tree"], batch["leaves"], priorities)
        return (rainbow.importance_weights(batch["probabilities"], args.importance_exponent) * losses).mean()

    compiled = torch.compile(batch_loss, fullgraph=True, backend="aot_eager")
    for seed in (3, 4):  # fresh draws (and for DQN a later newest slot) through the same compiled graph
        fresh = copy.deepcopy(replay)
        time = static_input(name, extra - (seed - 3) * 5) if name == "dqn" else extra
        torch.manual_seed(seed)
        expected = batch_loss(replay, time)
        torch.manual_seed(seed)
        assert torch.allclose(compiled(fresh, time), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(fresh["sum_tree"] if name == "rainbow" else fresh["valid"],
                           replay["sum_tree"] if name == "rainbow" else replay["valid"])


def test_dqn_samples_slots_uniformly_with_the_newest_slot_as_a_tensor():
    """The tensor-bounded draw covers slot times low .. buffer_time - n_step evenly (every slot valid, frames that
    hold their own slot index): 70 - 50 + 1 = 21 .. 68, 48 slots."""
    replay = dqn.make_replay(1, 50, 1, "cpu")
    replay["valid"][:] = True
    replay["frames"][0, :, 0, 0] = torch.arange(50, dtype=torch.uint8)
    torch.manual_seed(0)
    batch = dqn.sample_batch(replay, torch.tensor(70), 24_000, 2, 1, 0.9)
    slots = batch["observations"][:, 0, 0, 0].long()
    counts = torch.bincount(slots, minlength=50)
    used = [t % 50 for t in range(21, 69)]
    assert counts[[i for i in range(50) if i not in used]].sum() == 0
    assert counts[used].min() > 0.85 * 500 and counts[used].max() < 1.15 * 500


@pytest.mark.parametrize("name", ["dqn", "rainbow"])
def test_epsilon_greedy_runs_on_the_device_and_mixes_by_epsilon(name):
    q_values = torch.tensor([[0.0, 2.0, 1.0]]).repeat(4000, 1)
    torch.manual_seed(0)
    actions = SCRIPTS[name].select_actions(lambda obs: q_values, torch.zeros(4000, 4, 2, 2), 0.3, 3)
    assert isinstance(actions, np.ndarray) and actions.shape == (4000,)
    greedy_share = (actions == 1).mean()  # 0.7 greedy + 0.3 / 3 random picks of action 1
    assert abs(greedy_share - 0.8) < 0.03 and abs((actions == 0).mean() - 0.1) < 0.02


@pytest.mark.parametrize("name", ["dqn", "rainbow"])
def test_the_staged_store_equals_the_plain_store(name):
    script = SCRIPTS[name]
    generator = np.random.default_rng(1)
    replays = [script.make_replay(2, 16, 3, "cpu") for _ in range(2)]
    stage = script.HostStaging(torch.device("cpu"), pinned=False)
    done = [np.zeros(2, dtype=bool)] * 2
    more = (1, 1) if name == "rainbow" else ()
    for t in range(20):
        step = (generator.integers(0, 3, 2), generator.normal(size=2).astype(np.float32), generator.random(2) < 0.2,
                generator.random(2) < 0.1, {"elapsed_step": generator.integers(0, 3, 2)})
        obs = torch.as_tensor(generator.integers(0, 256, (2, 4, 3, 3), dtype=np.uint8))
        done[0] = script.store_env_step(replays[0], t, *step, obs, done[0], *more)
        done[1] = script.store_env_step(replays[1], t, *stage.env_step(*step), stage("obs", obs.numpy()), done[1], *more)
        assert np.array_equal(np.asarray(done[0]), np.asarray(done[1]))
    for key in replays[0]:
        assert torch.equal(replays[0][key], replays[1][key]), key
