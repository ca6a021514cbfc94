"""The value-based scripts' fast paths (issue 13), proven on a CPU at function level: the learner step that
--cuda-graphs captures (static in-place tensors, no host value read) equals the plain eager step, and
torch.compile(fullgraph=True) traces its sample -> loss -> priorities without a graph break and equals eager on
fresh inputs; epsilon-greedy runs on the device, and with a device epsilon reads nothing on the host; the store
main() runs (staged buffers, a device slot, episode_done in place) equals the plain one and reads nothing on the host.
CapturedStep's control flow (warm-ups, one capture, replays on the same tensors, the eager fallback) runs on CPU
stand-ins for torch.cuda; a real graph replay and the pinned, non_blocking copies need a GPU and are not run here."""

import contextlib
import copy
import types

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dqn_atari_gap as dqn
import rainbow_atari_gap as rainbow
import utils
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
    for epsilon in (0.3, torch.tensor(0.3)):  # a host float (eager), a 0-d tensor (what the captured acting reads)
        torch.manual_seed(0)
        actions = SCRIPTS[name].select_actions(lambda obs: q_values, torch.zeros(4000, 4, 2, 2), epsilon, 3)
        assert isinstance(actions, torch.Tensor) and actions.shape == (4000,)
        greedy_share = (actions == 1).float().mean()  # 0.7 greedy + 0.3 / 3 random picks of action 1
        assert abs(greedy_share - 0.8) < 0.03 and abs((actions == 0).float().mean() - 0.1) < 0.02
    torch.manual_seed(0)
    expected = SCRIPTS[name].select_actions(lambda obs: q_values, torch.zeros(4000, 4, 2, 2), 0.3, 3)
    torch.manual_seed(0)
    assert torch.equal(SCRIPTS[name].select_actions(lambda obs: q_values, torch.zeros(4000, 4, 2, 2), torch.tensor(0.3), 3),
                       expected)  # the same coins and actions either way


@pytest.mark.parametrize("name", ["dqn", "rainbow"])
def test_acting_on_a_device_epsilon_reads_no_tensor_value_on_the_host(name):
    counter = SyncCounter()
    with counter:
        SCRIPTS[name].select_actions(lambda obs: obs.flatten(1)[:, :3].float(), torch.zeros(8, 4, 2, 2), torch.tensor(0.5), 3)
    assert counter.syncs == 0


def env_steps(num_envs: int, steps: int, seed: int = 1):
    """Random EnvPool-like steps: (actions, rewards, terminated, truncated, info, next stacked obs)."""
    generator = np.random.default_rng(seed)
    for _ in range(steps):
        yield (generator.integers(0, 3, num_envs), generator.normal(size=num_envs).astype(np.float32),
               generator.random(num_envs) < 0.2, generator.random(num_envs) < 0.1,
               {"elapsed_step": generator.integers(0, 3, num_envs).astype(np.int32)},
               generator.integers(0, 256, (num_envs, 4, 3, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["dqn", "rainbow"])
def test_the_in_place_store_of_main_equals_the_plain_store_and_reads_nothing_on_the_host(name):
    """main()'s store: the staged arrays (one device buffer per name), the slot as a 0-d tensor and episode_done as
    a buffer updated in place, against the plain store of host arrays at an int slot; over the wrap of the circular
    slots and (Rainbow) the sum tree. The in-place one reads no tensor value on the host, so a CUDA graph can capture
    it (a 20-slot replay: 30 steps wrap it)."""
    script = SCRIPTS[name]
    more = (3, 4) if name == "rainbow" else ()
    plain, in_place = script.make_replay(2, 20, 3, "cpu"), script.make_replay(2, 20, 3, "cpu")
    stage = utils.HostStaging(torch.device("cpu"), pinned=False)
    plain_done, done_buffer = np.zeros(2, dtype=bool), torch.zeros(2, dtype=torch.bool)
    slot = torch.zeros((), dtype=torch.long)
    staged_buffers = None
    counter = SyncCounter()
    for t, (actions, rewards, terminated, truncated, info, next_obs) in enumerate(env_steps(2, 30)):
        plain_done = script.store_env_step(plain, t, actions, rewards, terminated, truncated, info,
                                           torch.as_tensor(next_obs), plain_done, *more)
        staged = (stage("actions", actions), *stage.env_step(rewards, terminated, truncated, info), stage("obs", next_obs))
        if staged_buffers is not None:
            assert all(a is b for a, b in zip(staged, staged_buffers))  # the same tensors at every step
        staged_buffers = staged
        slot.fill_(t)
        with counter:
            done = script.store_env_step(in_place, slot, *staged[:4], {"elapsed_step": staged[4]}, staged[5], done_buffer,
                                         *more)
            done_buffer.copy_(done)
        assert np.array_equal(np.asarray(plain_done), done_buffer.numpy())
    assert counter.syncs == 0
    for key in plain:
        assert torch.equal(plain[key], in_place[key]), key


def test_rainbow_new_transitions_get_the_running_maximum_and_stale_stacks_priority_zero():
    """Independent of the vectorised tree: after each store, leaf (env, slot) holds max_priority exactly when the
    transition at that slot time is complete (its n-step window stored), valid, and its frame stack not overwritten."""
    capacity, n_step, frame_stack = 12, 3, 4
    replay = rainbow.make_replay(2, capacity, 3, "cpu")
    replay["max_priority"].fill_(2.5)
    done = np.zeros(2, dtype=bool)
    valid_at = {}
    leaves = replay["sum_tree"].numel() // 2
    for t, (actions, rewards, terminated, truncated, info, next_obs) in enumerate(env_steps(2, 40, seed=3)):
        valid_at[t] = ~done
        done = rainbow.store_env_step(replay, torch.tensor(t), actions, rewards, terminated, truncated, info,
                                      torch.as_tensor(next_obs), done, n_step, frame_stack)
        for env in range(2):
            for s in range(capacity):
                times = [u for u in range(t + 1) if u % capacity == s]  # the newest slot time stored at slot s
                u = times[-1] if times else None
                expected = 0.0
                if u is not None and u + n_step <= t + 1 and u > t + 1 - capacity + frame_stack - 1 and valid_at[u][env]:
                    expected = 2.5
                assert replay["sum_tree"][leaves + env * capacity + s].item() == expected, (t, env, s)
    assert replay["sum_tree"][1].item() == pytest.approx(replay["sum_tree"][leaves:].sum().item())



@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's streams and graphs as CPU stand-ins: `captures` counts the graphs entered; a graph's replay runs
    `fake.replay` (set by the test: on a GPU it reruns the recorded kernels, writing the static outputs in place)."""
    fake = types.SimpleNamespace(captures=0, replay=None, streams=[])

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            fake.replay()

    @contextlib.contextmanager
    def capture(graph):
        fake.captures += 1
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "set_stream", fake.streams.append)
    return fake


def test_captured_step_warms_up_eagerly_captures_once_then_replays_on_the_same_tensors(fake_cuda):
    counter, x = torch.zeros(()), torch.zeros(())

    def step(x):
        return (x + counter.add_(1),)

    captured = utils.CapturedStep(step, "test step", warmup=2)
    fake_cuda.replay = lambda: captured.outputs[0].copy_(step(x)[0])
    outputs = [captured(x)[0].item() for _ in range(5)]
    assert fake_cuda.captures == 1
    assert outputs == [1.0, 2.0, 4.0, 5.0, 6.0]  # 2 warm-ups, the capture (the stand-in runs it once: 3), replays
    assert captured(x)[0] is captured.outputs[0]  # the static output, overwritten in place
    with pytest.raises(ValueError, match="other tensors"):
        captured(torch.zeros(()))


def test_a_failed_capture_says_so_in_one_line_and_runs_the_step_eagerly(fake_cuda, monkeypatch, capsys):
    def refuse(graph):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    captured = utils.CapturedStep(lambda x: x + 1, "store", warmup=1)
    assert [captured(torch.tensor(float(i))).item() for i in range(4)] == [1.0, 2.0, 3.0, 4.0]
    assert captured.eager and captured.graph is None and fake_cuda.captures == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert lines == ["warning: --cuda-graphs could not capture the store (operation not permitted when stream is "
                     "capturing); it runs eagerly"]


def test_a_step_that_fails_inside_the_capture_restores_the_stream_and_names_its_own_error(fake_cuda, monkeypatch, capsys):
    """torch.cuda.graph's exit calls capture_end first; when the capture was invalidated that raises too, so the
    stream the capture made current is never reset by it and the error caught is capture_end's."""

    fake_cuda.capturing = False

    @contextlib.contextmanager
    def invalidated_capture(graph):
        fake_cuda.capturing = True
        try:
            yield
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")
        finally:
            fake_cuda.capturing = False

    def step(x):
        if fake_cuda.capturing:
            raise RuntimeError("cannot read a CUDA value during stream capture")
        return x * 2

    monkeypatch.setattr(torch.cuda, "graph", invalidated_capture)
    captured = utils.CapturedStep(step, "learner step", warmup=1)
    assert [captured(torch.tensor(float(i))).item() for i in range(3)] == [0.0, 2.0, 4.0]
    assert captured.eager and len(fake_cuda.streams) == 1  # the stream current before the capture, set back once
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert lines == ["warning: --cuda-graphs could not capture the learner step (cannot read a CUDA value during stream "
                     "capture); it runs eagerly"]
