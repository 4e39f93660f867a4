"""Rollout throughput: ``RolloutWorker`` actors (full weights, and with LoRA adapters) against a
plain ``model.generate``; with ``--engine vllm``, a worker whose engine is vLLM against a plain
vLLM ``LLM.generate`` and a plain ``model.generate``."""

from __future__ import annotations

import dataclasses
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
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
from distrl.config import RolloutConfig, RunConfig
from distrl.models.loading import model_source_dir, select_device, select_dtype
from distrl.models.policy import build_model, build_tokenizer, left_pad
from distrl.models.tokenizers import Tokenizer
from distrl.pg.rollout import RolloutWorker, Trajectories, response_mask


class MeasuredRolloutWorker(RolloutWorker):
    """A ``RolloutWorker`` that also reports its actor process's peak memory."""

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def engine_name(self) -> str:
        """What generates: "hf" (transformers), or the class of the engine the worker built."""
        return "hf" if self.engine is None else type(self.engine).__name__


def raw_generate(
    model: Any, tokenizer: Tokenizer, rollout: RolloutConfig, prompts: list[list[int]]
) -> Callable[[], tuple[int, int]]:
    """A plain ``model.generate`` of ``prompts`` with ``rollout``'s sampling settings.

    The returned call gives the generated token positions (B x the width after the prompt)
    and the generated tokens (each row's up to and including its first EOS).
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
        response = out[:, input_ids.shape[1] :]
        return response.numel(), int(response_mask(response, tokenizer.eos_token_id).sum())

    return generate


def setup(options: BenchOptions) -> tuple[Any, int, int, Tokenizer, list[list[int]], list[int]]:
    """The section's config, cores (every one, as torch threads), repetitions, tokenizer,
    prompts and their ids; the seed and the peak-memory mark are reset."""
    config = bench_config(options)
    cores, repeats = os.cpu_count() or 1, 3 if options.quick else 5
    torch.set_num_threads(cores)
    torch.manual_seed(config.seed)
    reset_peak_rss()
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    prompts = bench_prompts(config, tokenizer)
    return config, cores, repeats, tokenizer, prompts, list(range(len(prompts)))


def bench_rollout(options: BenchOptions) -> dict[str, Any]:
    """The rollout section: RolloutWorker actors (1 and 2) against a plain ``generate``, on
    the same device (on a GPU machine the actors hold GPU shares); with ``options.engine``
    "vllm", ``bench_rollout_vllm``'s rows instead."""
    if options.engine == "vllm":
        return bench_rollout_vllm(options)
    from distrl.runtime.actors import actor_options, get, make_actor

    config, cores, repeats, tokenizer, prompts, example_ids = setup(options)
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
                seconds, (tokens, _) = clock(raw)
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


def model_folder(config: RunConfig, tokenizer: Tokenizer, scratch: str) -> Path:
    """The folder vLLM reads ``config.model`` from, as ``VLLMEngine`` finds it: the model's
    own folder, or (a tiny model) the Hugging Face model built and saved under ``scratch``."""
    folder = model_source_dir(config.model.name)
    if folder is None:
        build_model(config.model, tokenizer, seed=config.seed).save_pretrained(scratch)
        folder = Path(scratch)
    return folder


def raw_vllm_generate(
    folder: Path, config: RunConfig, tokenizer: Tokenizer, prompts: list[list[int]]
) -> tuple[float, Callable[[], int]]:
    """A plain vLLM ``LLM.generate`` of ``prompts`` with the engine arguments and sampling
    settings ``VLLMEngine`` uses, in this process.

    Returns:
        the seconds the engine took to build, and a call that generates and gives the
        generated tokens (each row's up to and including its EOS).
    """
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from distrl.engines.vllm_engine import kv_cache_bytes, quiet_vllm

    quiet_vllm()

    rollout, seed = config.rollout, config.seed * 1000  # worker 0's engine seed
    device = select_device(config.model.device)
    dtype = select_dtype(config.model.dtype, device)
    max_len = config.data.max_prompt_tokens + rollout.max_new_tokens
    rows = rollout.batch_size * rollout.samples_per_prompt
    memory: dict[str, Any] = {"gpu_memory_utilization": rollout.vllm_gpu_memory_utilization}
    if device.type == "cpu":
        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        memory = {"kv_cache_memory_bytes": kv_cache_bytes(hf_config, rows * max_len, dtype)}
    start = time.perf_counter()
    llm = LLM(
        model=str(folder),
        skip_tokenizer_init=True,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=max_len,
        max_num_seqs=max(rows, 1),
        seed=seed,
        logprobs_mode="processed_logprobs",
        enable_prefix_caching=True,
        enforce_eager=device.type == "cpu",
        **memory,
    )
    build_s = time.perf_counter() - start
    requests = [{"prompt_token_ids": list(p)} for p in prompts]
    eos = tokenizer.eos_token_id
    calls = itertools.count()

    def generate() -> int:
        base = seed + 7919 * next(calls)  # fresh samples each call, as the worker's engine
        params = [
            SamplingParams(
                n=1,
                temperature=rollout.temperature,
                top_p=rollout.top_p,
                top_k=rollout.top_k,
                max_tokens=rollout.max_new_tokens,
                logprobs=0,
                seed=base + 104729 * i,
                stop_token_ids=None if eos is None else [eos],
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = llm.generate(requests, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    return build_s, generate


def bench_rollout_vllm(options: BenchOptions) -> dict[str, Any]:
    """The rollout section with ``--engine vllm``: one ``RolloutWorker`` actor whose engine is
    vLLM against a plain vLLM ``LLM.generate`` in this process, and both against a plain
    Hugging Face ``model.generate``, on the same device, prompts and sampling settings."""
    from distrl.engines.vllm_engine import check_vllm
    from distrl.runtime.actors import actor_options, get, make_actor

    check_vllm("vllm")
    config, cores, repeats, tokenizer, prompts, example_ids = setup(options)
    rollout = dataclasses.replace(config.rollout, engine="vllm")
    hf_model = build_model(config.model, tokenizer, seed=config.seed)
    hf_param = next(hf_model.parameters())
    hf = raw_generate(hf_model, tokenizer, config.rollout, prompts)
    hf()  # warm-up
    # Both vLLM sides run the engine in their own process, with the process's torch threads
    # (vLLM's CPU thread binding, VLLM_CPU_OMP_THREADS_BIND, applies to engine subprocesses
    # only: with and without it the plain engine ran at the same rate here).
    with tempfile.TemporaryDirectory(prefix="distrl-bench-vllm-") as scratch, local_ray() as ray:
        folder = model_folder(config, tokenizer, scratch)
        raw_build_s, raw = raw_vllm_generate(folder, config, tokenizer, prompts)
        raw()  # warm-up
        gpus = gpu_share(options, 2)  # the raw engine holds the other share
        start = time.perf_counter()
        worker = make_actor(
            MeasuredRolloutWorker,
            actor_options(cores, gpus),
            model=config.model,
            tokenizer=config.tokenizer,
            rollout=rollout,
            seed=config.seed,
            torch_threads=cores,
            max_prompt_tokens=config.data.max_prompt_tokens,
        )
        devices = actor_devices([worker])  # waits for the engine build
        worker_build_s = time.perf_counter() - start

        def generate() -> Trajectories:
            return get(worker.generate.remote(prompts, example_ids))

        generate()  # warm-up
        hf_rates, hf_real, raw_rates, rates, inside = [], [], [], [], []
        for _ in range(repeats):
            seconds, (positions, tokens) = clock(hf)
            hf_rates.append(positions / seconds)
            hf_real.append(tokens / seconds)
            seconds, tokens = clock(raw)
            raw_rates.append(tokens / seconds)
            seconds, batch = clock(generate)
            rates.append(batch.num_tokens / seconds)
            inside.append(batch.num_tokens / batch.seconds)
        hf_threads = torch.get_num_threads()  # after the engine build in this process
        worker_peak = get(worker.peak_rss_mb.remote())
        worker_engine = get(worker.engine_name.remote())
        ray.kill(worker, no_restart=True)
    raw_vllm, worker_rate = statistics.median(raw_rates), statistics.median(rates)
    hf_rate = statistics.median(hf_real)
    result = {
        "engine": "vllm",
        "model": config.model.name,
        "dtype": str(hf_param.dtype).removeprefix("torch."),
        "device": str(hf_param.device),
        "batch_size": len(prompts),
        "max_new_tokens": rollout.max_new_tokens,
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "top_k": rollout.top_k,
        "prompt_width": max(len(p) for p in prompts),
        "repeats": repeats,
        "tokens_counted": "generated",
        "note": (
            "vLLM tokens = generated tokens, each row's up to and including its EOS (both vLLM "
            "sides stop at EOS and sample with per-row seeds, so their counts differ a little "
            "from call to call: rates, not counts, are compared); raw_vllm = vLLM LLM.generate "
            "in the driver on the same model folder with VLLMEngine's engine arguments; "
            "distrl_vllm_worker = the driver's wall time of ray.get on one RolloutWorker actor "
            f"(rollout.engine vllm, {cores} CPUs) generating the same batch; raw_hf = plain HF "
            "model.generate in the driver (torch_threads: as the engine build left them), its "
            "tokens_per_s counting positions (B x width after the prompt, every position "
            "computed) and generated_tokens_per_s the tokens up to each row's EOS; "
            "vllm_over_hf = raw_vllm "
            "over raw_hf generated_tokens_per_s; build_s = engine build, outside every rate; "
            f"medians of {repeats} repetitions, hf, raw vLLM and the worker interleaved, after "
            "one warm-up each"
        ),
        "raw_hf": {
            "tokens_per_s": statistics.median(hf_rates),
            "generated_tokens_per_s": hf_rate,
            "samples": rounded(hf_real),
            "torch_threads": hf_threads,
        },
        "raw_vllm": {
            "tokens_per_s": raw_vllm,
            "samples": rounded(raw_rates),
            "build_s": raw_build_s,
            "driver_peak_rss_mb": peak_rss_mb(),
        },
        "distrl_vllm_worker": {
            "workers": 1,
            "engine": worker_engine,
            "cpus_per_worker": cores,
            "gpus_per_worker": gpus,
            "devices": devices,
            "torch_threads_per_worker": cores,
            "tokens_per_s": worker_rate,
            "samples": rounded(rates),
            "in_actor_tokens_per_s": statistics.median(inside),
            "build_s": worker_build_s,
            "peak_rss_mb": [worker_peak],
            "reference_tokens_per_s": raw_vllm,
            "ratio": ratio(worker_rate, raw_vllm),
            # Each repetition's worker over the raw vLLM call just before it: load drifts.
            "ratio_samples": [round(w / r, 3) for w, r in zip(rates, raw_rates)],
        },
        "vllm_over_hf": ratio(raw_vllm, hf_rate),
    }
    print_figures(
        f"rollout (vllm): {result['model']} ({result['dtype']} on {result['device']}), batch "
        f"{result['batch_size']} x {result['max_new_tokens']} new tokens, "
        f"T={result['temperature']}; generated tokens/s; engine builds: raw "
        f"{raw_build_s:.1f} s, worker {worker_build_s:.1f} s",
        "tokens/s",
        {
            "distrl vLLM worker": result["distrl_vllm_worker"],
            "raw vLLM (ref: raw HF)": {
                "tokens_per_s": raw_vllm,
                "reference_tokens_per_s": hf_rate,
                "ratio": result["vllm_over_hf"],
                "peak_rss_mb": result["raw_vllm"]["driver_peak_rss_mb"],
            },
        },
    )
    return result
