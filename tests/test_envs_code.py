import time

import pytest

from distrl.data.examples import load_examples
from distrl.envs.code import CodeTask, passes_tests, python, solution_of
from distrl.rewards.base import SampleError

TASKS = {e.prompt_text: e for e in load_examples("code")}
ADD = next(e for p, e in TASKS.items() if "`add(a, b)`" in p)


def test_every_packaged_task_has_hidden_tests_and_a_reference_solution_passes_them():
    env = CodeTask()
    for example in TASKS.values():
        env.reset(example, seed=0)
        assert env.tests.count("assert") >= 3
        assert "assert" not in example.prompt_text  # hidden: never in the prompt
    env.reset(ADD, seed=0)
    assert env.answer("```python\ndef add(a, b):\n    return a + b\n```").reward == 1.0
    assert env.answer("def add(a, b):\n    return a - b").reward == pytest.approx(1 / 3)


def test_the_python_tool_runs_code_and_says_how_it_ended():
    assert python("print(6 * 7)") == "42\n"
    assert "ZeroDivisionError" in python("1 / 0") and "[exit status 1]" in python("1 / 0")
    assert python("pass") == "[no output]"


@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    pass",
        "x = bytearray(10**10)",
        "x = []\nwhile True:\n    x.append(' ' * 10**6)",
    ],
    ids=["busy-loop", "one-allocation", "growing-list"],
)
def test_a_runaway_answer_scores_zero_within_its_timeout_and_the_episode_ends(code):
    env = CodeTask(timeout_s=1.0)
    env.reset(ADD, seed=0)
    start = time.monotonic()
    step = env.answer(f"```python\n{code}\n```")
    assert time.monotonic() - start < 1.0 + 1.0
    assert (step.reward, step.done, step.info["passed"]) == (0.0, True, 0)


def test_a_solution_is_the_first_fenced_block_or_the_whole_message():
    assert solution_of("Here:\n```python\nx = 1\n```\nand ```y = 2```") == "x = 1\n"
    assert solution_of("x = 1") == "x = 1"
    assert solution_of("```py\nx = 1") == "x = 1"  # cut at the length limit


def test_the_reward_component_scores_single_turn_completions():
    prompt = ADD.prompt_text
    assert passes_tests(["def add(a, b): return a + b", "nothing"], [prompt, prompt]) == [1.0, 0.0]
    with pytest.raises(SampleError, match="sample 0: its prompt is not a packaged code task"):
        passes_tests(["x"], ["Write a poem."])
