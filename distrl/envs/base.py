"""The environment interface of multi-turn episodes, and how a run names its environment.

An environment plays the other side of a conversation, Gymnasium-style: ``reset`` starts an
episode from a data example and returns the first messages (the prompt); ``step`` takes the
model's message and returns a ``Step``: the messages to append (a user reply, tool results),
a reward for that turn, whether the episode is done, and info. One instance runs one episode
at a time; a rollout worker makes a fresh one per episode::

    class Echo(Environment):
        def reset(self, example, seed):
            return example.prompt_messages

        def step(self, message):
            return Step(messages=[], reward=float("hello" in message), done=True)

A run names it ``env.name: pkg.module:Class`` (keyword arguments from ``env.options``), or a
packaged name from ``ENVIRONMENTS``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from distrl.data.examples import Example
from distrl.errors import ConfigError

if TYPE_CHECKING:
    from distrl.envs.tools import Tool

# Packaged environments, by the name a config gives.
ENVIRONMENTS = {
    "guess": "distrl.envs.guess:GuessNumber",
    "calculator": "distrl.envs.calculator:Calculator",
    "code": "distrl.envs.code:CodeTask",
}


@dataclass(frozen=True)
class Step:
    """What the environment answers to one model message.

    Attributes:
        messages: chat messages to append (``{"role": "user" | "tool", "content": ...}``);
            none when the episode is done.
        reward: this turn's reward (summed over the episode into the sample's score).
        done: the episode ended (the task is solved, failed or over).
        info: anything worth keeping in the episode's record (JSON-serialisable).
    """

    messages: list[dict[str, str]] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """One side of a multi-turn episode; a fresh instance per episode."""

    @abstractmethod
    def reset(self, example: Example, seed: int) -> list[dict[str, str]]:
        """Start an episode from ``example``; return its first messages (the prompt)."""

    @abstractmethod
    def step(self, message: str) -> Step:
        """Answer the model's ``message`` (its turn's text, without the end-of-turn token)."""

    def tools(self) -> list[Tool]:
        """The tools offered to the model through the chat template (none by default; see
        ``distrl.envs.tools.ToolEnvironment``)."""
        return []


def load_environment(name: str, options: dict[str, Any] | None = None) -> type[Environment]:
    """The environment class ``name`` (packaged, or ``pkg.module:Class``), checked to build
    with ``options``.

    Raises:
        ConfigError: naming ``env.name`` and what is wrong with it.
    """
    spec = ENVIRONMENTS.get(name, name)
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(
            f"env.name: {name!r} is neither a packaged environment "
            f"({', '.join(ENVIRONMENTS)}) nor 'pkg.module:Class'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"env.name: cannot import {module_name!r} ({err})") from None
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        what = "missing" if cls is None else f"a {type(cls).__name__}"
        raise ConfigError(
            f"env.name: {spec} is {what}, not a subclass of distrl.envs.base.Environment"
        )
    try:
        cls(**(options or {}))
    except TypeError as err:
        raise ConfigError(f"env.options: {spec} does not take them ({err})") from None
    except ConfigError as err:  # a tool it names cannot be loaded
        raise ConfigError(f"env.options: {err}") from None
    return cls
