"""Procgen-HD as Gymnasium 1.x environments, registered as `procgen_hd/<game>-v0` when `procgen_hd` is imported:

    import gymnasium as gym, procgen_hd
    envs = gym.make_vec("procgen_hd/bigfish-v0", num_envs=64, vectorization_mode="vector_entry_point", resolution=128)
    env = gym.make("procgen_hd/bigfish-v0", resolution=128)   # one game, a gymnasium.Env

`ProcgenHDVectorEnv` is the native batched env (one libenv, its worker threads) as a `gymnasium.vector.VectorEnv`:
frames (N, R, R, 3) uint8 (procgen's gym layout; `channels_first=True` gives (N, 3, R, R)), float32 rewards,
`terminations` the episode ends and `truncations` always False (procgen's 1,000-step time-out is an episode end, as
in procgen's own gym interface), infos `level_seed`, `prev_level_seed`, `prev_level_complete` (each with its `_name`
mask). Autoreset mode SAME_STEP, procgen's own: the step that ends an episode returns its last reward and the next
episode's first frame; procgen never draws the last frame, so there is no `final_obs`. `reset(seed=s)` restarts every
env from level-seed stream `s` (one int: procgen seeds the batch as a whole); `reset()` starts new episodes.
"""

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

import procgen_hd

RENDER_FPS = 15  # procgen's interactive viewer


def _random_seed() -> int:
    """procgen's gym interface seeds an unseeded env at random; so do we (Gymnasium's convention too)."""
    return int(np.random.SeedSequence().generate_state(1)[0] % procgen_hd.INT32_MAX)


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed {seed!r}: procgen seeds all its envs from one integer in [0, {procgen_hd.INT32_MAX}]")


def _check_render_mode(render_mode):
    if render_mode not in (None, "rgb_array"):
        raise ValueError(f"render_mode {render_mode!r} is not offered; choose None or 'rgb_array' (the R x R frames)")


def _check_reset_options(options):
    if options:
        raise ValueError(f"reset options {sorted(options)} are not offered; Procgen-HD's reset takes none")


class _Batch:
    """One ProcgenHDEnv, rebuilt on reset(seed=...), with frames in the layout the Gymnasium env promises."""

    def __init__(self, num_envs: int, channels_first: bool, options: dict):
        self.num_envs, self.channels_first, self.options = num_envs, channels_first, options
        self.envs = procgen_hd.ProcgenHDEnv(num_envs=num_envs, seed=_random_seed(), **options)

    def reseed(self, seed: int):
        self.envs.close()
        self.envs = procgen_hd.ProcgenHDEnv(num_envs=self.num_envs, seed=int(seed), **self.options)

    def frames(self, obs: np.ndarray) -> np.ndarray:
        """`obs` (N, 3, R, R) is a channel-first view of (N, R, R, 3) memory: channel-last is that memory again."""
        return obs if self.channels_first else obs.transpose(0, 2, 3, 1)


def _space(resolution: int, channels_first: bool) -> gym.spaces.Box:
    shape = (3, resolution, resolution) if channels_first else (resolution, resolution, 3)
    return gym.spaces.Box(0, 255, shape, np.uint8)


class ProcgenHDVectorEnv(VectorEnv):
    """`num_envs` copies of `game` stepped together in C; the options are ProcgenHDEnv's (`seed` goes to `reset`)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS, "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, game: str, num_envs: int, resolution: int = 64, channels_first: bool = False,
                 render_mode: str = None, **options):
        _check_render_mode(render_mode)
        self._batch = _Batch(num_envs, bool(channels_first), dict(options, game=game, resolution=resolution))
        self.num_envs, self.render_mode = num_envs, render_mode
        self.single_observation_space = _space(resolution, bool(channels_first))
        self.single_action_space = gym.spaces.Discrete(procgen_hd.NUM_ACTIONS)
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self._last_frames = None

    def _infos(self, info: dict) -> dict:
        infos = {}
        for name, values in info.items():
            infos[name] = values.astype(bool) if name == "prev_level_complete" else values
            infos[f"_{name}"] = np.ones(self.num_envs, dtype=bool)
        return infos

    def reset(self, *, seed=None, options=None):
        if self.closed:
            raise RuntimeError("reset: this Procgen-HD vector env is closed; make a new one")
        _check_seed(seed)
        _check_reset_options(options)
        super().reset(seed=seed)
        if seed is not None:
            self._batch.reseed(seed)
        obs, info = self._batch.envs.reset()
        self._last_frames = obs
        return self._batch.frames(obs), self._infos(info)

    def step(self, actions):
        if self.closed:
            raise RuntimeError("step: this Procgen-HD vector env is closed; make a new one")
        obs, rewards, dones, info = self._batch.envs.step(actions)
        self._last_frames = obs
        return self._batch.frames(obs), rewards, dones, np.zeros(self.num_envs, dtype=bool), self._infos(info)

    def render(self):
        """The latest frames, (N, R, R, 3) uint8, with render_mode 'rgb_array'; None without a render mode."""
        if self.closed:
            raise RuntimeError("render: this Procgen-HD vector env is closed; make a new one")
        if self.render_mode is None:
            return None
        if self._last_frames is None:
            raise RuntimeError("render: nothing drawn yet; call reset first")
        return self._last_frames.transpose(0, 2, 3, 1).copy()

    def close_extras(self, **kwargs):
        self._batch.envs.close()


class ProcgenHDGymEnv(gym.Env):
    """One game as a `gymnasium.Env` (procgen's gym interface, on Gymnasium's API): after an episode ends, `reset`
    returns the next episode's first frame, which procgen has already drawn in the ending step."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS}

    def __init__(self, game: str, resolution: int = 64, channels_first: bool = False, render_mode: str = None,
                 **options):
        _check_render_mode(render_mode)
        options.setdefault("num_threads", 0)  # one game: step it in the caller
        self._batch = _Batch(1, bool(channels_first), dict(options, game=game, resolution=resolution))
        self.render_mode = render_mode
        self.observation_space = _space(resolution, bool(channels_first))
        self.action_space = gym.spaces.Discrete(procgen_hd.NUM_ACTIONS)
        self._frames = self._info = None
        self._episode_started = True  # a new env shows its first episode's first frame

    def _single(self, obs, info) -> tuple:
        self._frames, self._info = obs, info
        info = {name: (bool(v[0]) if name == "prev_level_complete" else int(v[0])) for name, v in info.items()}
        return self._batch.frames(obs)[0], info

    def reset(self, *, seed=None, options=None):
        _check_seed(seed)
        _check_reset_options(options)
        super().reset(seed=seed)
        if seed is not None:
            self._batch.reseed(seed)
            self._frames, self._episode_started = None, True
        if self._episode_started and self._frames is not None:
            obs, info = self._frames.copy(), self._info  # the episode procgen started in the last step
        else:
            obs, info = self._batch.envs.reset()
        self._episode_started = False
        return self._single(obs, info)

    def step(self, action):
        action = np.asarray(action)
        if action.shape != ():
            raise ValueError(f"action of shape {action.shape}: need one integer in [0, {procgen_hd.NUM_ACTIONS})")
        obs, reward, done, info = self._batch.envs.step(action.reshape(1))
        self._episode_started = bool(done[0])
        obs, info = self._single(obs, info)
        return obs, float(reward[0]), bool(done[0]), False, info

    def render(self):
        """The latest frame, (R, R, 3) uint8, with render_mode 'rgb_array'; None without a render mode."""
        self._batch.envs._check_open("render")
        if self.render_mode is None:
            return None
        if self._frames is None:
            raise RuntimeError("render: nothing drawn yet; call reset first")
        return self._frames[0].transpose(1, 2, 0).copy()

    def close(self):
        self._batch.envs.close()


def register_envs():
    """`procgen_hd/<game>-v0` for each game: `gymnasium.make` gives ProcgenHDGymEnv, `make_vec` with
    vectorization_mode="vector_entry_point" ProcgenHDVectorEnv (as ALE registers its vector env)."""
    for game in procgen_hd.GAMES:
        env_id = f"procgen_hd/{game}-v0"
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"{__name__}:ProcgenHDGymEnv", kwargs={"game": game},
                         vector_entry_point=f"{__name__}:ProcgenHDVectorEnv")
