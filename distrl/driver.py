"""The driver loop: rollout -> score -> learn -> publish -> log -> checkpoint, each stage timed.

Only this module (and the actor pools it uses) calls ``ray.get``. Everything the user can get
wrong (config, data, tokenizer, reward functions) is checked before Ray starts.
"""

from __future__ import annotations

import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray

from distrl import actors
from distrl.checkpoint import (
    latest_checkpoint,
    prune_checkpoints,
    verify_checkpoint,
    write_checkpoint,
)
from distrl.config import RunConfig, dump_yaml
from distrl.data import Example, load_examples, split
from distrl.errors import DistrlError
from distrl.learner import Learner, NonFiniteError
from distrl.metrics import MetricsLogger, format_progress
from distrl.policy import build_tokenizer, encode_prompts
from distrl.rewards import RewardBatch, ScoreResult, check_reward_config
from distrl.rollout import RolloutWorker, Trajectories

Report = Callable[[int, dict[str, float], "Path | None"], None]
# Reference responses feed the optional cross-entropy term and eval perplexity; a bound keeps
# one very long reply from setting the padded width (and memory) of a whole batch.
MAX_REFERENCE_TOKENS = 256
PROGRESS_KEYS = ["reward/total", "learner/kl", "eval/reward", "rollout/tokens_per_s"]


@dataclass
class Prompts:
    """Encoded prompts with the examples they came from, served in shuffled epochs."""

    examples: list[Example]
    ids: list[list[int]]
    references: list[list[int]]
    seed: int
    epoch: int = 0
    cursor: int = 0
    order: list[int] = field(default_factory=list)

    def next(self, n: int) -> list[int]:
        """Indices of the next ``n`` prompts (reshuffled each epoch, reproducibly)."""
        out = []
        while len(out) < n:
            if self.cursor == 0 or not self.order:
                self.order = list(range(len(self.ids)))
                random.Random(self.seed + self.epoch).shuffle(self.order)
            out.append(self.order[self.cursor])
            self.cursor += 1
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state(self) -> dict[str, int]:
        """Position in the prompt stream, for checkpoints."""
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load(self, state: dict[str, int]) -> None:
        """Continue from ``state()``."""
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.order = []
        if self.cursor:
            self.order = list(range(len(self.ids)))
            random.Random(self.seed + self.epoch).shuffle(self.order)


def prepare(config: RunConfig) -> tuple[Prompts, Prompts]:
    """Check rewards, read and encode data, before any actor starts: (train, validation)."""
    check_reward_config(config.reward)
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    examples = load_examples(config.data.train, limit=config.data.max_examples)
    if config.data.validation:
        train, val = examples, load_examples(config.data.validation)
    else:
        train, val = split(examples, val_fraction=config.data.val_fraction, seed=config.seed)
    if not val:
        # Said out loud: evaluating on training prompts measures fit, not generalisation.
        warnings.warn(
            "no held-out prompts (data.val_fraction is 0 and data.validation is empty): "
            "eval/* metrics use the first training prompts",
            stacklevel=2,
        )
        val = train[: config.output.eval_examples]

    def encode(part: list[Example]) -> Prompts:
        ids = encode_prompts(part, tokenizer, config.tokenizer, config.data)
        refs = [
            tokenizer.encode(e.reference)[:MAX_REFERENCE_TOKENS] if e.reference else []
            for e in part
        ]
        return Prompts(part, ids, refs, seed=config.seed)

    return encode(train), encode(val)


def run_dir_for(config: RunConfig) -> Path:
    """The run directory: ``output.dir`` or ``./runs/<algo>-<timestamp>``."""
    if config.output.dir:
        return Path(config.output.dir)
    return Path("runs") / f"{config.algo}-{datetime.now():%Y%m%d-%H%M%S}"


def init_ray(config: RunConfig) -> None:
    """Attach to a running cluster (``resources.address``, or RAY_ADDRESS inside ``ray job
    submit``) or start an embedded local Ray; local-only options never go to a cluster."""
    if ray.is_initialized():
        return
    address = config.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(
            address="local",
            num_cpus=config.resources.num_cpus,
            object_store_memory=config.resources.object_store_memory,
        )


def reward_batch(prompts: Prompts, batch: Trajectories) -> RewardBatch:
    """What the reward pool scores for a batch: prompt, response and the example's labels."""
    examples = [prompts.examples[i] for i in batch.example_ids]
    return RewardBatch.from_examples(examples, [str(t) for t in batch.texts])


class Trainer:
    """Owns the actors of one PPO run and steps the training loop (``QTrainer``: DQN)."""

    learner_class: type = Learner
    worker_class: type = RolloutWorker
    progress_keys = PROGRESS_KEYS

    def __init__(self, config: RunConfig, run_dir: Path, train: Prompts, val: Prompts) -> None:
        self.config, self.run_dir, self.train_prompts, self.val = config, run_dir, train, val
        res = config.resources
        self.learner = actors.make_actor(
            self.learner_class,
            actors.actor_options(res.learner_cpus, res.learner_gpus, res.custom.get("learner")),
            **self.learner_class.arguments(config),
        )
        self.workers = [
            actors.make_actor(
                self.worker_class,
                actors.actor_options(res.rollout_cpus, res.rollout_gpus, res.custom.get("rollout")),
                **self.worker_class.arguments(config, worker_index=i),
            )
            for i in range(config.rollout.num_workers)
        ]
        self.version = 0
        self.in_flight: dict[int, ray.ObjectRef] = {}
        self.extra_actors: list[ray.actor.ActorHandle] = []  # e.g. DQN's replay buffer
        self.pool = actors.RewardPool(config.reward, res, seed=config.seed)
        self.step = 0
        self.reward_restarts = 0  # counted before a resume
        self.best = -float("inf")
        self.faults = {
            "faults/stale_batches": 0,
            "faults/dropped_samples": 0,
            "faults/reward_actor_restarts": 0,
        }

    # ---- stages ------------------------------------------------------------------------

    def publish(self) -> int:
        """Put the learner's weights in the object store once; every worker loads that object."""
        weights_ref = self.learner.weights.remote()
        versions = actors.get([w.set_weights.remote(weights_ref) for w in self.workers])
        return max(versions)

    def submit(self, worker: ray.actor.ActorHandle) -> ray.ObjectRef:
        """Start a rollout on ``worker`` with the next prompts."""
        idx = self.train_prompts.next(self.config.rollout.batch_size)
        prompts = [self.train_prompts.ids[i] for i in idx]
        return worker.generate.remote(prompts, idx, **self.generate_options())

    def generate_options(self) -> dict[str, float]:
        """Extra keyword arguments of ``generate`` (DQN: the current epsilon)."""
        return {}

    def start(self) -> None:
        """Publish the first weights and start a rollout on every worker."""
        self.version = self.publish()
        self.in_flight = {i: self.submit(w) for i, w in enumerate(self.workers)}

    def collect(self) -> list[Trajectories]:
        """Each worker's finished batch, resubmitting ahead when ``max_policy_lag`` allows."""
        cfg = self.config
        parts = []
        for i, w in enumerate(self.workers):
            batch = actors.get(self.in_flight[i])
            while self.version - batch.version > cfg.rollout.max_policy_lag:
                # A restarted worker comes back with its initial weights: resend, redo.
                self.faults["faults/stale_batches"] += 1
                actors.get(w.set_weights.remote(self.learner.weights.remote()))
                batch = actors.get(self.submit(w))
            parts.append(batch)
            if cfg.rollout.max_policy_lag > 0:
                self.in_flight[i] = self.submit(w)  # generate the next batch while we learn
        return parts

    def score(self, parts: list[Trajectories]) -> tuple[Trajectories, ScoreResult]:
        """Score the joined batch; counts the samples the reward pool dropped."""
        batch = Trajectories.concat(parts)
        scores = self.pool.score(reward_batch(self.train_prompts, batch))
        self.faults["faults/dropped_samples"] += scores.num_dropped
        self.faults["faults/reward_actor_restarts"] = self.reward_restarts + self.pool.restarts
        return batch, scores

    def iterate(self) -> dict[str, float]:
        """One PPO iteration: rollout -> score -> learn -> publish; returns its metrics."""
        t0 = time.perf_counter()
        parts = self.collect()
        t1 = time.perf_counter()
        batch, scores = self.score(parts)
        t2 = time.perf_counter()
        kept = np.flatnonzero(~scores.dropped)  # reward.on_error=drop: train on the rest
        batch = batch.select(kept)
        refs = [self.train_prompts.references[i] for i in batch.example_ids]
        metrics = actors.get(self.learner.train.remote(batch, scores.total[kept], refs))
        t3 = time.perf_counter()
        self.version = self.publish()
        if self.config.rollout.max_policy_lag == 0:
            self.in_flight = {i: self.submit(w) for i, w in enumerate(self.workers)}
        metrics.update(self.rollout_metrics(parts, batch, self.version))
        metrics.update(scores.metrics())
        metrics.update(
            {
                "time/rollout_wait_s": t1 - t0,
                "time/score_s": t2 - t1,
                "time/train_s": t3 - t2,
                "time/publish_s": time.perf_counter() - t3,
            }
        )
        return metrics

    def run(self, logger: MetricsLogger, progress: bool, report: Report | None = None) -> None:
        """Train from ``self.step`` to ``config.iterations``; ``report`` sees every iteration."""
        from tqdm import tqdm

        cfg = self.config
        self.start()
        bar = tqdm(
            total=cfg.iterations,
            initial=self.step,
            disable=not progress,
            desc=f"distrl {cfg.algo}",
            unit="it",
            dynamic_ncols=True,
        )
        while self.step < cfg.iterations:
            t0 = time.perf_counter()
            try:
                metrics = self.iterate()
            except NonFiniteError as err:
                # The skipped updates left the weights as they were: save them and say where.
                done = self.run_dir / "checkpoints" / f"step_{self.step}"
                saved = (done if done.is_dir() else self.checkpoint({})) if self.step else None
                where = f"; the last good state (step {self.step}) is in {saved}" if saved else ""
                raise NonFiniteError(f"{err}{where}; fix the cause and --resume") from None
            self.step += 1
            metrics.update({"time/iteration_s": time.perf_counter() - t0, **self.faults})
            if cfg.output.eval_every and self.step % cfg.output.eval_every == 0:
                metrics.update(self.evaluate())
            logger.log(self.step, metrics)
            saved = None
            if self.step % cfg.output.checkpoint_every == 0 or self.step == cfg.iterations:
                saved = self.checkpoint(metrics)
            if report is not None:
                report(self.step, metrics, saved)
            bar.set_postfix_str(format_progress(metrics, self.progress_keys))
            if not progress:  # job logs (ray job logs) still get one line per iteration
                print(f"step {self.step}/{cfg.iterations} {bar.postfix}", flush=True)
            bar.update(1)
        bar.close()
        actors.get(list(self.in_flight.values()))  # let the last rollouts finish

    def rollout_metrics(
        self, parts: list[Trajectories], batch: Trajectories, version: int
    ) -> dict[str, float]:
        """Rollout throughput, response length and policy lag of an iteration's batches."""
        gen_s = max(p.seconds for p in parts)
        return {
            "rollout/tokens_per_s": batch.num_tokens / max(gen_s, 1e-9),
            "rollout/response_length": float(batch.response_mask.sum(1).mean()),
            "rollout/policy_lag": float(version - 1 - batch.version),
            "time/generate_s": gen_s,
        }

    def evaluate(self) -> dict[str, float]:
        """Greedy generations on held-out prompts: mean reward; reference accuracy/perplexity."""
        n = min(self.config.output.eval_examples, len(self.val.ids))
        idx = list(range(n))
        batch = actors.get(
            self.workers[0].generate.remote([self.val.ids[i] for i in idx], idx, greedy=True)
        )
        scores = self.pool.score(reward_batch(self.val, batch))
        out = {k.replace("reward/", "eval/reward_"): v for k, v in scores.metrics().items()}
        out["eval/reward"] = out.pop("eval/reward_total")
        out.update(
            actors.get(
                self.learner.reference_metrics.remote(
                    [self.val.ids[i] for i in idx], [self.val.references[i] for i in idx]
                )
            )
        )
        return out

    def shutdown(self) -> None:
        """Stop this run's actors (a shared Ray session, as in tests, stays up)."""
        for actor in [self.learner, *self.workers, *self.extra_actors]:
            ray.kill(actor, no_restart=True)
        self.pool.shutdown()

    # ---- checkpoints -------------------------------------------------------------------

    def checkpoint(self, metrics: dict[str, float]) -> Path:
        """Write ``step_<N>`` (and ``best``/``final``) atomically, then prune old ones."""
        root = self.run_dir / "checkpoints"
        extra = self.state()
        meta = {
            "step": self.step,
            "metrics": {
                k: v for k, v in metrics.items() if isinstance(v, float) and np.isfinite(v)
            },
        }

        def write(tmp: Path) -> None:
            actors.get(self.learner.save.remote(str(tmp), extra))
            self.save_extra(tmp)

        path = write_checkpoint(root, f"step_{self.step}", write, meta=meta)
        reward = metrics.get("eval/reward")
        if reward is not None and reward > self.best:
            self.best = reward
            write_checkpoint(root, "best", lambda tmp: _copy(path, tmp), meta=meta)
        if self.step == self.config.iterations:
            write_checkpoint(self.run_dir, "final", lambda tmp: _copy(path, tmp), meta=meta)
        prune_checkpoints(root, self.config.output.keep_checkpoints)
        return path

    def restore(self) -> bool:
        """Continue from the newest complete ``step_<N>``; False when there is none."""
        path = latest_checkpoint(self.run_dir / "checkpoints")
        if path is None:
            return False
        self.load_state(actors.get(self.learner.load.remote(str(path))))
        self.restore_extra(path)
        return True

    def state(self) -> dict[str, Any]:
        """The driver's share of a checkpoint: step, prompt position, best reward, faults."""
        return {
            "step": self.step,
            "prompts": self.train_prompts.state(),
            "best": self.best,
            "faults": self.faults,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``."""
        self.step, self.best = int(state["step"]), float(state["best"])
        self.train_prompts.load(state["prompts"])
        self.faults.update(state.get("faults", {}))
        self.reward_restarts = int(self.faults["faults/reward_actor_restarts"])

    def save_extra(self, folder: Path) -> None:
        """Write what else a checkpoint needs besides the learner's state (DQN: replay)."""

    def restore_extra(self, folder: Path) -> None:
        """Restore what ``save_extra`` wrote."""


def _copy(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.name != "distrl_checkpoint.json":
            shutil.copy2(item, dst / item.name)


def train(config: RunConfig, *, resume: bool = False, report: Report | None = None) -> Path:
    """Run (or resume) training as configured; returns the run directory.

    Args:
        config: the validated run config.
        resume: continue from the newest complete checkpoint in the run directory.
        report: called as ``report(step, metrics, checkpoint_or_None)`` after every iteration
            (Ray Tune trials pass the metrics on with ``tune.report``).
    """
    train_prompts, val_prompts = prepare(config)
    run_dir = run_dir_for(config).resolve()
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise DistrlError(
            f"output directory {run_dir} is not empty; pass --resume to continue "
            f"that run or choose another --output-dir"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(config, run_dir / "config.yaml")
    except OSError as exc:
        raise DistrlError(f"cannot write to output directory {run_dir}: {exc}") from None
    init_ray(config)
    trainer_class = Trainer
    if config.algo == "dqn":
        from distrl.qtrainer import QTrainer

        trainer_class = QTrainer
    trainer = trainer_class(config, run_dir, train_prompts, val_prompts)
    if not actors.get(trainer.learner.sees.remote(str(run_dir / "config.yaml"))):
        trainer.shutdown()
        raise DistrlError(
            f"the learner's node cannot see {run_dir}: on a multi-node cluster "
            f"output.dir must be on storage the head and the learner share"
        )
    resumed = resume and trainer.restore()
    logger = MetricsLogger(
        run_dir, tensorboard=config.output.tensorboard, plots=config.output.plots, resume=resumed
    )
    if resumed:
        logger.truncate_after(trainer.step)
        print(f"distrl: resuming {run_dir} at step {trainer.step}", flush=True)
    try:
        trainer.run(logger, progress=config.output.progress, report=report)
    finally:
        if config.output.plots:
            logger.plot()
        logger.close()
        trainer.shutdown()
    verify_checkpoint(run_dir / "final")
    print(f"distrl: finished {trainer.step} iterations; outputs in {run_dir}", flush=True)
    return run_dir
