"""What every reward component shares: the batch it scores, its base class, sample errors."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from distrl.errors import ConfigError, RewardError


@dataclass
class RewardBatch:
    """The samples to score, as parallel lists of length B.

    Attributes:
        responses: the generated texts being scored.
        prompts: the prompt each response answers ("" when unknown).
        references: a reference reply per sample, or None.
        qualities: a human quality label per sample, or None.
        targets: a target context per sample (what relevance compares to), or None.
    """

    responses: list[str]
    prompts: list[str] | None = None
    references: list[str | None] | None = None
    qualities: list[float | None] | None = None
    targets: list[str | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.responses)
        self.responses = list(self.responses)
        self.prompts = [""] * n if self.prompts is None else list(self.prompts)
        for name in ("references", "qualities", "targets"):
            value = getattr(self, name)
            setattr(self, name, [None] * n if value is None else list(value))
        for f in fields(self):
            if len(getattr(self, f.name)) != n:
                raise RewardError(
                    f"reward batch: {f.name} has {len(getattr(self, f.name))} entries "
                    f"for {n} responses"
                )

    def __len__(self) -> int:
        return len(self.responses)

    def select(self, indices: Sequence[int]) -> RewardBatch:
        """The samples at ``indices``, in that order."""
        return RewardBatch(
            **{f.name: [getattr(self, f.name)[i] for i in indices] for f in fields(self)}
        )

    @classmethod
    def from_examples(cls, examples: Sequence[Any], responses: Sequence[str]) -> RewardBatch:
        """A batch of ``responses`` to ``Example`` prompts, with their labels."""
        return cls(
            responses=list(responses),
            prompts=[e.prompt_text for e in examples],
            references=[e.reference for e in examples],
            qualities=[e.quality for e in examples],
            targets=[e.target for e in examples],
        )


class SampleError(Exception):
    """Raised by a component when one sample cannot be scored (e.g. it has no label)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class Component:
    """Base class. Subclasses set ``OPTIONS`` and implement ``__call__``."""

    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: dict[str, Any] | None = None, *, seed: int = 0) -> None:
        self.options = {**self.OPTIONS, **(options or {})}
        self.seed = seed

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        """Raise ConfigError (message without the component's path) for bad options."""
        check_keys(options, cls.OPTIONS)

    def __call__(self, batch: RewardBatch) -> Sequence[float]:
        raise NotImplementedError


def check_keys(options: dict[str, Any], valid: dict[str, Any]) -> None:
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            allowed = ", ".join(valid) or "none"
            raise ConfigError(f"unknown option '{key}'{hint}; valid options: {allowed}")
