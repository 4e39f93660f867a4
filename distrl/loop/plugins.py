"""Algorithms as plug-ins of the one training loop.

An algorithm names its roles (the learner and rollout-worker classes, any other stateful actor)
and supplies the hooks the loop calls, in its order: ``generate_options`` (what a rollout needs
from the algorithm), ``wants_more`` (whether a batch needs another round of rollouts),
``learn`` (scored rounds -> updates -> metrics), and its share of a checkpoint (``state``,
``save``, ``restore``). The loop owns everything else: actors, waits and faults, publication,
logging, evaluation and checkpoints. ``plugin`` picks one by the family of ``config.algo`` in
``distrl.algos.registry``; the maths each uses are pure functions in ``distrl.algos``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from distrl.algos import dqn, pg, registry
from distrl.config import RunConfig
from distrl.dqn.learner import QLearner
from distrl.dqn.replay import replay_spec
from distrl.dqn.rollout import QRolloutWorker, make_transitions, replay_width
from distrl.errors import DistrlError
from distrl.pg.learner import Learner
from distrl.pg.rollout import RolloutWorker, Trajectories
from distrl.rewards import ScoreResult
from distrl.runtime import actors
from distrl.runtime.crew import Crew

REPLAY_FILE = "replay.parquet"
NO_SIGNAL_ITERATIONS = 5  # DQN warns when no reward differed over this many iterations


@dataclass
class Round:
    """One round of rollouts, scored: every worker's batch, joined, with each row's group
    (the rows of one prompt share a group id)."""

    parts: list[Trajectories]
    batch: Trajectories
    scores: ScoreResult
    groups: np.ndarray


def group_rows(parts: list[Trajectories], n: int) -> np.ndarray:
    """Group id of each row of the joined ``parts``: every ``n`` rows of a part, in order, are
    the samples of one prompt (as the loop submits them)."""
    sizes = [len(p.example_ids) // n for p in parts]
    starts = np.cumsum([0, *sizes[:-1]])
    return np.concatenate([s + np.arange(k * n) // n for s, k in zip(starts, sizes)])


class Algorithm:
    """The hooks every algorithm supplies (see the module docstring); defaults do nothing.

    Args:
        config: the run's config.
        crew: the run's actors and the loop's waits.
        run_dir: the run directory.
        references: the reference response (token ids, empty where none) of each training
            example, by example id.
    """

    learner_class: type
    worker_class: type
    progress_keys: list[str]

    def __init__(
        self, config: RunConfig, crew: Crew, *, run_dir: Path, references: list[list[int]]
    ) -> None:
        self.config, self.crew, self.run_dir, self.references = config, crew, run_dir, references

    def actors(self) -> dict[str, ray.actor.ActorHandle]:
        """Stateful actors besides the learner, by role (restored from checkpoints if lost)."""
        return {}

    def replace(self, role: str) -> None:
        """Start a new, empty actor for ``role`` (one of ``actors()``)."""
        raise KeyError(role)

    def generate_options(self) -> dict[str, float]:
        """Extra keyword arguments of the workers' ``generate``."""
        return {}

    def wants_more(self, rounds: list[Round]) -> bool:
        """Whether the batch needs another round of rollouts."""
        return False

    def learn(self, rounds: list[Round], *, step: int) -> dict[str, float]:
        """Update the learner from scored rounds of iteration ``step`` (from 1); metrics."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The algorithm's share of the driver state in a checkpoint."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``."""

    def save(self, folder: Path) -> None:
        """Write what a checkpoint needs besides the learner's state."""

    def restore(self, folder: Path | None) -> None:
        """Restore what ``save`` wrote (None: the state before any step)."""


class PolicyGradient(Algorithm):
    """Every policy-gradient algorithm of the registry (PPO with its value head, the critic-free
    ones): on-policy batches go straight to the learner; DAPO's dynamic sampling and overlong
    shaping are options of all of them."""

    learner_class = Learner
    worker_class = RolloutWorker
    progress_keys = ["reward/total", "learner/kl", "eval/reward", "rollout/tokens_per_s"]

    def target(self) -> int:
        """Completions in one batch."""
        r = self.config.rollout
        return r.batch_size * r.num_workers * r.samples_per_prompt

    def wants_more(self, rounds: list[Round]) -> bool:
        """With dynamic sampling: until enough groups carry signal, within the round limit."""
        p = self.config.ppo
        if not p.dynamic_sampling or len(rounds) >= p.max_sampling_rounds:
            return False
        return int(self.keep(rounds).sum()) < self.target()

    def keep(self, rounds: list[Round]) -> np.ndarray:
        """(B,) rows to learn from: not dropped by the reward pool and, with dynamic sampling,
        in a group whose kept completions did not all score the same (no signal: zero
        advantage; a group left with one completion has none to compare with)."""
        scores = ScoreResult.concat([r.scores for r in rounds])
        keep = ~scores.dropped
        if self.config.ppo.dynamic_sampling:
            rows = np.flatnonzero(keep)
            groups = np.concatenate([r.groups for r in rounds])
            ties = pg.equal_reward_groups(
                scores=torch.from_numpy(scores.total[rows].astype(np.float64)),
                groups=torch.from_numpy(groups[rows]),
            ).numpy()
            keep[rows[ties]] = False
        return keep

    def rows(self, rounds: list[Round]) -> np.ndarray:
        """The rows of the joined rounds to learn from: the kept ones and, with dynamic
        sampling, the oldest whole groups that fill one batch (one round's rows at zero
        advantage when no group had signal)."""
        n = self.config.rollout.samples_per_prompt
        rows = np.flatnonzero(self.keep(rounds))
        if self.config.ppo.dynamic_sampling:
            if len(rows) == 0:  # no group had signal: learn from one round at zero advantage
                dropped = np.concatenate([r.scores.dropped for r in rounds])
                rows = np.flatnonzero(~dropped)[-self.target() :]
            groups = np.concatenate([r.groups for r in rounds])
            first = np.unique(groups[rows])[: self.target() // n]  # whole groups, oldest first
            rows = rows[np.isin(groups[rows], first)]
        return rows

    def learn(self, rounds: list[Round], *, step: int) -> dict[str, float]:
        """One update on ``rows``."""
        p = self.config.ppo
        keep, rows = self.keep(rounds), self.rows(rounds)
        scores = ScoreResult.concat([r.scores for r in rounds])
        groups = np.concatenate([r.groups for r in rounds])
        batch = Trajectories.concat([r.batch for r in rounds]).select(rows)
        penalty = self.overlong(batch)
        refs = [self.references[i] for i in batch.example_ids]
        metrics = self.crew.wait(
            "learner",
            self.crew.learner().train.remote(
                batch, scores.total[rows] + penalty, refs, groups=groups[rows]
            ),
        )
        metrics["sampling/rounds"] = float(len(rounds))
        if p.dynamic_sampling:
            metrics["sampling/kept_fraction"] = float(keep.mean())
        if p.overlong_buffer:
            metrics["reward/overlong_penalty"] = float(np.mean(penalty)) if len(penalty) else 0.0
        return metrics

    def overlong(self, batch: Trajectories) -> np.ndarray:
        """DAPO's overlong penalty (B,) of each response (zeros when ``overlong_buffer`` is 0)."""
        p = self.config.ppo
        lengths = batch.response_mask.sum(1)
        if not p.overlong_buffer:
            return np.zeros(len(lengths))
        penalty = pg.overlong_penalty(
            lengths=torch.from_numpy(lengths),
            max_length=self.config.rollout.max_new_tokens,
            buffer=p.overlong_buffer,
            penalty_factor=p.overlong_penalty,
        )
        return penalty.numpy().astype(np.float64)


class DQN(Algorithm):
    """Token-level DQN, Ape-X style: Q-guided rollout workers explore; the driver turns scored
    responses into n-step transitions with the workers' own priorities, adds them to the replay
    actor, and the learner runs ``dqn.updates_per_iteration`` TD steps on prioritized samples,
    sending new priorities straight back to the replay actor. Checkpoints hold the replay
    buffer as Parquet."""

    learner_class = QLearner
    worker_class = QRolloutWorker
    progress_keys = ["reward/total", "learner/td_loss", "eval/reward", "replay/size"]

    def __init__(
        self, config: RunConfig, crew: Crew, *, run_dir: Path, references: list[list[int]]
    ) -> None:
        super().__init__(config, crew, run_dir=run_dir, references=references)
        self.replay = self.make_replay()
        self.updates = 0  # learner update calls made (the epsilon schedule's clock)
        self.width = replay_width(self.config)
        self.rewards_seen: set[float] = set()  # distinct rewards of the first iterations

    def make_replay(self) -> ray.actor.ActorHandle:
        """A new, empty replay-buffer actor, never restarted by Ray (a loss is restored)."""
        res = self.config.resources
        cls, kwargs = replay_spec(self.config.replay, seed=self.config.seed)
        options = actors.actor_options(
            res.replay_cpus, 0.0, res.custom.get("replay"), **actors.STATEFUL
        )
        return actors.make_actor(cls, options, **kwargs)

    def actors(self) -> dict[str, ray.actor.ActorHandle]:
        """The replay buffer."""
        return {"replay": self.replay}

    def replace(self, role: str) -> None:
        """A new, empty replay buffer."""
        if role != "replay":
            raise KeyError(role)
        self.replay = self.make_replay()

    def epsilon(self) -> float:
        """The scheduled exploration rate."""
        d = self.config.dqn
        return dqn.epsilon(
            step=self.updates,
            start=d.epsilon_start,
            end=d.epsilon_end,
            decay_steps=d.epsilon_decay_steps,
        )

    def generate_options(self) -> dict[str, float]:
        """The scheduled epsilon for the next rollouts."""
        return {"epsilon": self.epsilon()}

    def learn(self, rounds: list[Round], *, step: int) -> dict[str, float]:
        """Transitions into replay -> TD updates with priority feedback; returns metrics."""
        (round_,) = rounds
        d, wait = self.config.dqn, self.crew.wait
        epsilon = self.epsilon()
        rewards = np.where(round_.scores.dropped, np.nan, round_.scores.total)
        columns, priorities = make_transitions(
            round_.batch,
            rewards,
            gamma=d.gamma,
            n_step=d.n_step,
            width=self.width,
            shaping=d.reward_shaping,
        )
        wait("replay", self.replay.add.remote(columns, priorities))
        self.warn_if_no_signal(rewards, step)
        size = wait("replay", self.replay.stats.remote())["replay/size"]
        learner_metrics: list[dict[str, float]] = []
        if size >= max(d.learning_starts, 1):
            learner, outs, applied = self.crew.learner(), [], []
            for _ in range(d.updates_per_iteration):
                sample = self.replay.sample.remote(d.batch_size)
                ids, td, metrics = learner.update.options(num_returns=3).remote(sample)
                # Runs in order, before the next sample; awaited below so that a failure
                # surfaces here instead of in a log.
                applied.append(self.replay.update_priorities.remote(ids, td))
                outs.append(metrics)
            learner_metrics = wait("learner", outs)
            wait("replay", applied)
            self.updates += d.updates_per_iteration
        out: dict[str, float] = {}
        for k in {k for m in learner_metrics for k in m}:
            values = [m[k] for m in learner_metrics if k in m]
            out[k] = float(np.sum(values) if k == "learner/skipped_updates" else np.mean(values))
        out.update(wait("replay", self.replay.stats.remote()))
        out["learner/updates"] = float(self.updates)
        if d.exploration == "epsilon":
            out["explore/epsilon"] = epsilon
        if d.exploration == "ucb":
            out["explore/ucb_bonus"] = float(np.mean([p.ucb_bonus for p in round_.parts]))
        every = self.config.replay.snapshot_every
        if every and step % every == 0:
            path = str(self.run_dir / REPLAY_FILE)
            wait("replay", self.replay.save_parquet.remote(path))
        return out

    def warn_if_no_signal(self, rewards: np.ndarray, step: int) -> None:
        """Warn once if the first iterations' rewards carry no signal (``no_signal_warning``)."""
        if step <= NO_SIGNAL_ITERATIONS:
            self.rewards_seen.update(float(r) for r in rewards[np.isfinite(rewards)])
            message = no_signal_warning(self.rewards_seen, self.config.dqn.action_top_k, step)
            if message:
                warnings.warn(message, stacklevel=2)

    def state(self) -> dict[str, Any]:
        """The update count."""
        return {"updates": self.updates}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``."""
        self.updates = int(state.get("updates", 0))

    def save(self, folder: Path) -> None:
        """The replay buffer, as a Parquet snapshot inside the checkpoint."""
        path = str(folder / REPLAY_FILE)
        self.crew.wait("replay", self.replay.save_parquet.remote(path))

    def restore(self, folder: Path | None) -> None:
        """Refill the replay buffer from the checkpoint's snapshot (every DQN checkpoint has
        one; a checkpoint without it is not from a DQN run); None: an empty buffer."""
        if folder is None:
            ray.kill(self.replay, no_restart=True)
            self.replay = self.make_replay()
            return
        path = folder / REPLAY_FILE
        if not path.is_file():
            raise DistrlError(f"checkpoint {folder} has no {REPLAY_FILE}: not a DQN checkpoint")
        self.crew.wait("replay", self.replay.load_parquet.remote(str(path)))


def no_signal_warning(rewards_seen: set[float], top_k: int, step: int) -> str | None:
    """What to say after iteration ``step`` (once, at ``NO_SIGNAL_ITERATIONS``) when every
    reward so far was the same while DQN acts only among the reference's top-k tokens: the
    tokens the reward needs may lie outside them, where DQN can never reach them."""
    if not top_k or step != NO_SIGNAL_ITERATIONS or len(rewards_seen) > 1:
        return None
    seen = f"{next(iter(rewards_seen)):g}" if rewards_seen else "dropped"
    return (
        f"every reward of the first {step} iterations was {seen}: DQN acts only among the "
        f"reference's top {top_k} tokens (dqn.action_top_k), so the tokens the reward needs may "
        "be out of reach; try a larger dqn.action_top_k, or 0 for the whole vocabulary"
    )


PLUGINS: dict[str, type[Algorithm]] = {"policy_gradient": PolicyGradient, "q_learning": DQN}
"""The plug-in of each family of ``distrl.algos.registry`` (an algorithm's ``family``)."""


def plugin(algo: str) -> type[Algorithm]:
    """The plug-in class that runs algorithm ``algo``."""
    return PLUGINS[registry.get(algo).family]
