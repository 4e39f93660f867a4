import json

import numpy as np
import pytest

from distrl.config import load_config
from distrl.data.examples import Example, Message, load_examples, packaged_file, split
from distrl.envs.guess import GuessNumber, write_prompts

EXAMPLE = Example((Message("user", "Guess my number from 1 to 8."),), target="3")


def test_a_guess_gets_higher_or_lower_and_the_number_ends_it_with_reward_one():
    env = GuessNumber()
    assert env.reset(EXAMPLE, seed=0) == EXAMPLE.prompt_messages
    assert (env.low, env.high, env.secret) == (1, 8, 3)  # as the prompt and target say
    higher = env.step("2")
    assert higher.messages == [{"role": "user", "content": "Higher."}] and higher.reward == 0.1
    assert env.step("I say 5").messages == [{"role": "user", "content": "Lower."}]
    assert env.step("5").reward == 0.0  # the same guess again earns nothing
    assert env.step("12").reward == 0.0  # nor one outside the range
    assert env.step("no idea").messages == [
        {"role": "user", "content": "Reply with only a number."}
    ]
    found = env.step("3")
    assert (found.reward, found.done, found.messages) == (1.0, True, [])
    env.reset(EXAMPLE, seed=0)
    assert env.guesses == set()  # a new episode starts afresh


def test_the_packaged_prompts_are_written_again_byte_for_byte_and_hold_out_whole_ranges(tmp_path):
    write_prompts(tmp_path / "guess.jsonl")
    assert (tmp_path / "guess.jsonl").read_bytes() == packaged_file("guess").read_bytes()
    records = [json.loads(line) for line in packaged_file("guess").read_text().splitlines()]
    env = GuessNumber()
    for example in load_examples("guess"):
        env.reset(example, seed=0)
        assert env.low <= env.secret <= env.high and 4 <= env.high - env.low + 1 <= 8
    assert len(records) == 256
    config = load_config("guess")
    train, val = split(load_examples("guess"), val_fraction=config.data.val_fraction, seed=0)
    assert {e.prompt_text for e in train}.isdisjoint(e.prompt_text for e in val) and val


@pytest.mark.slow  # the packaged SmolLM2 trained on Ray for 6 iterations (about 4 minutes)
def test_the_packaged_model_learns_to_guess(ray_session, tmp_path):
    from distrl.loop.driver import train
    from distrl.outputs.metrics import read_metrics

    iterations = 6
    config = load_config(
        "guess",
        {
            "iterations": iterations,
            "output.dir": str(tmp_path / "run"),
            "output.progress": False,
            "output.plots": False,
            "output.eval_every": iterations,
            "output.checkpoint_every": iterations,
        },
    )
    records = read_metrics(train(config) / "metrics.jsonl")
    rewards = [r["reward/total"] for r in records]
    # Untrained, the model mostly talks around the question (about 0.03 over the first two
    # iterations in the run the docs show); it learns to answer with numbers in the range.
    assert np.mean(rewards[-3:]) >= np.mean(rewards[:2]) + 0.2, rewards
    assert records[-1]["episode/turns"] > 1.5, records[-1]
