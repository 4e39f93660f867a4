"""Small Python functions checked by hidden unit tests in the sandbox: a packaged code task.

Each prompt asks for one function (``data.train: code``); its tests stay in the task file,
never in the prompt. The model may run code with the ``python`` tool before it answers (its
output comes back as a tool message); its answer, a message without tool calls, is the
solution: the first fenced code block in it, else the whole message. The reward is the share of
hidden tests the solution passes, run in a fresh sandboxed subprocess
(``distrl.envs.sandbox.run_tests``). The same check is a reward component for single-turn
runs: ``distrl.envs.code:passes_tests``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

from distrl.data.examples import Example, packaged_file
from distrl.envs.base import Step
from distrl.envs.sandbox import Limits, run_python, run_tests
from distrl.envs.tools import ToolEnvironment
from distrl.rewards.base import SampleError

LIMITS = Limits(timeout_s=5.0, cpu_s=5, memory_mb=512)
_FENCE = re.compile(r"```(?:python|py)?[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it prints.

    Args:
        code: the program; print what you want to see.
    """
    result = run_python(code, limits=LIMITS)
    out = result.stdout + result.stderr
    if result.timed_out:
        out += f"\n[timed out after {LIMITS.timeout_s:g} s]"
    elif result.returncode:
        out += f"\n[exit status {result.returncode}]"
    return out or "[no output]"


def solution_of(message: str) -> str:
    """The code a message answers with: its first fenced block, else the whole message."""
    fenced = _FENCE.search(message)
    return fenced.group(1) if fenced else message


@functools.cache
def hidden_tests(path: str) -> dict[str, str]:
    """Prompt text -> its tests (one per line) of a task file (``{"prompt", "tests"}`` lines)."""
    tasks = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        tasks[record["prompt"]] = "\n".join(record["tests"])
    return tasks


class CodeTask(ToolEnvironment):
    """Write a function; the ``python`` tool runs code; hidden tests score the answer."""

    tool_specs = ("distrl.envs.code:python",)

    def __init__(
        self,
        tasks: str | None = None,
        tools: Sequence[str] | None = None,
        timeout_s: float = LIMITS.timeout_s,
    ) -> None:
        super().__init__(tools)
        self.tasks = hidden_tests(tasks or str(packaged_file("code")))
        self.limits = dataclasses.replace(LIMITS, timeout_s=timeout_s)

    def reset(self, example: Example, seed: int) -> list[dict[str, str]]:
        """The example's prompt; its tests are the task file's for that prompt."""
        tests = self.tasks.get(example.prompt_text)
        if tests is None:
            raise KeyError(f"{example.source}: no hidden tests for this prompt in the task file")
        self.tests = tests
        return example.prompt_messages

    def answer(self, message: str) -> Step:
        """The share of hidden tests the answer's code passes; the episode ends."""
        passed, total, result = run_tests(solution_of(message), self.tests, limits=self.limits)
        info = {"passed": passed, "total": total, "timed_out": result.timed_out}
        return Step(reward=passed / total, done=True, info=info)


def passes_tests(completions: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
    """Reward: the share of its prompt's hidden tests (packaged code task) each completion's
    code passes, in the sandbox.

    Raises:
        SampleError: a prompt that is not one of the packaged code tasks.
    """
    tasks = hidden_tests(str(packaged_file("code")))
    scores = []
    for i, completion in enumerate(completions):
        tests = tasks.get(prompts[i]) if prompts is not None else None
        if tests is None:
            raise SampleError(i, f"sample {i}: its prompt is not a packaged code task")
        passed, total, _ = run_tests(solution_of(completion), tests, limits=LIMITS)
        scores.append(passed / total)
    return scores
