"""The one module that imports Ray: it turns distrl's plain role classes into actors and pools.

Roles (``RewardScorer``, rollout workers, the learner, the replay buffer) know nothing of Ray.
Here they become actors with resources from ``ResourcesConfig``. Roles a constructor rebuilds
exactly (rollout workers, reward actors) are restarted when they die (``max_restarts=-1``),
with the interrupted call retried (``max_task_retries=-1``); the learner and the replay buffer
hold state a constructor cannot rebuild, so they are not restarted here: the driver restores
them from a checkpoint (``STATEFUL``). Only the driver and its pools call ``ray.get``.
"""

from __future__ import annotations

import os
import time
import warnings
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from distrl.config import ResourcesConfig, RewardConfig
from distrl.errors import DistrlError
from distrl.rewards import (
    RewardBatch,
    RewardScorer,
    ScoreResult,
    check_reward_config,
    component_keys,
)
from distrl.runtime import faults
from distrl.runtime.faults import Hung, Interrupt


def actor_options(
    cpus: float,
    gpus: float = 0.0,
    custom: dict[str, float] | None = None,
    *,
    max_restarts: int = -1,
    max_task_retries: int = -1,
    runtime_env: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Options for ``ray.remote(cls).options(...)``: resources and restart policy.

    Args:
        cpus: CPUs the actor holds (fractions allowed).
        gpus: GPUs (or a share of one) the actor holds.
        custom: custom resources, e.g. ``{"inference_node": 0.01}``.
        max_restarts: restarts after the actor dies; -1 = always.
        max_task_retries: retries of a call interrupted by a death; -1 = always.
        runtime_env: Ray runtime environment of the actor (env vars, ``py_modules``...).
        **extra: any other ``.options`` keyword (``name``, ``scheduling_strategy``...).
    """
    options: dict[str, Any] = {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "max_restarts": max_restarts,
        "max_task_retries": max_task_retries,
        **extra,
    }
    if custom:
        options["resources"] = dict(custom)
    if runtime_env:
        options["runtime_env"] = runtime_env
    return options


# Options of actors that must never come back silently reset (see the module docstring).
STATEFUL = {"max_restarts": 0, "max_task_retries": 0}


def make_actor(cls: type, options: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """Start ``cls(*args, **kwargs)`` as an actor with ``options`` (see ``actor_options``)."""
    return ray.remote(cls).options(**options).remote(*args, **kwargs)


def _pid(_actor: Any) -> int:
    return os.getpid()


def pids(handles: list[Any], timeout: float | None = None) -> list[int]:
    """The process id of each actor (a restarted actor has a new one); waits for busy actors."""
    return get(pid_refs(handles), timeout=timeout)


def restarts(handles: list[Any]) -> list[int]:
    """How often Ray has restarted each actor, busy or idle (from Ray's control store, without
    a call to the actor; 0 for an actor it no longer knows)."""
    from ray._private import state  # the GCS's actor table: no dashboard needed

    counts = []
    for handle in handles:
        entry = state.actors(handle._actor_id.hex()) or {}
        counts.append(int(entry.get("NumRestarts", 0)))
    return counts


def pid_refs(handles: list[Any]) -> list[ray.ObjectRef]:
    """Refs to each actor's process id, answered once the actor's earlier calls are done."""
    return [h.__ray_call__.remote(_pid) for h in handles]


def _rss_mb(_actor: Any) -> float:
    """The actor process's resident memory in MiB (from /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def rss_mb(handles: list[Any], timeout: float | None = None) -> list[float]:
    """Each actor's resident memory in MiB; waits for busy actors."""
    return get([h.__ray_call__.remote(_rss_mb) for h in handles], timeout=timeout)


def node_memory_mb() -> float:
    """This machine's memory in MiB (0 where /proc does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def _node_ip(_actor: Any) -> str:
    return ray.util.get_node_ip_address()


def node_ip_ref(handle: Any) -> ray.ObjectRef:
    """A ref to the address of the node ``handle``'s actor runs on (loopback for a Ray that
    listens on loopback only): where it can serve others. A learner group's is rank 0's."""
    return handles(handle)[0].__ray_call__.remote(_node_ip)


POLL_S = 0.2  # how often a wait that a stop signal may abandon looks for the signal


def wait_all(refs: list[ray.ObjectRef], timeout: float | None) -> list[ray.ObjectRef]:
    """``ray.wait`` for every one of ``refs``; returns those done within ``timeout`` seconds.

    Inside a ``StopSignals.abandonable`` stretch it looks for a stop signal every ``POLL_S``
    seconds and raises ``Interrupt`` when one came.
    """
    refs = list(dict.fromkeys(refs))
    if not faults.abandoning():
        return ray.wait(refs, num_returns=len(refs), timeout=timeout)[0]
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if faults.interrupted():
            raise Interrupt
        left = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
        done, rest = ray.wait(refs, num_returns=len(refs), timeout=left)
        if not rest or (deadline is not None and time.monotonic() >= deadline):
            return done


def get(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get`` that re-raises distrl's own errors from inside an actor as themselves.

    Ray wraps an actor's exception in ``RayTaskError``; a ``RewardError`` (or any
    ``DistrlError``, or an ``OSError`` such as a full disk) then reaches the driver as that
    error with its own message. Inside a ``StopSignals.abandonable`` stretch a stop signal
    ends the wait with ``Interrupt`` (``wait_all``).

    Raises:
        ray.exceptions.GetTimeoutError: ``timeout`` seconds passed first.
    """
    try:
        if faults.abandoning():
            flat = [refs] if isinstance(refs, ray.ObjectRef) else list(refs)
            if len(wait_all(flat, timeout)) < len(set(flat)):
                raise GetTimeoutError(f"not every result was ready within {timeout} s")
        return ray.get(refs, timeout=timeout)
    except RayTaskError as err:
        if isinstance(err.cause, (DistrlError, OSError)):  # a full disk in an actor, too
            raise err.cause from None
        raise


# Learner methods rank 0 runs alone: it serves the weight group and keeps the last publication's
# size. Every other method is called on every rank.
RANK0_ONLY = frozenset(
    {
        "learner_group_address",
        "weight_group_address",
        "join_weight_group",
        "leave_weight_group",
        "publish_metrics",
    }
)


class LearnerGroup:
    """The learner's ranks (``resources.learner_workers``), called as one actor.

    ``group.train.remote(batch, ...)`` puts the arguments in the object store once, calls
    every rank's ``train`` with them (each computes its share and they meet in collectives)
    and returns rank 0's ref; ``every_rank(ref)`` gives the refs of all ranks' calls, which the
    driver waits on, so a rank that fails fails the call. The ranks form their
    torch.distributed group here (``join_learner_group``), within ``timeout_s``; a rank waits
    at most ``collective_timeout_s`` (default ``timeout_s``) in any collective after.

    Raises:
        LearnerGroupError: the group did not form (a rank's own error).
        Hung: the ranks did not start and join within ``timeout_s``.
    """

    def __init__(
        self,
        cls: type,
        options: dict[str, Any],
        arguments: dict[str, Any],
        world: int,
        *,
        timeout_s: float,
        collective_timeout_s: float | None = None,
    ) -> None:
        self.ranks = [make_actor(cls, options, **arguments) for _ in range(world)]
        collective_timeout_s = max(timeout_s, collective_timeout_s or 0.0)
        self.followers: dict[ray.ObjectRef, list[ray.ObjectRef]] = {}
        try:
            address = get(self.ranks[0].learner_group_address.remote(), timeout=timeout_s)
            joins = [
                rank.join_learner_group.remote(address, k, world, timeout_s=collective_timeout_s)
                for k, rank in enumerate(self.ranks)
            ]
            get(joins, timeout=timeout_s + 30)  # each rank gives up first, saying why
        except GetTimeoutError:
            self.kill()
            raise Hung(
                f"the {world} learner workers did not start and form their group within "
                f"faults.start_timeout_s={timeout_s:g} s"
            ) from None
        except BaseException:
            self.kill()
            raise

    def __getattr__(self, name: str) -> _GroupMethod:
        if name.startswith("__"):
            raise AttributeError(name)
        return _GroupMethod(self, name)

    def every_rank(self, ref: ray.ObjectRef) -> list[ray.ObjectRef]:
        """The refs of every rank's part of the call that returned ``ref`` (rank 0's)."""
        return [ref, *self.followers.pop(ref, [])]

    def kill(self) -> None:
        """Kill every rank."""
        for rank in self.ranks:
            ray.kill(rank, no_restart=True)


class _GroupMethod:
    """``LearnerGroup.<name>``: ``.remote(...)`` on rank 0 alone (``RANK0_ONLY``) or on all."""

    # Calls whose followers nobody waited on (a publication's) are forgotten past this many.
    REMEMBERED = 64

    def __init__(self, group: LearnerGroup, name: str, options: dict | None = None) -> None:
        self.group, self.name, self.call_options = group, name, options or {}

    def options(self, **options: Any) -> _GroupMethod:
        """The method with Ray call options (``num_returns``...) for every rank."""
        return _GroupMethod(self.group, self.name, {**self.call_options, **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        ranks = self.group.ranks
        if self.name in RANK0_ONLY:
            ranks = ranks[:1]
        else:
            args = tuple(shared(a) for a in args)
            kwargs = {k: shared(v) for k, v in kwargs.items()}
        calls = [getattr(rank, self.name) for rank in ranks]
        if self.call_options:
            calls = [call.options(**self.call_options) for call in calls]
        refs = [call.remote(*args, **kwargs) for call in calls]
        multiple = isinstance(refs[0], (list, tuple))  # num_returns > 1: a ref per return
        followers = self.group.followers
        for i, ref in enumerate(refs[0] if multiple else [refs[0]]):
            followers[ref] = [r[i] if multiple else r for r in refs[1:]]
        while len(followers) > self.REMEMBERED:
            followers.pop(next(iter(followers)))
        return refs[0]


def shared(value: Any) -> Any:
    """``value`` in the object store once (a ref), for calls on several actors; refs and
    small scalars as they are."""
    if value is None or isinstance(value, (ray.ObjectRef, bool, int, float, str)):
        return value
    return ray.put(value)


def kill(actor: Any, running: Any = ()) -> None:
    """Kill an actor, or every rank of a ``LearnerGroup``, without restarting it.

    Its calls still ``running`` (refs) are cancelled first: Ray would otherwise retry them on
    the dead actor (``max_task_retries``) and print that it will, after the run's last line.
    """
    for ref in running:
        ray.cancel(ref)
    for handle in getattr(actor, "ranks", [actor]):
        ray.kill(handle, no_restart=True)


def handles(actor: Any) -> list[Any]:
    """The actor handles behind ``actor``: a ``LearnerGroup``'s ranks, or itself."""
    return list(getattr(actor, "ranks", [actor]))


class RewardPool:
    """``RewardScorer`` actors that score batches in chunks, concurrently, keeping order.

    Args:
        reward_config: components, ``num_actors`` and ``batch_size`` (samples per call).
        resources_config: ``reward_cpus``, ``reward_gpus``, ``custom["reward"]``,
            ``torch_threads`` of each actor.
        seed: seed of any random reference model.
        num_actors: overrides ``reward_config.num_actors``.
        runtime_env: Ray runtime environment of the actors (e.g. where user functions live).
        timeout: seconds a score call may take before its actor is replaced.
        retries: how often a timed-out chunk is sent again.
        start_timeout: seconds the actors may take to start.
        memory_mb: an actor whose resident memory grows past this is replaced between batches
            (a reward function that leaks); None or 0: never.
    """

    def __init__(
        self,
        reward_config: RewardConfig,
        resources_config: ResourcesConfig | None = None,
        seed: int = 0,
        *,
        num_actors: int | None = None,
        runtime_env: dict[str, Any] | None = None,
        timeout: float | None = None,
        retries: int = 0,
        start_timeout: float | None = None,
        memory_mb: float | None = None,
    ) -> None:
        check_reward_config(reward_config)  # fail in the driver, not in N actors
        resources = resources_config or ResourcesConfig()
        self.config, self.seed, self.timeout, self.retries = reward_config, seed, timeout, retries
        self.start_timeout = start_timeout
        self.torch_threads = resources.torch_threads
        self.options = actor_options(
            resources.reward_cpus,
            resources.reward_gpus,
            resources.custom.get("reward"),
            runtime_env=runtime_env,
        )
        # No components (an environment's rewards alone score the episodes): no actors.
        count = (num_actors or reward_config.num_actors) if reward_config.components else 0
        self.actors = [self._new() for _ in range(count)]
        # Wait for the model loads here, so the first score() is not charged for them and a
        # scorer that cannot start fails now.
        self._wait_ready(self.actors)
        self.pids = pids(self.actors)
        self.restarts = 0  # actors found restarted (Ray restarts a dead one, retrying its call)
        self.timeouts = 0  # actors replaced because a score call passed ``timeout``
        self.memory_mb = memory_mb
        self.memory_replacements = 0  # actors replaced because they grew past ``memory_mb``

    def _wait_ready(self, handles: list[Any]) -> None:
        try:
            get([actor.ready.remote() for actor in handles], timeout=self.start_timeout)
        except GetTimeoutError:
            raise Hung(
                f"reward actors did not start within faults.start_timeout_s="
                f"{self.start_timeout:g} s"
            ) from None

    def _new(self) -> Any:
        return make_actor(
            RewardScorer, self.options, self.config, self.seed, torch_threads=self.torch_threads
        )

    def _replace(self, k: int, *, timed_out: bool = True) -> None:
        """Kill actor ``k`` (a hung process too: Ray ends it with SIGKILL) and start anew."""
        ray.kill(self.actors[k], no_restart=True)
        self.actors[k] = self._new()
        self.pids[k] = -1  # a replacement, not a restart
        self.timeouts += timed_out

    def score(self, batch: RewardBatch) -> ScoreResult:
        """Score ``batch``: chunks of ``batch_size`` go round-robin to the actors at once.

        A chunk not scored within ``timeout`` has its actor replaced and is sent again, at most
        ``retries`` times.

        Raises:
            RewardError: as ``RewardScorer.score``, naming the sample's index in ``batch``.
            Hung: a chunk timed out on every try.
        """
        if len(batch) == 0 or not self.actors:
            keys = component_keys(self.config)
            n = len(batch)
            return ScoreResult(np.zeros(n), {k: np.zeros(n) for k in keys}, np.zeros(n, bool))
        size = self.config.batch_size
        starts = list(range(0, len(batch), size))

        def send(k: int) -> ray.ObjectRef:
            start = starts[k]
            chunk = batch.select(range(start, min(start + size, len(batch))))
            return self.actors[k % len(self.actors)].score.remote(chunk, start)

        pending = {k: send(k) for k in range(len(starts))}
        results: dict[int, ScoreResult] = {}
        for attempt in range(self.retries + 1):
            refs = list(pending.values())
            done = wait_all(refs, self.timeout)
            for k, ref in list(pending.items()):
                if ref in done:
                    results[k] = get(ref)
                    del pending[k]
            if not pending:
                break
            hung = sorted({k % len(self.actors) for k in pending})
            for a in hung:
                self._replace(a)
            if attempt == self.retries:
                raise Hung(
                    f"reward actor {hung[0]}: score did not return within "
                    f"faults.score_timeout_s={self.timeout:g} s on {self.retries + 1} tries (a "
                    f"reward function that never returns?); raise the setting or fix the cause"
                )
            self._wait_ready([self.actors[a] for a in hung])
            pending = {k: send(k) for k in pending}
        result = ScoreResult.concat([results[k] for k in range(len(starts))])
        now = pids(self.actors, timeout=self.timeout)  # idle now: a round trip, not a wait
        self.restarts += sum(b != -1 and a != b for a, b in zip(now, self.pids))
        self.pids = now
        if self.memory_mb:
            grown = [
                (k, mb)
                for k, mb in enumerate(rss_mb(self.actors, timeout=self.timeout))
                if mb > self.memory_mb
            ]
            for k, mb in grown:
                warnings.warn(
                    f"reward actor {k} holds {mb:.0f} MiB, past faults.actor_memory_mb="
                    f"{self.memory_mb:g} (a reward function that keeps what it is given?); "
                    f"replaced with a new one",
                    stacklevel=2,
                )
                self._replace(k, timed_out=False)
                self.memory_replacements += 1
            if grown:
                self._wait_ready([self.actors[k] for k, _ in grown])
                self.pids = pids(self.actors, timeout=self.timeout)
        return result

    def shutdown(self) -> None:
        """Kill the actors (without restarting them)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
