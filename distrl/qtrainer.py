"""The DQN loop (``--algo dqn``): Ape-X for language models.

Rollout workers act with Q-guided decoding and explore; the reward pool scores their responses;
the driver turns them into n-step token transitions with initial priorities from the workers'
own Q-values and adds them to the replay actor; the learner runs ``dqn.updates_per_iteration``
TD steps on prioritized samples, sending new priorities straight back to the replay actor; the
new Q-network weights are published. Checkpoints hold the replay buffer as Parquet.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from distrl import actors
from distrl.algos import dqn
from distrl.config import RunConfig
from distrl.errors import DistrlError
from distrl.loop import Trainer
from distrl.prompts import Prompts
from distrl.qlearner import QLearner
from distrl.qrollout import QRolloutWorker, make_transitions
from distrl.replay import replay_spec

REPLAY_FILE = "replay.parquet"


class QTrainer(Trainer):
    """``Trainer`` with a Q-learner, Q-guided rollout workers and a replay-buffer actor."""

    learner_class = QLearner
    worker_class = QRolloutWorker
    progress_keys = ["reward/total", "learner/td_loss", "eval/reward", "replay/size"]

    def __init__(self, config: RunConfig, run_dir: Path, train: Prompts, val: Prompts) -> None:
        super().__init__(config, run_dir, train, val)
        self.replay = self.make_replay()
        self.updates = 0  # learner update calls made (the epsilon schedule's clock)
        self.width = config.data.max_prompt_tokens + config.rollout.max_new_tokens

    def make_replay(self) -> ray.actor.ActorHandle:
        """A new, empty replay-buffer actor, never restarted by Ray (``recover`` restores it)."""
        res = self.config.resources
        cls, kwargs = replay_spec(self.config.replay, seed=self.config.seed)
        options = actors.actor_options(
            res.replay_cpus, 0.0, res.custom.get("replay"), **actors.STATEFUL
        )
        return actors.make_actor(cls, options, **kwargs)

    def stateful(self) -> dict[str, ray.actor.ActorHandle]:
        """The learner and the replay buffer."""
        return {**super().stateful(), "replay": self.replay}

    def replace_stateful(self, role: str) -> None:
        """A new learner or replay buffer (its state comes from a checkpoint next)."""
        if role == "replay":
            self.replay = self.make_replay()
        else:
            super().replace_stateful(role)

    def generate_options(self) -> dict[str, float]:
        """The scheduled epsilon for the next rollouts."""
        d = self.config.dqn
        return {
            "epsilon": dqn.epsilon(
                step=self.updates,
                start=d.epsilon_start,
                end=d.epsilon_end,
                decay_steps=d.epsilon_decay_steps,
            )
        }

    def iterate(self) -> dict[str, float]:
        """Rollout -> score -> transitions into replay -> TD updates -> publish."""
        cfg, d = self.config, self.config.dqn
        t0 = time.perf_counter()
        epsilon = self.generate_options()["epsilon"]
        parts = self.collect()
        t1 = time.perf_counter()
        batch, scores = self.score(parts)
        t2 = time.perf_counter()
        rewards = np.where(scores.dropped, np.nan, scores.total)
        added, start = [], 0
        for part in parts:
            n = len(part.example_ids)
            columns, priorities = make_transitions(
                part,
                rewards[start : start + n],
                gamma=d.gamma,
                n_step=d.n_step,
                width=self.width,
                shaping=d.reward_shaping,
            )
            added.append(self.replay.add.remote(columns, priorities))
            start += n
        self.wait_stateful("replay", added)
        size = self.wait_stateful("replay", self.replay.stats.remote())["replay/size"]
        learner_metrics: list[dict[str, float]] = []
        if size >= max(d.learning_starts, 1):
            outs, applied = [], []
            for _ in range(d.updates_per_iteration):
                sample = self.replay.sample.remote(d.batch_size)
                ids, td, metrics = self.learner.update.options(num_returns=3).remote(sample)
                # Runs in order, before the next sample; its result is awaited below so that a
                # failure surfaces here instead of in a log.
                applied.append(self.replay.update_priorities.remote(ids, td))
                outs.append(metrics)
            learner_metrics = self.wait_stateful("learner", outs)
            self.wait_stateful("replay", applied)
            self.updates += d.updates_per_iteration
        t3 = time.perf_counter()
        self.version = self.publish()
        if cfg.rollout.max_policy_lag == 0:
            self.in_flight = {i: self.submit(w) for i, w in enumerate(self.workers)}
        metrics: dict[str, float] = {}
        keys = {k for m in learner_metrics for k in m}
        for k in keys:
            values = [m[k] for m in learner_metrics if k in m]
            total = k == "learner/skipped_updates"
            metrics[k] = float(np.sum(values) if total else np.mean(values))
        metrics.update(self.wait_stateful("replay", self.replay.stats.remote()))
        metrics.update(self.rollout_metrics(parts, batch, self.version))
        metrics.update(scores.metrics())
        if d.exploration == "epsilon":
            metrics["explore/epsilon"] = epsilon
        if d.exploration == "ucb":
            metrics["explore/ucb_bonus"] = float(np.mean([p.ucb_bonus for p in parts]))
        metrics.update(
            {
                "learner/updates": float(self.updates),
                "time/rollout_wait_s": t1 - t0,
                "time/score_s": t2 - t1,
                "time/train_s": t3 - t2,
                "time/publish_s": time.perf_counter() - t3,
            }
        )
        if cfg.replay.snapshot_every and (self.step + 1) % cfg.replay.snapshot_every == 0:
            path = str(self.run_dir / REPLAY_FILE)
            self.wait_stateful("replay", self.replay.save_parquet.remote(path))
        return metrics

    def state(self) -> dict[str, Any]:
        """``Trainer.state`` plus the update count."""
        return {**super().state(), "updates": self.updates}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``."""
        super().load_state(state)
        self.updates = int(state.get("updates", 0))

    def save_extra(self, folder: Path) -> None:
        """The replay buffer, as a Parquet snapshot inside the checkpoint."""
        self.wait_stateful("replay", self.replay.save_parquet.remote(str(folder / REPLAY_FILE)))

    def restore_extra(self, folder: Path | None) -> None:
        """Refill the replay buffer from the checkpoint's snapshot (every DQN checkpoint has
        one; a checkpoint without it is not from a DQN run); None: an empty buffer."""
        if folder is None:
            ray.kill(self.replay, no_restart=True)
            self.replay = self.make_replay()
            return
        path = folder / REPLAY_FILE
        if not path.is_file():
            raise DistrlError(f"checkpoint {folder} has no {REPLAY_FILE}: not a DQN checkpoint")
        self.wait_stateful("replay", self.replay.load_parquet.remote(str(path)))
