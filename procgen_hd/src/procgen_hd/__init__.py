"""Procgen-HD: the 16 Procgen games drawn natively at R x R (same field of view, levels, physics and
rewards at every R), as a batched NumPy environment over the fork's C API (libenv) through ctypes.

    import procgen_hd
    envs = procgen_hd.ProcgenHDEnv("bigfish", num_envs=64, resolution=192, num_levels=200)
    obs, info = envs.reset()                      # (64, 3, 192, 192) uint8, channel-first
    obs, reward, done, info = envs.step(actions)  # float32 rewards, bool episode ends

Procgen resets inside the step that ends an episode: that step returns the episode's last reward,
`done` True and the next episode's first frame. There is no truncation flag (a time-out at 1,000
steps is an episode end). `info` holds the level seed being played (`level_seed`) and, for the step
just taken, the level it was taken in (`prev_level_seed`) and whether it completed it
(`prev_level_complete`). Built from raphajaner/procgen-hd at the commit in `BUILD_INFO`.
"""

import ctypes
import gc
import json
import os

import numpy as np

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(PACKAGE_DIR, "build_info.json")) as _f:
    BUILD_INFO = json.load(_f)

GAMES = ("bigfish", "bossfight", "caveflyer", "chaser", "climber", "coinrun", "dodgeball", "fruitbot",
         "heist", "jumper", "leaper", "maze", "miner", "ninja", "plunder", "starpilot")
# distribution mode: (libenv code, games that have it); `exploration` is hard mode on one fixed level (procgen's env.py)
DISTRIBUTION_MODES = {
    "easy": (0, GAMES), "hard": (1, GAMES),
    "extreme": (2, ("chaser", "dodgeball", "leaper", "starpilot")),
    "memory": (10, ("caveflyer", "dodgeball", "heist", "jumper", "maze", "miner")),
    "exploration": (1, ("caveflyer", "climber", "coinrun", "heist", "jumper", "leaper", "maze", "ninja")),
}
EXPLORATION_LEVEL_SEEDS = {"coinrun": 1949448038, "caveflyer": 1259048185, "leaper": 1318677581, "jumper": 1434825276,
                           "maze": 158988835, "heist": 876640971, "climber": 1561126160, "ninja": 1123500215}
VISUAL_OPTIONS = {  # procgen's defaults (ProcgenGym3Env)
    "center_agent": True, "use_backgrounds": True, "paint_vel_info": False, "use_generated_assets": False,
    "use_monochrome_assets": False, "restrict_themes": False, "use_easy_jump": False,
}
NUM_ACTIONS = 15
MAX_RESOLUTION = 4096  # Qt draws larger frames too; one 4096 x 4096 frame is already 50 MB per environment
INT32_MAX = 2**31 - 1
MAX_STATE_BYTES = 2**20  # procgen's own bound on a serialised game state

# The C API (gym3's libenv.h)
UINT8, INT32, FLOAT32 = 1, 2, 3
SPACE_OBSERVATION, SPACE_ACTION, SPACE_INFO = 1, 2, 3


class _Option(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 128), ("dtype", ctypes.c_int), ("count", ctypes.c_int), ("data", ctypes.c_void_p)]


class _Options(ctypes.Structure):
    _fields_ = [("items", ctypes.POINTER(_Option)), ("count", ctypes.c_int)]


class _Value(ctypes.Union):
    _fields_ = [("uint8", ctypes.c_uint8), ("int32", ctypes.c_int32), ("float32", ctypes.c_float)]


class _TensorType(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char * 128), ("scalar_type", ctypes.c_int), ("dtype", ctypes.c_int),
                ("shape", ctypes.c_int * 16), ("ndim", ctypes.c_int), ("low", _Value), ("high", _Value)]


class _Buffers(ctypes.Structure):
    _fields_ = [("ob", ctypes.POINTER(ctypes.c_void_p)), ("rew", ctypes.c_void_p), ("first", ctypes.c_void_p),
                ("info", ctypes.POINTER(ctypes.c_void_p)), ("ac", ctypes.POINTER(ctypes.c_void_p))]


_lib = ctypes.CDLL(os.path.join(PACKAGE_DIR, "libenv.so"))
_lib.libenv_make.restype = ctypes.c_void_p
_lib.libenv_make.argtypes = [ctypes.c_int, _Options]
_lib.libenv_get_tensortypes.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_TensorType)]
_lib.libenv_set_buffers.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buffers)]
for _name in ("libenv_observe", "libenv_act", "libenv_close"):
    getattr(_lib, _name).argtypes = [ctypes.c_void_p]
_lib.get_state.restype = ctypes.c_int
_lib.get_state.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_lib.set_state.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]

# The fork draws one frame size per process (a global set by each new environment): open envs share it.
_open_resolutions = []


def check_options(game: str, resolution: int, num_levels: int, start_level: int, distribution_mode: str, seed: int,
                  num_envs: int = 1, num_threads: int = 0):
    """Raise ValueError, with one line naming the option, for what libenv cannot make (it would abort the process)."""
    if game not in GAMES:
        raise ValueError(f"game {game!r} is not a Procgen game; choose one of: {', '.join(GAMES)}")
    if distribution_mode not in DISTRIBUTION_MODES:
        raise ValueError(f"distribution_mode {distribution_mode!r} is unknown; choose one of: {', '.join(DISTRIBUTION_MODES)}")
    if game not in DISTRIBUTION_MODES[distribution_mode][1]:
        games = ", ".join(DISTRIBUTION_MODES[distribution_mode][1])
        raise ValueError(f"{game} has no {distribution_mode} mode; it is in: {games}")
    if not isinstance(resolution, int) or not 1 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution {resolution!r} cannot be drawn; choose a side from 1 to {MAX_RESOLUTION}")
    for name, value, low in (("num_levels", num_levels, 0), ("start_level", start_level, 0), ("seed", seed, 0),
                             ("num_envs", num_envs, 1), ("num_threads", num_threads, 0)):
        if not isinstance(value, int) or not low <= value <= INT32_MAX:
            raise ValueError(f"{name} {value!r} must be an integer from {low} to {INT32_MAX}")
    if num_levels and start_level + num_levels > INT32_MAX:
        raise ValueError(f"start_level {start_level} + num_levels {num_levels} must stay below 2**31")
    if distribution_mode == "exploration" and (num_levels, start_level) != (0, 0):
        raise ValueError("the exploration mode plays one fixed level: leave num_levels and start_level at 0")
    if _open_resolutions and resolution != _open_resolutions[0]:
        gc.collect()  # environments nothing refers to any more (a reference cycle, an old traceback) close when collected
    if _open_resolutions and resolution != _open_resolutions[0]:
        raise ValueError(f"resolution {resolution}: this process already draws {_open_resolutions[0]}x{_open_resolutions[0]} "
                         "(Procgen-HD draws one size per process; close those environments or use another process)")


class ProcgenHDEnv:
    """`num_envs` copies of one game, stepped together by `num_threads` worker threads (0: in the caller).

    `seed` seeds the stream of level seeds (and so the levels each env plays); levels are drawn from
    [start_level, start_level + num_levels), or from all 2**31 - 1 seeds when num_levels is 0.
    """

    def __init__(self, game: str, num_envs: int, resolution: int = 64, num_levels: int = 0, start_level: int = 0,
                 distribution_mode: str = "easy", seed: int = 0, num_threads: int = None, **visual_options):
        self._handle = None
        unknown = sorted(set(visual_options) - set(VISUAL_OPTIONS))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; the visual options are: {', '.join(VISUAL_OPTIONS)}")
        if num_threads is None:
            num_threads = min(num_envs, len(os.sched_getaffinity(0))) if isinstance(num_envs, int) else 0
        check_options(game, resolution, num_levels, start_level, distribution_mode, seed, num_envs, num_threads)
        if distribution_mode == "exploration":
            num_levels, start_level = 1, EXPLORATION_LEVEL_SEEDS[game]
        self.game, self.num_envs, self.resolution = game, num_envs, resolution
        self.num_levels, self.start_level, self.distribution_mode = num_levels, start_level, distribution_mode
        self.num_actions = NUM_ACTIONS
        self.options = dict(VISUAL_OPTIONS, **visual_options)
        self._needs_reset_step = False
        self._make(num_threads, seed)

    def _make(self, num_threads: int, seed: int):
        assets = (os.path.join(PACKAGE_DIR, "assets") + os.sep).encode()  # libenv wants the trailing separator
        items = [("env_name", UINT8, self.game.encode()), ("resource_root", UINT8, assets),
                 ("num_levels", INT32, self.num_levels), ("start_level", INT32, self.start_level),
                 ("distribution_mode", INT32, DISTRIBUTION_MODES[self.distribution_mode][0]),
                 ("num_actions", INT32, NUM_ACTIONS), ("rand_seed", INT32, seed), ("num_threads", INT32, num_threads),
                 ("debug_mode", INT32, 0), ("obs_width", INT32, self.resolution), ("obs_height", INT32, self.resolution),
                 ("render_human", UINT8, False), ("use_sequential_levels", UINT8, False)]
        items += [(name, UINT8, bool(value)) for name, value in self.options.items()]
        keep, options = [], (_Option * len(items))()
        for option, (name, dtype, value) in zip(options, items):
            if isinstance(value, bytes):
                data, count = ctypes.create_string_buffer(value, len(value)), len(value)
            else:
                data, count = (ctypes.c_int32 if dtype == INT32 else ctypes.c_uint8)(value), 1
            keep.append(data)
            option.name, option.dtype, option.count, option.data = name.encode(), dtype, count, ctypes.addressof(data)
        self._handle = _lib.libenv_make(self.num_envs, _Options(options, len(items)))
        _open_resolutions.append(self.resolution)
        info_count = _lib.libenv_get_tensortypes(self._handle, SPACE_INFO, None)
        info_types = (_TensorType * info_count)()
        _lib.libenv_get_tensortypes(self._handle, SPACE_INFO, info_types)
        # One buffer per tensor, one row per env: libenv writes env i's values into row i
        n, side = self.num_envs, self.resolution
        self._obs = np.zeros((n, side, side, 3), dtype=np.uint8)
        self._actions = np.zeros(n, dtype=np.int32)
        self._rewards = np.zeros(n, dtype=np.float32)
        self._firsts = np.zeros(n, dtype=np.uint8)
        dtypes = {UINT8: np.uint8, INT32: np.int32}
        self._infos = {t.name.decode(): np.zeros(n, dtype=dtypes[t.dtype]) for t in info_types}

        def row_pointers(*arrays):
            return (ctypes.c_void_p * (n * len(arrays)))(*[a.ctypes.data + i * a.strides[0] for a in arrays for i in range(n)])

        infos = [self._infos[t.name.decode()] for t in info_types]
        self._buffers = _Buffers(row_pointers(self._obs), self._rewards.ctypes.data, self._firsts.ctypes.data,
                                 row_pointers(*infos), row_pointers(self._actions))
        _lib.libenv_set_buffers(self._handle, ctypes.byref(self._buffers))

    def _observation(self):
        """Copies of what libenv wrote: frames (N, 3, R, R) as a channel-first view of (N, R, R, 3) memory."""
        info = {name: values.copy() for name, values in self._infos.items()}
        return self._obs.copy().transpose(0, 3, 1, 2), info

    def reset(self):
        """(obs, info). The first call returns the initial frames; later calls start a new episode in every env."""
        if self._needs_reset_step:
            self.step(np.full(self.num_envs, -1))  # procgen's forced reset: action -1 ends the episode
        _lib.libenv_observe(self._handle)
        self._needs_reset_step = True
        return self._observation()

    def step_async(self, actions):
        """Start a step of every env in the worker threads and return at once (`step_wait` collects it)."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or ((actions < -1) | (actions >= NUM_ACTIONS)).any():
            raise ValueError(f"actions must be {self.num_envs} integers in [0, {NUM_ACTIONS})")
        self._actions[:] = actions
        self._needs_reset_step = True
        _lib.libenv_act(self._handle)

    def step_wait(self):
        """(obs, reward, done, info) of the step started by `step_async`."""
        _lib.libenv_observe(self._handle)
        obs, info = self._observation()
        return obs, self._rewards.copy(), self._firsts.astype(bool), info

    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()

    def get_state(self) -> list:
        """Each env's serialised game state (bytes): level, positions, RNGs, step count."""
        _lib.libenv_observe(self._handle)
        buffer, states = ctypes.create_string_buffer(MAX_STATE_BYTES), []
        for i in range(self.num_envs):
            length = _lib.get_state(self._handle, i, buffer, MAX_STATE_BYTES)
            states.append(buffer.raw[:length])
        return states

    def set_state(self, states: list):
        """Restore `get_state`'s states; returns (obs, info) of the restored games, as `reset` does."""
        if len(states) != self.num_envs:
            raise ValueError(f"set_state needs {self.num_envs} states, got {len(states)}")
        for i, state in enumerate(states):
            if state[4:8] != len(self.game).to_bytes(4, "little") or state[8 : 8 + len(self.game)] != self.game.encode():
                raise ValueError(f"set_state: state {i} is not a state of {self.game}")  # libenv would exit the process
            _lib.set_state(self._handle, i, ctypes.create_string_buffer(state, len(state)), len(state))
        self._needs_reset_step = True
        return self._observation()

    def close(self):
        if self._handle is not None:
            _lib.libenv_close(self._handle)
            self._handle = None
            _open_resolutions.remove(self.resolution)

    def __del__(self):
        self.close()
