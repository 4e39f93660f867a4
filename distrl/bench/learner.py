"""Learner throughput and memory: ``Learner.train`` (full fine-tuning, and LoRA adapters)
against a plain forward + backward + AdamW step."""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distrl.bench.common import (
    LORA_RANK,
    BenchOptions,
    actor_devices,
    bench_config,
    bench_prompts,
    clock,
    gpu_share,
    local_ray,
    peak_gpu_mb,
    peak_rss_mb,
    print_figures,
    ratio,
    reset_peak_rss,
    rounded,
    synchronize,
)
from distrl.bench.shards import bench_learner_workers
from distrl.pg.learner import Learner
from distrl.pg.rollout import RolloutWorker


class MeasuredLearner(Learner):
    """A ``Learner`` that also reports its peak memory, what it trains, and can change its PPO
    epochs."""

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def peak_gpu_mb(self) -> float | None:
        return peak_gpu_mb()

    def trained_count(self) -> int:
        """Parameters in the optimizer (LoRA: the adapters and the value head)."""
        return sum(p.numel() for p in self.opt.params)

    def set_epochs(self, epochs: int) -> None:
        """Make later ``train`` calls take ``epochs`` passes (the rest of the config unchanged)."""
        self.ppo = dataclasses.replace(self.ppo, epochs=epochs)


def raw_train_step(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, lr: float, wd: float
) -> Callable[[], None]:
    """A plain causal-LM step on ``ids`` (B, L): forward with labels, backward, AdamW, on the
    model's device (the inputs are moved there once, untimed)."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    labels = ids.masked_fill(mask == 0, -100)
    model.train()

    def step() -> None:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)

    return step


def bench_learner(options: BenchOptions) -> dict[str, Any]:
    """The learner section: ``Learner.train`` (whole, and one epoch of updates) against a
    plain training step, on a batch from a real rollout, both on the same device."""
    from distrl.runtime.actors import actor_options, get, make_actor

    config = bench_config(options)
    cores, repeats = os.cpu_count() or 1, 3 if options.quick else 5
    torch.set_num_threads(cores)
    reset_peak_rss()
    worker = RolloutWorker(
        model=config.model,
        tokenizer=config.tokenizer,
        rollout=config.rollout,
        seed=config.seed,
        torch_threads=cores,
    )
    prompts = bench_prompts(config, worker.tokenizer)
    batch = worker.generate(prompts, list(range(len(prompts))))
    scores = np.linspace(-1.0, 1.0, len(prompts))  # fixed rewards; their values cost nothing
    # The sequences as the learner sees them: prompt + response, padding and post-EOS masked.
    ids = torch.from_numpy(np.concatenate([batch.prompt_ids, batch.response_ids], 1))
    mask = np.concatenate([batch.prompt_mask, batch.response_mask.astype(np.int64)], 1)
    mask = torch.from_numpy(mask)
    tokens = int(mask.sum())
    # The rollout model is the same model freshly loaded: train it rather than load another.
    raw = raw_train_step(worker.model, ids, mask, config.learner.lr, config.learner.weight_decay)
    raw()  # warm-up (AdamW allocates its state on the first step)
    lora_config = bench_config(options, lora_rank=LORA_RANK)
    with local_ray() as ray:

        def start(config: Any) -> Any:
            return make_actor(
                MeasuredLearner,
                actor_options(cores, gpu_share(options, 1)),
                **Learner.arguments(config) | {"torch_threads": cores},
            )

        learner = start(config)
        batch_ref = ray.put(batch)
        (learner_device,) = actor_devices([learner])  # waits for the model loads

        def train(epochs: int) -> tuple[float, dict[str, float]]:
            get(learner.set_epochs.remote(epochs))
            return clock(lambda: get(learner.train.remote(batch_ref, scores)))

        train(1)  # warm-up
        raw_s: list[float] = []
        wall, update_s, reported = ({1: [], 3: []} for _ in range(3))
        for _ in range(repeats):
            raw_s.append(clock(raw)[0])
            for epochs in (1, 3):
                seconds, metrics = train(epochs)
                wall[epochs].append(seconds)
                update_s[epochs].append(metrics["time/update_s"])
                reported[epochs].append(metrics["learner/tokens_per_s"])
        learner_peak = get(learner.peak_rss_mb.remote())
        memory = {
            "peak_gpu_mb": get(learner.peak_gpu_mb.remote()),
            "trained_parameters": get(learner.trained_count.remote()),
        }
        ray.kill(learner, no_restart=True)
        # One learner at a time, so each actor's peak memory is its own alone.
        lora = start(lora_config)
        lora_wall, lora_reported = [], []
        clock(lambda: get(lora.train.remote(batch_ref, scores)))  # warm-up
        for _ in range(repeats):
            raw_s.append(clock(raw)[0])
            seconds, metrics = clock(lambda: get(lora.train.remote(batch_ref, scores)))
            lora_wall.append(seconds)
            lora_reported.append(metrics["learner/tokens_per_s"])
        lora_row = {
            "tokens_per_s": tokens / statistics.median(lora_wall),
            "seconds": statistics.median(lora_wall),
            "samples": rounded([tokens / t for t in lora_wall]),
            "learner_reported_tokens_per_s": statistics.median(lora_reported),
            "lora_rank": LORA_RANK,
            "peak_gpu_mb": get(lora.peak_gpu_mb.remote()),
            "trained_parameters": get(lora.trained_count.remote()),
        }
        lora_peak = get(lora.peak_rss_mb.remote())
        ray.kill(lora, no_restart=True)
        # The same update with learner.packing: no compute on the batch's padding.
        packed_config = dataclasses.replace(
            config, learner=dataclasses.replace(config.learner, packing=True)
        )
        packed = start(packed_config)
        clock(lambda: get(packed.train.remote(batch_ref, scores)))  # warm-up
        packed_wall = []
        for _ in range(repeats):
            raw_s.append(clock(raw)[0])
            packed_wall.append(clock(lambda: get(packed.train.remote(batch_ref, scores)))[0])
        packed_row = {
            "tokens_per_s": tokens / statistics.median(packed_wall),
            "seconds": statistics.median(packed_wall),
            "samples": rounded([tokens / t for t in packed_wall]),
            "peak_rss_mb": get(packed.peak_rss_mb.remote()),
            "peak_gpu_mb": get(packed.peak_gpu_mb.remote()),
            "trained_parameters": get(packed.trained_count.remote()),
            "padding_share": 1.0 - tokens / ids.numel(),
        }
        ray.kill(packed, no_restart=True)
        workers = None
        if options.learner_workers:
            workers = bench_learner_workers(options, MeasuredLearner, batch_ref, scores, tokens)
    reference = tokens / statistics.median(raw_s)
    # The Learner's own clock around its epochs: one epoch alone, and a third of three.
    epochs_s = update_s[1] + [s / 3 for s in update_s[3]]
    epoch_s = statistics.median(epochs_s)
    rows = {
        f"train, {e} epoch{'s' * (e > 1)}": {
            "tokens_per_s": e * tokens / statistics.median(wall[e]),
            "seconds": statistics.median(wall[e]),
            "samples": rounded([e * tokens / t for t in wall[e]]),
            "learner_reported_tokens_per_s": statistics.median(reported[e]),
        }
        for e in (1, 3)
    }
    rows["update phase, one epoch"] = {
        "tokens_per_s": tokens / epoch_s,
        "seconds": epoch_s,
        "samples": rounded([tokens / t for t in epochs_s]),
    }
    for row in rows.values():
        row.update(memory, peak_rss_mb=learner_peak)
    rows[f"train, 1 epoch, LoRA rank {LORA_RANK}"] = {**lora_row, "peak_rss_mb": lora_peak}
    rows["train, 1 epoch, packed"] = packed_row
    for row in rows.values():
        row["reference_tokens_per_s"] = reference
        row["ratio"] = ratio(row["tokens_per_s"], reference)
    result = {
        "model": config.model.name,
        "dtype": str(next(worker.model.parameters()).dtype).removeprefix("torch."),
        "device": learner_device,
        "batch_shape": list(ids.shape),
        "tokens": tokens,
        "repeats": repeats,
        "note": (
            "tokens = attention-mask tokens of the prompt+response batch (as the Learner's own "
            "learner/tokens_per_s counts them), times epochs; the batch is one real rollout "
            f"of batch_size {len(prompts)} with minibatch_size {len(prompts)}, so every epoch "
            "is one optimizer step; train rows are the driver's wall time of ray.get on "
            "Learner.train in an actor with every CPU (reference and value forwards, GAE, "
            "updates); the update phase is the Learner's own time/update_s (its epochs of "
            "minibatch steps, after the no-grad passes), per epoch, at 1 and at 3 epochs; "
            "raw = plain HF forward with labels (LM head and loss over every position, "
            "where the Learner's cover the response only) + backward + AdamW step of the "
            f"same model on the same ids and mask in the driver with {cores} torch threads; "
            f"medians of {repeats} interleaved repetitions after one warm-up; the LoRA row "
            f"is a second learner actor (rank {LORA_RANK} adapters on every linear layer, "
            "the value head; its reference is its policy with adapters off) started after "
            "the first is gone, on the same batch, so each row's peak_rss_mb (and "
            "peak_gpu_mb on CUDA) is one learner's alone; the packed row is a third one with "
            "learner.packing (the batch's real tokens in one row per pass, padding_share of "
            "the padded batch skipped)"
        ),
        "raw": {
            "tokens_per_s": reference,
            "samples": rounded([tokens / t for t in raw_s]),
            "torch_threads": cores,
            "device": str(worker.device),
        },
        "driver_peak_rss_mb": peak_rss_mb(),
        "distrl": rows,
    }
    if workers is not None:
        result["learner_workers"] = workers
    print_figures(
        f"learner: {result['model']} ({result['dtype']} on {learner_device}, raw on "
        f"{worker.device}), batch {tokens} tokens {tuple(ids.shape)}; raw step "
        f"{reference:.1f} tokens/s, driver peak {result['driver_peak_rss_mb']:.0f} MiB",
        "tokens/s",
        rows,
    )
    if workers is not None:
        for world, row in workers["counts"].items():
            print(
                f"learner workers {world}: {row['tokens_per_s']:.1f} tokens/s, largest rank "
                f"{max(m['total'] for m in row['per_rank_state_mb']):.1f} MiB of learner state "
                f"({row['state_ratio']:.2f} of the first), weights apart from the first: "
                f"{row['weight_gap_share']:.2%} (largest {row['weight_gap_max']:.2g})"
            )
    return result
