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

Nothing a caller passes reaches a C `fassert`: options, actions and saved states are checked here
and refused with one line (ValueError), and every call on a closed env raises RuntimeError. With
Gymnasium installed, importing the package registers `procgen_hd/<game>-v0` (see `gymnasium_env`).
"""

import ctypes
import gc
import json
import os
import struct

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
MAX_THREADS = 1024  # libenv starts one OS thread each; a failed thread start would terminate the process

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

# The fork's game state (Game/BasicAbstractGame::serialize and each game's override): 4-byte little-endian ints and
# floats, strings and vectors prefixed by their length. libenv `fassert`s (exits the process) on a wrong version, game
# name or a read past the end, and throws std::length_error on a huge vector length: so every state is parsed here first.
STATE_VERSION, END_OF_BUFFER = 0, 0xCAFECAFE
ENTITY_BYTES = 31 * 4  # Entity::serialize: 31 ints and floats, the type is the 7th
PLAYER = 0
GAME_OPTION_NAMES = ("paint_vel_info", "use_generated_assets", "use_monochrome_assets", "restrict_themes",
                     "use_backgrounds", "center_agent", "debug_mode", "distribution_mode", "use_sequential_levels",
                     "use_easy_jump", "plain_assets", "physics_mode")
# After BasicAbstractGame's fields: s a 4-byte value, v a vector of them, e a list of entities
GAME_STATE_TAILS = {"bigfish": "ss", "bossfight": "v" + "s" * 23, "caveflyer": "", "chaser": "vv" + "s" * 7,
                    "climber": "s" * 7, "coinrun": "s" * 7, "dodgeball": "s" * 7, "fruitbot": "sss", "heist": "ssv",
                    "jumper": "s" * 7, "leaper": "svsvs", "maze": "ss", "miner": "s", "ninja": "s" * 8,
                    "plunder": "svvvv" + "s" * 9, "starpilot": "e"}
REQUIRED_ENTITIES = {"bossfight": 2, "jumper": 1}  # deserialize `fassert`s that the boss / the goal exists
MT19937_WORDS = 624


class _StateReader:
    """Reads a serialised game state as libenv's ReadBuffer does, raising ValueError where it would abort."""

    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def take(self, size: int) -> bytes:
        if size < 0 or self.offset + size > len(self.data):
            raise ValueError(f"is truncated or corrupt: it needs byte {self.offset + size} of {len(self.data)}")
        self.offset += size
        return self.data[self.offset - size : self.offset]

    def int(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def skip(self, count: int):
        self.take(4 * count)

    def length(self, item_bytes: int) -> int:
        count = self.int()
        if count < 0 or count * item_bytes > len(self.data) - self.offset:
            raise ValueError(f"is truncated or corrupt: a length of {count} at byte {self.offset - 4} runs past its end")
        return count

    def string(self) -> bytes:
        return self.take(self.length(1))

    def random_generator(self):
        """RandGen: a seeded flag and std::mt19937 as text (624 words and a position)."""
        self.int()
        words = self.string().split()
        if len(words) != MT19937_WORDS + 1 or not all(w.isdigit() and int(w) < 2**32 for w in words) \
                or int(words[-1]) > MT19937_WORDS:
            raise ValueError(f"is corrupt: no random generator state at byte {self.offset}")

    def entity_types(self) -> list:
        count = self.length(ENTITY_BYTES)
        return [struct.unpack_from("<i", self.take(ENTITY_BYTES), 24)[0] for _ in range(count)]


def check_state(state, game: str):
    """Raise ValueError (the reason, as a sentence's end) unless `state` is one libenv can restore into a `game` env."""
    if not isinstance(state, (bytes, bytearray)):
        raise ValueError(f"is a {type(state).__name__}, not bytes from get_state")
    reader = _StateReader(bytes(state))
    version = reader.int()
    if version != STATE_VERSION:
        raise ValueError(f"is not a Procgen game state (format version {version}, expected {STATE_VERSION})")
    name = reader.string()
    if name != game.encode():
        shown = name.decode("ascii", "replace") if name.decode("ascii", "replace") in GAMES else "an unknown game"
        raise ValueError(f"is a state of {shown}, not of {game}")
    options = dict(zip(GAME_OPTION_NAMES, (reader.int() for _ in GAME_OPTION_NAMES)))
    if options["use_generated_assets"]:
        raise ValueError("has use_generated_assets set: Procgen cannot restore such a game")
    modes = {code: name for name, (code, games) in DISTRIBUTION_MODES.items() if game in games and name != "exploration"}
    if options["distribution_mode"] not in modes:
        raise ValueError(f"is corrupt: distribution mode {options['distribution_mode']} is not one of {game}'s")
    reader.skip(5)  # grid_step, level seed range, game_type, game_n
    reader.random_generator(), reader.random_generator()  # level seeds, game
    reader.skip(14)  # step data, action, timeout, level seeds, episode bookkeeping, cur_time
    if reader.int() != 0:
        raise ValueError("is corrupt: it was saved in the middle of a step")  # act() `fassert`s on it
    reader.skip(1)  # grid_size
    types = reader.entity_types()
    for kind, required in ((PLAYER, "the agent"), (REQUIRED_ENTITIES.get(game), f"{game}'s main entity")):
        if kind is not None and kind not in types:
            raise ValueError(f"is corrupt: it holds no entity for {required}")
    reader.skip(19)  # background, movement and centring
    reader.random_generator()  # assets
    reader.skip(9)  # world size, unit, view, offsets, visibility
    width, height = reader.int(), reader.int()
    cells = reader.length(4)
    if width < 0 or height < 0 or cells != width * height:
        raise ValueError(f"is corrupt: its {width} x {height} grid does not hold {width * height} cells")
    reader.skip(cells)
    for item in GAME_STATE_TAILS[game]:
        if item == "s":
            reader.skip(1)
        elif item == "v":
            reader.skip(reader.length(4))
        else:
            reader.entity_types()
    if struct.unpack("<I", reader.take(4))[0] != END_OF_BUFFER:
        raise ValueError(f"is corrupt: no end marker at byte {reader.offset - 4}")
    if reader.offset != len(reader.data):
        raise ValueError(f"is corrupt: {len(reader.data) - reader.offset} bytes follow its end marker")


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
    if num_threads > MAX_THREADS:
        raise ValueError(f"num_threads {num_threads} starts too many threads; choose from 0 to {MAX_THREADS}")
    frame_bytes = num_envs * resolution * resolution * 7  # our frames (3 bytes a pixel) and libenv's (4)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if frame_bytes > memory:
        raise ValueError(f"num_envs {num_envs} at resolution {resolution} needs {frame_bytes / 2**30:.1f} GiB of frames, "
                         f"more than this machine's {memory / 2**30:.1f} GiB")
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
                 distribution_mode: str = "easy", seed: int = 0, num_threads: int = None,
                 use_sequential_levels: bool = False, **visual_options):
        self._handle = None
        unknown = sorted(set(visual_options) - set(VISUAL_OPTIONS))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; the visual options are: {', '.join(VISUAL_OPTIONS)}")
        for name, value in dict(visual_options, use_sequential_levels=use_sequential_levels).items():
            if not isinstance(value, (bool, np.bool_)) and value not in (0, 1):  # libenv `fassert`s a byte of 0 or 1
                raise ValueError(f"{name} {value!r} must be True or False")
        if num_threads is None:
            num_threads = min(num_envs, len(os.sched_getaffinity(0))) if isinstance(num_envs, int) else 0
        check_options(game, resolution, num_levels, start_level, distribution_mode, seed, num_envs, num_threads)
        if distribution_mode == "exploration":
            num_levels, start_level = 1, EXPLORATION_LEVEL_SEEDS[game]
        self.game, self.num_envs, self.resolution = game, num_envs, resolution
        self.num_levels, self.start_level, self.distribution_mode = num_levels, start_level, distribution_mode
        self.num_actions = NUM_ACTIONS
        self.options = dict(VISUAL_OPTIONS, **visual_options, use_sequential_levels=use_sequential_levels)
        self._needs_reset_step, self._step_pending = False, False
        self._make(num_threads, seed)

    def _make(self, num_threads: int, seed: int):
        assets = (os.path.join(PACKAGE_DIR, "assets") + os.sep).encode()  # libenv wants the trailing separator
        items = [("env_name", UINT8, self.game.encode()), ("resource_root", UINT8, assets),
                 ("num_levels", INT32, self.num_levels), ("start_level", INT32, self.start_level),
                 ("distribution_mode", INT32, DISTRIBUTION_MODES[self.distribution_mode][0]),
                 ("num_actions", INT32, NUM_ACTIONS), ("rand_seed", INT32, seed), ("num_threads", INT32, num_threads),
                 ("debug_mode", INT32, 0), ("obs_width", INT32, self.resolution), ("obs_height", INT32, self.resolution),
                 ("render_human", UINT8, False)]
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

    def _check_open(self, call: str):
        if self._handle is None:
            raise RuntimeError(f"{call}: this Procgen-HD env is closed (libenv has freed its games); make a new one")

    def _check_no_pending_step(self, call: str):
        if self._step_pending:
            raise RuntimeError(f"{call}: a step started by step_async is still running; collect it with step_wait first")

    def _observation(self):
        """Copies of what libenv wrote: frames (N, 3, R, R) as a channel-first view of (N, R, R, 3) memory."""
        info = {name: values.copy() for name, values in self._infos.items()}
        return self._obs.copy().transpose(0, 3, 1, 2), info

    def _act(self, actions):
        self._actions[:] = actions
        self._needs_reset_step = True
        _lib.libenv_act(self._handle)

    def reset(self):
        """(obs, info). The first call returns the initial frames; later calls start a new episode in every env."""
        self._check_open("reset")
        self._check_no_pending_step("reset")
        if self._needs_reset_step:
            self._act(-1)  # procgen's forced reset: action -1 ends the episode
        _lib.libenv_observe(self._handle)
        self._needs_reset_step = True
        return self._observation()

    def check_actions(self, actions) -> np.ndarray:
        """`actions` as an array of `num_envs` integers in [0, NUM_ACTIONS), or ValueError naming the first bad one."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions of shape {actions.shape}: need one integer per env, shape ({self.num_envs},)")
        if not np.issubdtype(actions.dtype, np.integer):
            raise ValueError(f"actions of dtype {actions.dtype}: need integers in [0, {NUM_ACTIONS}) (none is rounded)")
        bad = np.flatnonzero((actions < 0) | (actions >= NUM_ACTIONS))
        if bad.size:
            raise ValueError(f"action {actions[bad[0]]} of env {bad[0]}: actions are integers in [0, {NUM_ACTIONS})")
        return actions

    def step_async(self, actions):
        """Start a step of every env in the worker threads and return at once (`step_wait` collects it)."""
        self._check_open("step_async")
        self._check_no_pending_step("step_async")
        self._act(self.check_actions(actions))
        self._step_pending = True

    def step_wait(self):
        """(obs, reward, done, info) of the step started by `step_async`."""
        self._check_open("step_wait")
        if not self._step_pending:
            raise RuntimeError("step_wait: no step is running; start one with step_async")
        _lib.libenv_observe(self._handle)
        self._step_pending = False
        obs, info = self._observation()
        return obs, self._rewards.copy(), self._firsts.astype(bool), info

    def step(self, actions):
        self._check_open("step")
        self.step_async(actions)
        return self.step_wait()

    def get_state(self) -> list:
        """Each env's serialised game state (bytes): level, positions, RNGs, step count. The frame size is not part of
        it: a state restores the same game at any resolution."""
        self._check_open("get_state")
        self._check_no_pending_step("get_state")
        if self.options["use_generated_assets"]:
            raise ValueError("get_state: Procgen cannot save a game with use_generated_assets=True")
        _lib.libenv_observe(self._handle)
        buffer, states = ctypes.create_string_buffer(MAX_STATE_BYTES), []
        for i in range(self.num_envs):
            length = _lib.get_state(self._handle, i, buffer, MAX_STATE_BYTES)
            states.append(buffer.raw[:length])
        return states

    def set_state(self, states: list):
        """Restore `get_state`'s states (saved at any resolution); returns (obs, info) of the restored games, as `reset`
        does. Every state is checked before any is restored: a bad one raises ValueError and changes nothing."""
        self._check_open("set_state")
        self._check_no_pending_step("set_state")
        if self.options["use_generated_assets"]:
            raise ValueError("set_state: Procgen cannot restore a game with use_generated_assets=True")
        if isinstance(states, (bytes, bytearray, str)) or not hasattr(states, "__len__"):
            raise ValueError(f"set_state needs a list of {self.num_envs} states (bytes), got a {type(states).__name__}")
        if len(states) != self.num_envs:
            raise ValueError(f"set_state needs {self.num_envs} states, got {len(states)}")
        for i, state in enumerate(states):
            try:
                check_state(state, self.game)
            except ValueError as error:
                raise ValueError(f"set_state: state {i} {error}") from None
        for i, state in enumerate(states):
            _lib.set_state(self._handle, i, ctypes.create_string_buffer(bytes(state), len(state)), len(state))
        self._needs_reset_step = True
        return self._observation()

    def close(self):
        if self._handle is not None:
            _lib.libenv_close(self._handle)
            self._handle = None
            _open_resolutions.remove(self.resolution)

    def __del__(self):
        self.close()


try:  # Gymnasium (>= 1.1, which has AutoresetMode) is optional: with it, `procgen_hd/<game>-v0` works in make and make_vec
    import gymnasium
except ImportError:
    gymnasium = None
if gymnasium is not None and hasattr(gymnasium.vector, "AutoresetMode"):
    from procgen_hd.gymnasium_env import register_envs

    register_envs()
