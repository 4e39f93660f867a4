"""Guess the number: a packaged multi-turn task with higher/lower feedback.

The environment thinks of a whole number (the example's ``target``, else one drawn from the
episode's seed) and answers each guess with "Higher." or "Lower." until the model names it
or runs out of turns. A correct guess is worth 1.0, each other new guess within the stated
range 0.1 (``in_range_reward``). A reply without a number is told so and costs its turn. The
packaged prompt set (``data.train: guess``) asks for a number in a range of 4 to ``HIGH``
numbers that starts at 1 to 5; it is written by ``write_prompts`` and can be written again,
byte for byte, with ``python -m distrl.envs.guess``.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from distrl.data.examples import Example
from distrl.envs.base import Environment, Step

HIGH = 8
PROMPT = (
    "I am thinking of a whole number from {low} to {high}. Guess it: reply with only a number, "
    "and I will tell you whether mine is higher or lower."
)
_NUMBER = re.compile(r"-?\d+")
_RANGE = re.compile(r"from (-?\d+) to (-?\d+)")


class GuessNumber(Environment):
    """Answers guesses with higher/lower: 1.0 for finding the number, ``in_range_reward`` for
    each other new guess within the range the prompt states (a small step toward the task a
    model that starts by not answering with a number can climb)."""

    def __init__(self, low: int = 1, high: int = HIGH, in_range_reward: float = 0.1) -> None:
        if not low <= high:
            raise TypeError(f"low ({low}) must not exceed high ({high})")
        self.low, self.high, self.in_range_reward = low, high, in_range_reward
        self.secret, self.guesses = low, set()

    def reset(self, example: Example, seed: int) -> list[dict[str, str]]:
        """The example's prompt; the range is the one it states ("from 3 to 9"), else the
        options'; the secret is its target, else drawn from ``seed``."""
        stated = _RANGE.search(example.prompt_text)
        if stated is not None:
            self.low, self.high = int(stated.group(1)), int(stated.group(2))
        if example.target is not None and example.target.strip().lstrip("-").isdigit():
            self.secret = int(example.target)
        else:
            self.secret = random.Random(seed).randint(self.low, self.high)
        self.guesses = set()
        return example.prompt_messages

    def step(self, message: str) -> Step:
        """Judge the first number of ``message``."""
        found = _NUMBER.search(message)
        if found is None:
            return Step([{"role": "user", "content": "Reply with only a number."}])
        guess = int(found.group())
        if guess == self.secret:
            return Step(reward=1.0, done=True, info={"guess": guess})
        new = self.low <= guess <= self.high and guess not in self.guesses
        self.guesses.add(guess)
        hint = "Higher." if guess < self.secret else "Lower."
        reward = self.in_range_reward if new else 0.0
        return Step([{"role": "user", "content": hint}], reward=reward, info={"guess": guess})


def write_prompts(path: Path, *, count: int = 256, seed: int = 0) -> None:
    """Write the packaged prompt set: ``count`` prompts, each with its secret as ``target``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        low = rng.randint(1, 5)
        high = low + rng.randint(3, HIGH - 1)
        prompt = PROMPT.format(low=low, high=high)
        lines.append(json.dumps({"prompt": prompt, "target": str(rng.randint(low, high))}))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    from distrl.data.examples import packaged_file

    write_prompts(Path(sys.argv[1]) if len(sys.argv) > 1 else packaged_file("guess"))
