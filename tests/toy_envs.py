"""Small pixel tasks with exactly the interfaces of the scripts' back ends, for the learning tests.

Each task pays for an action chosen from a picture, with the reward a few steps later, so an agent
learns it only if frames, actions, rewards, episode ends and bootstrapping are wired right:

- `ToyProcgen` (procgen_hd.ProcgenHDEnv's batched interface, same-step reset, level seeds): each
  episode is three rounds; a round shows a coloured cue, the agent picks one of 15 actions, the
  next two frames show only its choice and the round's clock, and the round's last step pays 10
  if the choice matched the cue. The cue is gone when the reward comes: GAE must carry it back.
- `ToyAtari` (EnvPool's Atari, env_type="gymnasium": frame stack, lives, episodic life with its
  auto-reset step, `elapsed_step`, raw rewards in `info`, sticky actions, time limit): each life
  shows a grey cue once, the agent picks LEFT or RIGHT (of Breakout's 4 actions), and the life's
  third step pays 2 (raw; clipped to 1 for training) if it picked the lit side. Only the frame
  stack still holds the cue when the reward comes.
- `ToyReach` (EnvPool's DeepMind Control: pixels with frame stack and frame skip, the state-only
  twin, 1,000 control steps per episode, the stale reward of the auto-reset step): a point moves
  along a line by its action; the target's position is drawn in the frame and nowhere else, and
  every control step pays 1 within 0.1 of the target, nothing from 0.4 on.

`make(task_id, **options)` stands in for `envpool.make`: it honours the options the scripts pass
and refuses any other, as EnvPool does. A test injects it with
`monkeypatch.setattr(script.envpool, "make", toy_envs.make)` (procgen: `script.procgen_hd.ProcgenHDEnv`).
"""

import gymnasium
import numpy as np

# ToyAtari: Breakout's minimal action set is NOOP, FIRE, RIGHT, LEFT; cue 0 lights the left half, cue 1 the right
ATARI_ACTIONS, ATARI_LIVES, ATARI_REWARD = 4, 3, 2.0
ATARI_PAYING_ACTION = (3, 2)  # cue -> the action that pays
ATARI_OPTIONS = {"env_type", "num_envs", "seed", "img_height", "img_width", "gray_scale", "use_inter_area_resize",
                 "stack_num", "frame_skip", "full_action_space", "max_episode_steps", "noop_max", "use_fire_reset",
                 "episodic_life", "reward_clip", "repeat_action_probability"}
# ToyProcgen: procgen's 15 actions; cue c pays action PROCGEN_PAYING_ACTION[c]
PROCGEN_ROUNDS, PROCGEN_REWARD, PROCGEN_PAYING_ACTION = 3, 10.0, (4, 10)
# ToyReach: one control step moves the point by REACH_SPEED x action; 1000 control steps per episode
REACH_SPEED, REACH_CONTROL_STEPS = 0.01, 1000
DMC_OPTIONS = {"env_type", "num_envs", "seed", "base_path", "from_pixels", "render_width", "render_height",
               "render_camera_id", "frame_skip", "max_episode_steps", "frame_stack"}


def make(task_id: str, **options):
    """`envpool.make` for the toy tasks: an Atari id (`Breakout-v5`) gives ToyAtari, a DMC id (`CartpoleSwingup-v1`)
    ToyReach, with EnvPool's options; an option EnvPool would not take here is refused."""
    known = ATARI_OPTIONS if task_id.endswith("-v5") else DMC_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown or options.get("env_type") != "gymnasium":
        raise TypeError(f"toy envpool.make({task_id!r}): options {unknown or ['env_type']} are not EnvPool's here")
    options.pop("env_type")
    return ToyAtari(**options) if task_id.endswith("-v5") else ToyReach(**options)


def _generator(seed: int, *stream) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, *stream])


class EnvPoolCalls:
    """EnvPool's asynchronous pair (send, then recv: the step's results) and close, over a toy's synchronous step."""

    pending = None

    def send(self, actions):
        self.pending = actions

    def recv(self):
        return self.step(self.pending)

    def close(self):
        pass


class ToyAtari(EnvPoolCalls):
    """EnvPool's Atari interface on the cue task above (see the module docstring)."""

    def __init__(self, num_envs, seed, img_height=84, img_width=84, gray_scale=True, use_inter_area_resize=True,
                 stack_num=4, frame_skip=4, full_action_space=False, max_episode_steps=108_000, noop_max=30,
                 use_fire_reset=True, episodic_life=False, reward_clip=False, repeat_action_probability=0.0):
        assert gray_scale and not full_action_space, "the toy Atari task draws grey frames with the minimal action set"
        self.num_envs, self.side, self.stack_num = num_envs, (img_height, img_width), stack_num
        self.max_episode_steps, self.episodic_life, self.reward_clip = max_episode_steps, episodic_life, reward_clip
        self.sticky = repeat_action_probability
        self.action_space = gymnasium.spaces.Discrete(ATARI_ACTIONS)
        self.observation_space = gymnasium.spaces.Box(0, 255, (stack_num, img_height, img_width), np.uint8)
        self.rngs = [_generator(seed, i) for i in range(num_envs)]
        self.stacks = np.zeros((num_envs, stack_num, img_height, img_width), np.uint8)
        self.lives = np.zeros(num_envs, np.int32)
        self.elapsed = np.zeros(num_envs, np.int32)
        self.phase, self.cue, self.choice = (np.zeros(num_envs, np.int64) for _ in range(3))
        self.previous_action = np.zeros(num_envs, np.int64)
        self.game_over = np.zeros(num_envs, bool)  # the next step starts a new game (EnvPool's auto-reset)
        self.life_lost = np.zeros(num_envs, bool)  # with episodic life: the next step starts the next life

    def frame(self, i: int) -> np.ndarray:
        """Phase 0: the cue (left half lit, or the right half in vertical stripes); phases 1-2: the choice as the grey
        level of the bottom band and the phase as the top band's; phase 3: a lost life (black)."""
        height, width = self.side
        frame = np.zeros(self.side, np.uint8)
        if self.phase[i] == 0 and self.cue[i] == 0:
            frame[:, : width // 2] = 200
        elif self.phase[i] == 0:
            frame[:, width // 2 :: 2] = 200
        elif self.phase[i] in (1, 2):
            frame[-height // 4 :] = 30 + 55 * self.choice[i]
            frame[: height // 4] = 60 * self.phase[i]
        return frame

    def start_life(self, i: int):
        self.phase[i], self.cue[i] = 0, self.rngs[i].integers(2)

    def new_game(self, i: int):
        self.lives[i], self.elapsed[i], self.game_over[i], self.life_lost[i] = ATARI_LIVES, 0, False, False
        self.start_life(i)
        self.stacks[i] = self.frame(i)  # EnvPool fills the stack with a new game's first frame

    def push(self, i: int):
        self.stacks[i] = np.concatenate([self.stacks[i, 1:], self.frame(i)[None]])

    def info(self, raw_rewards, game_over) -> dict:
        return {"env_id": np.arange(self.num_envs, dtype=np.int32), "players": {"env_id": np.arange(self.num_envs,
                dtype=np.int32)}, "lives": self.lives.copy(), "reward": raw_rewards.astype(np.float32),
                "terminated": game_over.astype(np.int32), "ram": np.zeros((self.num_envs, 128), np.uint8),
                "elapsed_step": self.elapsed.copy()}

    def reset(self):
        for i in range(self.num_envs):
            self.new_game(i)
        return self.stacks.copy(), self.info(np.zeros(self.num_envs), np.zeros(self.num_envs, bool))

    def step(self, actions):
        actions = np.asarray(actions)
        assert actions.shape == (self.num_envs,) and ((0 <= actions) & (actions < ATARI_ACTIONS)).all(), actions
        raw, terminated, truncated = np.zeros(self.num_envs), np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool)
        game_over = np.zeros(self.num_envs, bool)
        for i, action in enumerate(actions):
            if self.game_over[i]:  # EnvPool's auto-reset step: the action is ignored, a new game starts
                self.new_game(i)
                continue
            if self.life_lost[i]:  # the auto-reset step after a lost life: the game goes on, elapsed_step kept
                self.life_lost[i] = False
                self.start_life(i)
                self.push(i)
                continue
            if self.rngs[i].random() < self.sticky:
                action = self.previous_action[i]
            self.previous_action[i] = action
            self.elapsed[i] += 1
            if self.phase[i] == 0:
                self.choice[i], self.phase[i] = action, 1
            elif self.phase[i] == 1:
                self.phase[i] = 2
            else:  # the life's last step pays for the choice made at its cue
                raw[i] = ATARI_REWARD * (self.choice[i] == ATARI_PAYING_ACTION[self.cue[i]])
                self.lives[i] -= 1
                game_over[i] = self.lives[i] == 0
                terminated[i] = game_over[i] or self.episodic_life
                self.life_lost[i] = self.episodic_life and not game_over[i]
                if self.life_lost[i] or game_over[i]:
                    self.phase[i] = 3
                else:
                    self.start_life(i)
            truncated[i] = self.elapsed[i] >= self.max_episode_steps
            self.game_over[i] = game_over[i] or truncated[i]
            self.push(i)
        rewards = np.sign(raw) if self.reward_clip else raw
        return self.stacks.copy(), rewards.astype(np.float32), terminated, truncated, self.info(raw, game_over)


class ToyReach(EnvPoolCalls):
    """EnvPool's DeepMind Control interface on the reach task above: `from_pixels` gives stacked RGB frames (the target
    in red, the point in green), else the state-only twin's dict of positions. Both simulate the same episodes for the
    same seed and actions; a reward is that of the step's last control step, as EnvPool's frame_skip."""

    def __init__(self, num_envs, seed, from_pixels=False, render_width=84, render_height=84, render_camera_id=-1,
                 frame_skip=1, max_episode_steps=REACH_CONTROL_STEPS, frame_stack=1, base_path=""):
        self.num_envs, self.side = num_envs, (render_height, render_width)
        self.frame_skip, self.frame_stack = frame_skip, frame_stack
        self.from_pixels, self.max_episode_steps = from_pixels, max_episode_steps
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (1,), np.float64)
        self.observation_space = (gymnasium.spaces.Box(0, 255, (3 * frame_stack, render_height, render_width), np.uint8)
                                  if from_pixels else gymnasium.spaces.Dict({
                                      "position": gymnasium.spaces.Box(-np.inf, np.inf, (2,), np.float64)}))
        self.rng = _generator(seed)
        self.point, self.target = np.zeros(num_envs), np.zeros(num_envs)
        self.elapsed = np.zeros(num_envs, np.int32)
        self.rewards = np.zeros(num_envs, np.float32)
        self.stacks = np.zeros((num_envs, 3 * frame_stack, render_height, render_width), np.uint8)
        self.needs_reset = True

    def column(self, position) -> np.ndarray:
        return np.clip(((position + 1) / 2 * self.side[1]).astype(int), 0, self.side[1] - 1)

    def frames(self) -> np.ndarray:
        height, width = self.side
        frames = np.zeros((self.num_envs, 3, height, width), np.uint8)
        rows = np.arange(self.num_envs)
        frames[rows, 0, :, self.column(self.target)] = 255  # the target: a red vertical line
        for shift in (-1, 0, 1):  # the point: a green bar, three columns wide, in the lower half
            frames[rows, 1, height // 2 :, np.clip(self.column(self.point) + shift, 0, width - 1)] = 255
        return frames

    def observation(self, new_episode: bool):
        if not self.from_pixels:
            return {"position": np.stack([self.point, self.target], axis=1)}
        frames = self.frames()
        if new_episode:
            self.stacks[:] = np.tile(frames, (1, self.frame_stack, 1, 1))
        else:
            self.stacks = np.concatenate([self.stacks[:, 3:], frames], axis=1)
        return self.stacks.copy()

    def info(self) -> dict:
        return {"env_id": np.arange(self.num_envs, dtype=np.int32), "players": {"env_id": np.arange(self.num_envs,
                dtype=np.int32)}, "elapsed_step": self.elapsed.copy()}

    def reset(self):
        side = self.rng.choice([-1.0, 1.0], self.num_envs)  # the point starts in the middle, the target left or right
        self.point[:], self.target[:] = 0.0, side * self.rng.uniform(0.5, 0.9, self.num_envs)
        self.elapsed[:], self.needs_reset = 0, False
        return self.observation(new_episode=True), self.info()

    def step(self, actions):
        actions = np.asarray(actions, dtype=np.float64).reshape(self.num_envs, 1)
        assert np.isfinite(actions).all()
        if self.needs_reset:  # EnvPool's auto-reset step: the action is ignored, the last reward is reported again
            obs, info = self.reset()
            return obs, self.rewards.copy(), np.zeros(self.num_envs, bool), np.zeros(self.num_envs, bool), info
        for _ in range(self.frame_skip):
            self.point = np.clip(self.point + REACH_SPEED * np.clip(actions[:, 0], -1, 1), -1, 1)
            distance = np.abs(self.point - self.target)
            self.rewards = np.clip(1 - (distance - 0.1) / 0.3, 0, 1).astype(np.float32)  # 1 within 0.1, 0 from 0.4
        self.elapsed += 1
        truncated = self.elapsed >= self.max_episode_steps
        self.needs_reset = bool(truncated.all())
        return self.observation(False), self.rewards.copy(), np.zeros(self.num_envs, bool), truncated, self.info()


class ToyProcgen:
    """procgen_hd.ProcgenHDEnv's interface on the cue task above: (N, 3, R, R) uint8 frames, float32 rewards, bool
    episode ends, reset in the step that ends an episode, level seeds from [start_level, start_level + num_levels)
    (all seeds when num_levels is 0), `get_state`/`set_state` as bytes."""

    def __init__(self, game, num_envs, resolution=64, num_levels=0, start_level=0, distribution_mode="easy", seed=0,
                 num_threads=None, **visual_options):
        self.game, self.num_envs, self.resolution, self.num_actions = game, num_envs, resolution, 15
        self.num_levels, self.start_level = num_levels, start_level
        self.level_rng = _generator(seed)
        self.level = np.zeros(num_envs, np.int64)
        self.round, self.phase, self.choice, self.earned = (np.zeros(num_envs, np.int64) for _ in range(4))
        self.pending = None
        for i in range(num_envs):
            self.new_level(i)

    def new_level(self, i: int):
        high = self.num_levels or 2**31 - 1
        self.level[i] = self.start_level + self.level_rng.integers(high) if self.num_levels else self.level_rng.integers(high)
        self.round[i], self.phase[i], self.earned[i] = 0, 0, 0

    def cue(self, i: int) -> int:
        return int(_generator(int(self.level[i]), int(self.round[i])).integers(2))

    def frame(self, i: int) -> np.ndarray:
        """Phase 0: the cue (a red left half, or a blue right half in stripes); phases 1-2: the choice as the green level
        of the bottom band and the round's clock in the top band; the cue is not drawn again."""
        side = self.resolution
        frame = np.zeros((3, side, side), np.uint8)
        if self.phase[i] == 0 and self.cue(i) == 0:
            frame[0, :, : side // 2] = 220
        elif self.phase[i] == 0:
            frame[2, :, side // 2 :: 2] = 220
        else:
            frame[1, -side // 4 :] = 10 + 16 * self.choice[i]
            frame[:, : side // 4] = 80 * self.phase[i]
        return frame

    def observation(self):
        obs = np.stack([self.frame(i) for i in range(self.num_envs)])
        return obs, {"level_seed": self.level.astype(np.int32), "prev_level_seed": self.level.astype(np.int32),
                     "prev_level_complete": np.zeros(self.num_envs, np.uint8)}

    def reset(self):
        return self.observation()

    def step(self, actions):
        actions = np.asarray(actions)
        assert actions.shape == (self.num_envs,) and ((0 <= actions) & (actions < 15)).all(), actions
        rewards, done = np.zeros(self.num_envs, np.float32), np.zeros(self.num_envs, bool)
        previous_level, complete = self.level.astype(np.int32), np.zeros(self.num_envs, np.uint8)
        for i, action in enumerate(actions):
            if self.phase[i] == 0:
                self.choice[i], self.phase[i] = action, 1
            elif self.phase[i] == 1:
                self.phase[i] = 2
            else:  # the round's last step pays for the choice made at its cue
                rewards[i] = PROCGEN_REWARD * (self.choice[i] == PROCGEN_PAYING_ACTION[self.cue(i)])
                self.earned[i] += rewards[i] > 0
                self.round[i], self.phase[i] = self.round[i] + 1, 0
                if self.round[i] == PROCGEN_ROUNDS:  # procgen resets in the step that ends the episode
                    done[i], complete[i] = True, self.earned[i] == PROCGEN_ROUNDS
                    self.new_level(i)
        obs, info = self.observation()
        info.update(prev_level_seed=previous_level, prev_level_complete=complete)
        return obs, rewards, done, info

    def step_async(self, actions):
        self.pending = actions

    def step_wait(self):
        return self.step(self.pending)

    def get_state(self) -> list:
        fields = (self.level, self.round, self.phase, self.choice, self.earned)
        return [np.array([field[i] for field in fields], np.int64).tobytes() for i in range(self.num_envs)]

    def set_state(self, states: list):
        for i, state in enumerate(states):
            self.level[i], self.round[i], self.phase[i], self.choice[i], self.earned[i] = np.frombuffer(state, np.int64)
        return self.observation()

    def close(self):
        pass
