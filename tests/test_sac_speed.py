"""The speed switches of sac_dmc_gap.py (issue 13), proven on a CPU: bf16 autocast and channels-last compute the
same losses and gradients as the plain float32 path on a fixed batch, the fused target update equals the
per-parameter loop, and real tiny runs of main(): the switches change nothing on a CPU, and forced on they are
wired in (autocast and channels-last inside the losses, each step's updates between sending the next action and
receiving its observation) while the replay still holds exactly what the environment returned."""

import copy
import glob
import os
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sac_dmc_gap as sac

NETWORK = dict(pool="flatten", width=1, padding="valid", resolution=20, dense_scale=1, feature_dim=16, hidden_dim=32,
               bound_log_std=True, log_std_min=-10.0, log_std_max=2.0, init="drq")


def networks(memory_format=torch.contiguous_format, **overrides):
    torch.manual_seed(0)
    args = SimpleNamespace(**dict(NETWORK, **overrides))
    encoder, actor, critic = sac.make_networks(args, 9, 2, "cpu", memory_format)
    return encoder, actor, critic, copy.deepcopy(encoder), copy.deepcopy(critic), copy.deepcopy(actor)


def fixed_batch(memory_format=torch.contiguous_format):
    """16 transitions in two augmented views (DrQ's K = M = 2), some terminal."""
    torch.manual_seed(1)
    replay = sac.make_replay(32, (9, 20, 20), 2, "cpu")
    obs = torch.randint(0, 256, (32, 9, 20, 20), dtype=torch.uint8)
    next_obs = torch.cat([obs[:, 3:], torch.randint(0, 256, (32, 3, 20, 20), dtype=torch.uint8)], dim=1)
    sac.add_transitions(replay, 0, obs, torch.rand(32, 2) * 2 - 1, torch.randn(32), next_obs, (torch.rand(32) < 0.2).float())
    torch.manual_seed(2)
    return sac.sample_batch(replay, 32, 16, 2, 2, memory_format)


def losses(parts, batch, target_mean, autocast=False):
    """Critic loss (with Q values) and actor and temperature losses, the same random draws on every call."""
    encoder, actor, critic, target_encoder, target_critic, target_actor = parts
    log_alpha = torch.tensor(np.log(0.1), dtype=torch.float32, requires_grad=True)
    torch.manual_seed(3)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        qf_loss, q1, q2 = sac.critic_loss(encoder, actor, critic, target_encoder, target_critic, log_alpha, batch, 2, 0.99,
                                          target_actor if target_mean else None)
        actor_loss, alpha_loss = sac.actor_and_temperature_losses(encoder, actor, critic, log_alpha,
                                                                  batch["observations"], -2.0)
    return {"qf_loss": qf_loss, "q1": q1, "q2": q2, "actor_loss": actor_loss, "alpha_loss": alpha_loss}


def critic_gradient(parts, values):
    encoder, _, critic = parts[:3]
    params = [*encoder.parameters(), *critic.parameters()]
    return torch.cat([grad.flatten() for grad in torch.autograd.grad(values["qf_loss"], params)])


@pytest.mark.parametrize("target_mean", [False, True])
def test_bf16_autocast_losses_are_float32_and_close_to_the_float32_losses_on_a_fixed_batch(monkeypatch, target_mean):
    parts, batch = networks(), fixed_batch()
    plain = losses(parts, batch, target_mean)
    seen = []  # the dtypes the float32 pieces receive under autocast

    def spy(function):
        def wrapped(*tensors, **kwargs):
            seen.append({t.dtype for t in tensors if torch.is_tensor(t)})
            return function(*tensors, **kwargs)
        return wrapped

    monkeypatch.setattr(sac, "soft_q_target", spy(sac.soft_q_target))
    monkeypatch.setattr(sac, "squashed_gaussian_log_prob", spy(sac.squashed_gaussian_log_prob))
    monkeypatch.setattr(sac, "temperature_loss", spy(sac.temperature_loss))
    conv_dtypes = []
    parts[0].convs[0].register_forward_hook(lambda module, inputs, output: conv_dtypes.append(output.dtype))
    fast = losses(parts, batch, target_mean, autocast=True)
    assert conv_dtypes and set(conv_dtypes) == {torch.bfloat16}  # the networks did run in bfloat16
    assert len(seen) >= 4 and all(dtypes == {torch.float32} for dtypes in seen)  # target, log-probs, temperature
    for name, value in plain.items():
        assert fast[name].dtype == torch.float32, name
        assert torch.allclose(fast[name], value, rtol=0.03, atol=0.03 * value.abs().mean().item()), name
    plain_gradient, fast_gradient = critic_gradient(parts, plain), critic_gradient(parts, fast)
    assert torch.nn.functional.cosine_similarity(plain_gradient, fast_gradient, dim=0) > 0.99


@pytest.mark.parametrize("padding, pool", [("valid", "flatten"), ("same", "avg"), ("valid", "max")])
def test_channels_last_gives_the_same_batch_losses_and_gradients(padding, pool):
    plain_parts, fast_parts = networks(padding=padding, pool=pool), networks(torch.channels_last, padding=padding, pool=pool)
    conv_weights = [m.weight for m in fast_parts[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in conv_weights)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in fast_parts[3].parameters() if w.dim() == 4)
    plain_batch, fast_batch = fixed_batch(), fixed_batch(memory_format=torch.channels_last)
    for key in ("observations", "next_observations"):
        assert fast_batch[key].is_contiguous(memory_format=torch.channels_last) and not fast_batch[key].is_contiguous()
    assert all(torch.equal(plain_batch[key], fast_batch[key]) for key in plain_batch)  # same values, other layout
    plain, fast = losses(plain_parts, plain_batch, False), losses(fast_parts, fast_batch, False)
    for name, value in plain.items():
        assert torch.allclose(fast[name], value, rtol=1e-5, atol=1e-6), name
    assert torch.allclose(critic_gradient(fast_parts, fast), critic_gradient(plain_parts, plain), rtol=1e-4, atol=1e-6)


def test_foreach_target_update_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    targets = [sac.Encoder(9, 1), sac.Critic("avg", 32, 4, 8, 2), sac.Actor("avg", 32, 4, 8, 2, None)]
    onlines = [sac.Encoder(9, 1), sac.Critic("avg", 32, 4, 8, 2), sac.Actor("avg", 32, 4, 8, 2, None)]
    reference = copy.deepcopy(targets)
    for _ in range(3):
        sac.soft_update(targets, onlines, 0.01)
        with torch.no_grad():  # the plain loop, one parameter at a time
            for target, online in zip(reference, onlines):
                for target_param, param in zip(target.parameters(), online.parameters()):
                    target_param.lerp_(param, 0.01)
    pairs = [(a, b) for fused, plain in zip(targets, reference) for a, b in zip(fused.parameters(), plain.parameters())]
    assert len(pairs) == 8 + 16 + 10 and all(torch.equal(a, b) for a, b in pairs)
    assert all(p.requires_grad and p.grad is None for target in targets for p in target.parameters())


def test_the_speed_switches_apply_only_with_cuda():
    args = sac.Args(bf16=True)  # bf16 is opt-in (issue 21), the other switches are on by default
    assert (args.tf32, args.cudnn_benchmark, args.channels_last, args.overlap_envs) == (True,) * 4 and not sac.Args().bf16
    assert sac.speed_switches(sac.Args(), torch.device("cuda")) == (False, torch.channels_last, True)
    assert sac.speed_switches(args, torch.device("cpu")) == (False, torch.contiguous_format, False)
    assert sac.speed_switches(args, torch.device("cuda")) == (True, torch.channels_last, True)
    off = sac.Args(bf16=False, channels_last=False, overlap_envs=False)
    assert sac.speed_switches(off, torch.device("cuda")) == (False, torch.contiguous_format, False)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    sac.utils.configure_cuda(args, torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark) == flags


# Real tiny runs of main(): cartpole (action repeat 8), 24x24 cheap frames, 60 agent steps, updates from step 30
TINY = ["--env-id", "cartpole-swingup", "--resolution", "24", "--cheap-visuals-for-tests", "--batch-size", "8",
        "--hidden-dim", "32", "--eval-episodes", "1", "--torch-threads", "1", "--no-progress", "--total-timesteps", "60",
        "--learning-starts", "30", "--buffer-size", "100", "--log-every", "20", "--eval-every", "0", "--save-every", "0",
        "--diag-every", "0", "--reward-scale", "0.5"]
LEARNING_STARTS = 30


def run_main(tmp_path, name, *flags, forced=False):
    """main() in this process; returns (final.pt, the stored transitions, the order of env and update calls)."""
    stored, events = [], []
    with pytest.MonkeyPatch.context() as patch:
        def spy(function_name, record):
            function = getattr(sac, function_name)

            def wrapped(*args, **kwargs):
                record(*args)
                return function(*args, **kwargs)
            patch.setattr(sac, function_name, wrapped)

        spy("add_transitions", lambda replay, position, *transition: stored.append([t.clone() for t in transition]))
        for function_name in ("send_actions", "receive_step", "learner_step"):
            spy(function_name, lambda *args, function_name=function_name: events.append(function_name))
        if forced:  # CUDA's switches on a CPU, and a look inside the losses that they are in effect there
            patch.setattr(sac, "speed_switches", lambda args, device: (True, torch.channels_last, True))
            spy("critic_loss", lambda encoder, actor, critic, target_encoder, target_critic, log_alpha, batch, *rest:
                events.append(("in_critic_loss", torch.is_autocast_enabled("cpu"),
                               batch["observations"].is_contiguous(memory_format=torch.channels_last),
                               encoder.convs[0].weight.is_contiguous(memory_format=torch.channels_last))))
        patch.chdir(tmp_path)
        patch.setattr(sys, "argv", ["sac_dmc_gap.py", *TINY, "--runs-dir", name, *flags])
        sac.main()
    (final,) = glob.glob(os.path.join(tmp_path, name, "*", "final.pt"))
    return torch.load(final, weights_only=True), stored, events


def tensors(checkpoint):
    """Every tensor of a checkpoint (weights, Adam moments, RNG states) by its path."""
    found = {}

    def walk(value, path):
        if torch.is_tensor(value):
            found[path] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{path}/{index}")
    walk({key: value for key, value in checkpoint.items() if key != "args"}, "")
    return found


def steps(events):
    """Per environment step (send ... receive), the number of updates that ran while the environment stepped."""
    counts, inside = [], None
    for event in events:
        if event == "send_actions":
            inside = 0
        elif event == "learner_step" and inside is not None:
            inside += 1
        elif event == "receive_step":
            counts.append(inside)
            inside = None
    return counts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("sac_speed")
    return {"default": run_main(tmp_path, "default", "--bf16"),  # every switch on: the defaults and the opt-in bf16
            "off": run_main(tmp_path, "off", "--no-tf32", "--no-cudnn-benchmark", "--no-bf16", "--no-channels-last",
                            "--no-overlap-envs"),
            "forced": run_main(tmp_path, "forced", forced=True)}


def test_the_switches_change_nothing_on_a_cpu(runs):
    """Every switch on (the defaults and --bf16) and every switch off: the same weights, Adam moments and RNG states,
    and no update while the environment steps."""
    default, off = tensors(runs["default"][0]), tensors(runs["off"][0])
    assert default.keys() == off.keys() and len(default) > 100
    assert all(torch.equal(default[key], off[key]) for key in default)
    assert runs["default"][0]["update_count"] == 31  # steps 30 to 60
    assert set(steps(runs["default"][2])) == {0} and len(steps(runs["default"][2])) >= 60


def test_forced_switches_run_the_updates_in_bf16_channels_last_while_the_environment_steps(runs):
    final, _, events = runs["forced"]
    inside_losses = [event for event in events if isinstance(event, tuple)]
    assert len(inside_losses) == final["update_count"] == runs["default"][0]["update_count"]  # the same schedule
    assert all(inside[1:] == (True, True, True) for inside in inside_losses)  # autocast, channels-last batch and weights
    # each step's updates ran between sending the next step's action and receiving its observation, except at the
    # log steps (20, 40, 60: the state is read) and the last step, whose updates ran at once
    per_step = steps(events)[:60]
    assert per_step[:LEARNING_STARTS] == [0] * LEARNING_STARTS
    assert per_step[LEARNING_STARTS:] == [0 if step in (40, 60) else 1 for step in range(LEARNING_STARTS, 60)]
    saved = tensors(final)
    assert all(torch.isfinite(value).all() for key, value in saved.items() if value.is_floating_point())


def test_the_overlapped_loop_stores_what_the_environment_returned_and_the_plain_loop_until_the_first_update(runs):
    """The forced run's replay against a fresh environment stepped with its stored actions: observations,
    rewards and next frames match exactly; and it is the plain run's replay until an action could see an update."""
    _, plain, _ = runs["default"]
    _, overlapped, _ = runs["forced"]
    assert len(plain) == len(overlapped) == 60
    for transition in range(LEARNING_STARTS):  # random actions, before any update
        assert all(torch.equal(a, b) for a, b in zip(plain[transition], overlapped[transition])), transition
    # step 31's action: after step 30's update in the plain loop, before it (the update runs meanwhile) when overlapped
    assert torch.equal(plain[LEARNING_STARTS][0], overlapped[LEARNING_STARTS][0])
    assert not torch.equal(plain[LEARNING_STARTS][1], overlapped[LEARNING_STARTS][1])
    args = sac.Args(env_id="cartpole-swingup", resolution=24, action_repeat=8)
    with tempfile.TemporaryDirectory() as assets:
        env = sac.make_env(args, 1, args.seed, sac.cheap_visuals_assets(assets))  # main's seed: --seed + step 0
        obs = torch.as_tensor(sac.reset_env(env))
        for observations, actions, rewards, next_observations, terminated in overlapped:
            next_obs, step_rewards, step_terminated = sac.step_env(env, actions.numpy(), 8)[:3]
            assert torch.equal(observations, obs)
            assert torch.equal(next_observations, torch.as_tensor(next_obs))
            assert torch.equal(rewards, 0.5 * torch.as_tensor(step_rewards, dtype=torch.float32))  # --reward-scale 0.5
            assert torch.equal(terminated, torch.as_tensor(step_terminated, dtype=torch.float32))
            obs = next_observations
