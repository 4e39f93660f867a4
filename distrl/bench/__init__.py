"""Throughput benchmarks.

``python -m distrl.bench [rollout|learner|replay|reward|attention|pipeline|all ...]
[--json OUT] [--model default|tiny] [--quick]``

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
- ``replay``: add / sample / update-priorities throughput of distrl's prioritized replay,
  in-process and as a Ray actor, against RLlib's ``PrioritizedReplayBuffer`` in-process.
- ``attention``: time and memory of FAVOR+ (the ``performer`` Q-network's attention) and of
  softmax attention as the sequence grows: linear against quadratic.
- ``pipeline``: end-to-end seconds per step and completions/s of distrl's PPO loop against
  TRL's ``GRPOTrainer`` (optional ``bench`` extra) on the same model, prompts, reward, batch,
  length and number of updates.
- ``reward``: samples/s of the ``RewardPool`` with 1 and 2 actors for the packaged ``default``
  config's reward (beside the same reward in-process, without Ray), and the cost of every
  built-in component alone, in ms per sample, measured in-process.

Peak resident memory (VmHWM) is reported for this process per section and, read from inside,
for every actor.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distrl.bench.attention import bench_attention
from distrl.bench.common import local_ray, machine_info
from distrl.bench.learner import bench_learner
from distrl.bench.pipeline import bench_pipeline
from distrl.bench.replay import bench_replay
from distrl.bench.reward import bench_reward
from distrl.bench.rollout import bench_rollout

SECTIONS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "rollout": bench_rollout,
    "learner": bench_learner,
    "reward": bench_reward,
    "replay": bench_replay,
    "attention": bench_attention,
    "pipeline": bench_pipeline,
}


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmark sections and optionally write their JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m distrl.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "sections",
        nargs="*",
        default=["all"],
        choices=[*SECTIONS, "all"],
        metavar="section",
        help=f"what to measure: {', '.join(SECTIONS)} or all (default)",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    parser.add_argument(
        "--model", default="default", choices=["default", "tiny"], help="packaged config"
    )
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = list(SECTIONS) if "all" in args.sections else list(dict.fromkeys(args.sections))
    report: dict[str, Any] = {
        "machine": machine_info(),
        "model": args.model,
        "quick": args.quick,
    }
    print(", ".join(f"{k}: {v}" for k, v in report["machine"].items()))
    with local_ray():  # one Ray for every section: its start-up is paid once
        for name in names:
            # Other tenants of a shared machine show in the load average, not in our timings.
            load = os.getloadavg()[0]
            report[name] = SECTIONS[name](args.model, args.quick)
            report[name]["load_average"] = [load, os.getloadavg()[0]]
            print(f"1-min load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
            if args.json:  # after every section, so an interrupted run keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(f"\nwrote {args.json}")
    return 0
