"""Throughput benchmarks.

``python -m distrl.bench [rollout|learner|reward|all ...] [--json OUT] [--model default|tiny]
[--quick]``

Each section is a function returning a JSON-ready dict and printing a table; ``all`` runs every
section. Speed is measured here, never asserted in tests. The machine is shared and noisy:
compare figures from one run rather than across runs. Every distrl figure sits beside a raw
reference measured in the same run (repetitions interleaved with distrl's), and their ratio.

- ``rollout``: tokens/s of ``RolloutWorker`` actors (1 worker with every CPU; 2 workers with
  an equal share each, generating at once) against a plain Hugging Face ``model.generate`` of
  the same model, prompts, batch size, length and sampling settings in this process.
- ``learner``: tokens/s of ``Learner.train`` (in an actor with every CPU) on a batch from a real
  rollout, whole and its update phase alone, against a plain forward + backward + AdamW step
  of the same model on the same tokens in this process.
- ``reward``: samples/s of the ``RewardPool`` with 1 and 2 actors for the packaged ``default``
  config's reward (beside the same reward in-process, without Ray), and the cost of every
  built-in component alone, in ms per sample, measured in-process.

Peak resident memory (VmHWM) is reported for this process per section and, read from inside,
for every actor.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from distrl.config import RewardComponent, RewardConfig, RolloutConfig, RunConfig, load_config
from distrl.data import load_examples
from distrl.learner import Learner
from distrl.policy import build_model, build_tokenizer, encode_prompts, left_pad
from distrl.rewards import COMPONENTS, RewardBatch, RewardScorer
from distrl.rollout import RolloutWorker, Trajectories
from distrl.tokenizers import Tokenizer

BATCH_SIZE = 8  # sequences per generate call and per learner batch (one PPO minibatch)
MAX_NEW_TOKENS = 32

# Options that let every built-in component run on unlabelled chat data.
COMPONENT_OPTIONS: dict[str, dict[str, Any]] = {
    "relevance": {"target": "talking about food, cooking and restaurants"},
    "quality": {"default": 1.0},
    "length": {"target_min": 12, "target_max": 24, "max_tokens": 24},
}


def machine_info() -> dict[str, Any]:
    """Cores, torch threads, device and versions, stored with every benchmark result."""
    import ray
    import torch
    import transformers

    from distrl.models import select_device

    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(select_device("auto")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def reward_batch(n: int) -> RewardBatch:
    """``n`` packaged chat replies as responses, each with another reply as its reference."""
    examples = load_examples("default", limit=n + 1)
    replies = [e.reference or e.prompt_text for e in examples]
    while len(replies) < n + 1:  # a small packaged set is repeated
        replies += replies
    prompts = [e.prompt_text for e in examples] * (n // len(examples) + 1)
    return RewardBatch(replies[:n], prompts=prompts[:n], references=replies[1 : n + 1])


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds per call of ``fn``, best of ``repeats`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


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
        seconds = _timed(call, repeats)
        costs[name] = {"load_s": load_s, "ms_per_sample": 1000 * seconds / len(batch)}
    return costs


def pool_throughput(
    reward: RewardConfig, resources: Any, batch: RewardBatch, actors: int, repeats: int
) -> dict[str, float]:
    """Samples/s of a ``RewardPool`` of ``actors`` scorers over ``batch``."""
    from distrl.actors import RewardPool

    start = time.perf_counter()
    pool = RewardPool(reward, resources, num_actors=actors)
    startup = time.perf_counter() - start
    pool.score(batch)  # warm-up
    seconds = _timed(lambda: pool.score(batch), repeats)
    pool.shutdown()
    return {"samples_per_s": len(batch) / seconds, "startup_s": startup}


def bench_reward(model: str, quick: bool) -> dict[str, Any]:
    """The reward section: pool samples/s with 1 and 2 actors, and per-component cost.

    Always the packaged ``default`` config's reward; ``model`` does not apply here.
    """
    del model
    config = load_config("default")
    n_pool, n_components, repeats = (256, 32, 2) if quick else (2048, 128, 3)
    pool_batch, component_batch = reward_batch(n_pool), reward_batch(n_components)

    in_process = RewardScorer(config.reward)
    in_process.score(pool_batch)
    local = len(pool_batch) / _timed(lambda: in_process.score(pool_batch), repeats)

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
    print(f"{'scorer':<22}{'samples/s':>12}{'startup s':>12}")
    print(f"{'in-process (no Ray)':<22}{result['in_process_samples_per_s']:>12.0f}{'-':>12}")
    for k, row in result["pool"].items():
        name = f"pool, {k} actor{'s' * (k != '1')}"
        print(f"{name:<22}{row['samples_per_s']:>12.0f}{row['startup_s']:>12.1f}")
    print(f"\ncomponent cost alone, in-process, {result['component_samples']} samples")
    print(f"{'component':<22}{'ms/sample':>12}{'load s':>12}")
    for name, row in result["component_costs"].items():
        print(f"{name:<22}{row['ms_per_sample']:>12.3f}{row['load_s']:>12.2f}")


SECTIONS: dict[str, Callable[[bool], dict[str, Any]]] = {"reward": bench_reward}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmark sections and optionally write their JSON."""
    parser = argparse.ArgumentParser(prog="python -m distrl.bench", description=__doc__)
    parser.add_argument(
        "section", nargs="?", default="all", choices=[*SECTIONS, "all"], help="what to measure"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = list(SECTIONS) if args.section == "all" else [args.section]
    report: dict[str, Any] = {"machine": machine_info(), "quick": args.quick}
    print(", ".join(f"{k}: {v}" for k, v in report["machine"].items()))
    for name in names:
        report[name] = SECTIONS[name](args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
