"""The training loop: rollout -> score -> learn -> publish -> log -> checkpoint, each stage timed.

``Trainer`` owns one run's actors and steps the loop for every algorithm; what differs between
algorithms is a plug-in (``distrl.loop.plugins``): its roles and a few hooks. Faults are met here:
a hung rollout worker or reward actor is replaced, a lost learner or replay buffer is restored
from the newest checkpoint with the steps since redone, and SIGINT/SIGTERM stop the run with
the last complete step saved. Every survived fault is counted under ``faults/``.

Weights reach the rollout workers through ``distrl.weights.publish``.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from distrl.config import RunConfig
from distrl.data.prompts import Prompts, reward_batch
from distrl.envs.episodes import Episodes, with_episode_rewards
from distrl.errors import DistrlError
from distrl.loop.plugins import Round, group_rows, plugin
from distrl.loop.rundir import resume_hint
from distrl.outputs.metrics import MetricsLogger, format_progress
from distrl.pg.rollout import Trajectories
from distrl.rewards import ScoreResult
from distrl.runtime import actors
from distrl.runtime.checkpoint import (
    RESUME_ONLY,
    latest_checkpoint,
    prune_checkpoints,
    write_checkpoint,
)
from distrl.runtime.crew import Crew
from distrl.runtime.faults import (
    FAULT_KEYS,
    Hung,
    Interrupt,
    LossJump,
    Lost,
    Stopped,
    StopSignals,
    loss_jump,
)
from distrl.runtime.optimizer import NonFiniteError
from distrl.weights.publish import Publisher

Report = Callable[[int, dict[str, float], "Path | None"], None]


@dataclass
class Request:
    """A batch asked of a rollout worker: the call, its prompts, and where the prompt stream
    stood before they were drawn (a checkpoint goes back to the earliest untrained one)."""

    ref: ray.ObjectRef
    idx: list[int]
    drawn: dict[str, int]


class Trainer:
    """Owns the actors of one run and steps the training loop; ``self.algo`` (chosen by
    ``config.algo`` by ``distrl.loop.plugins.plugin``) supplies the roles and the learning step."""

    def __init__(self, config: RunConfig, run_dir: Path, train: Prompts, val: Prompts) -> None:
        self.config, self.run_dir, self.train_prompts, self.val = config, run_dir, train, val
        algorithm = plugin(config.algo)
        self.learner_class, self.worker_class = algorithm.learner_class, algorithm.worker_class
        self.progress_keys = algorithm.progress_keys
        self.learner = self.make_learner()
        self.workers = [self.make_worker(i) for i in range(config.rollout.num_workers)]
        self.version = 0  # the newest the workers hold or, in async mode, have queued
        self.asynchronous = config.rollout.mode == "async"
        # Each worker's batches asked and not yet collected, oldest first: one ahead in sync
        # mode (none at max_policy_lag 0 while the learner trains), max_policy_lag in async.
        self.queues: dict[int, deque[Request]] = {}
        # Where the prompt stream stood before each batch collected for the step under way was
        # drawn. A checkpoint keeps the earliest of these and the queued ones, so a resumed run
        # draws them again in the same order (none skipped, none repeated).
        self.taken: list[dict[str, int]] = []
        self.posted: dict[int, list[ray.ObjectRef]] = {}  # async: deliveries not yet checked
        self.stale_rows = 0  # rows made again this step for being too stale
        self.crew = Crew(
            learner=lambda: self.learner,
            workers=lambda: self.workers,
            wait=self.wait_stateful,
            renew_worker=self.renew_worker,
            dead_role=self.dead_role,
            count_fault=self.count_fault,
        )
        self.publisher = Publisher(
            self.crew, config.faults, broadcasts=config.rollout.weight_sync == "broadcast"
        )
        f = config.faults
        memory = f.actor_memory_mb or actors.node_memory_mb() / 4
        self.pool = actors.RewardPool(
            config.reward,
            config.resources,
            seed=config.seed,
            timeout=f.score_timeout_s,
            retries=f.call_retries,
            start_timeout=f.start_timeout_s,
            memory_mb=memory,
        )
        self.step = 0
        self.best = -float("inf")
        self.faults = dict.fromkeys(FAULT_KEYS, 0)
        # What the pool's own counters add to (counted before a resume or a restore).
        self.counted = dict.fromkeys(POOL_COUNTERS, 0)
        self.seen_restarts: dict[str, int] = {}  # rollout worker's actor id -> restarts counted
        self.unlogged: tuple[int, dict[str, float]] | None = None  # (step, its line)
        self.logger: MetricsLogger | None = None
        self.last_rounds: list[Round] = []  # the latest iteration's, for its samples
        self.last_checkpoint = time.monotonic()
        self.signals = StopSignals()
        # its own actors (DQN: the replay buffer) and state
        self.algo = algorithm(config, self.crew, run_dir=run_dir, references=train.references)
        self.initial_state = self.state()  # what a recovery with no checkpoint restores

    def make_learner(self) -> ray.actor.ActorHandle | actors.LearnerGroup:
        """A new learner actor, or a group of ``resources.learner_workers`` acting as one; never
        restarted by Ray (``recover`` restores it instead)."""
        res, f = self.config.resources, self.config.faults
        options = actors.actor_options(
            res.learner_cpus, res.learner_gpus, res.custom.get("learner"), **actors.STATEFUL
        )
        arguments = self.learner_class.arguments(self.config)
        if res.learner_workers == 1:
            return actors.make_actor(self.learner_class, options, **arguments)
        return actors.LearnerGroup(
            self.learner_class,
            options,
            arguments,
            res.learner_workers,
            timeout_s=f.start_timeout_s,
            # A rank waits in a collective while another is busy alone: rank 0 writing the
            # checkpoint's files, or awaiting the rollout workers of a broadcast.
            collective_timeout_s=max(f.start_timeout_s, f.train_timeout_s, f.generate_timeout_s),
        )

    def make_worker(self, index: int) -> ray.actor.ActorHandle:
        """Rollout worker ``index`` (Ray restarts it if it dies; its batch is then redone)."""
        res = self.config.resources
        options = actors.actor_options(
            res.rollout_cpus, res.rollout_gpus, res.custom.get("rollout")
        )
        return actors.make_actor(
            self.worker_class, options, **self.worker_class.arguments(self.config, index)
        )

    # ---- waiting on actors -------------------------------------------------------------

    def stateful(self) -> dict[str, ray.actor.ActorHandle]:
        """The actors whose loss means restoring a checkpoint, by role."""
        return {"learner": self.learner, **self.algo.actors()}

    def wait_stateful(self, role: str, refs: Any) -> Any:
        """``actors.get`` on calls of the learner or replay actor; ``Lost`` if one is lost.

        The timeout is ``faults.train_timeout_s`` (learner) or ``faults.replay_timeout_s``.
        """
        f = self.config.faults
        timeout = f.replay_timeout_s if role == "replay" else f.train_timeout_s
        group = self.stateful().get(role)
        try:
            if isinstance(group, actors.LearnerGroup):  # a rank that fails fails the call
                return self.wait_every_rank(group, refs, timeout)
            return actors.get(refs, timeout=timeout)
        except GetTimeoutError:
            setting = "replay_timeout_s" if role == "replay" else "train_timeout_s"
            raise Lost(role, f"did not answer within faults.{setting}={timeout:g} s") from None
        except RayActorError:
            raise self.lost(self.dead_role() or role) from None
        except RayTaskError:
            # A learner rank's collective fails when another rank died: that death is the fault.
            dead = self.dead_role() if isinstance(group, actors.LearnerGroup) else None
            if dead is None:
                raise
            raise self.lost(dead) from None

    @staticmethod
    def wait_every_rank(group: actors.LearnerGroup, refs: Any, timeout: float) -> Any:
        """``actors.get`` on calls of a learner group (a ref, or a list of them), waiting on
        every rank's part of each; returns rank 0's results."""
        single = isinstance(refs, ray.ObjectRef)
        every: list[ray.ObjectRef] = []
        firsts = []
        for ref in [refs] if single else refs:
            firsts.append(len(every))
            every.extend(group.every_rank(ref))
        got = actors.get(every, timeout=timeout)
        return got[firsts[0]] if single else [got[i] for i in firsts]

    def lost(self, role: str) -> Lost:
        """``Lost`` for stateful ``role`` found dead (a learner group: one of its workers)."""
        group = isinstance(self.stateful().get(role), actors.LearnerGroup)
        return Lost(role, "lost one of its workers" if group else "died")

    def count_from(self, faults: dict[str, int]) -> None:
        """Continue the counters the pool and Ray keep from ``faults`` (a resume, a restore)."""
        self.counted = {k: int(faults[k]) - getattr(self.pool, a) for k, a in POOL_COUNTERS.items()}

    def count_fault(self, key: str) -> None:
        """Add one to the run's fault counter ``key`` (``faults/...``)."""
        self.faults[key] += 1

    def dead_role(self) -> str | None:
        """The first stateful actor that no longer answers (an argument from a dead replay
        actor fails the learner's call too, so the failing call does not say who died)."""
        return next((r for r, a in self.stateful().items() if not self.alive(a)), None)

    def alive(self, actor: ray.actor.ActorHandle) -> bool:
        """Whether ``actor`` (every rank of a learner group) answers a trivial call within
        30 s."""
        try:
            actors.pids(actors.handles(actor), timeout=30)
        except (RayActorError, GetTimeoutError):
            return False
        return True

    def wait_rollout(self, i: int, *, refresh: bool = False) -> Trajectories:
        """Worker ``i``'s in-flight batch (after sending it the current weights and a new batch
        when ``refresh``). A worker past ``faults.generate_timeout_s`` is replaced and its batch
        redone, at most ``faults.call_retries`` times; then the run stops with ``Hung``."""
        f = self.config.faults
        for attempt in range(f.call_retries + 1):
            try:
                if attempt:
                    self.replace_worker(i)
                elif refresh:
                    self.refresh(i, redo="first")
                return actors.get(self.queues[i][0].ref, timeout=f.generate_timeout_s)
            except GetTimeoutError:
                self.faults["faults/rollout_timeouts"] += 1
        raise Hung(
            f"rollout worker {i}: generate did not return within faults.generate_timeout_s="
            f"{f.generate_timeout_s:g} s on {f.call_retries + 1} tries; raise the setting or "
            f"fix the cause"
        )

    def replace_worker(self, i: int) -> int:
        """Kill worker ``i`` (Ray SIGKILLs a hung process) and start a new one with the current
        weights, asking it again for the batches the old one held."""
        self.renew_worker(i)
        return self.refresh(i, redo="all")

    def renew_worker(self, i: int) -> None:
        """Kill worker ``i`` and wait for a new one (initial weights, in no weight group)."""
        self.count_restarts([self.workers[i]])  # its last ones, before it goes
        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self.make_worker(i)
        self.posted[i] = []  # died with the old worker
        self.publisher.reset()
        self.wait_started([self.workers[i]], f"rollout worker {i}")

    def wait_started(self, handles: list[ray.actor.ActorHandle], what: str) -> None:
        """Wait for new actors to be constructed, at most ``faults.start_timeout_s``."""
        timeout = self.config.faults.start_timeout_s
        try:
            every = [h for actor in handles for h in actors.handles(actor)]
            actors.get([h.__ray_ready__.remote() for h in every], timeout=timeout)
        except GetTimeoutError:
            raise Hung(
                f"{what} did not start within faults.start_timeout_s={timeout:g} s"
            ) from None

    def refresh(self, i: int, *, redo: str) -> int:
        """Send worker ``i`` the learner's current weights and ask it again for its queued
        batches (``redo``: ``"all"``, or the ``"first"``, which came back stale); returns the
        version it holds. By broadcast every worker takes them again."""
        version, renewed = self.publisher.to_worker(i)
        for j in renewed:  # their batches in flight died with them
            if j != i:
                self.redo(j)
        self.redo(i, first_only=redo == "first")
        return version

    def redo(self, i: int, *, first_only: bool = False) -> None:
        """Ask worker ``i`` again for its queued batches (or the first), the same prompts."""
        queue = self.queues.get(i, deque())
        for request in list(queue)[:1] if first_only else queue:
            request.ref = self.ask(i, request.idx)

    # ---- stages ------------------------------------------------------------------------

    def publish(self, *, behind: bool = False) -> int:
        """Send the learner's weights to every worker (``distrl.weights.publish``); returns the
        version they hold. A worker replaced on the way is asked again for its queued batches.
        ``behind`` (async mode): queue them behind each worker's batches and do not wait."""
        if behind:
            version, refs = self.publisher.post()
            for i, ref in enumerate(refs):
                self.posted.setdefault(i, []).append(ref)
            return version
        version, renewed = self.publisher.publish()
        for i in renewed:
            self.redo(i)
        return version

    def submit(self, i: int) -> None:
        """Queue a rollout on worker ``i`` with the next prompts, each ``samples_per_prompt``
        times in a row (the rows of one prompt are its group)."""
        r = self.config.rollout
        drawn = self.train_prompts.state()
        idx = [
            i for i in self.train_prompts.next(r.batch_size) for _ in range(r.samples_per_prompt)
        ]
        self.queues.setdefault(i, deque()).append(Request(self.ask(i, idx), idx, drawn))

    def ask(self, i: int, idx: list[int]) -> ray.ObjectRef:
        """Worker ``i``'s rollout of training prompts ``idx``."""
        return self.rollout(
            self.workers[i], self.train_prompts, idx, **self.algo.generate_options()
        )

    def submit_all(self) -> None:
        """Queue a batch on every worker, in worker order (the order they are trained in)."""
        for i in range(len(self.workers)):
            self.submit(i)

    def rollout(
        self, worker: ray.actor.ActorHandle, prompts: Prompts, idx: list[int], **options: Any
    ) -> ray.ObjectRef:
        """``worker``'s generation for prompts ``idx`` of ``prompts``: one completion each, or
        with ``env.name`` one multi-turn episode each."""
        if self.config.env.name:
            examples = [prompts.examples[i] for i in idx]
            return worker.generate_episodes.remote(examples, idx, **options)
        return worker.generate.remote([prompts.ids[i] for i in idx], idx, **options)

    def start(self) -> None:
        """Publish the first weights and start a rollout on every worker."""
        self.wait_started([*self.stateful().values(), *self.workers], "the run's actors")
        self.publisher.reset()  # a new or restored learner serves a new weight group
        self.version = self.publish()
        self.taken = []
        self.queues, self.posted = {}, {}
        r = self.config.rollout
        for _ in range(r.max_policy_lag if self.asynchronous else 1):
            self.submit_all()

    def collect(self) -> list[Trajectories]:
        """Each worker's oldest batch, queueing the next when ``max_policy_lag`` allows.

        A batch made by a policy more than ``max_policy_lag`` versions behind the learner's (a
        restarted worker's initial weights, a delivery that failed its check) is made again
        from the same prompts with the current weights: never trained on, never skipped.
        """
        lag = self.config.rollout.max_policy_lag
        parts = []
        for i in range(len(self.workers)):
            batch = self.wait_rollout(i)
            self.check_posted(i)
            while self.version - batch.version > lag:
                self.faults["faults/stale_batches"] += 1
                self.stale_rows += len(batch.example_ids)
                batch = self.wait_rollout(i, refresh=True)
            parts.append(batch)
            self.taken.append(self.queues[i].popleft().drawn)
            if lag > 0:  # generate the next batch while we learn
                self.submit(i)
        self.count_restarts(self.workers)
        return parts

    def check_posted(self, i: int) -> None:
        """Check the weights posted to worker ``i`` that it has loaded by now (async mode)."""
        pending = self.posted.get(i, [])
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=0) if pending else ([], [])
        for ref in done:
            pending.remove(ref)
            self.publisher.checked(i, ref)

    def count_restarts(self, workers: list[ray.actor.ActorHandle]) -> None:
        """Count the restarts Ray made of ``workers`` since they were last counted, busy or
        idle (a busy one's batch is also a stale batch), into ``faults/rollout_restarts``."""
        for worker, n in zip(workers, actors.restarts(workers)):
            key = worker._actor_id.hex()
            self.faults["faults/rollout_restarts"] += n - self.seen_restarts.get(key, 0)
            self.seen_restarts[key] = n

    def score(self, parts: list[Trajectories]) -> tuple[Trajectories, ScoreResult]:
        """Score the joined batch; counts the samples the reward pool dropped."""
        batch = Trajectories.concat(parts)
        scores = with_episode_rewards(
            self.pool.score(reward_batch(self.train_prompts, batch)), batch
        )
        if isinstance(batch, Episodes):
            self.faults["faults/env_errors"] += int(batch.failed.sum())
            self.faults["faults/env_restarts"] += batch.env_restarts
        self.faults["faults/dropped_samples"] += scores.num_dropped
        for key, attribute in POOL_COUNTERS.items():
            self.faults[key] = self.counted[key] + getattr(self.pool, attribute)
        return batch, scores

    def iterate(self) -> dict[str, float]:
        """One iteration: rollout -> score -> learn -> publish; returns its metrics."""
        times = {"time/rollout_wait_s": 0.0, "time/score_s": 0.0}
        rounds: list[Round] = []
        step = self.step + 1
        self.stale_rows = 0
        with self.signals.abandonable(f"step {step}'s rollouts"):  # nothing learned yet
            while not rounds or self.algo.wants_more(rounds):
                if rounds and self.config.rollout.max_policy_lag == 0:  # nothing ran ahead
                    self.submit_all()
                t0 = time.perf_counter()
                parts = self.collect()
                t1 = time.perf_counter()
                batch, scores = self.score(parts)
                times["time/rollout_wait_s"] += t1 - t0
                times["time/score_s"] += time.perf_counter() - t1
                offset = int(rounds[-1].groups.max()) + 1 if rounds else 0
                groups = offset + group_rows(parts, self.config.rollout.samples_per_prompt)
                rounds.append(Round(parts, batch, scores, groups))
        t2 = time.perf_counter()
        self.signals.doing = f"step {step}'s update"
        metrics = self.algo.learn(rounds, step=step)
        self.taken = []  # trained
        t3 = time.perf_counter()
        self.signals.doing = f"step {step}'s publish"
        self.version = self.publish(behind=self.asynchronous)
        times.update({"time/train_s": t3 - t2, "time/publish_s": time.perf_counter() - t3})
        if self.config.rollout.max_policy_lag == 0:
            self.submit_all()
        metrics.update(self.wait_stateful("learner", self.learner.publish_metrics.remote()))
        metrics.update(self.rollout_metrics(rounds, self.version))
        # What the learner did not train for: waiting on the rollouts, their scores, the publish.
        times["time/learner_idle_s"] = (
            times["time/rollout_wait_s"] + times["time/score_s"] + times["time/publish_s"]
        )
        metrics.update(ScoreResult.concat([r.scores for r in rounds]).metrics())
        self.last_rounds = rounds
        return {**metrics, **times}

    def samples(self, rounds: list[Round]) -> list[dict[str, Any]]:
        """The first ``output.samples_logged`` completions of an iteration, as rows of
        ``samples.jsonl``: prompt, response, the policy version that generated it, the total
        reward and each component (None where a sample was dropped or a component failed)."""
        rows: list[dict[str, Any]] = []
        for r in rounds:
            for i in range(len(r.batch.texts)):
                if len(rows) == self.config.output.samples_logged:
                    return rows
                example = self.train_prompts.examples[int(r.batch.example_ids[i])]
                rewards = {"reward/total": r.scores.total[i]}
                rewards.update({f"reward/{k}": v[i] for k, v in r.scores.components.items()})
                row = {
                    "example": int(r.batch.example_ids[i]),
                    "prompt": example.prompt_text,
                    "response": str(r.batch.texts[i]),
                    "version": int(r.batch.row_versions[i]),
                    **{k: float(v) for k, v in rewards.items()},
                }
                if isinstance(r.batch, Episodes):  # the whole episode, turn by turn
                    row["turns"] = json.loads(str(r.batch.transcripts[i]))
                rows.append(row)
        return rows

    def run(self, logger: MetricsLogger, progress: bool, report: Report | None = None) -> None:
        """Train from ``self.step`` to ``config.iterations``; ``report`` sees every iteration.

        Raises:
            Stopped: SIGINT or SIGTERM arrived (after the last complete step is checkpointed).
            Hung, DistrlError: a fault that is not survived, in one line.
        """
        from tqdm import tqdm

        cfg = self.config
        self.logger = logger
        bar = tqdm(
            total=cfg.iterations,
            initial=self.step,
            disable=not progress,
            desc=f"distrl {cfg.algo}",
            unit="it",
            dynamic_ncols=True,
        )
        with self.signals:
            try:
                self._loop(bar, progress, report)
            except Interrupt:
                pass  # a signal cut a rollout or reward wait short: nothing learned was lost
            finally:
                bar.close()
            if self.signals.signum is not None:
                self.stop_on_signal()
        # Let the last rollouts finish before their actors are killed (bounded like any wait).
        refs = [r.ref for queue in self.queues.values() for r in queue]
        ray.wait(refs, num_returns=len(refs), timeout=self.config.faults.generate_timeout_s)

    def _loop(self, bar: Any, progress: bool, report: Report | None) -> None:
        cfg = self.config
        self.guarded(self.start)
        while self.step < cfg.iterations and self.signals.signum is None:
            t0 = time.perf_counter()
            try:
                metrics = self.iterate()
            except NonFiniteError as err:
                # The skipped updates left the weights as they were: save them and say where.
                done = self.run_dir / "checkpoints" / f"step_{self.step}"
                saved = (done if done.is_dir() else self.checkpoint({})) if self.step else None
                where = f"; the last good state (step {self.step}) is in {saved}" if saved else ""
                raise NonFiniteError(f"{err}{where}; fix the cause and --resume") from None
            except Lost as lost:
                self.recover(lost)
                continue
            self.step += 1
            jumped = loss_jump(self.logger.history, metrics, cfg.faults.max_loss_jump)
            if jumped:  # this step is neither logged nor saved
                raise LossJump(
                    f"step {self.step}: {jumped}: a corrupted checkpoint or a diverging run; "
                    f"{resume_hint(self.run_dir)} (after fixing the cause, or with "
                    f"--faults.max_loss_jump 0 if the jump is expected)"
                )
            metrics.update(self.faults)
            self.unlogged = (self.step, metrics)  # this step's line, until it is written
            if cfg.output.eval_every and self.step % cfg.output.eval_every == 0:
                t1 = time.perf_counter()
                with self.signals.abandonable(f"step {self.step}'s evaluation"):
                    metrics.update(self.guarded(self.evaluate, default={}))
                metrics["time/eval_s"] = time.perf_counter() - t1
            # The step's line is written once its checkpoint is: a driver that dies in between
            # leaves the line in the checkpoint's manifest, and a resume writes it from there.
            saved = None
            minutes = (time.monotonic() - self.last_checkpoint) / 60
            due = cfg.output.checkpoint_minutes and minutes >= cfg.output.checkpoint_minutes
            if self.step % cfg.output.checkpoint_every == 0 or self.step == cfg.iterations or due:
                t1 = time.perf_counter()
                self.signals.doing = f"step {self.step}'s checkpoint"
                saved = self.guarded(lambda m=metrics: self.checkpoint(m))
                if saved is None:  # lost while saving: recovered to an earlier step
                    continue
                metrics["time/checkpoint_s"] = time.perf_counter() - t1
            metrics["time/iteration_s"] = time.perf_counter() - t0
            self.logger.log(self.step, metrics)
            self.unlogged = None
            every = cfg.output.samples_every
            if every and (self.step % every == 0 or self.step == 1):
                self.logger.log_samples(self.step, self.samples(self.last_rounds))
            if report is not None:
                report(self.step, metrics, saved)
            bar.set_postfix_str(format_progress(metrics, self.progress_keys))
            if not progress:  # job logs (ray job logs) still get one line per iteration
                print(f"step {self.step}/{cfg.iterations} {bar.postfix}", flush=True)
            bar.update(self.step - bar.n)  # a recovery may have gone back some steps

    def guarded(self, call: Callable[[], Any], default: Any = None) -> Any:
        """``call()``; if it loses a stateful actor, recover and return ``default``."""
        try:
            return call()
        except Lost as lost:
            self.recover(lost)
            return default

    # ---- faults ------------------------------------------------------------------------

    def recover(self, lost: Lost) -> None:
        """Restore the learner (and replay) from the newest checkpoint after ``lost``; the
        steps since are redone. Past ``faults.max_restores`` the run stops instead."""
        key = f"faults/{lost.role}_restarts"
        self.faults[key] += 1
        path = latest_checkpoint(self.run_dir / "checkpoints")
        restores = sum(self.faults[f"faults/{r}_restarts"] for r in ("learner", "replay"))
        if restores > self.config.faults.max_restores:
            where = f"{path}" if path else "none yet"
            raise DistrlError(
                f"{lost} at step {self.step + 1}, loss {restores} of a run that survives "
                f"faults.max_restores={self.config.faults.max_restores}; newest checkpoint: "
                f"{where}; fix the cause and resume with --resume --output-dir {self.run_dir}"
            )
        lost_step, faults = self.step + 1, dict(self.faults)
        for role, actor in self.stateful().items():
            if role == lost.role or not self.alive(actor):
                actors.kill(actor)  # a hung one too
                self.replace_stateful(role)
        if path is not None:
            self.restore(path)
        else:  # nothing saved yet: start again from the constructors' state
            self.load_state(self.initial_state)
            self.algo.restore(None)
        self.faults = faults
        self.count_from(faults)
        assert self.logger is not None
        self.logger.truncate_after(self.step)
        print(
            f"distrl: {lost} during step {lost_step}; restored "
            f"{path if path else 'the initial state'} (step {self.step}); redoing steps "
            f"{self.step + 1}..{lost_step} ({key} = {self.faults[key]})",
            file=sys.stderr,
            flush=True,
        )
        self.guarded(self.start)

    def replace_stateful(self, role: str) -> None:
        """Start a new actor for ``role`` (its state comes from a checkpoint next)."""
        if role == "learner":
            self.learner = self.make_learner()
        else:
            self.algo.replace(role)

    def stop_on_signal(self) -> None:
        """Checkpoint the last complete step (unless saved already) and raise ``Stopped``."""
        signum = self.signals.signum or signal.SIGINT
        saved = self.run_dir / "checkpoints" / f"step_{self.step}"
        history = self.logger.history if self.logger else []
        logged = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
        # The signal cut this step's evaluation or checkpoint short (not a step a restore undid).
        step, metrics = self.unlogged or (None, None)
        if step != self.step:
            metrics = None
        if self.step and not saved.is_dir():
            saved = self.checkpoint(logged if metrics is None else metrics)
        if metrics is not None and self.logger is not None:
            self.logger.log(self.step, metrics)
        where = f"step {self.step} is saved in {saved}" if self.step else "no step was complete"
        raise Stopped(
            f"stopped by {signal.Signals(signum).name}: {where}; continue with: python -m "
            f"distrl.run --resume --output-dir {self.run_dir}",
            signum,
        )

    def rollout_metrics(self, rounds: list[Round], version: int) -> dict[str, float]:
        """Rollout throughput, response length, policy lag (per sample: max and mean), the
        batches queued ahead, the samples made again for staleness and the workers' idle
        seconds of an iteration's rounds (the workers of a round generate side by side, rounds
        one after another)."""
        parts = [p for r in rounds for p in r.parts]
        gen_s = sum(max(p.seconds for p in r.parts) for r in rounds)
        lengths = np.concatenate([p.response_mask.sum(1) for p in parts])
        # Per sample: how many versions the policy that made it was behind the one trained.
        lags = version - 1 - np.concatenate([p.row_versions for p in parts])
        metrics = {
            "rollout/tokens_per_s": sum(p.num_tokens for p in parts) / max(gen_s, 1e-9),
            "rollout/response_length": float(lengths.mean()),
            "rollout/policy_lag": float(lags.max()),
            "rollout/policy_lag_mean": float(lags.mean()),
            "rollout/queue_depth": float(sum(len(q) for q in self.queues.values())),
            "rollout/stale_samples": float(self.stale_rows),
            "time/generate_s": gen_s,
            "time/worker_idle_s": sum(p.idle_s for p in parts),
        }
        if isinstance(parts[0], Episodes):  # per episode: model turns, tool calls, failed calls
            for name in ("turns", "tool_calls", "tool_errors"):
                values = np.concatenate([getattr(p, name) for p in parts])
                metrics[f"episode/{name}"] = float(values.mean())
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Greedy generations on held-out prompts: mean reward; reference accuracy/perplexity."""
        n = min(self.config.output.eval_examples, len(self.val.ids))
        idx = list(range(n))
        prompts = [self.val.ids[i] for i in idx]
        f = self.config.faults
        for attempt in range(f.call_retries + 1):
            if attempt:  # worker 0 hung: replace it, its training batches asked again
                self.replace_worker(0)
            ref = self.rollout(self.workers[0], self.val, idx, greedy=True)
            try:
                batch = actors.get(ref, timeout=f.generate_timeout_s)
                break
            except GetTimeoutError:
                self.faults["faults/rollout_timeouts"] += 1
        else:
            raise Hung(
                f"rollout worker 0: the evaluation's generate did not return within "
                f"faults.generate_timeout_s={f.generate_timeout_s:g} s on {f.call_retries + 1} "
                f"tries; raise the setting or fix the cause"
            )
        scores = with_episode_rewards(self.pool.score(reward_batch(self.val, batch)), batch)
        out = {k.replace("reward/", "eval/reward_"): v for k, v in scores.metrics().items()}
        out["eval/reward"] = out.pop("eval/reward_total")
        refs = [self.val.references[i] for i in idx]
        out.update(
            self.wait_stateful("learner", self.learner.reference_metrics.remote(prompts, refs))
        )
        return out

    def shutdown(self) -> None:
        """Stop this run's actors (a shared Ray session, as in tests, stays up)."""
        for actor in self.stateful().values():
            actors.kill(actor)
        for i, worker in enumerate(self.workers):  # with the rollouts a signal abandoned
            actors.kill(worker, [r.ref for r in self.queues.get(i, ())])
        self.pool.shutdown()

    # ---- checkpoints -------------------------------------------------------------------

    def checkpoint(self, metrics: dict[str, float]) -> Path:
        """Write ``step_<N>`` (and ``best``/``final``) atomically, then prune old ones."""
        root = self.run_dir / "checkpoints"
        extra = self.state()
        meta = {
            "step": self.step,
            "metrics": {  # the step's line of metrics.jsonl, but for its last two timings
                k: v
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
            },
        }

        def write(tmp: Path) -> None:
            self.wait_stateful("learner", self.learner.save.remote(str(tmp), extra))
            self.algo.save(tmp)

        path = write_checkpoint(root, f"step_{self.step}", write, meta=meta)

        def export(tmp: Path) -> None:  # a plain Hugging Face folder (LoRA: merged)
            _copy(path, tmp)
            self.wait_stateful("learner", self.learner.export_merged.remote(str(tmp)))

        reward = metrics.get("eval/reward")
        if reward is not None and reward > self.best:
            self.best = reward
            write_checkpoint(root, "best", export, meta=meta)
        if self.step == self.config.iterations:
            write_checkpoint(self.run_dir, "final", export, meta=meta)
        prune_checkpoints(root, self.config.output.keep_checkpoints, newest_only=RESUME_ONLY)
        self.last_checkpoint = time.monotonic()
        return path

    def restore(self, path: Path) -> None:
        """Continue from checkpoint folder ``path``."""
        self.load_state(self.wait_stateful("learner", self.learner.load.remote(str(path))))
        self.algo.restore(path)

    def state(self) -> dict[str, Any]:
        """The driver's share of a checkpoint: step, prompt position (before the first batch
        drawn but not trained), best reward, faults."""
        untrained = [*self.taken, *(r.drawn for q in self.queues.values() for r in q)]
        return {
            "step": self.step,
            "prompts": min(
                untrained,
                key=lambda s: (s["epoch"], s["cursor"]),
                default=self.train_prompts.state(),
            ),
            "best": self.best,
            "faults": dict(self.faults),
            **self.algo.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``."""
        self.step, self.best = int(state["step"]), float(state["best"])
        self.train_prompts.load(state["prompts"])
        self.faults.update(state.get("faults", {}))
        self.count_from(self.faults)
        self.algo.load_state(state)


# Fault counters the reward pool keeps: key -> the pool's attribute.
POOL_COUNTERS = {
    "faults/reward_actor_restarts": "restarts",
    "faults/reward_timeouts": "timeouts",
    "faults/reward_memory_replacements": "memory_replacements",
}


def _copy(src: Path, dst: Path) -> None:
    """``best``/``final``: a step checkpoint without its manifest and optimizer state."""
    for item in src.iterdir():
        if item.name != "distrl_checkpoint.json" and item.name not in RESUME_ONLY:
            shutil.copy2(item, dst / item.name)
