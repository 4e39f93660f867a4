"""Throughput benchmarks.

``python -m distrl.bench [rollout|episodes|learner|publish|replay|reward|attention|pipeline|
asynchrony|all ...] [--json OUT] [--model default|tiny] [--quick] [--batch B] [--new-tokens T]
[--device auto|cpu|cuda] [--dtype auto|float32|bfloat16|float16] [--engine hf|vllm]``

Each section is a function returning a JSON-ready dict and printing a table; ``all`` runs every
section. Speed is measured here, never asserted in tests. The machine is shared and noisy:
compare figures from one run rather than across runs. Every distrl figure sits beside a raw
reference measured in the same run (repetitions interleaved with distrl's), and their ratio.
Both sides of a comparison run on the same device, and the JSON says which: on a CUDA machine
(``--device auto``) distrl's actors hold GPU shares and the raw side runs on the same GPU, at
``--batch`` x ``--new-tokens`` (GPU-sized batches are the ones worth measuring there).

- ``rollout``: tokens/s of ``RolloutWorker`` actors (1 worker with every CPU; 2 workers with
  an equal share each, generating at once; 1 worker whose policy carries rank-8 LoRA adapters)
  against a plain Hugging Face ``model.generate`` of the same model, prompts, batch size,
  length and sampling settings in this process. With ``--engine vllm``: 1 worker with
  ``rollout.engine vllm`` against a plain vLLM ``LLM.generate`` (same engine arguments) and a
  plain ``model.generate``, generated tokens/s up to each row's EOS, engine builds apart.
- ``episodes``: multi-turn episodes (the packaged ``guess`` environment, up to 4 model turns)
  of one ``RolloutWorker`` on ``--engine``, episodes/s and the model's tokens/s, against the
  same worker's single-turn generation of as many tokens per sequence.
- ``learner``: tokens/s of ``Learner.train`` (in an actor with every CPU) on a batch from a real
  rollout, whole and its update phase alone, against a plain forward + backward + AdamW step
  of the same model on the same tokens in this process; and a learner with rank-8 LoRA
  adapters on the same batch, with each learner's peak memory and trained parameters. With
  ``--learner-workers 1 2``, also the learner as 1 and 2 sharded learner workers: each rank's
  learner-state memory, tokens/s, and their first update's weights against the first count's.
- ``publish``: seconds to get the learner's weights into 2 rollout workers, as the driver
  does it (``publish_weights`` views, ``set_weights``), in float32 and bfloat16, against the
  plain way (a state dict of torch tensors through the object store, ``load_state_dict``);
  and the same with rank-8 LoRA adapters, where only the adapters move.
- ``replay``: add / sample / update-priorities throughput of distrl's prioritized replay,
  in-process and as a Ray actor, against RLlib's ``PrioritizedReplayBuffer`` in-process
  (optional ``bench`` extra; without it distrl's figures alone, with a note).
- ``attention``: time and memory of FAVOR+ (the ``performer`` Q-network's attention) and of
  softmax attention as the sequence grows: linear against quadratic.
- ``pipeline``: end-to-end seconds per step and completions/s of distrl's PPO loop against
  TRL's ``GRPOTrainer`` (optional ``bench`` extra) on the same model, prompts, reward, batch,
  length and number of updates.
- ``asynchrony``: GRPO with 2 rollout workers in sync mode and in async mode at
  ``max_policy_lag`` 1, 2 and 4 (``rollout.mode``): seconds per step, completions/s and the
  learner's and workers' idle shares; and (not ``--quick``) the packaged ``arithmetic`` task's
  reward against samples and wall time, sync against async at lag 2.
- ``reward``: samples/s of the ``RewardPool`` with 1 and 2 actors for the packaged ``default``
  config's reward (beside the same reward in-process, without Ray), and the cost of every
  built-in component alone, in ms per sample, measured in-process.

Peak resident memory (VmHWM) is reported for this process per section and, read from inside,
for every actor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distrl.bench.asynchrony import bench_asynchrony
from distrl.bench.attention import bench_attention
from distrl.bench.common import BATCH_SIZE, MAX_NEW_TOKENS, BenchOptions, local_ray, machine_info
from distrl.bench.episodes import bench_episodes
from distrl.bench.learner import bench_learner
from distrl.bench.pipeline import bench_pipeline
from distrl.bench.publish import bench_publish
from distrl.bench.replay import bench_replay
from distrl.bench.reward import bench_reward
from distrl.bench.rollout import bench_rollout
from distrl.errors import ModelError

SECTIONS: dict[str, Callable[[BenchOptions], dict[str, Any]]] = {
    "rollout": bench_rollout,
    "episodes": bench_episodes,
    "learner": bench_learner,
    "publish": bench_publish,
    "reward": bench_reward,
    "replay": bench_replay,
    "attention": bench_attention,
    "pipeline": bench_pipeline,
    "asynchrony": bench_asynchrony,
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
    parser.add_argument(
        "--batch",
        type=int,
        default=BATCH_SIZE,
        help=f"sequences per generate call and learner batch (default {BATCH_SIZE})",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=MAX_NEW_TOKENS,
        help=f"new tokens per sequence in rollout and learner (default {MAX_NEW_TOKENS})",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where both sides run; auto = CUDA when present (actors then hold GPU shares)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="model dtype; auto = bfloat16 on a GPU that supports it, else float32",
    )
    parser.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="the rollout section's engine; vllm: a RolloutWorker with rollout.engine vllm "
        "against a plain vLLM LLM.generate and a plain HF generate",
    )
    parser.add_argument(
        "--learner-workers",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="the learner section also runs the learner as each of these numbers of sharded "
        "learner workers (e.g. 1 2): per-rank state memory, tokens/s, weights against the first",
    )
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.learner_workers):
        parser.error("--learner-workers takes counts of 1 or more")
    if args.batch < 1 or args.new_tokens < 1:
        parser.error("--batch and --new-tokens must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    names = list(SECTIONS) if "all" in args.sections else list(dict.fromkeys(args.sections))
    options = BenchOptions(
        model=args.model,
        quick=args.quick,
        batch=args.batch,
        new_tokens=args.new_tokens,
        device=args.device,
        dtype=args.dtype,
        engine=args.engine,
        learner_workers=tuple(args.learner_workers),
    )
    try:
        options.on_gpu  # noqa: B018 (resolves the device: fail before any section starts)
    except ModelError as err:
        parser.error(f"--device {args.device}: {err}")
    report: dict[str, Any] = {
        "machine": machine_info(),
        **dataclasses.asdict(options),
    }
    print(", ".join(f"{k}: {v}" for k, v in report["machine"].items()))
    with local_ray():  # one Ray for every section: its start-up is paid once
        for name in names:
            # Other tenants of a shared machine show in the load average, not in our timings.
            load, start = os.getloadavg()[0], time.monotonic()
            report[name] = SECTIONS[name](options)
            report[name]["load_average"] = [load, os.getloadavg()[0]]
            report[name]["elapsed_s"] = time.monotonic() - start
            print(
                f"{name}: {report[name]['elapsed_s']:.0f} s; "
                f"1-min load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
            )
            if args.json:  # after every section, so an interrupted run keeps what it measured
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(f"\nwrote {args.json}")
    return 0
