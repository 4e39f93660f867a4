"""Reward throughput: the reward pool with 1 and 2 actors, and each component's cost."""

from __future__ import annotations

import time
from typing import Any

from distrl.bench.common import (
    COMPONENT_OPTIONS,
    BenchOptions,
    actor_peak_rss_mb,
    local_ray,
    timed,
)
from distrl.config import RewardComponent, RewardConfig, load_config
from distrl.data.examples import load_examples
from distrl.rewards import COMPONENTS, RewardBatch, RewardScorer


def reward_batch(n: int) -> RewardBatch:
    """``n`` packaged chat replies as responses, each with another reply as its reference."""
    examples = load_examples("default", limit=n + 1)
    replies = [e.reference or e.prompt_text for e in examples]
    while len(replies) < n + 1:  # a small packaged set is repeated
        replies += replies
    prompts = [e.prompt_text for e in examples] * (n // len(examples) + 1)
    return RewardBatch(replies[:n], prompts=prompts[:n], references=replies[1 : n + 1])


def scorer_devices(scorer: RewardScorer) -> dict[str, str]:
    """Where each component of ``scorer`` runs: its model's device ("cpu" without a model)."""
    out = {}
    for key, component in zip(scorer.reward.keys, scorer.reward.components):
        model = getattr(component, "lm", None) or getattr(component, "embedder", None)
        out[key] = str(getattr(model, "device", "cpu"))
    return out


def _actor_scorer_devices(actor: RewardScorer) -> dict[str, str]:
    return scorer_devices(actor)


def component_costs(batch: RewardBatch, repeats: int) -> dict[str, dict[str, float]]:
    """Load seconds and ms per sample of each built-in component alone, in this process."""
    costs = {}
    for name in COMPONENTS:
        config = RewardConfig(
            components=(RewardComponent(name, 1.0, COMPONENT_OPTIONS.get(name, {})),)
        )
        start = time.perf_counter()
        scorer = RewardScorer(config)
        load_s = time.perf_counter() - start
        component = scorer.reward.components[0]
        lm = getattr(component, "lm", None)

        def call(component=component, lm=lm) -> None:
            if lm is not None:  # perplexity and fluency memoise their batch: measure a full pass
                lm._memo = None
            component(batch)

        call()  # warm-up: first-call allocations, caches of fixed texts
        seconds = timed(call, repeats)
        costs[name] = {"load_s": load_s, "ms_per_sample": 1000 * seconds / len(batch)}
    return costs


def pool_throughput(
    reward: RewardConfig, resources: Any, batch: RewardBatch, actors: int, repeats: int
) -> dict[str, float]:
    """Samples/s of a ``RewardPool`` of ``actors`` scorers over ``batch``."""
    from distrl.runtime.actors import RewardPool

    start = time.perf_counter()
    pool = RewardPool(reward, resources, num_actors=actors)
    startup = time.perf_counter() - start
    pool.score(batch)  # warm-up
    seconds = timed(lambda: pool.score(batch), repeats)
    peaks = actor_peak_rss_mb(pool.actors)
    import ray

    devices = ray.get([a.__ray_call__.remote(_actor_scorer_devices) for a in pool.actors])
    pool.shutdown()
    return {
        "samples_per_s": len(batch) / seconds,
        "startup_s": startup,
        "peak_rss_mb": peaks,
        "devices": devices,
    }


def bench_reward(options: BenchOptions) -> dict[str, Any]:
    """The reward section: pool samples/s with 1 and 2 actors, and per-component cost.

    Always the packaged ``default`` config's reward and resources (its components' devices
    as configured); ``options.quick`` alone applies here.
    """
    config = load_config("default")
    n_pool, n_components, repeats = (256, 32, 2) if options.quick else (2048, 128, 3)
    pool_batch, component_batch = reward_batch(n_pool), reward_batch(n_components)

    in_process = RewardScorer(config.reward)

    def score_afresh() -> None:
        for component in in_process.reward.components:  # else repeats hit the LM's memo
            if (lm := getattr(component, "lm", None)) is not None:
                lm._memo = None
        in_process.score(pool_batch)

    score_afresh()
    local = len(pool_batch) / timed(score_afresh, repeats)

    with local_ray():
        pools = {
            str(k): pool_throughput(config.reward, config.resources, pool_batch, k, repeats)
            for k in (1, 2)
        }
    result = {
        "config": "default",
        "components": [c.name for c in config.reward.components],
        "batch_size": config.reward.batch_size,
        "samples": len(pool_batch),
        "in_process_samples_per_s": local,
        "in_process_devices": scorer_devices(in_process),
        "pool": pools,
        "component_costs": component_costs(component_batch, repeats),
        "component_samples": len(component_batch),
    }
    print_reward(result)
    return result


def print_reward(result: dict[str, Any]) -> None:
    """Print the reward section as two small tables."""
    print(
        f"\nreward: packaged 'default' config ({' + '.join(result['components'])}), "
        f"{result['samples']} samples, chunks of {result['batch_size']}"
    )
    print(f"{'scorer':<22}{'samples/s':>12}{'startup s':>12}{'peak MiB':>14}")
    print(f"{'in-process (no Ray)':<22}{result['in_process_samples_per_s']:>12.0f}{'-':>12}")
    for k, row in result["pool"].items():
        name = f"pool, {k} actor{'s' * (k != '1')}"
        peak = "/".join(f"{p:.0f}" for p in row["peak_rss_mb"])
        print(f"{name:<22}{row['samples_per_s']:>12.0f}{row['startup_s']:>12.1f}{peak:>14}")
    print(f"\ncomponent cost alone, in-process, {result['component_samples']} samples")
    print(f"{'component':<22}{'ms/sample':>12}{'load s':>12}")
    for name, row in result["component_costs"].items():
        print(f"{name:<22}{row['ms_per_sample']:>12.3f}{row['load_s']:>12.2f}")
