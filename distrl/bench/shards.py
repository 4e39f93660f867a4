"""The learner at several ranks (``--learner-workers 1 2``): per-rank learner-state memory,
tokens/s and how far N ranks' update is from one learner's, on the learner section's batch."""

from __future__ import annotations

import os
import statistics
from typing import Any

import numpy as np
import torch

from distrl.bench.common import BenchOptions, bench_config, clock, gpu_share, rounded
from distrl.pg.learner import Learner

# A weight that differs by more than this from one learner's update counts as moved apart.
WEIGHT_GAP = 1e-6


def start_learners(cls: type, config: Any, options: BenchOptions, world: int) -> Any:
    """One learner actor (``world`` 1) or a ``LearnerGroup`` of ``world`` ranks, sharing
    this machine's cores (and GPUs) evenly."""
    from distrl.runtime.actors import LearnerGroup, actor_options, make_actor

    cores = os.cpu_count() or 1
    threads = max(1, cores // world)
    options_ = actor_options(cores / world, gpu_share(options, world))
    arguments = Learner.arguments(config) | {"torch_threads": threads}
    if world == 1:
        return make_actor(cls, options_, **arguments)
    return LearnerGroup(cls, options_, arguments, world, timeout_s=600)


def bench_learner_workers(
    options: BenchOptions, cls: type, batch_ref: Any, scores: np.ndarray, tokens: int
) -> dict[str, Any]:
    """Each of ``options.learner_workers`` in turn (one at a time, so memory is its own): a
    warm-up update from the initial weights (compared with one learner's), then timed ones."""
    from distrl.runtime.actors import get, handles, kill

    config = bench_config(options)
    repeats = 2 if options.quick else 4
    rows: dict[str, dict[str, Any]] = {}
    single: dict[str, torch.Tensor] | None = None
    for world in options.learner_workers:
        learner = start_learners(cls, config, options, world)
        ranks = handles(learner)

        def train(learner: Any = learner, ranks: list[Any] = ranks) -> Any:
            refs = [r.train.remote(batch_ref, scores) for r in ranks]
            return get(refs)[0]

        train()  # from the initial weights: the update compared across learner counts
        weights = get([r.weights.remote() for r in ranks])[0].tensors()  # a collective
        # Right after an update, as in a run: gradients and moments are all held.
        memory = get([r.state_memory.remote() for r in ranks])
        seconds = [clock(train)[0] for _ in range(repeats)]
        row: dict[str, Any] = {
            "tokens_per_s": tokens / statistics.median(seconds),
            "seconds": statistics.median(seconds),
            "samples": rounded([tokens / s for s in seconds]),
            "per_rank_state_mb": [{k: round(v, 2) for k, v in m.items()} for m in memory],
            "peak_rss_mb": get([r.peak_rss_mb.remote() for r in ranks]),
            "peak_gpu_mb": get([r.peak_gpu_mb.remote() for r in ranks]),
        }
        if single is None:
            single = {k: v.float() for k, v in weights.items()}
        gaps = torch.cat([(weights[k].float() - single[k]).abs().flatten() for k in single])
        row["weight_gap_max"] = float(gaps.max())
        row["weight_gap_share"] = float((gaps > WEIGHT_GAP).float().mean())
        rows[str(world)] = row
        kill(learner)
    first = rows[str(options.learner_workers[0])]
    base = max(m["total"] for m in first["per_rank_state_mb"])
    for row in rows.values():
        row["state_ratio"] = max(m["total"] for m in row["per_rank_state_mb"]) / base
    return {
        "note": (
            f"each learner count in turn on the learner section's batch ({tokens} tokens), "
            "ranks sharing the machine's cores (and GPUs) evenly; per_rank_state_mb is what "
            "each rank holds right after an update (its shards of the policy, value head and "
            "reference; gradients; AdamW moments; float32 masters of a low-precision run); "
            f"state_ratio = largest rank's total / the first count's; weight_gap_* compare "
            f"the first update from the same initial weights with the first count's (share of "
            f"weights apart by more than {WEIGHT_GAP:g}: AdamW's step is lr * sign(grad) where "
            "a gradient is round-off, so those flip); tokens_per_s from the median of "
            f"{repeats} updates"
        ),
        "counts": rows,
    }
