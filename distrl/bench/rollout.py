"""Rollout throughput: ``RolloutWorker`` actors (full weights, and with LoRA adapters) against a
plain ``model.generate``."""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

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
    peak_rss_mb,
    print_figures,
    ratio,
    reset_peak_rss,
    rounded,
    synchronize,
)
from distrl.config import RolloutConfig
from distrl.policy import build_model, build_tokenizer, left_pad
from distrl.rollout import RolloutWorker, Trajectories
from distrl.tokenizers import Tokenizer


class MeasuredRolloutWorker(RolloutWorker):
    """A ``RolloutWorker`` that also reports its actor process's peak memory."""

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()


def raw_generate(
    model: Any, tokenizer: Tokenizer, rollout: RolloutConfig, prompts: list[list[int]]
) -> Callable[[], int]:
    """A plain ``model.generate`` of ``prompts`` with ``rollout``'s sampling settings.

    The returned call gives the generated token positions: B x the width after the prompt.
    """
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)  # inputs made once, untimed
    device = next(model.parameters()).device
    input_ids, attention_mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    def generate() -> int:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            max_new_tokens=rollout.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        synchronize(device)
        return out[:, input_ids.shape[1] :].numel()

    return generate


def bench_rollout(options: BenchOptions) -> dict[str, Any]:
    """The rollout section: RolloutWorker actors (1 and 2) against a plain ``generate``, on
    the same device (on a GPU machine the actors hold GPU shares)."""
    from distrl.actors import actor_options, get, make_actor

    config = bench_config(options)
    cores, repeats = os.cpu_count() or 1, 3 if options.quick else 5
    torch.set_num_threads(cores)
    torch.manual_seed(config.seed)
    reset_peak_rss()
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    prompts = bench_prompts(config, tokenizer)
    example_ids = list(range(len(prompts)))
    # Loaded as every distrl role loads it (same weights, dtype, device); the timed call is HF's.
    raw_model = build_model(config.model, tokenizer, seed=config.seed)
    raw_param = next(raw_model.parameters())
    raw = raw_generate(raw_model, tokenizer, config.rollout, prompts)
    raw()  # warm-up
    raw_rates: list[float] = []
    rows: dict[str, dict[str, Any]] = {}
    lora = bench_config(options, lora_rank=LORA_RANK).learner.lora
    with local_ray() as ray:
        for workers, rank in ((1, 0), (2, 0), (1, LORA_RANK)):
            threads = max(1, cores // workers)
            gpus = gpu_share(options, workers)
            actors = [
                make_actor(
                    MeasuredRolloutWorker,
                    actor_options(cores / workers, gpus),
                    model=config.model,
                    tokenizer=config.tokenizer,
                    rollout=config.rollout,
                    seed=config.seed,
                    worker_index=i,
                    torch_threads=threads,
                    lora=lora if rank else None,
                )
                for i in range(workers)
            ]
            devices = actor_devices(actors)  # waits for the model loads

            def generate(actors: list[Any] = actors) -> list[Trajectories]:
                return get([a.generate.remote(prompts, example_ids) for a in actors])

            generate()  # warm-up
            rates, inside, real, paired = [], [], [], []
            for _ in range(repeats):
                seconds, tokens = clock(raw)
                paired.append(tokens / seconds)
                seconds, batches = clock(generate)
                positions = sum(b.response_ids.size for b in batches)
                rates.append(positions / seconds)
                inside.append(positions / max(b.seconds for b in batches))
                real.append(sum(b.num_tokens for b in batches) / positions)
            name = f"{workers} worker{'s' * (workers > 1)}"
            rows[name + (f", LoRA rank {rank}" if rank else "")] = {
                "workers": workers,
                "lora_rank": rank,
                "cpus_per_worker": cores / workers,
                "gpus_per_worker": gpus,
                "devices": devices,
                "torch_threads_per_worker": threads,
                "tokens_per_s": statistics.median(rates),
                "samples": rounded(rates),
                "in_actor_tokens_per_s": statistics.median(inside),
                "unpadded_fraction": statistics.mean(real),
                "peak_rss_mb": get([a.peak_rss_mb.remote() for a in actors]),
                # Against the raw repetitions interleaved with these: load drifts between phases.
                "reference_tokens_per_s": statistics.median(paired),
                "ratio": ratio(statistics.median(rates), statistics.median(paired)),
            }
            raw_rates += paired
            for actor in actors:
                ray.kill(actor, no_restart=True)
    reference = statistics.median(raw_rates)
    result = {
        "model": config.model.name,
        "dtype": str(raw_param.dtype).removeprefix("torch."),
        "batch_size": len(prompts),
        "max_new_tokens": config.rollout.max_new_tokens,
        "temperature": config.rollout.temperature,
        "prompt_width": max(len(p) for p in prompts),
        "repeats": repeats,
        "note": (
            "tokens = generated token positions, B x (sequence width after the prompt), on both "
            "sides (batched generation computes every position, even after a row's EOS); "
            "distrl tokens/s is the driver's wall time of ray.get on all workers' generate "
            "calls (each worker generates its own batch of batch_size); raw = plain HF "
            f"model.generate in the driver with {cores} torch threads, on the workers' "
            "device and dtype; medians of "
            f"{repeats} repetitions interleaved with distrl's, after one warm-up; each "
            "row's ratio is against the raw repetitions interleaved with it; the LoRA row's "
            f"worker holds rank {LORA_RANK} adapters on every linear layer, unmerged, as "
            "its policy does in a LoRA run"
        ),
        "raw": {
            "tokens_per_s": reference,
            "samples": rounded(raw_rates),
            "torch_threads": cores,
            "device": str(raw_param.device),
            "driver_peak_rss_mb": peak_rss_mb(),
        },
        "distrl": rows,
    }
    print_figures(
        f"rollout: {result['model']} ({result['dtype']} on {result['raw']['device']}), batch "
        f"{result['batch_size']} x {result['max_new_tokens']} new tokens, "
        f"T={result['temperature']}; raw generate "
        f"{reference:.1f} tokens/s, driver peak {result['raw']['driver_peak_rss_mb']:.0f} MiB",
        "tokens/s",
        rows,
    )
    return result
