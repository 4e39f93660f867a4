"""Replay throughput: distrl's sum-tree buffer in-process and as a Ray actor, beside RLlib's
``PrioritizedReplayBuffer`` on the same operations and transitions, in the same run.

Transitions are those of ``limits.md``: int32[64] ``obs`` and ``next_obs``, an int action, a
float reward and a bool done, in a full buffer of 100,000 with alpha 0.6; adds come in batches
of 256, samples and priority updates in batches of 512 (beta 0.4).

RLlib is optional (the ``bench`` extra): without it the section reports distrl's figures
alone, its RLlib figures and ratios None and a ``note`` saying what to install.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from distrl.bench.common import BenchOptions, actor_peak_rss_mb, local_ray, ratio
from distrl.dqn.replay import PrioritizedReplay, UniformReplay
from distrl.runtime import actors

CAPACITY, ADD_BATCH, BATCH, OBS_LEN = 100_000, 256, 512, 64
OPERATIONS = ("add_transitions_per_s", "sample_per_s", "update_per_s", "sample_update_per_s")


def transitions(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` random transitions as numpy columns."""
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.integers(0, 50_000, (n, OBS_LEN), dtype=np.int32),
        "next_obs": rng.integers(0, 50_000, (n, OBS_LEN), dtype=np.int32),
        "action": rng.integers(0, 50_000, n),
        "reward": rng.random(n, dtype=np.float32),
        "done": rng.random(n) < 0.05,
    }


def rllib_figures(capacity: int, seconds: float) -> dict[str, float]:
    """RLlib's old-stack ``PrioritizedReplayBuffer``, in this process, on the same operations."""
    from ray.rllib.policy.sample_batch import SampleBatch
    from ray.rllib.utils.replay_buffers.prioritized_replay_buffer import (
        PrioritizedReplayBuffer,
    )

    buf = PrioritizedReplayBuffer(capacity=capacity, alpha=0.6)
    chunk = SampleBatch(transitions(ADD_BATCH))
    while len(buf) < capacity:
        buf.add(chunk)
    td = np.abs(np.random.default_rng(1).standard_normal(BATCH)) + 1e-6
    idx = buf.sample(BATCH, beta=0.4)["batch_indexes"]

    def sample_update() -> None:
        fresh = buf.sample(BATCH, beta=0.4)["batch_indexes"]
        buf.update_priorities(fresh, td)

    return {
        "add_transitions_per_s": rate(lambda: buf.add(chunk), seconds) * ADD_BATCH,
        "sample_per_s": rate(lambda: buf.sample(BATCH, beta=0.4), seconds),
        "update_per_s": rate(lambda: buf.update_priorities(idx, td), seconds),
        "sample_update_per_s": rate(sample_update, seconds),
    }


def actor_figures(capacity: int, seconds: float) -> dict[str, float]:
    """distrl's ``PrioritizedReplay`` as a Ray actor, called from this process (each call
    waited for: the round trip a driver pays; a learner's pipelined calls pay less)."""
    buf = actors.make_actor(PrioritizedReplay, actors.actor_options(0.0), capacity=capacity)
    chunk = transitions(ADD_BATCH)
    try:
        big = transitions(capacity)
        actors.get(buf.add.remote(big))
        td = np.random.default_rng(1).standard_normal(BATCH)
        _, idx, _ = actors.get(buf.sample.remote(BATCH))

        def sample_update() -> None:
            _, fresh, _ = actors.get(buf.sample.remote(BATCH))
            actors.get(buf.update_priorities.remote(fresh, td))

        call: Callable[[Any], Any] = actors.get
        figures = {
            "add_transitions_per_s": rate(lambda: call(buf.add.remote(chunk)), seconds) * ADD_BATCH,
            "sample_per_s": rate(lambda: call(buf.sample.remote(BATCH)), seconds),
            "update_per_s": rate(lambda: call(buf.update_priorities.remote(idx, td)), seconds),
            "sample_update_per_s": rate(sample_update, seconds),
        }
        figures["peak_rss_mb"] = actor_peak_rss_mb([buf])[0]  # a full buffer of 100,000
        return figures
    finally:
        import ray

        ray.kill(buf, no_restart=True)


def bench_replay(options: BenchOptions) -> dict[str, Any]:
    """Add / sample / update throughput: distrl in-process and through Ray vs RLlib (numpy
    on the CPU, both; no model is involved)."""
    seconds = 0.5 if options.quick else 2.0
    ours = benchmark(CAPACITY, BATCH, seconds, ADD_BATCH, OBS_LEN)
    note = None
    try:
        rllib: dict[str, float | None] = dict(rllib_figures(CAPACITY, seconds))
    except ImportError as err:
        rllib = dict.fromkeys(OPERATIONS)
        note = f'RLlib comparison skipped ({err}): pip install -e ".[bench]"'
    with local_ray():
        remote = actor_figures(CAPACITY, seconds)

    def vs_rllib(value: float, op: str) -> float | None:
        reference = rllib[op]
        return None if reference is None else ratio(value, reference)

    rows = {
        op: {
            "distrl": ours[op],
            "distrl_ray_actor": remote[op],
            "rllib": rllib[op],
            "ratio": vs_rllib(ours[op], op),
            "ratio_ray_actor": vs_rllib(remote[op], op),
        }
        for op in OPERATIONS
    }

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    print(f"\nreplay, capacity {CAPACITY}, alpha 0.6, add batches {ADD_BATCH}, sample {BATCH}")
    print(f"{'':<24}{'distrl':>12}{'via Ray':>12}{'RLlib':>12}{'ratio':>8}{'Ray ratio':>10}")
    for op, row in rows.items():
        print(
            f"{op:<24}{row['distrl']:>12.0f}{row['distrl_ray_actor']:>12.0f}"
            f"{num(row['rllib'], '.0f'):>12}{num(row['ratio'], '.1f'):>8}"
            f"{num(row['ratio_ray_actor'], '.1f'):>10}"
        )
    print(f"replay actor peak memory: {remote['peak_rss_mb']:.0f} MiB")
    out = {
        "device": "cpu",
        "capacity": CAPACITY,
        "add_batch": ADD_BATCH,
        "batch": BATCH,
        "figures": rows,
        "actor_peak_rss_mb": remote["peak_rss_mb"],
    }
    if note:
        print(note)
        out["note"] = note
    return out


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over at least ``seconds`` (and at least 3 calls)."""
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def benchmark(
    capacity: int = 100_000,
    batch: int = 512,
    seconds: float = 1.0,
    add_batch: int = 256,
    obs_len: int = 64,
    prioritized: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """In-process throughput on int32[obs_len] obs/next_obs transitions in a full buffer.

    Mirrors the RLlib figures in limits.md: adds in batches of ``add_batch`` (transitions/s),
    ``sample(batch)``, ``update_priorities`` of ``batch`` ids and sample + update (calls/s).
    """
    rng = np.random.default_rng(seed)
    chunk = {
        "obs": rng.integers(0, 50_000, (add_batch, obs_len), dtype=np.int32),
        "next_obs": rng.integers(0, 50_000, (add_batch, obs_len), dtype=np.int32),
        "action": rng.integers(0, 50_000, add_batch),
        "reward": rng.random(add_batch, dtype=np.float32),
        "done": rng.random(add_batch) < 0.05,
    }
    buf = PrioritizedReplay(capacity, seed=seed) if prioritized else UniformReplay(capacity, seed)
    while len(buf) < capacity:
        buf.add(chunk)
    add_per_s = rate(lambda: buf.add(chunk), seconds) * add_batch
    _, ids, _ = buf.sample(batch)  # after the adds, so that these ids are live
    td = rng.standard_normal(batch)

    def sample_update() -> None:
        _, fresh_ids, _ = buf.sample(batch)
        buf.update_priorities(fresh_ids, td)

    return {
        "capacity": capacity,
        "batch": batch,
        "add_transitions_per_s": add_per_s,
        "sample_per_s": rate(lambda: buf.sample(batch), seconds),
        "update_per_s": rate(lambda: buf.update_priorities(ids, td), seconds),
        "sample_update_per_s": rate(sample_update, seconds),
    }
