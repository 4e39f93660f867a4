import json

import numpy as np
import pytest

from distrl.data.examples import Example, Message
from distrl.envs.calculator import Calculator, calculate
from distrl.envs.episodes import Renderer, run_episodes
from distrl.models.tokenizers import load_tokenizer

SUM = Example((Message("user", "7 + 5 = ? Reply with only the result."),), reference="12")


def test_calculate_does_arithmetic_and_nothing_else():
    assert (calculate("(7 + 5) * 3"), calculate("7 / 2"), calculate("-3 + 1")) == (
        "36",
        "3.5",
        "-2",
    )
    for bad in ['__import__("os").getcwd()', "2 ** 10", "x + 1", "9" * 31 + " + 1"]:
        with pytest.raises(ValueError):
            calculate(bad)


def test_a_tool_call_gets_its_result_a_bad_one_its_error_and_the_answer_ends_the_episode():
    env = Calculator()
    env.reset(SUM, seed=0)
    called = env.step(
        '<tool_call>{"name": "calculate", "arguments": {"expression": "7 + 5"}}</tool_call>'
    )
    assert called.messages == [{"role": "tool", "name": "calculate", "content": "12"}]
    assert (called.reward, called.done, called.info) == (
        0.0,
        False,
        {"tool_calls": 1, "tool_errors": 0},
    )
    failed = env.step(
        '<tool_call>{"name": "calculate", "arguments": {"expression": "1/0"}}</tool_call>'
    )
    assert failed.messages[0]["content"].startswith("error: calculate raised ZeroDivisionError")
    assert not failed.done and failed.info["tool_errors"] == 1
    unknown = env.step('<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert "unknown tool 'search'" in unknown.messages[0]["content"]
    assert env.step("The answer is 12.").reward == 1.0
    assert env.step("13").reward == 0.0


def test_an_episode_with_a_tool_offers_it_in_the_prompt_and_masks_its_result():
    tokenizer = load_tokenizer("tiktoken:gpt2")
    renderer = Renderer(tokenizer, tools=Calculator().tools())
    env = Calculator()
    call = '<tool_call>{"name": "calculate", "arguments": {"expression": "7+5"}}</tool_call>'
    replies = iter([call, "12"])
    eos = tokenizer.eos_token_id

    def generate(seqs):
        ids = [tokenizer.encode(next(replies)) + [eos] for _ in seqs]
        return ids, {"logprobs": [np.full(len(i), -0.5) for i in ids]}

    (episode,) = run_episodes(
        generate=generate,
        environments=[env],
        examples=[SUM],
        seeds=[0],
        renderer=renderer,
        eos_id=eos,
        max_turns=3,
        max_total_tokens=200,
    )
    prompt = tokenizer.decode(episode.prompt)
    assert '"name": "calculate"' in prompt and prompt.endswith("Assistant:")
    assert (episode.reward, episode.tool_calls, episode.tool_errors, episode.done) == (
        1.0,
        1,
        0,
        True,
    )
    tool_turn = [t for s, t in zip(episode.sampled, episode.tokens) if not s]
    assert tokenizer.decode(tool_turn) == "\nTool: 12\nAssistant:"
    assert [t["role"] for t in episode.turns] == ["assistant", "tool", "assistant"]
    json.dumps(episode.turns)  # the transcript is JSON as it is
