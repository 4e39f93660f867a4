"""Arithmetic with a calculator: a packaged multi-turn task with a tool.

The model answers the packaged sums (``data.train: arithmetic``, "7 + 5 = ? Reply with only the
result.") and may first call ``calculate`` with an expression; the result comes back as a tool
message and the model answers in a later turn. The answer is judged as the arithmetic reward
does (``distrl.data.tasks.arithmetic.correct``): 1.0 when the number it answers with is right,
else 0.0, and the episode ends.
"""

from __future__ import annotations

import ast
import operator

from distrl.data.examples import Example
from distrl.data.tasks.arithmetic import answer_given, answer_of, first_integer
from distrl.envs.base import Step
from distrl.envs.tools import ToolEnvironment

_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
MAX_DIGITS = 30  # operands and results beyond this are refused, not computed


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers, + - * / // % and parentheses.

    Args:
        expression: the expression, for example "(7 + 5) * 3".
    """

    def value(node: ast.AST) -> float | int:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            result = node.value
        elif isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            result = _OPERATORS[type(node.op)](value(node.left), value(node.right))
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            result = _UNARY[type(node.op)](value(node.operand))
        else:
            raise ValueError(f"not arithmetic: {ast.unparse(node)!r}")
        if abs(result) >= 10**MAX_DIGITS:
            raise ValueError(f"a number of more than {MAX_DIGITS} digits")
        return result

    result = value(ast.parse(expression.strip(), mode="eval").body)
    return str(int(result) if float(result).is_integer() else round(result, 10))


class Calculator(ToolEnvironment):
    """Sums and differences, with ``calculate`` to call; 1.0 for the right answer."""

    tool_specs = ("distrl.envs.calculator:calculate",)

    def reset(self, example: Example, seed: int) -> list[dict[str, str]]:
        """The example's prompt; its answer is the reference, else worked out from the prompt."""
        reference = first_integer(example.reference) if example.reference else None
        self.expected = reference if reference is not None else answer_of(example.prompt_text)
        return example.prompt_messages

    def answer(self, message: str) -> Step:
        """1.0 when ``message`` answers with the expected number; the episode ends."""
        given = answer_given(message)
        return Step(reward=float(given == self.expected), done=True, info={"answer": given})
