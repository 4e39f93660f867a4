"""Text generation as a gymnasium environment, for RLlib's own algorithms or any gym agent.

An optional example, apart from distrl's own training (nothing else in distrl imports it): it
needs gymnasium, and RLlib to run RLlib's algorithms on it, which the optional ``bench`` extra
installs (``pip install -e ".[bench]"``); without them importing this module stops with a
message saying so.

The MDP distrl's DQN learns on: the state is the prompt plus the tokens generated so far, an
action appends one token (``Discrete(vocab)``), and the episode ends at EOS or after
``rollout.max_new_tokens`` tokens with the run's composite reward of the whole response (0 on
every earlier step). It is built from a distrl run config, so prompts, tokenizer and reward are
exactly those of ``python -m distrl.run`` with the same config::

    from ray.rllib.algorithms.dqn import DQNConfig
    DQNConfig().environment(TextGenerationEnv, env_config={"config": "tiny"})

Observations are the last ``max_prompt_tokens + max_new_tokens`` token ids, left-padded with
the pad id, as a float32 ``Box``: RLlib's default encoders take float inputs, and float32 holds
every id below 2**24 exactly (embed them with ``obs.long()`` in a custom model).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distrl.config import load_config
from distrl.data.prompts import prepare
from distrl.models.policy import build_tokenizer
from distrl.rewards import RewardBatch, RewardScorer

try:
    import gymnasium as gym
except ModuleNotFoundError as err:
    if err.name is None or err.name.split(".")[0] != "gymnasium":
        raise
    raise ModuleNotFoundError(
        "distrl.envs.gym (the Gymnasium example) needs gymnasium, which the optional bench extra "
        'installs with RLlib: pip install -e ".[bench]"',
        name="gymnasium",
    ) from None


class TextGenerationEnv(gym.Env):
    """One prompt per episode, one token per step, the composite reward at the end.

    Args:
        env_config: ``{"config": name or YAML path (default "tiny"), "overrides": {dotted
            field: value}}``, the same as ``python -m distrl.run --config ... --field value``.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, env_config: dict[str, Any] | None = None) -> None:
        env_config = dict(env_config or {})
        run = load_config(env_config.get("config", "tiny"), env_config.get("overrides"))
        self.prompts, _ = prepare(run)
        self.tokenizer = build_tokenizer(run.model, run.tokenizer)
        self.scorer = RewardScorer(run.reward, seed=run.seed)
        self.max_new_tokens = run.rollout.max_new_tokens
        self.width = run.data.max_prompt_tokens + run.rollout.max_new_tokens
        vocab = self.tokenizer.vocab_size
        self.action_space = gym.spaces.Discrete(vocab)
        self.observation_space = gym.spaces.Box(0, vocab - 1, shape=(self.width,), dtype=np.float32)
        self.render_mode = "ansi"
        self.example = 0
        self.prompt: list[int] = []
        self.response: list[int] = []

    def _obs(self) -> np.ndarray:
        state = (self.prompt + self.response)[-self.width :]
        obs = np.full(self.width, self.tokenizer.pad_token_id, dtype=np.float32)
        obs[self.width - len(state) :] = state
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode on a random training prompt (``options={"example": i}`` picks one)."""
        super().reset(seed=seed)
        if options and "example" in options:
            self.example = int(options["example"])
        else:
            self.example = int(self.np_random.integers(len(self.prompts.ids)))
        self.prompt, self.response = list(self.prompts.ids[self.example]), []
        return self._obs(), {"example": self.example}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Append token ``action``; the reward arrives when the response ends."""
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action!r} is not a token id in [0, {self.action_space.n})")
        self.response.append(int(action))
        done = int(action) == self.tokenizer.eos_token_id or (
            len(self.response) >= self.max_new_tokens
        )
        info: dict[str, Any] = {"example": self.example}
        reward = 0.0
        if done:
            example = self.prompts.examples[self.example]
            result = self.scorer.score(RewardBatch.from_examples([example], [self.render()]))
            reward = float(result.total[0])
            info["reward_components"] = {k: float(v[0]) for k, v in result.components.items()}
        return self._obs(), reward, done, False, info

    def render(self) -> str:
        """The response so far, decoded."""
        return self.tokenizer.decode(self.response)
