"""Reward components, the composite and its errors, in-process (no Ray)."""

import random
import textwrap

import numpy as np
import pytest

from distrl.config import RewardComponent, RewardConfig
from distrl.errors import ConfigError, RewardError
from distrl.models.tokenizers import tiktoken_encoding
from distrl.rewards import (
    RewardBatch,
    RewardScorer,
    ScoreResult,
    check_reward_config,
    compute_reward,
)
from distrl.rewards.encoders import ReferenceLM, sentence_embedder

TINY_LM = {"model": "tiny-llama", "tokenizer": "tiktoken:gpt2"}


def scorer(*components, on_error="raise"):
    """A RewardScorer over (name, weight, options) tuples."""
    parts = tuple(
        RewardComponent(*c) if isinstance(c, tuple) else RewardComponent(c) for c in components
    )
    return RewardScorer(RewardConfig(components=parts, on_error=on_error))


def values(name, responses, options=None, **batch):
    """The raw values of one component over ``responses``."""
    result = scorer((name, 1.0, options or {})).score(RewardBatch(responses, **batch))
    return result.components[name]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write ``source`` as module ``name`` into an importable folder."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name, source):
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


# ---- text statistics ----------------------------------------------------------------------


def test_diversity_is_distinct_n_averaged_over_n():
    # "a a a b": distinct-1 = 2/4, distinct-2 = |{aa, ab}| / 3 = 2/3.
    v = values("diversity", ["a a a b", "", "The cat sat on a mat."])
    assert v[0] == pytest.approx((2 / 4 + 2 / 3) / 2)
    assert v[1] == 0.0
    assert v[2] == 1.0
    assert values("diversity", ["a a a b"], {"n": 1})[0] == 0.5


def test_repeated_words_score_lower_diversity_than_varied_ones():
    v = values("diversity", ["good good good good good good", "a quick brown fox jumps high"])
    assert v[0] < v[1]


def test_repetition_is_minus_the_fraction_of_repeated_ngrams():
    # bigrams: (the cat) (cat the) (the cat) (cat the) (the cat): 3 of 5 repeat an earlier one.
    v = values("repetition", ["the cat the cat the cat", "one two three", "hi"], {"n": 2})
    assert v.tolist() == pytest.approx([-3 / 5, 0.0, 0.0])


# ---- length --------------------------------------------------------------------------------


def test_length_penalty_past_max_is_the_configured_amount():
    enc = tiktoken_encoding("cl100k_base")
    short, long = "Hello there, friend.", "word " * 30
    n_short, n_long = len(enc.encode(short)), len(enc.encode(long))
    assert n_short < 10 < n_long
    flat = values("length", [short, long], {"max_tokens": 10, "penalty": 2.5})
    assert flat.tolist() == [0.0, -2.5]
    per_token = values("length", [long], {"max_tokens": 10, "penalty": 0.5, "per_token": True})
    assert per_token[0] == pytest.approx(-0.5 * (n_long - 10))


def test_length_bonus_in_range_and_penalty_below_min():
    enc = tiktoken_encoding("cl100k_base")
    text = "one two three four five six"
    n = len(enc.encode(text))
    opts = {"target_min": n, "target_max": n + 2, "bonus": 0.75, "min_tokens": 3}
    v = values("length", [text, "hi", "x " * (n + 5)], opts)
    assert v.tolist() == [0.75, -1.0, 0.0]


def test_length_counts_in_the_chosen_tokenizer():
    text = "antidisestablishmentarianism " * 3
    opts = {"max_tokens": 5, "per_token": True, "tokenizer": "tiktoken:gpt2"}
    expected = -(len(tiktoken_encoding("gpt2").encode(text)) - 5)
    assert values("length", [text], opts)[0] == expected


# ---- quality -------------------------------------------------------------------------------


def test_quality_is_the_label_or_the_default():
    v = values("quality", ["a", "b"], {"default": 0.25}, qualities=[0.8, None])
    assert v.tolist() == [0.8, 0.25]


def test_quality_without_label_or_default_names_the_sample():
    with pytest.raises(RewardError, match=r"'quality' failed on sample 1 \('unlabelled'\)"):
        values("quality", ["labelled", "unlabelled"], qualities=[1.0, None])


def test_quality_as_weight_multiplies_the_total():
    s = scorer(
        ("diversity", 2.0, {}),
        ("repetition", 1.0, {"n": 1}),
        ("quality", 1.0, {"as_weight": True}),
    )
    batch = RewardBatch(["a a b b", "a b c d"], qualities=[0.5, 2.0])
    r = s.score(batch)
    d, rep = r.components["diversity"], r.components["repetition"]
    assert r.total == pytest.approx((2.0 * d + rep) * np.array([0.5, 2.0]))
    assert r.components["quality"].tolist() == [0.5, 2.0]


# ---- composite and user functions ----------------------------------------------------------


def test_composite_total_is_the_weighted_sum():
    s = scorer(("diversity", 0.5, {}), ("repetition", -2.0, {"n": 1}), ("quality", 3.0, {}))
    r = s.score(RewardBatch(["a a b", "x y z"], qualities=[1.0, 0.1]))
    expected = sum(
        w * r.components[n] for n, w in [("diversity", 0.5), ("repetition", -2.0), ("quality", 3.0)]
    )
    assert r.total == pytest.approx(expected)
    assert set(r.timing) == {"diversity", "repetition", "quality"}
    assert r.metrics()["reward/quality"] == pytest.approx(0.55)


def test_repeated_component_names_get_suffixes():
    s = scorer(("diversity", 1.0, {"n": 1}), ("diversity", 1.0, {"n": 2}))
    assert list(s.score(RewardBatch(["a a b"])).components) == ["diversity", "diversity_2"]


def test_user_function_by_import_path_is_called_trl_style(user_module):
    user_module(
        "my_rewards",
        """
        calls = []

        def score(prompts, completions, references, qualities, targets, scale=1.0, **kwargs):
            calls.append(dict(prompts=prompts, references=references, qualities=qualities,
                              targets=targets, scale=scale))
            return [scale * len(c) for c in completions]

        def only_completions(completions):
            return [1.0 for _ in completions]
        """,
    )
    import my_rewards

    s = scorer(("my_rewards:score", 2.0, {"scale": 10.0}), "my_rewards:only_completions")
    batch = RewardBatch(["ab", "abcd"], prompts=["p1", "p2"], qualities=[0.5, None])
    r = s.score(batch)
    assert r.components["my_rewards:score"].tolist() == [20.0, 40.0]
    assert r.total.tolist() == [2.0 * 20.0 + 1.0, 2.0 * 40.0 + 1.0]
    (call,) = my_rewards.calls
    assert call == dict(
        prompts=["p1", "p2"],
        references=[None, None],
        qualities=[0.5, None],
        targets=[None, None],
        scale=10.0,
    )


def test_compute_reward_is_seed_000s_combination():
    r = compute_reward(
        ["a a a a", "x y z w"],
        config=RewardConfig(components=(RewardComponent("diversity"),)),
    )
    assert r.total[0] < r.total[1]


def test_batch_lists_must_match_and_from_examples():
    from distrl.data.examples import Example, Message

    with pytest.raises(RewardError, match="prompts has 1 entries for 2 responses"):
        RewardBatch(["a", "b"], prompts=["p"])
    ex = Example((Message("user", "hi"),), reference="hello", quality=0.5, target="greetings")
    b = RewardBatch.from_examples([ex], ["yo"])
    assert (b.prompts, b.references, b.qualities, b.targets) == (
        ["hi"],
        ["hello"],
        [0.5],
        ["greetings"],
    )


def test_score_results_concatenate_in_order():
    s = scorer("diversity")
    a, b = s.score(RewardBatch(["a a"])), s.score(RewardBatch(["a b", "c c c"]))
    joined = ScoreResult.concat([a, b])
    assert joined.components["diversity"].tolist() == [0.75, 1.0, (1 / 3 + 1 / 2) / 2]
    assert joined.dropped.tolist() == [False] * 3


# ---- bad rewards ---------------------------------------------------------------------------


BAD = """
import math

def raises(completions, **kw):
    if any("boom" in c for c in completions):
        raise ValueError("cannot score this")
    return [1.0] * len(completions)

def wrong_length(completions, **kw):
    return [1.0, 2.0]

def nan(completions, **kw):
    return [math.nan if "nan" in c else 1.0 for c in completions]
"""


def test_raising_component_names_component_index_and_text(user_module):
    user_module("bad_rewards", BAD)
    long = "boom " + "x" * 200
    with pytest.raises(RewardError) as err:
        scorer("bad_rewards:raises").score(RewardBatch(["fine", "ok", long]))
    message = str(err.value)
    assert "'bad_rewards:raises' failed on sample 2" in message
    assert "'boom xxxx" in message and "x" * 100 not in message  # text cut to ~80 chars
    assert "ValueError: cannot score this" in message


def test_wrong_length_and_nan_are_named(user_module):
    user_module("bad_rewards", BAD)
    with pytest.raises(RewardError, match=r"'bad_rewards:wrong_length' failed on sample 0 \('a'\)"):
        scorer("bad_rewards:wrong_length").score(RewardBatch(["a", "b", "c"]))
    with pytest.raises(
        RewardError, match=r"'bad_rewards:nan' failed on sample 1 \('is nan'\): returned nan"
    ):
        scorer("bad_rewards:nan").score(RewardBatch(["fine", "is nan"]))


def test_drop_mode_masks_and_counts(user_module):
    user_module("bad_rewards", BAD)
    s = scorer("diversity", "bad_rewards:raises", "bad_rewards:nan", on_error="drop")
    r = s.score(RewardBatch(["good one", "boom", "a nan", "fine too"]))
    assert r.dropped.tolist() == [False, True, True, False]
    assert r.num_dropped == 2 and len(r.errors) == 2
    assert np.isnan(r.total[1:3]).all() and np.isfinite(r.total[[0, 3]]).all()
    assert r.total[0] == pytest.approx(r.components["diversity"][0] + 2.0)
    assert r.metrics()["reward/dropped"] == 2.0


def test_batch_only_failure_and_sample_errors_in_drop_mode(user_module):
    user_module(
        "batchy",
        "def f(completions):\n    assert len(completions) == 1\n    return [1.0]\n",
    )
    with pytest.raises(
        RewardError, match=r"'batchy:f' failed on the batch of samples 0..1 \(but on none alone\)"
    ):
        scorer("batchy:f").score(RewardBatch(["a", "b"]))
    s = scorer("diversity", ("quality", 1.0, {}), on_error="drop")
    r = s.score(RewardBatch(["a b", "c d", "e f"], qualities=[None, 0.5, None]))
    assert r.dropped.tolist() == [True, False, True]
    assert r.errors[0].startswith(
        "reward component 'quality' failed on sample 0 ('a b'): no quality label (set option"
    )


# ---- validation before Ray starts ----------------------------------------------------------


def config(*components):
    return RewardConfig(components=tuple(RewardComponent(*c) for c in components))


def test_check_unknown_name_suggests_the_closest():
    with pytest.raises(
        ConfigError, match=r"components\[1\].name.*'diversty'.*did you mean 'diversity'"
    ):
        check_reward_config(config(("length", 1.0, {"max_tokens": 4}), ("diversty", 1.0, {})))


def test_check_unknown_option_suggests_the_closest():
    with pytest.raises(
        ConfigError, match=r"\(length\).options: unknown option 'max_token'.*'max_tokens'"
    ):
        check_reward_config(config(("length", 1.0, {"max_token": 4})))
    with pytest.raises(ConfigError, match="target_min .* larger than target_max"):
        check_reward_config(config(("length", 1.0, {"target_min": 9, "target_max": 3})))


def test_check_user_function_import_and_options(user_module):
    with pytest.raises(
        RewardError, match=r"'nowhere_pkg.mod:f'.*cannot import module 'nowhere_pkg.mod'"
    ):
        check_reward_config(config(("nowhere_pkg.mod:f", 1.0, {})))
    user_module(
        "strict_fn", "def f(completions, scale=1.0):\n    return [scale] * len(completions)\n"
    )
    with pytest.raises(RewardError, match="has no function 'g'"):
        check_reward_config(config(("strict_fn:g", 1.0, {})))
    with pytest.raises(ConfigError, match="unknown option 'scal'.*did you mean 'scale'"):
        check_reward_config(config(("strict_fn:f", 1.0, {"scal": 2})))
    check_reward_config(config(("strict_fn:f", 1.0, {"scale": 2})))


def test_check_tiny_reference_model_needs_a_tokenizer_and_as_weight_needs_terms():
    with pytest.raises(ConfigError, match="set option tokenizer"):
        check_reward_config(config(("perplexity", 1.0, {"model": "tiny-llama"})))
    with pytest.raises(ConfigError, match="no other components"):
        check_reward_config(config(("quality", 1.0, {"as_weight": True})))


# ---- reference LM (tiny random model) ------------------------------------------------------


def test_perplexity_and_fluency_with_a_tiny_model_share_one_forward(monkeypatch):
    s = scorer(("perplexity", 1.0, TINY_LM), ("fluency", 1.0, TINY_LM))
    lm = s.reward.components[0].lm
    assert s.reward.components[1].lm is lm
    calls = []
    original = ReferenceLM._nll_rows
    monkeypatch.setattr(
        ReferenceLM, "_nll_rows", lambda self, rows: calls.append(1) or original(self, rows)
    )
    texts = [
        "Hello there.",
        "A much longer response with many more words in it than the first.",
        "",
    ]
    batch = RewardBatch(texts, prompts=["Hi", "Tell me something", ""])
    r = s.score(batch)
    assert len(calls) == 1  # one micro-batch, shared by both components
    ppl, flu = r.components["perplexity"], r.components["fluency"]
    assert np.isfinite(ppl).all() and (ppl < -1).all()
    assert flu == pytest.approx(-1 / ppl)
    assert ((flu > 0) & (flu <= 1)).all()
    # Padding must not change anything: one sample at a time gives the same numbers.
    alone = [s.score(batch.select([i])).components["perplexity"][0] for i in range(3)]
    assert ppl == pytest.approx(alone, rel=1e-4)


@pytest.mark.slow
def test_real_model_prefers_fluent_english_to_shuffled_words():
    s = scorer("perplexity", "fluency")
    sentences = [
        "The weather is lovely today, so we are going for a walk in the park.",
        "I usually drink a cup of coffee before I start working in the morning.",
    ]
    shuffled = []
    for text in sentences:
        words = text.split()
        random.Random(0).shuffle(words)
        shuffled.append(" ".join(words))
    r = s.score(RewardBatch(sentences + shuffled, prompts=["What are your plans?"] * 4))
    ppl, flu = r.components["perplexity"], r.components["fluency"]
    assert (ppl[:2] > ppl[2:]).all() and (flu[:2] > flu[2:]).all()


# ---- embeddings (real MiniLM and spaCy) ----------------------------------------------------


ON_TOPIC = "Boil the spaghetti in salted water, then stir in the tomato sauce and basil."
OFF_TOPIC = "The central bank raised interest rates and the stock market fell sharply."


@pytest.fixture(scope="module")
def embedding_scorer():
    """MiniLM and spaCy loaded once for the module (their loaders are process-wide caches)."""
    return scorer(
        ("relevance", 1.0, {"target": "cooking pasta and Italian recipes"}),
        "similarity",
        "spacy_similarity",
    )


def test_on_topic_response_is_more_relevant(embedding_scorer):
    r = embedding_scorer.score(RewardBatch([ON_TOPIC, OFF_TOPIC], references=["x", "x"]))
    relevance = r.components["relevance"]
    assert relevance[0] > relevance[1] + 0.2
    assert relevance.min() >= -1 and relevance.max() <= 1
    embedder = embedding_scorer.reward.components[0].embedder
    assert embedder is sentence_embedder("auto")  # one MiniLM per process
    assert "cooking pasta and Italian recipes" in embedder._cache  # the fixed target is cached


def test_sample_target_wins_over_the_option(embedding_scorer):
    batch = RewardBatch(
        [OFF_TOPIC, OFF_TOPIC], targets=["finance and the economy", None], references=["x", "x"]
    )
    relevance = embedding_scorer.score(batch).components["relevance"]
    assert relevance[0] > relevance[1]


def test_similarity_is_higher_for_a_paraphrase(embedding_scorer):
    reference = "The cat is sleeping on the warm windowsill."
    batch = RewardBatch(
        ["A cat naps on the sunny window ledge.", "Quarterly revenue exceeded analyst forecasts."],
        references=[reference, reference],
    )
    r = embedding_scorer.score(batch)
    for name in ("similarity", "spacy_similarity"):
        assert r.components[name][0] > r.components[name][1], name


def test_identical_text_has_similarity_one_and_missing_reference_is_named(embedding_scorer):
    r = embedding_scorer.score(RewardBatch(["same words here"], references=["same words here"]))
    assert r.components["similarity"][0] == pytest.approx(1.0, abs=1e-5)
    assert r.components["spacy_similarity"][0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(
        RewardError, match=r"'similarity' failed on sample 1 \('b'\): .*no reference"
    ):
        embedding_scorer.score(RewardBatch(["a", "b"], references=["a", None]))


@pytest.mark.slow
def test_compute_reward_default_uses_the_target_context():
    r = compute_reward([ON_TOPIC, OFF_TOPIC], target_context="cooking pasta", config=None, seed=0)
    assert set(r.components) == {"fluency", "diversity", "relevance"}
    assert np.isfinite(r.total).all()


def test_a_reward_actor_without_a_model_component_never_imports_transformers():
    """Each reward actor is a fresh process: importing transformers there costs seconds of
    CPU at every start (and every test run) for components that need no model."""
    import subprocess
    import sys

    code = (
        "import sys; import distrl.runtime.actors; from distrl.config import load_config; "
        "from distrl.rewards import RewardScorer; RewardScorer(load_config('tiny', {}).reward); "
        "print(sorted(m for m in ('transformers', 'peft', 'vllm') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
