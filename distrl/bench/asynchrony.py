"""Synchronous against asynchronous training (``rollout.mode``), in the same run.

Throughput: GRPO on the pipeline section's work (``distrl.bench.pipeline``: 8 completions of
at most 32 tokens per step) with 2 rollout workers, in sync mode (``max_policy_lag`` 1) and in
async mode at ``max_policy_lag`` 1, 2 and 4: seconds per step, completions/s, and the share of
each step the learner sat idle (waiting on rollouts, scores and the publish) and the workers sat
idle (between their batches), medians over the steps after a warm-up one. Ratios are against
the sync row.

Learning (left out with ``--quick``): the packaged ``arithmetic`` task (its config, fewer
steps) in sync mode and in async mode at ``max_policy_lag`` 2, same seed: the mean reward of
each step against the samples trained and the wall time so far, and the held-out greedy
accuracy (``eval/reward``) at the end.

The workers and the learner share this machine's cores: async mode gains where each has a
processor of its own (a GPU each), which ``--device cuda`` measures.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

from distrl.bench.common import BenchOptions, gpu_share, local_ray, ratio, rounded
from distrl.bench.pipeline import COMPLETIONS, MAX_NEW_TOKENS, pipeline_overrides, timed_steps
from distrl.config import load_config
from distrl.outputs.metrics import read_metrics

WORKERS = 2
MODES = (("sync", 1), ("async", 1), ("async", 2), ("async", 4))
LEARNING_STEPS = 16


def throughput(options: BenchOptions, steps: int, mode: str, lag: int) -> dict[str, Any]:
    """Seconds per step and idle shares of GRPO on the pipeline's work in ``mode`` at ``lag``."""
    from distrl.loop.driver import train

    with tempfile.TemporaryDirectory() as tmp:
        overrides = pipeline_overrides(options, steps, tmp, lag=lag, threads=1, workers=WORKERS)
        overrides["rollout.mode"] = mode
        records = read_metrics(train(load_config(options.model, overrides)) / "metrics.jsonl")
    seconds = timed_steps(records)
    timed = records[1:]
    per_step = statistics.median(seconds)
    return {
        "mode": mode,
        "max_policy_lag": lag,
        "seconds_per_step": per_step,
        "completions_per_s": COMPLETIONS / per_step,
        "learner_idle_share": statistics.median(
            r["time/learner_idle_s"] / s for r, s in zip(timed, seconds)
        ),
        "worker_idle_share": statistics.median(
            r["time/worker_idle_s"] / (WORKERS * s) for r, s in zip(timed, seconds)
        ),
        "policy_lag_max": max(r["rollout/policy_lag"] for r in records),
        "seconds": rounded(seconds),
    }


def learning(options: BenchOptions, mode: str, lag: int) -> dict[str, Any]:
    """The ``arithmetic`` task's reward per step against samples and wall time, in ``mode``."""
    from distrl.loop.driver import train

    with tempfile.TemporaryDirectory() as tmp:
        gpus = gpu_share(options, WORKERS + 1)
        overrides = {
            "model.device": options.device,
            "model.dtype": options.dtype,
            "iterations": LEARNING_STEPS,
            "rollout.mode": mode,
            "rollout.max_policy_lag": lag,
            "rollout.num_workers": WORKERS,
            "rollout.batch_size": 4,  # 8 prompts x 4 samples a step, as the task's config
            "resources.rollout_gpus": gpus,
            "resources.learner_gpus": gpus,
            "output.dir": f"{tmp}/run",
            "output.eval_every": LEARNING_STEPS,
            "output.checkpoint_every": LEARNING_STEPS,
            "output.tensorboard": False,
            "output.plots": False,
            "output.progress": False,
        }
        config = load_config("arithmetic", overrides)
        records = read_metrics(train(config) / "metrics.jsonl")
    per_step = config.rollout.batch_size * WORKERS * config.rollout.samples_per_prompt
    wall, elapsed = [], 0.0
    for r in records:
        elapsed += r["time/iteration_s"]
        wall.append(elapsed)
    return {
        "mode": mode,
        "max_policy_lag": lag,
        "samples": [per_step * r["step"] for r in records],
        "wall_s": rounded(wall),
        "reward": rounded([r["reward/total"] for r in records]),
        "reward_last_4": statistics.mean(r["reward/total"] for r in records[-4:]),
        "eval_reward": records[-1].get("eval/reward"),
    }


def bench_asynchrony(options: BenchOptions) -> dict[str, Any]:
    """Sync against async GRPO: throughput and idle shares, and (not ``--quick``) learning."""
    steps = 3 if options.quick else 6
    out: dict[str, Any] = {"workers": WORKERS, "completions_per_step": COMPLETIONS}
    with local_ray():
        rows = {f"{m}_lag{lag}": throughput(options, steps, m, lag) for m, lag in MODES}
        curves = (
            {}
            if options.quick
            else {
                f"{m}_lag{lag}": learning(options, m, lag) for m, lag in (("sync", 1), ("async", 2))
            }
        )
    reference = rows["sync_lag1"]["completions_per_s"]
    print(
        f"\nasynchrony, {WORKERS} workers, {COMPLETIONS} completions x <= {MAX_NEW_TOKENS} tokens"
    )
    head = f"{'':<14}{'s/step':>10}{'compl/s':>10}{'vs sync':>9}{'learner idle':>14}"
    print(f"{head}{'worker idle':>13}")
    for name, row in rows.items():
        row["ratio"] = ratio(row["completions_per_s"], reference)
        print(
            f"{name:<14}{row['seconds_per_step']:>10.2f}{row['completions_per_s']:>10.2f}"
            f"{row['ratio']:>9.2f}{row['learner_idle_share']:>14.0%}"
            f"{row['worker_idle_share']:>13.0%}"
        )
    out["throughput"] = rows
    if curves:
        print(f"\narithmetic, {LEARNING_STEPS} steps: mean reward of the last 4, eval at the end")
        for name, curve in curves.items():
            print(
                f"{name:<14}reward {curve['reward_last_4']:.3f}  eval {curve['eval_reward']}  "
                f"wall {curve['wall_s'][-1]:.0f} s"
            )
        out["learning"] = curves
    return out
