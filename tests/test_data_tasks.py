"""The arithmetic task: its reward's worked examples, its packaged prompts and config, and (slow)
that the packaged SmolLM2 learns it through ``distrl.loop.driver.train``."""

import json
from importlib import resources

import numpy as np
import pytest

from distrl.config import load_config
from distrl.data.examples import load_examples, split
from distrl.data.prompts import prepare, reward_batch
from distrl.data.tasks import arithmetic
from distrl.data.tasks.arithmetic import answer_given, answer_of, correct, first_integer
from distrl.loop.driver import train
from distrl.outputs.metrics import read_metrics
from distrl.pg.rollout import RolloutWorker
from distrl.rewards import RewardBatch, RewardScorer, SampleError, check_reward_config

CONFIG = str(resources.files("distrl.config.presets").joinpath("arithmetic.yaml"))
PROMPT = "17 + 25 = ? Reply with only the result."
# The learning test, measured with seeds 0, 1 and 2: over iterations 4-10 the mean training
# reward was 0.59, 0.54 and 0.73 (0.21 with seed 0 and a learning rate of 1e-9, which leaves the
# policy untrained); greedy accuracy on the first 32 held-out problems went from 0.50, 0.44 and
# 0.38 to 0.75, 0.59 and 0.78.
ITERATIONS = 10
TRAINED_REWARD = 0.45
EVAL_RISE = 3 / 32  # three more held-out problems right


@pytest.mark.parametrize(
    "completion, score",
    [
        ("42", 1.0),  # right answer
        ("42.", 1.0),
        ("43", 0.0),  # wrong answer
        ("The answer is 42.", 1.0),  # answer after words
        ("The answer is 42, not 43.", 1.0),  # the first number counts
        ("The answer is 43, not 42.", 0.0),
        ("17 + 25 = 42", 1.0),  # a worked equation answers with its result
        ("17+25=42", 1.0),
        ("17 + 25 = 43", 0.0),
        ("17 + 25 = 40 + 2 = 42", 1.0),
        ("17 + 25 = 43, so 42", 0.0),
        ("17 + 25 is 42", 1.0),
        ("17 + 25 is 17", 0.0),  # an operand of the calculation is not its answer
        ("(17 + 25) equals 42.", 1.0),
        ("17 + 25 = ?", 0.0),  # the question repeated: no answer
        ("forty-two", 0.0),  # no number
        ("", 0.0),
        ("4 2", 0.0),
    ],
)
def test_correct_scores_the_number_answered(completion, score):
    assert correct([completion], ["42"], [PROMPT]) == [score]


@pytest.mark.parametrize(
    "completion, score",
    [
        ("-8", 1.0),
        ("The result is -8.", 1.0),
        ("\u22128", 1.0),  # a typographic minus sign
        ("4 - 12 = -8", 1.0),
        ("8", 0.0),  # the sign matters
        ("x-8", 0.0),  # a hyphen after a word joins, it does not negate
    ],
)
def test_correct_reads_negative_numbers(completion, score):
    assert correct([completion], ["-8"], ["4 - 12 = ? Reply with only the result."]) == [score]


def test_the_reference_is_the_answer_when_it_is_an_integer():
    assert correct(["13", "12"], ["13", "13"], ["What is six plus seven?"] * 2) == [1.0, 0.0]
    # The data's label wins over the prompt's sum.
    assert correct(["5", "3"], ["5", "5"], ["1 + 2 = ?"] * 2) == [1.0, 0.0]


def test_without_a_reference_the_answer_comes_from_the_prompt():
    prompts = ["9 - 7 = ? Reply with only the result.", "12 + 0 = ?"]
    assert correct(["2", "12"], [None, None], prompts) == [1.0, 1.0]
    assert correct(["-2", "12"], prompts=prompts) == [0.0, 1.0]
    # A reference that is not an integer gives way to the prompt as well.
    assert correct(["2"], ["two"], prompts[:1]) == [1.0]


def test_a_sample_without_any_answer_is_a_sample_error():
    with pytest.raises(SampleError, match="sample 1: no answer") as err:
        correct(["3", "3"], [None, None], ["1 + 2 = ?", "What is the capital of France?"])
    assert err.value.index == 1


def test_first_integer_answer_given_and_answer_of():
    assert first_integer("about 3-4 apples") == 3
    assert first_integer("7 + 5 = 12") == 7
    assert first_integer("-0") == 0
    assert first_integer("no digits") is None
    assert answer_given("7 + 5 = 12") == 12
    assert answer_given("7 - 9 = -2") == -2
    assert answer_given("7 + 5 = ?") is None
    assert answer_given("5 - 0 is 4") == 4
    assert answer_given("3 x 4 - 1 = 11") == 11
    assert answer_of("12 - 5 = ? Reply with only the result.") == 7
    assert answer_of("12 + 12 = ?") == 24
    assert answer_of("What is 5 times 3?") is None


def test_the_reward_runs_as_a_named_component():
    config = load_config(CONFIG).reward
    check_reward_config(config)
    batch = RewardBatch(
        ["12", "7 + 5 = 12", "The answer is 11"],
        prompts=["7 + 5 = ? Reply with only the result."] * 3,
        references=["12"] * 3,
    )
    result = RewardScorer(config).score(batch)
    np.testing.assert_array_equal(result.total, [1.0, 1.0, 0.0])
    assert result.metrics()["reward/distrl.data.tasks.arithmetic:correct"] == pytest.approx(2 / 3)


def test_the_packaged_prompts_are_what_write_prompts_writes(tmp_path):
    written = arithmetic.write_prompts(tmp_path / "arithmetic.jsonl")
    assert written.read_bytes() == arithmetic.DATA_FILE.read_bytes()
    other = arithmetic.write_prompts(tmp_path / "other.jsonl", seed=1)
    assert other.read_bytes() != written.read_bytes()  # the seed sets the order


def test_the_packaged_prompts_are_every_small_sum_and_difference_once():
    examples = load_examples(str(arithmetic.DATA_FILE))
    n = arithmetic.MAX_OPERAND + 1
    assert len(examples) == n * n + n * (n + 1) // 2  # sums, then differences that are >= 0
    assert len({e.prompt_text for e in examples}) == len(examples)
    answers = [answer_of(e.prompt_text) for e in examples]
    assert [int(e.reference) for e in examples] == answers
    assert min(answers) == 0 and max(answers) == 2 * arithmetic.MAX_OPERAND
    records = [json.loads(line) for line in arithmetic.DATA_FILE.read_text().splitlines()]
    assert all(set(r) == {"prompt", "response"} for r in records)


def test_the_config_holds_out_unseen_problems():
    config = load_config(CONFIG)
    assert config.algo == "grpo" and config.rollout.samples_per_prompt > 1
    examples = load_examples(config.data.train)
    train, val = split(examples, val_fraction=config.data.val_fraction, seed=config.seed)
    assert {e.prompt_text for e in train}.isdisjoint(e.prompt_text for e in val)
    assert config.output.eval_examples <= len(val) < len(train)


def held_out_accuracy(config, worker, prompts) -> float:
    """Greedy accuracy on the first ``output.eval_examples`` held-out problems, as the loop's
    evaluation measures it (``eval/reward``)."""
    n = min(config.output.eval_examples, len(prompts.ids))
    batch = worker.generate(prompts.ids[:n], list(range(n)), greedy=True)
    return float(RewardScorer(config.reward).score(reward_batch(prompts, batch)).total.mean())


def learning_run(tmp_path, seed: int) -> tuple[list[float], float, float]:
    """Train the arithmetic config for ITERATIONS iterations: (training reward of each
    iteration, held-out greedy accuracy before training, and after)."""
    config = load_config(
        CONFIG,
        {
            "seed": seed,
            "iterations": ITERATIONS,
            "output.dir": str(tmp_path / "run"),
            "output.progress": False,
            "output.plots": False,
            "output.eval_every": ITERATIONS,
            "output.checkpoint_every": ITERATIONS,
        },
    )
    _, held_out = prepare(config)
    untrained = held_out_accuracy(
        config, RolloutWorker(**RolloutWorker.arguments(config)), held_out
    )
    records = read_metrics(train(config) / "metrics.jsonl")
    return [r["reward/total"] for r in records], untrained, records[-1]["eval/reward"]


@pytest.mark.slow  # the packaged SmolLM2 trained on Ray for 10 iterations (a few minutes)
def test_the_packaged_model_learns_arithmetic(ray_session, tmp_path):
    rewards, untrained, trained = learning_run(tmp_path, seed=0)
    figures = {"rewards": rewards, "untrained_eval": untrained, "eval": trained}
    assert np.mean(rewards[3:]) >= TRAINED_REWARD, figures
    assert trained >= untrained + EVAL_RISE, figures
