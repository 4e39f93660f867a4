"""Prompts for a run: read, checked against the model, encoded, and served in shuffled epochs.

Everything here runs in the driver before any actor starts, so a bad data file, reward function,
model name or a prompt too long for the model's context stops the run with one line naming it.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from distrl.config import ModelConfig, RunConfig
from distrl.data.examples import Example, load_examples, split
from distrl.envs.base import load_environment
from distrl.errors import ModelError
from distrl.models.loading import TINY_MODELS, model_source_dir
from distrl.models.policy import build_tokenizer, encode_prompts
from distrl.pg.rollout import Trajectories
from distrl.rewards import RewardBatch, check_reward_config

# Reference responses feed the optional cross-entropy term and eval perplexity; a bound keeps
# one very long reply from setting the padded width (and memory) of a whole batch.
MAX_REFERENCE_TOKENS = 256


@dataclass
class Prompts:
    """Encoded prompts with the examples they came from, served in shuffled epochs."""

    examples: list[Example]
    ids: list[list[int]]
    references: list[list[int]]
    seed: int
    epoch: int = 0
    cursor: int = 0
    order: list[int] = field(default_factory=list)

    def next(self, n: int) -> list[int]:
        """Indices of the next ``n`` prompts (reshuffled each epoch, reproducibly)."""
        out = []
        while len(out) < n:
            if self.cursor == 0 or not self.order:
                self.order = list(range(len(self.ids)))
                random.Random(self.seed + self.epoch).shuffle(self.order)
            out.append(self.order[self.cursor])
            self.cursor += 1
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        """Position in the prompt stream, for checkpoints."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict[str, int]) -> None:
        """Continue from ``state()``."""
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.order = []
        if self.cursor:
            self.order = list(range(len(self.ids)))
            random.Random(self.seed + self.epoch).shuffle(self.order)


def prepare(config: RunConfig) -> tuple[Prompts, Prompts]:
    """Check rewards, read and encode data, before any actor starts: (train, validation)."""
    check_reward_config(config.reward)
    if config.env.name:
        load_environment(config.env.name, config.env.options)
    context = model_context(config.model)
    if config.model.reference:
        model_context(config.model, config.model.reference)
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    examples = load_examples(config.data.train, limit=config.data.max_examples)
    if config.data.validation:
        train, val = examples, load_examples(config.data.validation)
    else:
        train, val = split(examples, val_fraction=config.data.val_fraction, seed=config.seed)
    if not val:
        # Said out loud: evaluating on training prompts measures fit, not generalisation.
        warnings.warn(
            "no held-out prompts (data.val_fraction is 0 and data.validation is empty): "
            "eval/* metrics use the first training prompts",
            stacklevel=2,
        )
        val = train[: config.output.eval_examples]

    def encode(part: list[Example]) -> Prompts:
        ids = encode_prompts(part, tokenizer, config.tokenizer, config.data)
        refs = [
            tokenizer.encode(e.reference)[:MAX_REFERENCE_TOKENS] if e.reference else []
            for e in part
        ]
        return Prompts(part, ids, refs, seed=config.seed)

    train_prompts, val_prompts = encode(train), encode(val)
    for part in (train_prompts, val_prompts):
        check_context(config, part, context)
    return train_prompts, val_prompts


def reward_batch(prompts: Prompts, batch: Trajectories) -> RewardBatch:
    """What the reward pool scores for a batch: prompt, response and the example's labels."""
    examples = [prompts.examples[i] for i in batch.example_ids]
    return RewardBatch.from_examples(examples, [str(t) for t in batch.texts])


def model_context(model: ModelConfig, name: str | None = None) -> int | None:
    """Positions the model can attend over (None for a hub id, read only when loaded).

    Raises:
        ModelError: ``name`` (default ``model.name``) is a file or a missing path.
    """
    name = name or model.name
    if name in TINY_MODELS:
        sizes = TINY_MODELS[name][1]
        return sizes.get("max_position_embeddings") or sizes.get("n_positions")
    if Path(name).expanduser().is_file():
        raise ModelError(f"model {name} is a file; a model is a Hugging Face folder or a name")
    folder = model_source_dir(name)
    if folder is None:
        return None
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config.get("max_position_embeddings") or config.get("n_positions")


def check_context(config: RunConfig, prompts: Prompts, context: int | None) -> None:
    """Refuse a prompt that, with ``rollout.max_new_tokens``, would not fit the model."""
    if context is None or not prompts.ids:
        return
    longest = max(range(len(prompts.ids)), key=lambda i: len(prompts.ids[i]))
    after, what = config.rollout.max_new_tokens, "rollout.max_new_tokens"
    if config.env.name:  # an episode: every turn after the prompt
        after, what = max(after, config.env.max_total_tokens), "env.max_total_tokens"
    need = len(prompts.ids[longest]) + after
    if need > context:
        raise ModelError(
            f"{prompts.examples[longest].source}: the prompt is {len(prompts.ids[longest])} "
            f"tokens; with {what} {after} that is {need}, beyond the {context} positions of "
            f"model {config.model.name!r}; lower data.max_prompt_tokens (now "
            f"{config.data.max_prompt_tokens}) or {what}"
        )
