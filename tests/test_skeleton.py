"""The four scripts keep one skeleton: the definitions they share are the same text, the sections come in
the same order, the shared flags are utils.RunArgs' or read the same, and no line runs past 127 characters."""

import ast
import dataclasses
import glob
import inspect
import os
import re

import pytest

import dqn_atari_gap
import ppo_procgen_impoola
import rainbow_atari_gap
import sac_dmc_gap
import utils

SCRIPTS = {"ppo": ppo_procgen_impoola, "dqn": dqn_atari_gap, "rainbow": rainbow_atari_gap, "sac": sac_dmc_gap}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A definition and the scripts that must hold it word for word (what is not listed differs by algorithm)
SHARED = {
    "pool_features": ("ppo", "dqn", "rainbow", "sac"),
    "pooled_size": ("ppo", "dqn", "rainbow", "sac"),
    "feature_map_shape": ("ppo", "dqn", "rainbow", "sac"),
    "Bottleneck": ("ppo", "dqn", "rainbow", "sac"),
    "ResidualBlock": ("ppo", "dqn", "rainbow"),
    "impala_encoder": ("dqn", "rainbow"),  # PPO keeps Impoola's own (PyTorch's max-pool padding)
    "SameMaxPool2d": ("dqn", "rainbow"),
    "make_encoder": ("dqn", "rainbow"),
    "SoftMoE": ("dqn", "rainbow"),
    "SamePad2d": ("dqn", "rainbow", "sac"),
    "stack_frames": ("dqn", "rainbow"),
    "n_step_returns": ("dqn", "rainbow"),
    "gather_batch": ("dqn", "rainbow"),
    "recent_observations": ("dqn", "rainbow"),
    "linear_schedule": ("dqn", "rainbow"),
    "soft_update": ("dqn", "rainbow"),
    "select_actions": ("dqn", "rainbow"),
    "evaluate": ("dqn", "rainbow"),
    "sparsifiable_weights": ("dqn", "rainbow"),
    "erk_sparsities": ("dqn", "rainbow"),
    "topk_mask": ("dqn", "rainbow"),
    "pruning_sparsity": ("dqn", "rainbow"),
    "rigl_drop_fraction": ("dqn", "rainbow"),
    "rigl_mask": ("dqn", "rainbow"),
    "mask_update_schedule": ("dqn", "rainbow"),
    "is_mask_update": ("dqn", "rainbow"),
    "make_masks": ("dqn", "rainbow"),
    "masked_pairs": ("dqn", "rainbow"),
    "apply_masks": ("dqn", "rainbow"),
    "prune_masks_": ("dqn", "rainbow"),
    "rigl_masks_": ("dqn", "rainbow"),
    "sparse_training": ("dqn", "rainbow"),
    "check_resumed_sparsity": ("dqn", "rainbow"),
    "SparseTraining": ("dqn", "rainbow"),
}

SECTIONS = ("Args", "Network", "Algorithm", "Storage", "Environment", "Evaluation", "Main")  # the math before the plumbing
HEADER = re.compile(r"^# (\w+)(: .+)?$")

# Flags that mean the same in these scripts but are each script's own (the rest are utils.RunArgs'): their type and
# docstring must read the same (defaults differ by paper: width 2 in Impoola, dense scale 4 in Rainbow, flatten in DrQ's SAC)
ALL = tuple(SCRIPTS)
SHARED_FLAGS = [("exp_name", ALL), ("width", ALL), ("dense_scale", ALL), ("pool", ("ppo", "sac")),
                *((flag, ("dqn", "rainbow")) for flag in ("pool", "num_experts", "encoder_blocks", "dense_layers",
                                                          "layer_norm", "weight_decay"))]


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_definition_is_the_same_text_in_every_script(name):
    sources = {script: inspect.getsource(getattr(SCRIPTS[script], name)) for script in SHARED[name]}
    first = sources[SHARED[name][0]]
    differing = [script for script, source in sources.items() if source != first]
    assert not differing, f"{name} differs from {SHARED[name][0]}'s in {differing}"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sections_come_in_the_skeleton_order(script):
    lines = inspect.getsource(SCRIPTS[script]).splitlines()
    headers = [m.group(1) for m in map(HEADER.match, lines) if m and m.group(1) in SECTIONS]
    assert tuple(headers) == SECTIONS


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_main_is_the_last_section_and_check_args_opens_it(script):
    source = inspect.getsource(SCRIPTS[script])
    tree = ast.parse(source)
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert functions[-2:] == ["check_args", "main"]
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    calls = [ast.unparse(statement) for statement in main.body[:2]]
    assert calls[1] == "check_args(args)"


def field_text(module, name):
    """One Args field's `name: type` and its docstring line."""
    lines = inspect.getsource(module.Args).splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"    {name}: ", line))
    return [lines[start].split(" = ")[0], lines[start + 1]]


@pytest.mark.parametrize("flag,scripts", SHARED_FLAGS)
def test_shared_flag_reads_the_same_in_every_script(flag, scripts):
    texts = {script: field_text(SCRIPTS[script], flag) for script in scripts}
    assert all(text == texts[scripts[0]] for text in texts.values()), texts


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_args_extend_the_shared_run_flags_without_redeclaring_one(script):
    args = SCRIPTS[script].Args
    assert issubclass(args, utils.RunArgs)
    own = {node.target.id for node in ast.parse(inspect.getsource(args)).body[0].body if isinstance(node, ast.AnnAssign)}
    assert not own & {field.name for field in dataclasses.fields(utils.RunArgs)}


def test_utils_names_only_flags_every_script_has():
    """utils reads `args.NAME` and lists RUN_NEUTRAL_FLAGS: each a flag of every script, none a script's private one."""
    common = set.intersection(*({field.name for field in dataclasses.fields(module.Args)} for module in SCRIPTS.values()))
    read = set(re.findall(r"\bargs\.(\w+)", inspect.getsource(utils)))
    assert read <= common and set(utils.RUN_NEUTRAL_FLAGS) <= common, (read | set(utils.RUN_NEUTRAL_FLAGS)) - common


PYTHON_FILES = sorted(os.path.relpath(path, REPO) for folder in ("cleanrl_pool", "benchmark", "tests", "procgen_hd")
                      for path in glob.glob(os.path.join(REPO, folder, "**", "*.py"), recursive=True))


@pytest.mark.parametrize("path", PYTHON_FILES)
def test_lines_fit_in_127_characters(path):
    with open(os.path.join(REPO, path)) as f:
        long_lines = [number for number, line in enumerate(f, 1) if len(line.rstrip("\n")) > 127]
    assert not long_lines, f"{path}: lines {long_lines} are longer than 127 characters"
