"""A user's own reward function, named by import path ``pkg.module:function``."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from distrl.errors import RewardError
from distrl.rewards.base import Component, RewardBatch, check_keys


def import_function(spec: str) -> Callable[..., Sequence[float]]:
    """Import user function ``pkg.mod:func``.

    Raises:
        RewardError: the module cannot be imported, lacks the function, or it is not callable.
    """
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise RewardError(
            f"reward component {spec!r}: a user function is named 'pkg.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(
            f"reward component {spec!r}: cannot import module {module_name!r}: {err}"
        ) from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise RewardError(
            f"reward component {spec!r}: module {module_name!r} has no function {func_name!r}"
        )
    return func


# The keyword arguments a user function receives, TRL-style, besides its options.
USER_ARGUMENTS = ("prompts", "completions", "references", "qualities", "targets")


class UserFunction(Component):
    """A user's function ``f(prompts=, completions=, references=, qualities=, targets=, **options)``
    returning one float per sample. A function without ``**kwargs`` gets only the arguments it
    names, so ``def f(completions): ...`` works too."""

    def __init__(self, spec: str, options: dict[str, Any] | None = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.func = import_function(spec)
        self.accepts = _accepted(self.func)

    @classmethod
    def check_function(cls, spec: str, options: dict[str, Any]) -> None:
        """Import ``spec`` and check that it accepts every option key."""
        accepts = _accepted(import_function(spec))
        if accepts is not None:
            unknown = [k for k in options if k not in accepts]
            if unknown:
                check_keys(
                    {unknown[0]: None}, {k: None for k in accepts if k not in USER_ARGUMENTS}
                )

    def __call__(self, batch: RewardBatch) -> Sequence[float]:
        kwargs = {
            "prompts": batch.prompts,
            "completions": batch.responses,
            "references": batch.references,
            "qualities": batch.qualities,
            "targets": batch.targets,
            **self.options,
        }
        if self.accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepts}
        return self.func(**kwargs)


def _accepted(func: Callable) -> set[str] | None:
    """The keyword names ``func`` accepts, or None if it takes ``**kwargs``."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
