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

Each trial is one ``distrl.loop.driver.train`` run with its own placement group (a bundle for the
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
import dataclasses
import math
import os
import shutil
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from distrl.config import RunConfig, cli, dump_yaml, load_config
from distrl.config.schema import build, to_dict
from distrl.config.space import (
    SWEEP_FILE,
    Param,
    Space,
    check_space,
    read_space,
    trial_bundles,
    trial_rows,
    with_values,
    write_summary,
)
from distrl.errors import ConfigError, DataError, DistrlError
from distrl.outputs.metrics import METRICS_FILE, read_metrics
from distrl.outputs.plots import plot_history, plot_sweep
from distrl.runtime.checkpoint import latest_checkpoint

BEST_FILE = "best_config.yaml"

# ---- Ray Tune --------------------------------------------------------------------------------


def run_trial(
    search: dict[str, float], *, space: Space, config: RunConfig, exp_dir: str, cwd: str
) -> None:
    """One Tune trial: ``distrl.loop.driver.train`` with the trial's values, in the trial's folder.

    The distrl run directory is ``<exp_dir>/<trial>/distrl``, on the sweep's storage, so a
    restored trial resumes from its own newest checkpoint (or Tune's copy of it).
    """
    from ray import tune

    from distrl.loop.driver import train

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
            # Tune may stop this process at any report (ASHA), before the run could draw its
            # plots: the sweep draws them from metrics.jsonl when the trial ends (TrialPlots).
            "output.plots": False,
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

    # A restored trial resumes from its newest checkpoint; one that died before its first
    # checkpoint has nothing to resume and starts again in an emptied folder.
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    train(trial_config, resume=resume, report=report)


def _adopt_tune_checkpoint(checkpoint: Any, root: Path) -> None:
    """Put Tune's restored checkpoint into the run's checkpoints when it is newer than theirs."""
    if checkpoint is None:
        return
    import shutil

    from distrl.runtime.checkpoint import (
        MARKER,
        latest_checkpoint,
        verify_checkpoint,
        write_checkpoint,
    )

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


def plot_trial(trial_dir: Path) -> list[Path]:
    """Draw a trial's plots (``<trial>/distrl/outputs/plots/``) from its ``metrics.jsonl``, as
    ``distrl.run`` does at the end of a run; returns the PNG files written."""
    run_dir = Path(trial_dir) / "distrl"
    if not (run_dir / METRICS_FILE).is_file():
        return []
    history = read_metrics(run_dir / METRICS_FILE)
    return plot_history(history, run_dir / "plots", title=Path(trial_dir).name)


def _trial_plots(exp_dir: Path) -> Any:
    from ray.tune import Callback

    class TrialPlots(Callback):
        """Draws each trial's plots when it ends: finished, stopped by ASHA or failed."""

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            try:
                plot_trial(exp_dir / trial_dirname(trial.trial_id))
            except (OSError, DataError) as exc:  # plots are not worth stopping a sweep for
                print(f"distrl.tune: no plots for {trial.trial_id}: {exc}", file=sys.stderr)

        on_trial_error = on_trial_complete

    return TrialPlots()


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

    Ray must be initialised (``distrl.loop.driver.init_ray``).
    """
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    # Each distrl checkpoint makes Tune snapshot the experiment (num_to_keep=1), which it
    # would report as "excessive"; local snapshots are cheap.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # No Tune TensorBoard logger: each trial's distrl run writes its own event files (the tags
    # of distrl.run), and Tune's logger would print a hint to its temporary staging folder.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    callbacks = [CSVLoggerCallback(), JsonLoggerCallback()]
    if config.output.plots:
        callbacks.append(_trial_plots(exp_dir))

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
            time_attr="training_iteration",
            metric=space.metric,
            mode=space.mode,
            max_t=config.iterations,
            grace_period=grace,
        )
    tuner = tune.Tuner(
        trainable,
        param_space={p.key: tune.uniform(*p.bounds()) for p in space.params},
        # metric and mode go to the searcher and scheduler only: given here, Tune's console would
        # print its own "Current best trial" (the last result, not distrl's best_trial).
        tune_config=tune.TuneConfig(
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
            callbacks=callbacks,
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

    from distrl.loop.driver import init_ray

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


def best_trial(rows: list[dict[str, Any]], space: Space) -> dict[str, Any] | None:
    """The sweep's best trial: the best ``best_<metric>`` (the best value any of its iterations
    reported); ties go to the better ``last_<metric>``, then to the first trial folder by name.

    ``best_config.yaml``, ``summary.png`` and the printed line all name this trial; None when no
    trial reported the metric.
    """
    best, last = f"best_{space.metric}", f"last_{space.metric}"
    sign = -1.0 if space.mode == "max" else 1.0
    scored = [r for r in rows if r[best] is not None]
    return min(scored, key=lambda r: (sign * r[best], sign * r[last], r["trial"]), default=None)


def summarize(results: Any, space: Space, config: RunConfig, exp_dir: Path) -> int:
    """Write and print the summary of Tune's ResultGrid (``write_results``); the exit code."""
    top = write_results(trial_rows(results, space, config.iterations), space, config, exp_dir)
    if results.num_terminated + results.num_errors < len(results):
        print(
            "distrl.tune: interrupted; continue with: python -m distrl.tune --resume "
            f"--name {exp_dir.name} --storage {exp_dir.parent}",
            file=sys.stderr,
        )
        return 130
    return 0 if top is not None else 1


def write_results(
    rows: list[dict[str, Any]], space: Space, config: RunConfig, exp_dir: Path
) -> dict[str, Any] | None:
    """Write summary.csv, summary.png and best_config.yaml into ``exp_dir`` and print where
    they are and which trial is best (``best_trial``); returns that trial's row."""
    top = best_trial(rows, space)
    write_summary(rows, space, exp_dir)
    params = [(p.path, p.log) for p in space.params]
    plot_sweep(
        rows,
        metric=space.metric,
        mode=space.mode,
        params=params,
        best=top["trial"] if top else None,
        path=exp_dir / "summary.png",
    )
    print(f"distrl.tune: {len(rows)} trials; summary in {exp_dir / 'summary.csv'}", flush=True)
    if config.output.tensorboard:
        print(f"distrl.tune: curves: tensorboard --logdir {exp_dir}", flush=True)
    if top is None:
        print(f"distrl.tune: no trial reported {space.metric}; see summary.csv", file=sys.stderr)
        return None
    dump_yaml(with_values(config, {p: top[p] for p, _ in params}), exp_dir / BEST_FILE)
    values = " ".join(f"{p}={top[p]:.4g}" for p, _ in params)
    print(
        f"distrl.tune: best trial {top['trial']} ({space.mode} {space.metric} "
        f"{top[f'best_{space.metric}']:.4g}): {exp_dir / top['trial']}\n"
        f"distrl.tune: its config ({values}): {exp_dir / BEST_FILE}",
        flush=True,
    )
    return top


if __name__ == "__main__":
    cli.run_main(main)
