"""``python -m distrl.tune``: hyperparameter sweeps of the distrl training loop with Ray Tune.

A search-space file (``tune_spaces/*.yaml``) names a base config, the metric to optimise and a
range per dotted config field (list items by index, ``reward.components[0].weight``)::

    base: default            # packaged config name or YAML path (--config overrides it)
    overrides: {iterations: 20}   # optional fixed dotted settings on top of the base
    metric: eval/reward      # a metric the training loop reports
    mode: max                # max | min
    params:
      learner.lr: {low: 1.0e-6, high: 1.0e-3, log: true}
      ppo.epochs: {low: 1, high: 4, type: int}

Each trial is one ``distrl.driver.train`` run with its own placement group (a bundle for the
trial itself plus one per learner, rollout worker and reward actor). ``BayesOptSearch`` only
searches continuous boxes, so fields are searched in a transformed space and mapped back inside
the trial; values are clamped to [low, high] against rounding at the edges:

- ``log: true``: x ~ uniform(log(low), log(high)), value = exp(x).
- ``type: int``: x ~ uniform(low, high + 1), value = floor(x): every integer gets the same width
  (with ``log`` too: x ~ uniform(log(low), log(high + 1)), value = floor(exp(x))).

Tune's own trial configs show the searched coordinate (``log(learner.lr)``); each trial reports
the real values as ``params/<field>`` every iteration, and the summary uses them.

Examples:
    python -m distrl.tune --space tune_spaces/ppo.yaml --num-samples 16 --max-concurrent 4
    python -m distrl.tune --space tune_spaces/ppo.yaml --config tiny --iterations 4 \\
        --num-samples 4 --max-concurrent 2 --trial-cpus 0.25 --scheduler asha
    python -m distrl.tune --resume --name ppo-20261126-101500   # continue a stopped sweep
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from distrl import cli
from distrl.config import NAMED_CONFIGS, RunConfig, build, dump_yaml, load_config, to_dict
from distrl.errors import ConfigError, DistrlError

# The training loop (distrl.driver) builds the PPO learner only; a DQN space can be checked
# (--dry-run) but not run until the DQN path lands.
RUNNABLE_ALGOS = ("ppo",)
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
    "learner/kl",
    "learner/kl_coef",
    "learner/skipped_updates",
    "learner/early_stopped",
    "learner/version",
    "learner/tokens_per_s",
    "rollout/tokens_per_s",
    "rollout/response_length",
    "rollout/policy_lag",
    "time/rollout_wait_s",
    "time/generate_s",
    "time/score_s",
    "time/train_s",
    "time/learn_s",
    "time/publish_s",
    "time/iteration_s",
    "faults/stale_batches",
    "faults/dropped_samples",
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
    if config.algo == "dqn":
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
    """``summary.csv`` (one row per trial) and ``summary.png`` (best metric per trial, and the
    best metric against each parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    best_key = f"best_{space.metric}"
    n = 1 + len(space.params)
    cols = min(n, 3)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(4.5 * cols, 3.6 * ((n + cols - 1) // cols))
    )
    axes = list(getattr(axes, "flat", [axes]))
    ok = [r for r in rows if r[best_key] is not None]
    colours = {"finished": "tab:blue", "stopped": "tab:orange", "error": "tab:red"}
    axes[0].bar(range(len(ok)), [r[best_key] for r in ok], color=[colours[r["status"]] for r in ok])
    axes[0].set_xticks(range(len(ok)), [r["trial"].split("_")[-1] for r in ok], rotation=90)
    axes[0].set_title(f"best {space.metric} per trial ({space.mode})")
    for ax, p in zip(axes[1:], space.params):
        ax.scatter([r[p.path] for r in ok], [r[best_key] for r in ok])
        if p.log:
            ax.set_xscale("log")
        ax.set_xlabel(p.path)
        ax.set_ylabel(space.metric)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out_dir / "summary.png", dpi=100)
    plt.close(fig)


def best_config(rows: list[dict[str, Any]], space: Space, config: RunConfig) -> RunConfig | None:
    """The base config with the values of the trial with the best metric (None if none has one)."""
    key = f"best_{space.metric}"
    scored = [r for r in rows if r[key] is not None]
    if not scored:
        return None
    pick = max if space.mode == "max" else min
    best = pick(scored, key=lambda r: r[key])
    return with_values(config, {p.path: best[p.path] for p in space.params})


# ---- Ray Tune --------------------------------------------------------------------------------


def run_trial(
    search: dict[str, float], *, space: Space, config: RunConfig, exp_dir: str, cwd: str
) -> None:
    """One Tune trial: ``distrl.driver.train`` with the trial's values, in the trial's folder.

    The distrl run directory is ``<exp_dir>/<trial>/distrl``, on the sweep's storage, so a
    restored trial resumes from its own newest checkpoint (or Tune's copy of it).
    """
    from ray import tune

    from distrl.driver import train

    if os.path.isdir(cwd):  # Tune moved us to a scratch folder; relative config paths need this
        os.chdir(cwd)
    run_dir = Path(exp_dir) / trial_dirname(tune.get_context().get_trial_id()) / "distrl"
    values = space.real_values(search)
    trial_config = with_values(
        config,
        {
            **values,
            "output.dir": str(run_dir),
            "output.progress": False,
            "output.tensorboard": False,  # Tune writes the same metrics to TensorBoard
        },
    )
    _adopt_tune_checkpoint(tune.get_checkpoint(), run_dir / "checkpoints")
    params = {f"params/{k}": float(v) for k, v in values.items()}
    latest: dict[str, float] = {space.metric: math.nan}

    def report(step: int, metrics: dict[str, float], saved: Path | None) -> None:
        # Evaluation metrics keep their last value between evaluations (NaN before the first):
        # Tune needs the metric in every result.
        latest.update(metrics)
        checkpoint = tune.Checkpoint.from_directory(str(saved)) if saved else None
        tune.report({**latest, **params, "step": step}, checkpoint=checkpoint)

    train(trial_config, resume=True, report=report)


def _adopt_tune_checkpoint(checkpoint: Any, root: Path) -> None:
    """Put Tune's restored checkpoint into the run's checkpoints when it is newer than theirs."""
    if checkpoint is None:
        return
    import shutil

    from distrl.checkpoint import MARKER, latest_checkpoint, verify_checkpoint, write_checkpoint

    with checkpoint.as_directory() as folder:
        meta = verify_checkpoint(Path(folder))
        mine = latest_checkpoint(root)
        if mine is not None and verify_checkpoint(mine)["step"] >= meta["step"]:
            return

        def copy(tmp: Path) -> None:
            for item in Path(folder).iterdir():
                if item.name != MARKER:
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)

        write_checkpoint(root, f"step_{meta['step']}", copy, meta=meta)


def trial_dirname(trial_id: str) -> str:
    """A trial's folder name: short and free of searched values (which are transformed)."""
    return f"trial_{trial_id}"


def _searcher(metric: str, mode: str, random_steps: int, seed: int) -> Any:
    from ray.tune.search.bayesopt import BayesOptSearch

    class Searcher(BayesOptSearch):
        """BayesOpt that replaces a failed random-phase trial with another random one.

        BayesOptSearch waits for all its random trials to complete before fitting; a failed one
        never completes, which would stall the sweep.
        """

        def on_trial_complete(self, trial_id: str, result: Any = None, error: bool = False):
            random_phase = len(self._buffered_trial_results) < self.random_search_trials
            if (error or result is None) and trial_id in self._live_trial_mapping and random_phase:
                self._total_random_search_trials -= 1
            super().on_trial_complete(trial_id, result, error)

    return Searcher(
        metric=metric, mode=mode, random_search_steps=random_steps, random_state=seed, verbose=0
    )


def run_sweep(
    space: Space,
    config: RunConfig,
    exp_dir: Path,
    *,
    num_samples: int,
    max_concurrent: int,
    scheduler: str = "fifo",
    random_steps: int | None = None,
    trial_cpus: float = 0.5,
    resume: bool = False,
) -> Any:
    """Run (or, with ``resume``, continue) the sweep in ``exp_dir``; returns Tune's ResultGrid.

    Ray must be initialised (``distrl.driver.init_ray``).
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    # Each distrl checkpoint makes Tune snapshot the experiment (num_to_keep=1), which it
    # would report as "excessive"; local snapshots are cheap.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial, space=space, config=config, exp_dir=str(exp_dir), cwd=os.getcwd()
        ),
        tune.PlacementGroupFactory(trial_bundles(config, trial_cpus)),
    )
    if resume:
        tuner = tune.Tuner.restore(
            str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=False
        )
        return tuner.fit()
    steps = random_steps if random_steps is not None else min(10, max(1, num_samples // 2))
    asha = None
    if scheduler == "asha":
        grace = config.output.eval_every if space.metric.startswith("eval/") else 1
        asha = ASHAScheduler(
            time_attr="training_iteration", max_t=config.iterations, grace_period=grace
        )
    tuner = tune.Tuner(
        trainable,
        param_space={p.key: tune.uniform(*p.bounds()) for p in space.params},
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            search_alg=ConcurrencyLimiter(
                _searcher(space.metric, space.mode, steps, config.seed),
                max_concurrent=max_concurrent,
            ),
            scheduler=asha,
            num_samples=num_samples,
            trial_dirname_creator=lambda trial: trial_dirname(trial.trial_id),
        ),
        run_config=tune.RunConfig(
            name=exp_dir.name,
            storage_path=str(exp_dir.parent),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        ),
    )
    return tuner.fit()


# ---- command line ----------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    """Sweep options plus one flag per config field (applied to the space's base config)."""
    p = argparse.ArgumentParser(
        prog="python -m distrl.tune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--space", metavar="YAML", help="search-space file (tune_spaces/*.yaml)")
    p.add_argument("--num-samples", type=int, default=16, metavar="N", help="trials (16)")
    p.add_argument("--max-concurrent", type=int, default=2, metavar="K", help="trials at once (2)")
    p.add_argument(
        "--scheduler",
        choices=["fifo", "asha"],
        default="fifo",
        help="asha stops poor trials early (after output.eval_every iterations for eval/ "
        "metrics); fifo runs every trial to the end (default)",
    )
    p.add_argument(
        "--random-steps",
        type=int,
        metavar="N",
        help="random trials before BayesOpt fits its model (default: num-samples/2, at most 10)",
    )
    p.add_argument(
        "--trial-cpus",
        type=float,
        default=0.5,
        metavar="CPUS",
        help="CPUs reserved for each trial's own process, besides its actors (0.5)",
    )
    p.add_argument("--name", help="experiment name (default: <space>-<timestamp>)")
    p.add_argument(
        "--storage",
        default="runs/tune",
        metavar="DIR",
        help="results root; a shared filesystem on a multi-node cluster (runs/tune)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep <storage>/<name> with its saved space and config",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="check the space and config, print them, exit"
    )
    cli.add_config_arguments(p)
    for action in p._actions:
        if action.dest == "config":
            action.default = None
            action.help = "base config, overriding the space file's 'base'"
    return p


def base_config(space: Space, args: argparse.Namespace) -> RunConfig:
    """The space's base config (or --config), its overrides, then the dotted flags."""
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    source = args.config or space.base
    try:
        load_config(source, space.overrides)
    except ConfigError as exc:
        raise ConfigError(f"{space.file}: base {source} with its overrides: {exc}") from None
    for param in space.params:
        if param.path in flags or param.path in space.overrides:
            raise ConfigError(f"{param.path} is both searched and set to a fixed value")
    return load_config(source, {**space.overrides, **flags})


def load_sweep(args: argparse.Namespace) -> tuple[Space, RunConfig, Path]:
    """Space, base config and experiment folder: from the files and flags, or (--resume) as
    saved in the experiment."""
    storage = Path(args.storage).resolve()
    if args.resume:
        if not args.name:
            raise ConfigError("--resume needs --name, the sweep to continue")
        saved_file = storage / args.name / SWEEP_FILE
        if not saved_file.is_file():
            raise ConfigError(f"--resume: {saved_file} does not exist; no sweep there")
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
        params = tuple(Param(**x) for x in saved["space"].pop("params"))
        space = Space(**saved["space"], params=params)
        return space, build(RunConfig, saved["config"]), storage / args.name
    if not args.space:
        raise ConfigError("--space is required (e.g. --space tune_spaces/ppo.yaml)")
    space = read_space(args.space)
    config = base_config(space, args)
    space = check_space(space, config)
    name = args.name or f"{Path(space.file).stem}-{datetime.now():%Y%m%d-%H%M%S}"
    exp_dir = storage / name
    if exp_dir.exists() and any(exp_dir.iterdir()) and not args.dry_run:
        raise ConfigError(f"{exp_dir} already exists; --resume continues it, or pick --name")
    return space, config, exp_dir


def save_sweep(space: Space, config: RunConfig, exp_dir: Path) -> None:
    """Keep what --resume needs in the experiment folder."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "space": {
            **dataclasses.asdict(space),
            "params": [dataclasses.asdict(p) for p in space.params],
        },
        "config": to_dict(config),
    }
    (exp_dir / SWEEP_FILE).write_text(yaml.safe_dump(state, sort_keys=False), encoding="utf-8")


def start_ray(config: RunConfig, bundles: list[dict[str, float]]) -> None:
    """Start or attach to Ray; an embedded local Ray must fit one trial (a cluster may scale)."""
    import ray

    from distrl.driver import init_ray

    local = not ray.is_initialized() and not (
        config.resources.address or os.environ.get("RAY_ADDRESS")
    )
    init_ray(config)
    need, have = sum(b.get("CPU", 0.0) for b in bundles), ray.cluster_resources().get("CPU", 0)
    if local and need > have:
        raise DistrlError(
            f"a trial reserves {need:g} CPUs {bundles} but this local Ray has {have:g}; lower "
            "--trial-cpus or resources.*_cpus, or raise resources.num_cpus"
        )


def main(argv: list[str] | None = None) -> int:
    """Check everything before Ray starts, run the sweep, write and print the summary."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        cli.parse_config(p, argv)  # raises its error naming the flag and its closest spelling
    if args.num_samples < 1 or args.max_concurrent < 1 or args.trial_cpus < 0:
        raise ConfigError("--num-samples and --max-concurrent must be >= 1, --trial-cpus >= 0")
    if "://" in args.storage:
        raise ConfigError("--storage must be a directory (a shared filesystem on a cluster)")
    space, config, exp_dir = load_sweep(args)
    print(f"distrl.tune: {space.mode} {space.metric} of {config.algo} runs over:", flush=True)
    for param in space.params:
        kind = f"{'log ' if param.log else ''}{param.type}"
        print(f"  {param.path}: [{param.low}, {param.high}] {kind}", flush=True)
    if args.dry_run:
        return 0
    if config.algo not in RUNNABLE_ALGOS:
        raise DistrlError(
            f"algo {config.algo} is not implemented yet: the training loop runs "
            f"{', '.join(RUNNABLE_ALGOS)} only, so this sweep cannot start"
        )
    if not args.resume:
        save_sweep(space, config, exp_dir)
    start_ray(config, trial_bundles(config, args.trial_cpus))
    results = run_sweep(
        space,
        config,
        exp_dir,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        scheduler=args.scheduler,
        random_steps=args.random_steps,
        trial_cpus=args.trial_cpus,
        resume=args.resume,
    )
    return summarize(results, space, config, exp_dir)


def summarize(results: Any, space: Space, config: RunConfig, exp_dir: Path) -> int:
    """Write summary.csv, summary.png and best_config.yaml into ``exp_dir``; print the best."""
    rows = trial_rows(results, space, config.iterations)
    write_summary(rows, space, exp_dir)
    print(f"distrl.tune: {len(rows)} trials; summary in {exp_dir / 'summary.csv'}", flush=True)
    print(f"distrl.tune: curves: tensorboard --logdir {exp_dir}", flush=True)
    best = best_config(rows, space, config)
    if best is None:
        print(f"distrl.tune: no trial reported {space.metric}; see summary.csv", file=sys.stderr)
    else:
        dump_yaml(best, exp_dir / "best_config.yaml")
        print(f"distrl.tune: best config ({exp_dir / 'best_config.yaml'}):", flush=True)
        print((exp_dir / "best_config.yaml").read_text(encoding="utf-8"), flush=True)
    if results.num_terminated + results.num_errors < len(results):
        print(
            "distrl.tune: interrupted; continue with: python -m distrl.tune --resume "
            f"--name {exp_dir.name} --storage {exp_dir.parent}",
            file=sys.stderr,
        )
        return 130
    return 0 if best is not None else 1


if __name__ == "__main__":
    cli.run_main(main)
