"""Sweep spaces for ``distrl.tune``, without Ray: parsing and checking a space file, the
log/int transforms BayesOpt needs, placement-group bundles per trial, and the sweep summary
(CSV, PNG, best config). See ``distrl.tune`` for the file format."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distrl.algos import registry
from distrl.config import NAMED_CONFIGS, RunConfig
from distrl.config.schema import build, to_dict
from distrl.errors import ConfigError
from distrl.runtime.faults import FAULT_KEYS

SPACE_KEYS = ("base", "overrides", "metric", "mode", "params")
PARAM_KEYS = ("low", "high", "log", "type")
SWEEP_FILE = "distrl_sweep.yaml"  # what --resume needs: space, base config, settings
# What Trainer.run reports every iteration, besides reward/<component> and eval/reward_<component>.
LOOP_METRICS = (
    "reward/total",
    "reward/dropped",
    "eval/reward",
    "eval/ref_perplexity",
    "eval/ref_token_accuracy",
    "learner/policy_loss",
    "learner/value_loss",
    "learner/entropy",
    "learner/clipfrac",
    "learner/approx_kl",
    "learner/value_clipfrac",
    "learner/grad_norm",
    "learner/lr",
    "learner/ce_loss",
    "learner/kl_loss",
    "learner/kl",
    "learner/kl_coef",
    "learner/skipped_updates",
    "learner/early_stopped",
    "learner/version",
    "learner/tokens_per_s",
    # DQN
    "learner/td_loss",
    "learner/aux_loss",
    "learner/q_mean",
    "learner/target_q_mean",
    "learner/td_abs_mean",
    "learner/is_weight_mean",
    "learner/sample_age",
    "learner/steps",
    "learner/updates",
    "replay/size",
    "replay/added",
    "replay/sample_calls",
    "replay/stale_updates",
    "replay/priority_mean",
    "replay/priority_max",
    "replay/beta",
    "explore/epsilon",
    "explore/ucb_bonus",
    "rollout/tokens_per_s",
    "rollout/response_length",
    "rollout/policy_lag",
    "episode/turns",
    "episode/tool_calls",
    "episode/tool_errors",
    "time/rollout_wait_s",
    "time/generate_s",
    "time/score_s",
    "time/train_s",
    "time/learn_s",
    "time/update_s",
    "time/publish_s",
    "time/iteration_s",
    *FAULT_KEYS,
    # group algorithms and DAPO options
    "sampling/rounds",
    "sampling/kept_fraction",
    "reward/overlong_penalty",
    "publish/bytes",
)


# ---- the search space (no Ray) ---------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched config field and its transform (see the module docstring)."""

    path: str  # canonical dotted path, list items as [i]
    low: float
    high: float
    log: bool = False
    type: str | None = "float"  # "float" | "int"; None (left out in the file) = the field's

    @property
    def key(self) -> str:
        """The name of the searched coordinate in Tune's trial config."""
        return f"log({self.path})" if self.log else self.path

    def bounds(self) -> tuple[float, float]:
        """The interval BayesOpt searches."""
        high = self.high + 1 if self.type == "int" else self.high
        return (math.log(self.low), math.log(high)) if self.log else (self.low, high)

    def to_real(self, x: float) -> float | int:
        """Map a searched coordinate to the config value."""
        value = math.exp(x) if self.log else x
        if self.type == "int":
            return int(min(max(math.floor(value + 1e-9), self.low), self.high))
        return float(min(max(value, self.low), self.high))

    def to_search(self, value: float) -> float:
        """The coordinate ``to_real`` maps to ``value`` (an integer's cell centre)."""
        if self.type == "int":
            value = value + 0.5
        return math.log(value) if self.log else float(value)


@dataclass(frozen=True)
class Space:
    """A parsed search-space file."""

    file: str
    base: str
    metric: str
    mode: str
    params: tuple[Param, ...]
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def real_values(self, search: dict[str, float]) -> dict[str, float | int]:
        """Config values (by canonical path) of a trial's searched coordinates."""
        return {p.path: p.to_real(float(search[p.key])) for p in self.params}


def read_space(file: str | Path) -> Space:
    """Read and shape-check a search-space YAML file (fields are checked by ``check_space``).

    Raises:
        ConfigError: naming the file and the entry at fault.
    """
    file = Path(file)
    if not file.is_file():
        raise ConfigError(f"search space {file} does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a mapping with keys {', '.join(SPACE_KEYS)}")
    _check_keys(file, "", data, SPACE_KEYS)
    for key in ("metric", "params"):
        if key not in data:
            raise ConfigError(f"{file}: '{key}' is missing")
    mode = data.get("mode", "max")
    if mode not in ("max", "min"):
        raise ConfigError(f"{file}: mode must be max or min, got {mode!r}")
    if not isinstance(data["params"], dict) or not data["params"]:
        raise ConfigError(f"{file}: params must map dotted config fields to {{low, high}} ranges")
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{file}: overrides must map dotted config fields to values")
    params = tuple(_param(file, str(path), spec) for path, spec in data["params"].items())
    base = str(data.get("base", "default"))
    if base not in NAMED_CONFIGS and (file.parent / base).is_file():
        base = str(file.parent / base)  # a relative path is relative to the space file
    return Space(str(file), base, str(data["metric"]), mode, params, overrides)


def _param(file: Path, path: str, spec: Any) -> Param:
    where = f"{file}: params '{path}'"
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected {{low: .., high: .., log: bool, type: float|int}}")
    _check_keys(file, f"params '{path}' ", spec, PARAM_KEYS)
    bounds = {}
    for key in ("low", "high"):
        value = spec.get(key)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: '{key}' must be finite, got {value!r}")
        bounds[key] = value
    low, high = bounds["low"], bounds["high"]
    log, kind = spec.get("log", False), spec.get("type")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: 'log' must be true or false, got {log!r}")
    if kind not in (None, "float", "int"):
        raise ConfigError(f"{where}: 'type' must be float or int, got {kind!r}")
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    return Param(path, low, high, log, kind)


def _check_keys(file: Path, where: str, data: dict, valid: tuple[str, ...]) -> None:
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{file}: {where}unknown key '{key}'{hint}; valid keys: {', '.join(valid)}"
            )


def _parts(path: str) -> list[str]:
    """``reward.components[0].weight`` -> ``['reward', 'components', '0', 'weight']``."""
    return re.sub(r"\[(\d+)\]", r".\1", path).split(".")


def resolve_field(path: str, config: RunConfig) -> tuple[str, Any]:
    """Canonical path and annotated type of a dotted field of ``config``.

    List items are addressed by index, ``reward.components.0.weight`` or
    ``reward.components[0].weight``; the index must exist in ``config``.

    Raises:
        ConfigError: unknown field (with the closest spelling), missing index, or a section.
    """
    node: Any = config
    canonical, tp = "", RunConfig
    for part in _parts(path):
        if isinstance(node, tuple):
            if not part.isdigit():
                raise ConfigError(f"'{path}': {canonical} is a list; address an item as [0]")
            if int(part) >= len(node):
                raise ConfigError(
                    f"'{path}': {canonical} has {len(node)} item(s) in the base config, "
                    f"so index {part} does not exist"
                )
            node, canonical = node[int(part)], f"{canonical}[{part}]"
            tp = type(node)
            continue
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config field '{path}': {canonical} has no sub-fields")
        hints = typing.get_type_hints(type(node))
        if part not in hints:
            close = difflib.get_close_matches(part, list(hints), n=1, cutoff=0.5)
            prefix = f"{canonical}." if canonical else ""
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config field '{path}'{hint}; fields of "
                f"{canonical or 'the config'}: {', '.join(hints)}"
            )
        node, tp = getattr(node, part), hints[part]
        canonical = f"{canonical}.{part}" if canonical else part
    if dataclasses.is_dataclass(node) or isinstance(node, tuple):
        raise ConfigError(f"'{path}' is a config section, not a field")
    return canonical, tp


def with_values(config: RunConfig, values: dict[str, Any]) -> RunConfig:
    """``config`` with dotted fields set (list items by index), validated by the config builder."""
    data = to_dict(config)
    for path, value in values.items():
        *parents, leaf = _parts(path)
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(leaf) if isinstance(node, list) else leaf] = value
    return build(RunConfig, data)


def known_metrics(config: RunConfig) -> list[str]:
    """Every metric name the training loop reports for ``config``."""
    from distrl.rewards import component_keys

    keys = component_keys(config.reward)
    evals = [f"eval/reward_{k}" for k in [*keys, "dropped"]]
    return [*LOOP_METRICS, *(f"reward/{k}" for k in keys), *evals]


def check_space(space: Space, config: RunConfig) -> Space:
    """Check ``space`` against the base ``config``; returns it with canonical field paths.

    Raises:
        ConfigError: unknown field or metric, a non-numeric field, ``type`` not matching the
            field, a bound outside the field's own range, or an eval metric without evaluations.
    """
    params = []
    for p in space.params:
        where = f"{space.file}: params '{p.path}'"
        try:
            path, tp = resolve_field(p.path, config)
        except ConfigError as exc:
            raise ConfigError(f"{space.file}: {exc}") from None
        kinds = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(kinds) == 1:
            tp = kinds[0]
        if tp not in (int, float):
            raise ConfigError(f"{where}: only numeric fields can be searched; this one is {tp}")
        if p.type not in (None, tp.__name__):
            raise ConfigError(
                f"{where}: the field is {tp.__name__} but the range says type: {p.type} "
                f"(write type: {tp.__name__}, or leave type out)"
            )
        if tp is int and not (float(p.low).is_integer() and float(p.high).is_integer()):
            raise ConfigError(
                f"{where}: an int field needs whole-number bounds, got {p.low}..{p.high}"
            )
        p = dataclasses.replace(p, low=tp(p.low), high=tp(p.high), type=tp.__name__)
        for name, bound in (("low", p.low), ("high", p.high)):
            try:
                with_values(config, {path: bound})
            except ConfigError as exc:
                raise ConfigError(f"{where}: {name} {bound} is not a valid value: {exc}") from None
        params.append(dataclasses.replace(p, path=path))
    paths = [p.path for p in params]
    for path in paths:
        if paths.count(path) > 1:
            raise ConfigError(f"{space.file}: field {path} appears more than once")
    valid = known_metrics(config)
    if space.metric not in valid:
        raise ConfigError(
            f"{space.file}: unknown metric '{space.metric}'; the training loop reports: "
            + ", ".join(valid)
        )
    every, iterations = config.output.eval_every, config.iterations
    if space.metric.startswith("eval/") and not 0 < every <= iterations:
        raise ConfigError(
            f"{space.file}: metric {space.metric} needs evaluations, but output.eval_every is "
            f"{every} with {iterations} iterations; set output.eval_every to 1..{iterations}"
        )
    return dataclasses.replace(space, params=tuple(params))


def trial_bundles(config: RunConfig, trial_cpus: float) -> list[dict[str, float]]:
    """Placement-group bundles of one trial: the trial itself, then one per actor it starts."""
    res = config.resources

    def bundle(cpus: float, gpus: float, role: str) -> dict[str, float]:
        wanted = {"CPU": cpus, "GPU": gpus, **res.custom.get(role, {})}
        return {k: float(v) for k, v in wanted.items() if v}

    roles = [
        (bundle(res.learner_cpus, res.learner_gpus, "learner"), 1),
        (bundle(res.rollout_cpus, res.rollout_gpus, "rollout"), config.rollout.num_workers),
        (bundle(res.reward_cpus, res.reward_gpus, "reward"), config.reward.num_actors),
    ]
    if registry.get(config.algo).uses_replay:
        roles.append((bundle(res.replay_cpus, 0.0, "replay"), 1))
    first = {"CPU": float(trial_cpus)} if trial_cpus else {}
    return [first, *(dict(b) for b, n in roles if b for _ in range(n))]


# ---- summary ---------------------------------------------------------------------------------


def trial_rows(results: Any, space: Space, iterations: int) -> list[dict[str, Any]]:
    """One summary row per trial of a Tune ``ResultGrid``: real values, best/last metric."""
    import numpy as np

    rows = []
    for result in results:
        frame = result.metrics_dataframe
        series = (
            frame[space.metric].astype(float).to_numpy()
            if frame is not None and space.metric in frame
            else np.zeros(0)
        )
        finite = series[np.isfinite(series)]
        best = float(finite.max() if space.mode == "max" else finite.min()) if finite.size else None
        step = int((result.metrics or {}).get("step", 0))
        status = "error" if result.error else ("finished" if step >= iterations else "stopped")
        row = {"trial": Path(result.path).name, "status": status, "iterations": step}
        row.update(space.real_values(result.config))
        row[f"best_{space.metric}"] = best
        row[f"last_{space.metric}"] = float(finite[-1]) if finite.size else None
        row["error"] = str(result.error).strip().splitlines()[-1][:200] if result.error else ""
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial"])


def write_summary(rows: list[dict[str, Any]], space: Space, out_dir: Path) -> None:
    """``summary.csv``: one row per trial (``distrl.outputs.plots`` draws ``summary.png``)."""
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
