"""``distrl.validate``: pass@k, sampled evaluation and the command line, on the tiny model."""

import json
import math
import sys
import textwrap

import numpy as np
import pytest

from distrl.config import ModelConfig, TokenizerConfig, dump_yaml, load_config
from distrl.errors import ConfigError
from distrl.models.policy import build_model, build_tokenizer
from distrl.validate import main, pass_at_k, pass_ks, validate


def test_pass_at_k_worked_example():
    # n = 4 completions per prompt; the prompts have c = 0, 1, 2 and 4 successes.
    successes = np.array(
        [
            [0, 0, 0, 0],
            [0, 1, 0, 0],
            [1, 0, 0, 1],
            [1, 1, 1, 1],
        ],
        dtype=bool,
    )
    # pass@1 = c / n: (0 + 1/4 + 2/4 + 1) / 4.
    assert pass_at_k(successes=successes, k=1) == pytest.approx(0.4375)
    # pass@2 = 1 - C(n - c, 2) / C(4, 2), C(4, 2) = 6: 1 - 6/6, 1 - 3/6, 1 - 1/6, 1 - 0/6.
    assert pass_at_k(successes=successes, k=2) == pytest.approx((0 + 0.5 + 5 / 6 + 1) / 4)
    # pass@3: C(4, 3) = 4; C(3, 3) = 1 for c = 1; c = 2 leaves too few failures to fill 3 draws.
    assert pass_at_k(successes=successes, k=3) == pytest.approx((0 + 0.75 + 1 + 1) / 4)
    # pass@4 (all drawn): 1 when any succeeded.
    assert pass_at_k(successes=successes, k=4) == pytest.approx(0.75)


def test_pass_at_k_needs_k_within_the_samples():
    with pytest.raises(ValueError, match="k=5, n=4"):
        pass_at_k(successes=np.ones((2, 4), bool), k=5)


def test_pass_ks_are_powers_of_two_and_n():
    assert pass_ks(1) == [1]
    assert pass_ks(8) == [1, 2, 4, 8]
    assert pass_ks(6) == [1, 2, 4, 6]


# Prompt number r (in the order first seen) gets 2r successes: its first 2r completions score 1.
RANKED_REWARD = """
    ranks, seen, completions_of = {}, {}, {}

    def score(prompts, completions):
        out = []
        for prompt, completion in zip(prompts, completions):
            rank = ranks.setdefault(prompt, len(ranks))
            seen[prompt] = seen.get(prompt, 0) + 1
            completions_of.setdefault(prompt, []).append(completion)
            out.append(1.0 if seen[prompt] <= 2 * rank else 0.0)
        return out
"""


@pytest.fixture
def ranked_reward(tmp_path, monkeypatch):
    """A user reward module whose successes per prompt are known: 0, 2, 4, ..."""
    (tmp_path / "ranked_reward.py").write_text(textwrap.dedent(RANKED_REWARD))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ranked_reward", raising=False)
    yield [{"name": "ranked_reward:score", "weight": 1.0}]
    sys.modules.pop("ranked_reward", None)


def test_sampled_validation_reports_success_rate_and_pass_at_k(ranked_reward):
    config = load_config("tiny", {"reward.components": ranked_reward})
    report = validate(config, examples=3, samples=4, temperature=1.0, success_threshold=1.0)
    # c = 0, 2, 4 successes of n = 4 (worked out as in test_pass_at_k_worked_example); samples
    # grouped with the wrong prompts would give c = 2, 2, 2 and pass@2 = 5/6.
    assert report["validate/examples"] == 3 and report["validate/samples"] == 4
    assert report["validate/success_rate"] == pytest.approx(6 / 12)
    assert report["validate/pass@1"] == pytest.approx(6 / 12)
    assert report["validate/pass@2"] == pytest.approx((0 + 5 / 6 + 1) / 3)
    assert report["validate/pass@4"] == pytest.approx(2 / 3)
    assert report["validate/reward_total"] == pytest.approx(6 / 12)
    assert report["validate/temperature"] == 1.0
    # Sampled: a prompt's four completions are not one greedy completion four times.
    completions_of = sys.modules["ranked_reward"].completions_of
    assert all(len(set(c)) > 1 for c in completions_of.values()), completions_of


def test_more_prompts_than_one_generate_call_keep_each_prompts_samples_together(ranked_reward):
    config = load_config("tiny", {"reward.components": ranked_reward})
    # 40 samples a prompt: one prompt per generate call (64 sequences at most).
    report = validate(config, examples=3, samples=40, temperature=1.0)
    assert report["validate/success_rate"] == pytest.approx((0 + 2 + 4) / 120)
    c_of_40 = [1 - math.comb(40 - c, 32) / math.comb(40, 32) for c in (0, 2, 4)]
    assert report["validate/pass@32"] == pytest.approx(sum(c_of_40) / 3)


def test_samples_use_the_runs_temperature_and_greedy_is_the_default():
    config = load_config("tiny")
    sampled = validate(config, examples=2, samples=8, max_new_tokens=4, success_threshold=0.0)
    assert sampled["validate/temperature"] == config.rollout.temperature
    assert sampled["validate/response_length"] <= 4
    assert sampled["validate/pass@8"] == 1.0 == sampled["validate/success_rate"]
    # Greedy decoding: one completion, reproducible, the same as --temperature 0.
    greedy = validate(config, examples=2, success_threshold=math.inf)
    assert greedy["validate/temperature"] == 0.0 and greedy["validate/samples"] == 1
    assert greedy["validate/pass@1"] == 0.0 and "validate/pass@2" not in greedy
    assert validate(config, examples=2, temperature=0.0, success_threshold=math.inf) == greedy


@pytest.fixture
def checkpoint(tmp_path):
    """A run folder as training leaves it: ``config.yaml`` beside ``final/`` (tiny policy)."""
    config = load_config("tiny")
    dump_yaml(config, tmp_path / "config.yaml")
    model = ModelConfig(name="tiny-llama", device="cpu")
    tokenizer = build_tokenizer(model, TokenizerConfig(name="tiktoken:gpt2"))
    folder = tmp_path / "final"
    build_model(model, tokenizer, seed=0).save_pretrained(folder)
    (folder / "distrl_tokenizer.json").write_text(json.dumps({"spec": "tiktoken:gpt2"}))
    return folder


def test_cli_writes_every_figure_to_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--checkpoint", str(checkpoint), "--examples", "2", "--samples", "4"]
    argv += ["--temperature", "0.7", "--max-new-tokens", "4", "--success-threshold", "0.5"]
    assert main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("reward_total", "success_rate", "pass@1", "pass@2", "pass@4", "ref_perplexity"):
        assert f"validate/{key}" in report, key
    assert report["validate/temperature"] == 0.7
    assert report["validate/success_threshold"] == 0.5
    out, err = capsys.readouterr()
    assert "validate/pass@4" in out
    # What it is doing, on stderr as it goes: loading, a bar over the prompts, scoring.
    assert f"distrl.validate: loading {checkpoint}" in err
    assert "distrl.validate: generating" in err and "2/2" in err
    assert "distrl.validate: scoring 8 completions" in err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "held-out prompts to generate for (default 32)" in help_text
    assert "(default 1: greedy)" in help_text and "(default 1.0:" in help_text


def test_a_checkpoint_holding_a_pickle_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from test_models_loading import pickled_model_folder

    from distrl.config import cli

    marker = tmp_path / "code-ran"
    folder = pickled_model_folder(tmp_path / "final", marker)
    (folder / "distrl_tokenizer.json").write_text(json.dumps({"spec": "tiktoken:gpt2"}))
    argv = ["distrl.validate", "--checkpoint", str(folder), "--config", "tiny", "--examples", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(main)
    assert exit_.value.code == 2
    err = capsys.readouterr().err  # after the progress line saying what it loads
    assert err.splitlines()[:-1] == [f"distrl.validate: loading {folder}"]
    last = err.splitlines()[-1]
    assert last.startswith(f"error: cannot load the model in {folder}: its weights are a pickle")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--samples", "0"], "--samples 0: must be at least 1"),
        (["--examples", "0"], "--examples 0: must be at least 1"),
        (["--temperature", "-1"], "--temperature -1.0: must be 0"),
        (["--samples", "4", "--temperature", "0"], "--temperature 0 is greedy decoding"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
    ],
)
def test_cli_rejects_bad_sampling_flags_before_loading_anything(flags, message):
    with pytest.raises(ConfigError, match=message):
        main(["--checkpoint", "default", *flags])


@pytest.fixture
def dqn_checkpoint(tmp_path):
    """A DQN checkpoint folder (Performer Q-network, 8 new tokens) as a run's learner saves it."""
    from distrl.dqn.learner import QLearner

    config = load_config("tiny", {"algo": "dqn", "dqn.q_network": "performer"})
    QLearner(**QLearner.arguments(config)).save(str(tmp_path))
    return str(tmp_path)


def test_a_dqn_checkpoint_samples_from_q_at_the_temperature_and_length_asked(dqn_checkpoint):
    from distrl.validate import run_config_for

    config = run_config_for(dqn_checkpoint, "tiny")
    assert config.rollout.max_new_tokens == 8
    report = validate(
        config, examples=2, checkpoint=dqn_checkpoint, samples=4, temperature=0.7, max_new_tokens=12
    )
    assert report["validate/temperature"] == 0.7 and "validate/pass@4" in report
    assert 8 < report["validate/response_length"] <= 12
    assert "validate/ref_perplexity" not in report  # Q-values are not a distribution


def test_a_run_that_generated_with_vllm_validates_in_process_with_generate():
    """Validation decodes a few prompts itself and reads the policy for the reference metrics:
    a run's rollout.engine vllm does not carry over (vLLM need not be installed)."""
    config = load_config("tiny", {"rollout.engine": "vllm"})
    report = validate(config, examples=2, max_new_tokens=4)
    assert report["validate/examples"] == 2 and "validate/ref_perplexity" in report
