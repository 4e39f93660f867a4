"""The composite reward of a ``RewardConfig``, its validation, and the ``RewardScorer`` role.

total = sum(weight * component) over the additive components, times ``weight * quality`` for a
quality component with ``as_weight: true``. Every component's raw values come back too, so the
driver can log them as ``reward/<component>``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from distrl.config import RewardComponent, RewardConfig
from distrl.errors import ConfigError, RewardError
from distrl.rewards.base import Component, RewardBatch, SampleError
from distrl.rewards.components import COMPONENTS
from distrl.rewards.user import UserFunction

TEXT_SHOWN = 80


@dataclass
class ScoreResult:
    """Rewards of a batch of B samples.

    Attributes:
        total: (B,) composite reward; NaN where the sample was dropped.
        components: name -> (B,) raw values of each component (NaN where it failed).
        dropped: (B,) True for samples dropped under ``on_error: drop``.
        timing: name -> seconds each component took on this batch.
        errors: one message per dropped sample and component that failed on it.
    """

    total: np.ndarray
    components: dict[str, np.ndarray]
    dropped: np.ndarray
    timing: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def num_dropped(self) -> int:
        """How many samples were dropped."""
        return int(self.dropped.sum())

    def metrics(self) -> dict[str, float]:
        """Means over kept samples as ``reward/<name>``, plus ``reward/dropped``."""
        keep = ~self.dropped
        mean = lambda v: float(np.mean(v[keep])) if keep.any() else math.nan  # noqa: E731
        out = {"reward/total": mean(self.total)}
        out.update({f"reward/{name}": mean(v) for name, v in self.components.items()})
        out["reward/dropped"] = float(self.num_dropped)
        return out

    @classmethod
    def concat(cls, results: Sequence[ScoreResult]) -> ScoreResult:
        """Join results of consecutive chunks; timings are summed."""
        names = list(results[0].components) if results else []
        timing: dict[str, float] = {}
        for r in results:
            for name, seconds in r.timing.items():
                timing[name] = timing.get(name, 0.0) + seconds
        return cls(
            total=np.concatenate([r.total for r in results]) if results else np.zeros(0),
            components={n: np.concatenate([r.components[n] for r in results]) for n in names},
            dropped=np.concatenate([r.dropped for r in results]) if results else np.zeros(0, bool),
            timing=timing,
            errors=[e for r in results for e in r.errors],
        )


def component_keys(config: RewardConfig) -> list[str]:
    """The name each component is reported under: its name, with ``_2``... for repeats."""
    keys: list[str] = []
    for c in config.components:
        key, k = c.name, 1
        while key in keys:
            k += 1
            key = f"{c.name}_{k}"
        keys.append(key)
    return keys


def check_reward_config(config: RewardConfig) -> None:
    """Validate a reward config without loading any model (call it before Ray starts).

    Raises:
        ConfigError: an unknown component name or option (with the closest valid one), or a
            bad option value; the message names ``reward.components[i]``.
        RewardError: a user function cannot be imported.
    """
    import difflib

    additive = 0
    for i, comp in enumerate(config.components):
        where = f"reward.components[{i}] ({comp.name})"
        if ":" in comp.name:
            try:
                UserFunction.check_function(comp.name, comp.options)
            except ConfigError as err:
                raise ConfigError(f"{where}.options: {err}") from None
            additive += 1
            continue
        if comp.name not in COMPONENTS:
            close = difflib.get_close_matches(comp.name, list(COMPONENTS), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"reward.components[{i}].name: unknown reward component {comp.name!r}{hint}; "
                f"valid names: {', '.join(COMPONENTS)}, or a user function 'pkg.module:function'"
            )
        try:
            COMPONENTS[comp.name].check(comp.options)
        except ConfigError as err:
            raise ConfigError(f"{where}.options: {err}") from None
        additive += not comp.options.get("as_weight", False)
    if config.components and additive == 0:
        raise ConfigError(
            "reward.components: a quality component with as_weight weights the other components' "
            "sum, but there are no other components"
        )


def _shown(text: str) -> str:
    """A sample's text for a message: repr, cut to about TEXT_SHOWN characters."""
    return repr(text if len(text) <= TEXT_SHOWN else text[: TEXT_SHOWN - 3] + "...")


class CompositeReward:
    """The weighted sum of a ``RewardConfig``'s components (``compute_reward``).

    Args:
        config: the reward config; validated here with ``check_reward_config``.
        seed: seed of any random reference model.
    """

    def __init__(self, config: RewardConfig, *, seed: int = 0) -> None:
        check_reward_config(config)
        self.config = config
        self.keys = component_keys(config)
        self.components: list[Component] = [_build(c, seed) for c in config.components]

    def __call__(self, batch: RewardBatch, *, offset: int = 0) -> ScoreResult:
        """Score ``batch``.

        Args:
            batch: the samples.
            offset: index of the batch's first sample in a larger batch, so errors name the
                sample's index there (the pool scores chunks).

        Raises:
            RewardError: a component failed on a sample (and ``on_error`` is "raise"), or failed
                on the whole batch without any single sample failing.
        """
        n = len(batch)
        total, factor = np.zeros(n), np.ones(n)
        dropped = np.zeros(n, dtype=bool)
        values, timing, errors = {}, {}, []
        for key, spec, comp in zip(self.keys, self.config.components, self.components):
            start = time.perf_counter()
            v, bad = self._run(key, comp, batch, offset)
            timing[key] = time.perf_counter() - start
            for i, reason in bad.items():
                message = (
                    f"reward component {key!r} failed on sample {offset + i} "
                    f"({_shown(batch.responses[i])}): {reason}"
                )
                if self.config.on_error == "raise":
                    raise RewardError(message)
                errors.append(message)
                dropped[i] = True
            values[key] = v
            if spec.options.get("as_weight", False):
                factor *= spec.weight * v
            else:
                total += spec.weight * v
        total = total * factor
        total[dropped] = np.nan
        return ScoreResult(total, values, dropped, timing, errors)

    def _run(
        self, key: str, comp: Component, batch: RewardBatch, offset: int
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Values (B,) of one component and the failed samples {index: reason}."""
        n = len(batch)
        try:
            values, problem = _floats(comp(batch), n), None
        except SampleError as err:
            if self.config.on_error == "raise":  # the component already knows the sample
                return np.full(n, np.nan), {err.index: str(err)}
            values, problem = None, _reason(err)
        except Exception as err:  # a user function may raise anything
            values, problem = None, _reason(err)
        if values is None or isinstance(values, str):
            problem = problem or values
            # Score sample by sample to find which ones fail.
            values, bad = np.full(n, np.nan), {}
            for i in range(n):
                try:
                    one = _floats(comp(batch.select([i])), 1)
                except Exception as err:
                    one = _reason(err)
                if isinstance(one, str):
                    bad[i] = one
                    if self.config.on_error == "raise":
                        break
                else:
                    values[i] = one[0]
            if not bad:
                raise RewardError(
                    f"reward component {key!r} failed on the batch of samples {offset}.."
                    f"{offset + n - 1} (but on none alone): {problem}"
                )
            return values, bad
        bad = {int(i): f"returned {values[i]}" for i in np.flatnonzero(~np.isfinite(values))}
        return values, bad


def _reason(err: Exception) -> str:
    """Why a call failed: a SampleError's own message, else the exception's type and message."""
    return str(err) if isinstance(err, SampleError) else f"{type(err).__name__}: {err}"


def _floats(result: object, n: int) -> np.ndarray | str:
    """``result`` as a float array of length n, or a string saying why it is not one."""
    if hasattr(result, "__array__"):  # numpy or torch: its dtype says it all
        kind = np.asarray(result).dtype.kind
        if kind not in "biuf":
            return f"returned an array of {np.asarray(result).dtype}, not numbers"
    elif isinstance(result, (str, bytes)) or not isinstance(result, Sequence):
        return f"returned {type(result).__name__} {result!r}, not a list of numbers"
    else:  # a list: every item a number (bools count), never a string such as "1.0"
        for item in result:
            if not isinstance(item, (numbers.Real, np.bool_)) and not _scalar(item):
                return f"returned {type(item).__name__} {item!r}, not a number"
    try:
        values = np.asarray(result, dtype=np.float64)
    except (TypeError, ValueError) as err:
        return f"returned {type(result).__name__}, not numbers ({err})"
    if values.ndim != 1 or len(values) != n:
        got = f"{len(values)} values" if values.ndim == 1 else f"an array of shape {values.shape}"
        return f"returned {got} for {n} sample{'s' * (n != 1)}"
    return values


def _scalar(item: object) -> bool:
    """A zero-dimensional numeric array or tensor."""
    if not hasattr(item, "__array__"):
        return False
    a = np.asarray(item)
    return a.ndim == 0 and a.dtype.kind in "biuf"


def _build(comp: RewardComponent, seed: int) -> Component:
    if ":" in comp.name:
        return UserFunction(comp.name, comp.options, seed=seed)
    return COMPONENTS[comp.name](comp.options, seed=seed)


def trial_score(config: RewardConfig, batch: RewardBatch, timeout_s: float) -> None:
    """Score ``batch`` once with the user functions of ``config`` (the packaged components are
    tested with distrl), before Ray starts. A function that raises, returns something other
    than one number per sample, returns a non-finite value (unless ``on_error: drop``), or does
    not return within ``timeout_s`` stops the run here instead of at its first scoring.

    Raises:
        RewardError: naming the function and what it did.
    """
    users = tuple(c for c in config.components if ":" in c.name)
    if not users:
        return
    trial = dataclasses.replace(config, components=users)
    outcome: list[ScoreResult | BaseException] = []

    def score() -> None:
        try:
            outcome.append(CompositeReward(trial)(batch))
        except BaseException as err:  # handed to the caller's thread
            outcome.append(err)

    # A thread cannot be stopped: a function that never returns is left behind in a daemon
    # thread, and the run stops with this error.
    thread = threading.Thread(target=score, name="distrl-reward-trial", daemon=True)
    thread.start()
    thread.join(timeout_s)
    where = f"on a trial batch of {len(batch)} empty replies before Ray starts"
    if not outcome:
        names = ", ".join(c.name for c in users)
        raise RewardError(
            f"reward function {names} did not return within faults.score_timeout_s="
            f"{timeout_s:g} s {where}"
        )
    if isinstance(outcome[0], RewardError):
        raise RewardError(f"{outcome[0]} ({where})") from None
    if isinstance(outcome[0], BaseException):
        raise outcome[0]


class RewardScorer:
    """Scores batches with the composite reward; the role the reward actor pool runs.

    Args:
        reward_config: which components, weights and options.
        seed: seed of any random reference model.
        torch_threads: torch intra-op threads (None: leave torch's default).
    """

    def __init__(
        self, reward_config: RewardConfig, seed: int = 0, *, torch_threads: int | None = None
    ) -> None:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)
        self.reward = CompositeReward(reward_config, seed=seed)

    def score(self, batch: RewardBatch, offset: int = 0) -> ScoreResult:
        """Score ``batch`` (see ``CompositeReward.__call__``)."""
        return self.reward(batch, offset=offset)

    def ready(self) -> bool:
        """True once constructed (lets a pool wait for its actors' model loads)."""
        return True


_CACHED: dict[str, CompositeReward] = {}


def compute_reward(
    completions: Sequence[str],
    *,
    config: RewardConfig | None = None,
    prompts: Sequence[str] | None = None,
    references: Sequence[str | None] | None = None,
    qualities: Sequence[float | None] | None = None,
    targets: Sequence[str | None] | None = None,
    target_context: str | None = None,
    seed: int = 0,
) -> ScoreResult:
    """Score completions in-process with a composite reward.

    Args:
        completions: the texts to score.
        config: the reward; default fluency + diversity, plus relevance when a
            target is given. The built reward (its models) is kept for the next call.
        prompts, references, qualities, targets: per-sample inputs, as in ``RewardBatch``.
        target_context: one target for every sample.
        seed: seed of any random reference model.
    """
    if target_context is not None and targets is None:
        targets = [target_context] * len(completions)
    if config is None:
        names = ["fluency", "diversity"] + (["relevance"] if targets is not None else [])
        config = RewardConfig(components=tuple(RewardComponent(name) for name in names))
    cache_key = f"{config!r}/{seed}"
    if cache_key not in _CACHED:
        _CACHED[cache_key] = CompositeReward(config, seed=seed)
    batch = RewardBatch(list(completions), prompts, references, qualities, targets)
    return _CACHED[cache_key](batch)
