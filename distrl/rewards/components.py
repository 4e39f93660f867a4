"""Reward components: each maps a ``RewardBatch`` to one float per sample.

A component is a plain class: ``OPTIONS`` lists its option keys with their defaults,
``check(options)`` validates them without loading anything (so configs fail before Ray starts),
and ``__call__(batch)`` scores. ``COMPONENTS`` maps config names to classes; a name of the form
``pkg.mod:func`` is a user function instead (``distrl.rewards.user``).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from distrl.errors import ConfigError
from distrl.rewards import encoders
from distrl.rewards.base import Component, RewardBatch, SampleError


def _words(text: str) -> list[str]:
    """Lower-cased words (letters, digits, inner apostrophes); punctuation is not a word."""
    return re.findall(r"\w+(?:'\w+)*", text.lower())


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _int_list(value: Any, name: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or not all(type(v) is int and v >= 1 for v in values):
        raise ConfigError(
            f"option {name} must be a positive integer or a list of them, got {value!r}"
        )
    return values


class Diversity(Component):
    """Distinct-n on words, averaged over ``n``: unique n-grams / n-grams (0 with no n-gram)."""

    OPTIONS = {"n": [1, 2]}

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        super().check(options)
        _int_list(options.get("n", cls.OPTIONS["n"]), "n")

    def __call__(self, batch: RewardBatch) -> list[float]:
        ns = _int_list(self.options["n"], "n")
        out = []
        for text in batch.responses:
            words = _words(text)
            distinct = [len(set(g)) / len(g) if (g := _ngrams(words, n)) else 0.0 for n in ns]
            out.append(sum(distinct) / len(ns))
        return out


class Repetition(Component):
    """Minus the fraction of word n-grams that repeat an earlier one, in [-1, 0]."""

    OPTIONS = {"n": 3}

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        super().check(options)
        if len(_int_list(options.get("n", 3), "n")) != 1:
            raise ConfigError("option n must be one positive integer")

    def __call__(self, batch: RewardBatch) -> list[float]:
        n = _int_list(self.options["n"], "n")[0]
        grams = [_ngrams(_words(text), n) for text in batch.responses]
        return [-(len(g) - len(set(g))) / len(g) if g else 0.0 for g in grams]


class Length(Component):
    """Token-count shaping: a bonus inside a target range, penalties past a maximum and below a
    minimum (each a flat amount, or per token over/under with ``per_token``)."""

    OPTIONS = {
        "tokenizer": "tiktoken:cl100k_base",
        "model": "default",
        "target_min": None,
        "target_max": None,
        "bonus": 1.0,
        "max_tokens": None,
        "penalty": 1.0,
        "min_tokens": None,
        "min_penalty": 1.0,
        "per_token": False,
    }

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        super().check(options)
        o = {**cls.OPTIONS, **options}
        for key in ("target_min", "target_max", "max_tokens", "min_tokens"):
            if o[key] is not None and (not isinstance(o[key], int) or o[key] < 0):
                raise ConfigError(f"option {key} must be a non-negative integer, got {o[key]!r}")
        for key in ("bonus", "penalty", "min_penalty"):
            if isinstance(o[key], bool) or not isinstance(o[key], (int, float)):
                raise ConfigError(f"option {key} must be a number, got {o[key]!r}")
        if not isinstance(o["per_token"], bool):
            raise ConfigError(f"option per_token must be true or false, got {o['per_token']!r}")
        if all(o[k] is None for k in ("target_min", "target_max", "max_tokens", "min_tokens")):
            raise ConfigError("set at least one of target_min, target_max, max_tokens, min_tokens")
        lo, hi = o["target_min"], o["target_max"]
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"option target_min ({lo}) is larger than target_max ({hi})")

    def __init__(self, options: dict[str, Any] | None = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.tokenizer = encoders.counting_tokenizer(
            self.options["tokenizer"], self.options["model"]
        )

    def __call__(self, batch: RewardBatch) -> list[float]:
        o = self.options
        out = []
        for ids in self.tokenizer.encode_batch(batch.responses):
            n, value = len(ids), 0.0
            in_range = (o["target_min"] is None or n >= o["target_min"]) and (
                o["target_max"] is None or n <= o["target_max"]
            )
            if in_range and (o["target_min"] is not None or o["target_max"] is not None):
                value += o["bonus"]
            if o["max_tokens"] is not None and n > o["max_tokens"]:
                value -= o["penalty"] * ((n - o["max_tokens"]) if o["per_token"] else 1)
            if o["min_tokens"] is not None and n < o["min_tokens"]:
                value -= o["min_penalty"] * ((o["min_tokens"] - n) if o["per_token"] else 1)
            out.append(value)
        return out


class Quality(Component):
    """The example's human quality label (``default`` for unlabelled samples, else an error).
    With ``as_weight`` the composite multiplies the total by it instead of adding a term."""

    OPTIONS = {"default": None, "as_weight": False}

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        super().check(options)
        default = options.get("default")
        if default is not None and (
            isinstance(default, bool) or not isinstance(default, (int, float))
        ):
            raise ConfigError(f"option default must be a number, got {default!r}")
        if not isinstance(options.get("as_weight", False), bool):
            raise ConfigError(
                f"option as_weight must be true or false, got {options['as_weight']!r}"
            )

    def __call__(self, batch: RewardBatch) -> list[float]:
        out = []
        for i, label in enumerate(batch.qualities):
            if label is None:
                label = self.options["default"]
            if label is None:
                raise SampleError(
                    i, "no quality label (set option default to score unlabelled samples)"
                )
            out.append(float(label))
        return out


class _LMComponent(Component):
    """Shared by perplexity and fluency: per-token NLL of the response under a frozen LM."""

    OPTIONS = {
        "model": "default",
        "tokenizer": "auto",
        "device": "auto",
        "max_prompt_tokens": 256,
        "max_response_tokens": 256,
        "micro_batch": 8,
    }

    @classmethod
    def check(cls, options: dict[str, Any]) -> None:
        super().check(options)
        o = {**cls.OPTIONS, **options}
        from distrl.models.loading import TINY_MODELS  # transformers: only where it is needed

        if o["model"] in TINY_MODELS and o["tokenizer"] == "auto":
            raise ConfigError(
                f"model {o['model']!r} is random and has no tokenizer of its own: set option "
                f"tokenizer (e.g. 'tiktoken:gpt2')"
            )
        for key in ("max_prompt_tokens", "max_response_tokens", "micro_batch"):
            if not isinstance(o[key], int) or o[key] < 1:
                raise ConfigError(f"option {key} must be a positive integer, got {o[key]!r}")

    def __init__(self, options: dict[str, Any] | None = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        o = self.options
        self.lm = encoders.reference_lm(o["model"], o["tokenizer"], o["device"], seed)

    def mean_nll(self, batch: RewardBatch) -> np.ndarray:
        o = self.options
        return self.lm.mean_nll(
            batch.prompts,
            batch.responses,
            max_prompt_tokens=o["max_prompt_tokens"],
            max_response_tokens=o["max_response_tokens"],
            micro_batch=o["micro_batch"],
        )


class Perplexity(_LMComponent):
    """Negative perplexity of the response given the prompt: -exp(mean token NLL)."""

    def __call__(self, batch: RewardBatch) -> np.ndarray:
        return -np.exp(self.mean_nll(batch))


class Fluency(_LMComponent):
    """Geometric-mean token probability of the response, exp(-mean token NLL), in (0, 1]."""

    def __call__(self, batch: RewardBatch) -> np.ndarray:
        return np.exp(-self.mean_nll(batch))


def _texts_or_option(
    batch: RewardBatch, per_sample: list, option: str | None, what: str
) -> list[str]:
    """Each sample's own text, else the option's, else a SampleError naming what is missing."""
    out = []
    for i, text in enumerate(per_sample):
        text = text if text is not None else option
        if text is None:
            raise SampleError(
                i, f"the sample has no {what} (give the example one or set option {what})"
            )
        out.append(text)
    return out


class Relevance(Component):
    """MiniLM cosine between the response and the target context (the sample's, else ``target``)."""

    OPTIONS = {"target": None, "device": "auto"}

    def __init__(self, options: dict[str, Any] | None = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.embedder = encoders.sentence_embedder(self.options["device"])

    def _fixed(self, batch: RewardBatch) -> list[str]:
        return _texts_or_option(batch, batch.targets, self.options["target"], "target")

    def __call__(self, batch: RewardBatch) -> np.ndarray:
        fixed = self._fixed(batch)
        return encoders.cosine(
            self.embedder.embed(batch.responses), self.embedder.embed(fixed, cache=True)
        )


class Similarity(Relevance):
    """MiniLM cosine between the response and the reference (the sample's, else ``reference``)."""

    OPTIONS = {"reference": None, "device": "auto"}

    def _fixed(self, batch: RewardBatch) -> list[str]:
        return _texts_or_option(batch, batch.references, self.options["reference"], "reference")


class SpacySimilarity(Component):
    """spaCy en_core_web_md similarity (cosine of mean word vectors) with the reference text."""

    OPTIONS = {"reference": None}

    def __init__(self, options: dict[str, Any] | None = None, *, seed: int = 0) -> None:
        super().__init__(options, seed=seed)
        self.spacy = encoders.spacy_vectors()

    def __call__(self, batch: RewardBatch) -> np.ndarray:
        refs = _texts_or_option(batch, batch.references, self.options["reference"], "reference")
        return encoders.cosine(
            self.spacy.vectors(batch.responses), self.spacy.vectors(refs, cache=True)
        )


COMPONENTS: dict[str, type[Component]] = {
    "perplexity": Perplexity,
    "fluency": Fluency,
    "diversity": Diversity,
    "repetition": Repetition,
    "relevance": Relevance,
    "similarity": Similarity,
    "spacy_similarity": SpacySimilarity,
    "length": Length,
    "quality": Quality,
}
