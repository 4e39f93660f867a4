"""Small sums with an exact answer: a packaged prompt set and the reward that checks it.

Each prompt asks for one sum or difference of whole numbers from 0 to ``MAX_OPERAND``
(differences are never negative)::

    {"prompt": "7 + 5 = ? Reply with only the result.", "response": "12"}

``correct`` scores a completion 1.0 when the number it answers with is the answer and 0.0
otherwise. That number is the completion's first integer that is not part of a calculation
(``7 + 5``): "12", "The answer is 12.", "7 + 5 = 12" and "7 + 5 is 12" all answer 12, "7 + 5 =
11, so 12" answers 11, and a completion with no number, or only the question repeated ("7 + 5 =
?"), answers nothing. There is no partial credit. Use it as a reward component::

    reward:
      components:
        - name: distrl.data.tasks.arithmetic:correct

The packaged file (``DATA_FILE``) is written by ``write_prompts`` and can be written again,
byte for byte, with ``python -m distrl.data.tasks.arithmetic``.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from distrl.rewards.base import SampleError

DATA_FILE = Path(__file__).with_name("arithmetic.jsonl")
MAX_OPERAND = 12
SEED = 0
TEMPLATE = "{a} {op} {b} = ? Reply with only the result."

_MINUS = "-\u2212"  # ASCII hyphen-minus and the typographic minus sign
# A minus sign is part of a number unless it follows a word character, as in "3-4" or "x-5",
# where it joins rather than negates.
_INTEGER = re.compile(rf"(?:(?<!\w)[{_MINUS}])?\d+")
# A calculation, "7 + 5" or "3 x 4 - 1": it leads to the answer (after "=", "is") but is not it.
_CALCULATION = re.compile(rf"[{_MINUS}]?\d+(?:\s*[-+*/×÷x\u2212]\s*[{_MINUS}]?\d+)+")
_PROBLEM = re.compile(r"(\d+)\s*([+-])\s*(\d+)\s*=")


def first_integer(text: str) -> int | None:
    """The first whole number written in ``text`` (a leading minus sign included), or None."""
    match = _INTEGER.search(text)
    return int(match.group().replace("\u2212", "-")) if match else None


def answer_given(completion: str) -> int | None:
    """The number a completion answers with: its first integer outside a calculation, so the
    answer of ``"7 + 5 = 12"`` is 12; None when it gives no such number."""
    return first_integer(_CALCULATION.sub(" ", completion))


def answer_of(prompt: str) -> int | None:
    """The answer to a prompt written with ``TEMPLATE`` (``"9 - 7 = ? ..."`` -> 2), or None."""
    match = _PROBLEM.search(prompt)
    if match is None:
        return None
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a + b if op == "+" else a - b


def correct(
    completions: Sequence[str],
    references: Sequence[str | None] | None = None,
    prompts: Sequence[str] | None = None,
) -> list[float]:
    """1.0 for each completion that answers with its sample's answer (``answer_given``), else 0.0.

    The answer is the sample's reference reply when it is an integer, else it is worked out
    from the prompt (``answer_of``), so prompts written without a reference score too.

    Args:
        completions: the generated texts, B of them.
        references: the reference reply of each sample (``"12"``), or None.
        prompts: the prompt of each sample.

    Raises:
        SampleError: a sample has neither an integer reference nor a prompt ``answer_of`` reads.
    """
    scores = []
    for i, completion in enumerate(completions):
        reference = references[i] if references is not None else None
        answer = first_integer(reference) if reference is not None else None
        if answer is None:
            answer = answer_of(prompts[i]) if prompts is not None else None
        if answer is None:
            raise SampleError(
                i, f"sample {i}: no answer (no integer reference, no 'a + b = ?' in the prompt)"
            )
        scores.append(float(answer_given(completion) == answer))
    return scores


def problems(*, max_operand: int = MAX_OPERAND, seed: int = SEED) -> list[dict[str, str]]:
    """Every ``a + b`` and every ``a - b`` with ``b <= a``, for ``a, b`` in ``[0, max_operand]``,
    shuffled by ``seed``; each record is ``{"prompt": ..., "response": answer}``."""
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    sums = [TEMPLATE.format(a=a, op="+", b=b) for a, b in pairs]
    differences = [TEMPLATE.format(a=a, op="-", b=b) for a, b in pairs if b <= a]
    records = [{"prompt": p, "response": str(answer_of(p))} for p in sums + differences]
    random.Random(seed).shuffle(records)
    return records


def write_prompts(
    path: str | Path = DATA_FILE, *, max_operand: int = MAX_OPERAND, seed: int = SEED
) -> Path:
    """Write ``problems(...)`` as JSONL to ``path``; the defaults give the packaged file."""
    path = Path(path)
    lines = [json.dumps(r) + "\n" for r in problems(max_operand=max_operand, seed=seed)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_prompts(*sys.argv[1:2]))
