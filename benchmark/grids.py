"""Ready-made sweeps for the papers' main experiments, as plain data.

A grid names a script of cleanrl_pool/ (or a path), flags that stay `fixed`, and flags to `vary`:
a dict of flag -> list of values (every combination is one run), or a list of such dicts (the
union of their combinations). Flags are spelled as on the command line, without the dashes.
A JSON file with the same keys works as well: `python benchmark/sweep.py --grid my_grid.json`.
"""

import os
import sys

SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cleanrl_pool")
if SCRIPTS_DIR not in sys.path:
    sys.path.insert(0, SCRIPTS_DIR)
import utils  # noqa: E402  (the games' score table, shared with the scripts)

PROCGEN_GAMES = sorted(utils.PROCGEN_SCORE_RANGES)  # the 16 games, as ppo_procgen_impoola.py lists them
GAP_ATARI_GAMES = [  # Sokar & Castro 2025, REFERENCE §7
    "Asterix", "SpaceInvaders", "Breakout", "Pong", "Qbert", "DemonAttack", "Seaquest", "WizardOfWor",
    "RoadRunner", "BeamRider", "Frostbite", "CrazyClimber", "Assault", "Krull", "Boxing", "Jamesbond",
    "Kangaroo", "UpNDown", "Gopher", "Hero",
]
SEEDS = [1, 2, 3, 4, 5]
GAP_RUNS = {"env-id": GAP_ATARI_GAMES, "seed": SEEDS}

GRIDS = {
    "procgen_hd": {
        "about": "Procgen-HD (Trumpp et al., TMLR 2026): Impala (flatten) vs Impoola (avg) x resolution x width, "
                 "16 games, 5 seeds, 25M steps, easy, 200 training levels; frames drawn natively at each resolution "
                 "(the authors' Procgen-HD fork, procgen_hd/)",
        "script": "ppo_procgen_impoola.py",
        "fixed": {"total-timesteps": 25_000_000, "distribution-mode": "easy"},
        "vary": {"env-id": PROCGEN_GAMES, "seed": SEEDS, "pool": ["flatten", "avg"],
                 "resolution": [48, 64, 80, 96, 112], "width": [2, 3, 4]},
    },
    "impoola_width": {
        "about": "Impoola (Trumpp et al., RLC 2025) scaling plot: Impala width 1-3 vs Impoola width 1-4, "
                 "16 games, 5 seeds, 25M steps, easy, 64x64",
        "script": "ppo_procgen_impoola.py",
        "fixed": {"total-timesteps": 25_000_000, "distribution-mode": "easy", "resolution": 64},
        "vary": [
            {"env-id": PROCGEN_GAMES, "seed": SEEDS, "pool": ["flatten"], "width": [1, 2, 3]},
            {"env-id": PROCGEN_GAMES, "seed": SEEDS, "pool": ["avg"], "width": [1, 2, 3, 4]},
        ],
    },
    "gap_atari": {
        "about": "Mind the GAP (Sokar & Castro 2025): Rainbow with the Impala encoder, flatten vs GAP x dense "
                 "width x1-x8, the paper's 20 Atari games, 5 seeds, 200M frames",
        "script": "rainbow_atari_gap.py",
        "fixed": {"preset": "rainbow", "encoder": "impala", "total-timesteps": 50_000_000},
        "vary": {"env-id": GAP_ATARI_GAMES, "seed": SEEDS, "pool": ["flatten", "avg"], "dense-scale": [1, 2, 4, 8]},
    },
    "gap_comparison": {
        "about": "Mind the GAP's comparison set: Rainbow, Impala encoder, dense layer x4: flatten, GAP, "
                 "SoftMoE-1, tokens, and flatten + gradual pruning / static sparse / RigL, + weight decay 1e-5 (coupled "
                 "L2, as RigL's DQN), + LayerNorm; then flatten vs GAP with 4 residual blocks per stage or 2 dense layers "
                 "(Figure 8); the paper's 20 Atari games, 5 seeds, 200M frames. Flatten and GAP at x4 are gap_atari's runs",
        "script": "rainbow_atari_gap.py",
        "fixed": {"preset": "rainbow", "encoder": "impala", "total-timesteps": 50_000_000},
        "vary": [  # dense-scale varied (one value) as in gap_atari: the same experiment names, so its runs are reused
            {**GAP_RUNS, "pool": ["flatten", "avg", "softmoe", "tokens"], "dense-scale": [4]},
            {**GAP_RUNS, "pool": ["flatten"], "dense-scale": [4], "sparsity-method": ["prune", "static", "rigl"]},
            {**GAP_RUNS, "pool": ["flatten"], "dense-scale": [4], "weight-decay": [1e-5]},
            {**GAP_RUNS, "pool": ["flatten"], "dense-scale": [4], "layer-norm": [True]},
            {**GAP_RUNS, "pool": ["flatten", "avg"], "dense-scale": [4], "encoder-blocks": [4]},
            {**GAP_RUNS, "pool": ["flatten", "avg"], "dense-scale": [4], "dense-layers": [2]},
        ],
    },
}
