import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "cleanrl_pool")
sys.path.insert(0, SCRIPTS)  # the scripts import `utils` as a sibling file, as a copied-out script does


def run_script(name, *flags, cwd, timeout=600):
    """Run a script for real in a subprocess, as a user would; returns the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *flags],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def read_scalars(run_dir):
    """{tag: [(step, value), ...]} from a run folder's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents"):
            accumulator = EventAccumulator(os.path.join(run_dir, name), size_guidance={"scalars": 0, "images": 0})
            accumulator.Reload()
            for tag in accumulator.Tags()["scalars"]:
                scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return scalars


def read_image_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for name in os.listdir(run_dir):
        if name.startswith("events.out.tfevents"):
            accumulator = EventAccumulator(os.path.join(run_dir, name), size_guidance={"images": 0})
            accumulator.Reload()
            tags.update(accumulator.Tags()["images"])
    return tags


def read_images(run_dir):
    """{tag: [(step, width, height), ...]} of the images in a run folder's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = {}
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents"):
            accumulator = EventAccumulator(os.path.join(run_dir, name), size_guidance={"images": 0})
            accumulator.Reload()
            for tag in accumulator.Tags()["images"]:
                images.setdefault(tag, []).extend((e.step, e.width, e.height) for e in accumulator.Images(tag))
    return images


def target_is_online_after_sync(run_dir):
    """(final target == final online network, online network moved since the step-200 checkpoint):
    a run that syncs its target at its last step, after that step's updates, gives (True, True)."""
    import torch

    final = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)
    earlier = torch.load(os.path.join(run_dir, "checkpoints", "step_000000000200.pt"), weights_only=True)
    synced = all(torch.equal(final["target_network"][name], value) for name, value in final["q_network"].items())
    moved = not all(torch.equal(earlier["q_network"][name], value) for name, value in final["q_network"].items())
    return synced, moved


@pytest.fixture
def script_runner():
    return run_script


@pytest.fixture
def one_torch_thread():
    """The test machine's 2 cores are shared: one intra-op thread avoids OpenMP spin contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
