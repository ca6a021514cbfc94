"""ppo_procgen_impoola.py's speed switches (issue 13) on a CPU: each fast path computes the same function as the plain
one (bf16 autocast, micro-batch gradient accumulation, channels-last, the overlapped rollout, compilation, the memory
probe), main() wires them in when they are on, and on a CPU they are off, so that a run writes the same weights."""

import copy
import glob
import math
import sys

from types import SimpleNamespace

import numpy as np
import procgen_hd
import pytest
import torch

import ppo_procgen_impoola as ppo
import utils

CHANNELS_LAST = torch.channels_last


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def behaviour_batch(agent, size, resolution, seed):
    """A minibatch collected by `agent`, then the agent moved a little (so that ratios differ from 1 and some clip);
    advantages with a non-zero mean, so that normalising them over the wrong steps would show."""
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (size, 3, resolution, resolution), dtype=torch.uint8, generator=generator)
    actions, logprobs, values = ppo.policy_step(agent, obs)
    advantages = 1.0 + torch.randn(size, generator=generator, dtype=logprobs.dtype)
    with torch.no_grad():
        for parameter in agent.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return {"obs": obs, "actions": actions, "logprobs": logprobs, "values": values, "advantages": advantages,
            "returns": values + advantages}


# bf16 autocast: the network in bfloat16, the loss and the weights in float32
def test_bf16_autocast_loss_is_close_to_float32_with_float32_weights_and_loss():
    """ppo_loss on the network's forward inside the run's mixed-precision context, as main() passes it to ppo_update."""
    torch.manual_seed(0)
    agent = ppo.Agent(15, 16, "avg", width=1, dense_scale=1)
    minibatch = behaviour_batch(agent, 32, 16, seed=1)
    feature_dtypes = []
    agent.encoder.register_forward_hook(lambda module, inputs, output: feature_dtypes.append(output.dtype))
    results = {}
    for bf16 in (False, True):
        agent.zero_grad()
        forward = utils.within(utils.mixed_precision(torch.device("cpu"), bf16), agent)
        loss, parts = ppo.ppo_loss(forward, minibatch, 0.2, True, 0.01, 0.5)
        loss.backward()
        results[bf16] = loss, parts, torch.cat([p.grad.flatten() for p in agent.parameters()])
    assert feature_dtypes == [torch.float32, torch.bfloat16]  # autocast reached the convolutions, and only with bf16
    (loss32, parts32, grad32), (loss16, parts16, grad16) = results[False], results[True]
    assert loss16.dtype == torch.float32 and all(part.dtype == torch.float32 for part in parts16.values())
    assert all(parameter.dtype == torch.float32 for parameter in agent.parameters())
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-2, abs=1e-3)
    for name in ("policy_loss", "value_loss", "entropy"):
        assert parts16[name].item() == pytest.approx(parts32[name].item(), rel=1e-2, abs=1e-3), name
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99


def test_bf16_policy_step_gives_float32_log_probs_and_values():
    """The rollout's policy step inside the mixed-precision context, as main() runs the whole rollout."""
    agent = ppo.Agent(15, 16, "avg", width=1, dense_scale=1)
    obs = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    torch.manual_seed(3)
    with utils.mixed_precision(torch.device("cpu"), True):
        action, logprob, value = ppo.policy_step(agent, obs)
    torch.manual_seed(3)
    action32, logprob32, value32 = ppo.policy_step(agent, obs)
    assert logprob.dtype == value.dtype == torch.float32 and action.dtype == torch.long
    assert torch.allclose(value, value32, atol=2e-2) and torch.allclose(logprob, logprob32, atol=2e-2)


# Micro-batches: their gradients add up to the whole minibatch's
@pytest.mark.parametrize("clip_vloss", [False, True])
def test_micro_batches_sum_to_the_whole_minibatch_gradient_in_float64(clip_vloss):
    """Each Adam step sees the same gradient (float64, to 1e-10) whether the minibatch of 16 runs whole or as micro-batches
    of 4 or 1, with advantages normalised over the whole minibatch; the logged means agree too."""
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        agent = ppo.Agent(15, 16, "avg", width=1, dense_scale=1).double()
        batch = behaviour_batch(agent, 32, 16, seed=2)
        assert batch["logprobs"].dtype == torch.float64

        class RecordingOptimizer:  # keeps the weights, so that every run sees the same ones
            def __init__(self):
                self.gradients = []

            def zero_grad(self):
                agent.zero_grad()

            def step(self):
                self.gradients.append(torch.cat([p.grad.flatten() for p in agent.parameters()]))

        args = ppo.Args(num_minibatches=2, update_epochs=2, norm_adv=True, clip_vloss=clip_vloss, max_grad_norm=1e9)
        runs = {}
        for micro_batch_size in (16, 4, 1):
            optimizer = RecordingOptimizer()
            torch.manual_seed(5)  # the same shuffles
            means, finite = ppo.ppo_update(agent, agent, optimizer, batch, args, micro_batch_size, lambda: None)
            runs[micro_batch_size] = optimizer.gradients, means
            assert bool(finite) and len(optimizer.gradients) == 4
    finally:
        torch.set_default_dtype(torch.float32)
    whole_gradients, whole_means = runs[16]
    assert all(g.dtype == torch.float64 and g.abs().max() > 1e-3 for g in whole_gradients)
    for micro_batch_size in (4, 1):
        gradients, means = runs[micro_batch_size]
        for got, expected in zip(gradients, whole_gradients):
            assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), micro_batch_size
        assert means == pytest.approx(whole_means, rel=1e-10, abs=1e-12)


def test_fitting_micro_batch_size_is_the_largest_divisor_that_fits():
    # 80 % of 1000 free bytes: fixed 100 + size x 10 <= 800 -> size <= 70; divisors of 96: ... 48, 96
    assert ppo.fitting_micro_batch_size(96, 10, 100, 1000) == 48
    assert ppo.fitting_micro_batch_size(96, 1, 0, 1e9) == 96
    assert ppo.fitting_micro_batch_size(97, 10, 100, 1000) == 1  # prime: only 1 fits
    assert ppo.fitting_micro_batch_size(96, 10, 900, 1000) == 1  # nothing fits: 1, which the memory check refuses


def test_update_memory_probe_counts_the_peak_per_step_beyond_the_gradients(monkeypatch):
    """The CUDA memory probe run on a CPU with the allocator's counters faked: peak minus the gradients, per step."""
    allocated = {"now": 5_000, "peak": 0}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: allocated.update(peak=allocated["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated["peak"])
    backward = torch.Tensor.backward

    def backward_allocating(tensor, *args, **kwargs):
        allocated["peak"] = allocated["now"] + 16 * 1_000 + weight_bytes  # 1,000 bytes per step, then the gradients
        return backward(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward_allocating)
    args = ppo.Args(resolution=16, width=1)
    weight_bytes = 4 * sum(utils.parameter_counts(ppo.Agent(15, 16, "avg", 1, 1)).values())
    per_step, fixed = ppo.update_memory(args, torch.device("cpu"), probe_size=16)
    assert per_step == 1_000 and fixed == 4 * weight_bytes  # weights, gradients, Adam's two moments


# channels-last: the same network outputs, and minibatches gathered from the rollout stay channels-last
@pytest.mark.parametrize("pool", ["flatten", "avg"])
def test_channels_last_gives_the_same_outputs(pool):
    torch.manual_seed(0)
    agent = ppo.Agent(15, 24, pool, width=1, dense_scale=1)
    fast = copy.deepcopy(agent).to(memory_format=CHANNELS_LAST)
    assert fast.encoder[0].weight.is_contiguous(memory_format=CHANNELS_LAST)
    obs = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8)
    logits, value = agent(obs)
    fast_logits, fast_value = fast(obs.contiguous(memory_format=CHANNELS_LAST))
    assert torch.allclose(fast_logits, logits, atol=1e-5) and torch.allclose(fast_value, value, atol=1e-5)
    rollout = ppo.allocate_rollout(4, 3, 24, "cpu", channels_last=True)
    rollout["obs"][1] = obs[:3]
    minibatch = rollout["obs"].flatten(0, 1)[torch.tensor([3, 5, 0])]
    assert minibatch.is_contiguous(memory_format=CHANNELS_LAST) and torch.equal(minibatch[:2], obs[[0, 2]])
    assert not ppo.allocate_rollout(4, 3, 24, "cpu")["obs"].flatten(0, 1).is_contiguous(memory_format=CHANNELS_LAST)


# The overlapped rollout: two halves stepped in turn give the data of the plain rollout of the envs stepped as one
def pixel_policy(obs):
    """A policy whose numbers do not depend on the batch it is computed in (elementwise only): logits from the mean
    pixel, Gumbel-max samples drawn in env order, so halves in turn draw the same noise as one batch."""
    brightness = obs.double().mean(dim=(1, 2, 3))
    logits = (brightness[:, None] * torch.linspace(-1, 1, 15, dtype=torch.float64) / 64).float()
    action = ppo.sample_action(logits)
    return action, torch.log_softmax(logits, 1).gather(1, action[:, None])[:, 0], brightness.float() / 255


class ScriptedHalf:
    """Env i's episodes last lengths[i] steps, each step pays the step count times the action + 1; frames show the step
    count. Stepped only through step_async / step_wait, strictly in turn; `log` records the calls."""

    def __init__(self, lengths, log=None, name=""):
        self.lengths, self.num_envs = np.array(lengths), len(lengths)
        self.elapsed, self.pending = np.zeros(self.num_envs, dtype=int), None
        self.log, self.name = [] if log is None else log, name

    def frames(self):
        return np.broadcast_to(self.elapsed[:, None, None, None], (self.num_envs, 3, 4, 4)).astype(np.uint8)

    def step_async(self, action):
        assert self.pending is None and action.shape == (self.num_envs,)
        self.pending = action
        self.log.append((self.name, "async"))

    def step_wait(self):
        assert self.pending is not None
        self.log.append((self.name, "wait"))
        self.elapsed += 1
        reward = (self.elapsed * (self.pending + 1)).astype(np.float32)
        done = self.elapsed == self.lengths
        self.elapsed[done], self.pending = 0, None
        return self.frames(), reward, done, {}

    def step(self, action):
        self.step_async(action)
        return self.step_wait()


def rollout_of(collect, envs, num_envs, num_steps, obs):
    """`collect` (collect_rollout, or collect_rollout_overlapped on halves) of `num_steps` from `obs`."""
    torch.manual_seed(7)
    rollout = ppo.allocate_rollout(num_steps, num_envs, obs.shape[-1], "cpu")
    normalizer = ppo.new_reward_normalizer(num_envs, "cpu")
    episodes = {"return": np.zeros(num_envs), "length": np.zeros(num_envs, dtype=np.int64)}
    steps = []
    result = collect(pixel_policy, envs, rollout, obs, torch.zeros(num_envs), normalizer, episodes, 0.9, 10.0,
                     on_step=lambda count, episodic_return: steps.append((count, episodic_return)))
    return rollout, result, normalizer, episodes, steps


def assert_same_rollouts(first, second):
    (rollout, result, normalizer, episodes, steps), (rollout2, result2, normalizer2, episodes2, steps2) = first, second
    assert all(torch.equal(rollout[key], rollout2[key]) for key in rollout), [k for k in rollout if not torch.equal(
        rollout[k], rollout2[k])]
    assert torch.equal(result[0], result2[0]) and torch.equal(result[1], result2[1]) and result[2:] == result2[2:]
    assert all(torch.equal(normalizer[key], normalizer2[key]) for key in normalizer)
    assert all(np.array_equal(episodes[key], episodes2[key]) for key in episodes) and steps == steps2


def test_overlapped_rollout_equals_the_plain_rollout_of_the_same_halves():
    lengths, num_steps = [[3, 5, 2], [4, 7, 1]], 13
    obs = torch.zeros(6, 3, 4, 4, dtype=torch.uint8)
    plain = rollout_of(ppo.collect_rollout, ScriptedHalf(lengths[0] + lengths[1]), 6, num_steps, obs)
    log = []
    halves = SimpleNamespace(halves=[ScriptedHalf(lengths[0], log, "A"), ScriptedHalf(lengths[1], log, "B")])
    overlapped = rollout_of(ppo.collect_rollout_overlapped, halves, 6, num_steps, obs)
    assert_same_rollouts(overlapped, plain)
    # each half's game step (async -> wait) spans the other half's policy step (its wait -> async)
    turn = [("A", "wait"), ("A", "async"), ("B", "wait"), ("B", "async")]
    assert log == [("A", "async"), ("B", "async")] + turn * (num_steps - 1) + [("A", "wait"), ("B", "wait")]
    assert len(plain[1][2]) > 10 and len(set(plain[0]["actions"].flatten().tolist())) > 5  # episodes ended, actions vary


def test_env_halves_continue_the_same_procgen_games_stepped_in_turn():
    """EnvHalves of an env against that env itself (same seed): the overlapped rollout plays the same games, with the
    same frames, rewards and episode ends, and ends in the same game states."""
    args = ppo.Args(env_id="bossfight", num_envs=4, resolution=32)
    envs = [ppo.make_envs(args, 4, 200, seed=3) for _ in range(2)]
    try:
        obs = [torch.from_numpy(e.reset()[0]) for e in envs]
        halves = ppo.EnvHalves(envs[1], lambda num_envs: ppo.make_envs(args, num_envs, 200, seed=99))
        plain = rollout_of(ppo.collect_rollout, envs[0], 4, 40, obs[0])
        overlapped = rollout_of(ppo.collect_rollout_overlapped, halves, 4, 40, obs[1])
        assert_same_rollouts(overlapped, plain)
        assert halves.get_state() == envs[0].get_state()
        frames, _ = halves.set_state(envs[0].get_state())  # as a resumed run: the restored games' frames, frame-last
        assert np.array_equal(frames, plain[1][0].numpy()) and frames.strides[1] == 1
    finally:
        envs[0].close()
        halves.close()


# Which switches act where
def test_speed_plan_turns_everything_asked_on_on_cuda_and_nothing_on_a_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on = ppo.Args(bf16=True)  # bf16 is opt-in (issue 21), the other switches are on by default
    assert not ppo.Args().bf16 and not any(ppo.speed_plan(on, cpu).values())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert all(ppo.speed_plan(on, cuda).values())
    assert ppo.speed_plan(ppo.Args(), cuda) == {"bf16": False, "channels_last": True, "overlap_envs": True}
    assert ppo.speed_plan(ppo.Args(bf16=True, num_envs=63), cuda)["overlap_envs"] is False
    off = ppo.Args(bf16=False, channels_last=False, overlap_envs=False)
    assert not any(ppo.speed_plan(off, cuda).values())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert ppo.speed_plan(on, cuda)["bf16"] is False


@pytest.mark.slow
def test_compiled_policy_step_and_gae_equal_eager_on_fresh_inputs(monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's random numbers, to compare samples
    agent = ppo.Agent(15, 16, "avg", width=1, dense_scale=1)
    policy, gae = torch.compile(ppo.policy_step), torch.compile(ppo.compute_gae)
    for seed in (0, 1):
        obs = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        compiled = policy(agent, obs)
        torch.manual_seed(seed)
        eager = ppo.policy_step(agent, obs)
        assert torch.equal(compiled[0], eager[0])
        assert all(torch.allclose(c, e, atol=1e-5) for c, e in zip(compiled[1:], eager[1:]))
        generator = torch.Generator().manual_seed(10 + seed)
        rewards, values = torch.randn(9, 3, generator=generator), torch.randn(9, 3, generator=generator)
        dones = (torch.rand(9, 3, generator=generator) < 0.3).float()
        tail = torch.randn(3, generator=generator), torch.tensor([0.0, 1.0, 0.0])
        for got, expected in zip(gae(rewards, values, dones, *tail, 0.99, 0.95),
                                 ppo.compute_gae(rewards, values, dones, *tail, 0.99, 0.95)):
            assert torch.allclose(got, expected, atol=1e-5)


# main(): the switches do nothing on a CPU, and when a plan turns the fast paths on, main() runs through them
TINY = ["--env-id", "bossfight", "--width", "1", "--num-envs", "4", "--num-steps", "16", "--num-minibatches", "2",
        "--update-epochs", "1", "--total-timesteps", "128", "--eval-every", "0", "--final-eval-episodes", "0",
        "--save-every", "0", "--diag-every", "0", "--no-progress", "--runs-dir", "runs"]
NO_SWITCHES = ["--no-tf32", "--no-cudnn-benchmark", "--no-bf16", "--no-channels-last", "--no-overlap-envs"]


def train(tmp_path, monkeypatch, *flags, plan=None):
    """main() in this process; returns (final weights, the network's forward calls, the training envs' step sizes)."""
    calls, stepped = [], []

    class SpyAgent(ppo.Agent):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.encoder.register_forward_hook(lambda module, inputs, output: calls.append({
                "batch": len(output), "grad": torch.is_grad_enabled(), "dtype": output.dtype,
                "obs_channels_last": inputs[0].is_contiguous(memory_format=CHANNELS_LAST),
                "weights_channels_last": module[0].weight.is_contiguous(memory_format=CHANNELS_LAST)}))

    step_async = procgen_hd.ProcgenHDEnv.step_async

    def recording_step_async(envs, actions):
        stepped.append(envs.num_envs)
        return step_async(envs, actions)

    run_cwd = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    run_cwd.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(ppo, "Agent", SpyAgent)
        patch.setattr(procgen_hd.ProcgenHDEnv, "step_async", recording_step_async)
        if plan is not None:
            patch.setattr(ppo, "speed_plan", lambda args, device: dict(plan))
        patch.chdir(run_cwd)
        patch.setattr(sys, "argv", ["ppo_procgen_impoola.py", *TINY, *flags])
        ppo.main()
    (final,) = glob.glob(str(run_cwd / "runs" / "*" / "final.pt"))
    return torch.load(final, weights_only=True)["model"], calls, stepped


def forward_batches(calls, grad):
    return sorted({call["batch"] for call in calls if call["grad"] == grad})


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    threads = torch.get_num_threads()  # set up before one_torch_thread: the same single thread as the other runs
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield train(tmp_path_factory.mktemp("plain"), monkeypatch)
    torch.set_num_threads(threads)


def test_on_a_cpu_the_switches_do_nothing(plain_run, tmp_path, monkeypatch):
    weights, calls, stepped = plain_run
    assert stepped == [4] * 32  # one env of 4, 16 steps x 2 iterations
    assert forward_batches(calls, grad=False) == [4] and forward_batches(calls, grad=True) == [32]
    assert all(call["dtype"] == torch.float32 and not call["weights_channels_last"] for call in calls)
    for flags in (NO_SWITCHES, ["--bf16", "--micro-batch-size", "32"]):  # each off; each on (bf16 is opt-in), one micro-batch
        other, _, _ = train(tmp_path, monkeypatch, *flags)
        assert all(torch.equal(other[name], value) for name, value in weights.items()), flags


def test_main_runs_through_channels_last_overlap_and_micro_batches_when_they_are_on(plain_run, tmp_path, monkeypatch):
    """Forced on (as on CUDA): halves of 2 envs stepped in turn, update forwards of micro-batches of 8, channels-last
    weights and minibatches; and the same training as the plain run, to float rounding."""
    weights, calls, stepped = train(tmp_path, monkeypatch, "--micro-batch-size", "8",
                                    plan={"bf16": False, "channels_last": True, "overlap_envs": True})
    assert stepped == [2] * 64
    assert forward_batches(calls, grad=False) == [2, 4]  # the halves' policy steps, the last frames' values
    assert [call["batch"] for call in calls if call["grad"]] == [8] * 16  # 2 iterations x 2 minibatches x 4 micro-batches
    assert all(call["weights_channels_last"] and call["obs_channels_last"] for call in calls)
    assert all(call["dtype"] == torch.float32 for call in calls)
    plain_weights = plain_run[0]
    assert all(torch.allclose(value, plain_weights[name], atol=1e-5) for name, value in weights.items())


def test_main_runs_the_network_under_bf16_autocast_when_bf16_is_on(tmp_path, monkeypatch):
    """Forced on (as on CUDA): every training forward in bfloat16, the update's distribution and losses outside autocast."""
    autocast_in_loss, real_loss = [], ppo.ppo_loss

    def recording_loss(*args):
        autocast_in_loss.append(torch.is_autocast_enabled("cpu"))
        return real_loss(*args)

    monkeypatch.setattr(ppo, "ppo_loss", recording_loss)
    weights, calls, _ = train(tmp_path, monkeypatch, plan={"bf16": True, "channels_last": False, "overlap_envs": False})
    assert {call["dtype"] for call in calls} == {torch.bfloat16}  # rollout, last values and update alike
    assert autocast_in_loss == [False] * 4  # 2 iterations x 2 minibatches: only the forward inside ppo_loss is autocast
    assert forward_batches(calls, grad=True) == [32]
    assert all(value.dtype == torch.float32 and torch.isfinite(value).all() for value in weights.values())
    assert math.isfinite(sum(value.double().sum().item() for value in weights.values()))


def test_compile_wraps_the_network_the_policy_step_and_gae(tmp_path, monkeypatch):
    """--compile hands the network, the rollout's policy step and GAE to torch.compile (recorded here, run eagerly)."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda function, *args, **kwargs: compiled.append(function) or function)
    train(tmp_path, monkeypatch, "--compile")
    assert {type(compiled[0]).__name__, *compiled[1:]} == {"SpyAgent", ppo.policy_step, ppo.compute_gae}
