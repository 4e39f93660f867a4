"""The episodes section: multi-turn episodes against single-turn generation, one worker.

A ``RolloutWorker`` (``--engine hf`` or ``vllm``) plays the packaged ``guess`` environment's
episodes, up to ``MAX_TURNS`` model turns of at most ``--new-tokens`` each, on a batch of its
prompts; the reference is the same worker's single-turn ``generate`` on the same prompts with
``max_new_tokens`` set to the episodes' mean model tokens per episode (measured in the warm-up),
so both sides generate about as many tokens per sequence. Rates count the model's generated
tokens (up to each turn's EOS), not the environment's; the episodes' seconds include
tokenising the environment's turns and, on the Hugging Face engine, prefilling the whole
episode again each turn (vLLM's prefix cache keeps the earlier turns).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

from distrl.bench.common import (
    BenchOptions,
    clock,
    print_figures,
    ratio,
    rounded,
)
from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.models.policy import encode_prompts

MAX_TURNS = 4


def bench_episodes(options: BenchOptions) -> dict[str, Any]:
    """Episodes/s and model tokens/s of multi-turn episodes against single-turn generation."""
    from distrl.pg.rollout import RolloutWorker

    config = load_config(
        options.model,
        {
            "model.device": options.device,
            "model.dtype": options.dtype,
            "rollout.engine": options.engine,
            "rollout.max_new_tokens": options.new_tokens,
            "rollout.batch_size": options.batch,
            "ppo.minibatch_size": options.batch,
            "data.train": "guess",
            "env.name": "guess",
            "env.max_turns": MAX_TURNS,
            "env.max_total_tokens": MAX_TURNS * (options.new_tokens + 32),
            "resources.torch_threads": os.cpu_count() or 1,
        },
    )
    repeats = 3 if options.quick else 5
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    examples = load_examples("guess", limit=options.batch)
    ids = list(range(len(examples)))
    prompts = encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)
    warm = worker.generate_episodes(examples, ids)  # and the per-episode length to match
    length = max(1, round(float(warm.response_mask.sum(1).mean())))
    single_rollout = dataclasses.replace(config.rollout, max_new_tokens=length)
    multi_rollout = worker.config

    holder = worker.engine if worker.engine is not None else worker  # reads it per call

    def single() -> Any:
        holder.config = single_rollout
        try:
            return worker.generate(prompts, ids)
        finally:
            holder.config = multi_rollout

    single()  # warm-up
    multi_s, single_s, multi_tokens, single_tokens, turns = [], [], [], [], []
    for _ in range(repeats):
        seconds, batch = clock(lambda: worker.generate_episodes(examples, ids))
        multi_s.append(seconds)
        multi_tokens.append(int(batch.response_mask.sum()))
        turns.append(float(batch.turns.mean()))
        seconds, batch = clock(single)
        single_s.append(seconds)
        single_tokens.append(int(batch.response_mask.sum()))
    if worker.engine is not None:
        worker.engine.close()
    rates = [t / s for t, s in zip(single_tokens, single_s)]
    reference = statistics.median(rates)
    episode_rates = [t / s for t, s in zip(multi_tokens, multi_s)]
    rows = {
        f"episodes, up to {MAX_TURNS} turns": {
            "tokens_per_s": statistics.median(episode_rates),
            "episodes_per_s": statistics.median([len(ids) / s for s in multi_s]),
            "turns_per_episode": statistics.median(turns),
            "model_tokens_per_episode": statistics.median(multi_tokens) / len(ids),
            "samples": rounded(episode_rates),
        },
        "single turn, same length": {
            "tokens_per_s": reference,
            "episodes_per_s": statistics.median([len(ids) / s for s in single_s]),
            "model_tokens_per_episode": statistics.median(single_tokens) / len(ids),
            "samples": rounded(rates),
        },
    }
    for row in rows.values():
        row["reference_tokens_per_s"] = reference
        row["ratio"] = ratio(row["tokens_per_s"], reference)
    print_figures(
        f"episodes: {config.model.name} ({options.engine} engine), {len(ids)} episodes of "
        f"the guess environment, max_new_tokens {options.new_tokens} a turn",
        "tokens/s",
        rows,
    )
    single_length = single_rollout.max_new_tokens
    return {
        "model": config.model.name,
        "engine": options.engine,
        "episodes": len(ids),
        "repeats": repeats,
        "single_turn_max_new_tokens": single_length,
        "note": (
            "one RolloutWorker in this process plays the packaged guess environment's episodes "
            f"(up to {MAX_TURNS} model turns of at most {options.new_tokens} tokens); the "
            "reference is the same worker's single-turn generate on the same prompts with "
            f"max_new_tokens {single_length}, the episodes' mean model tokens in the warm-up; "
            "tokens_per_s counts the model's tokens up to each turn's EOS; medians of "
            f"{repeats} interleaved repetitions after one warm-up each"
        ),
        "distrl": rows,
    }
