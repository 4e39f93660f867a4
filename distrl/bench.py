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
import torch

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


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (VmHWM, which ``reset_peak_rss`` restarts)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> None:
    """Restart this process's peak-memory count (Linux), so each section reports its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def local_ray() -> Iterator[Any]:
    """An embedded local Ray with one CPU per core, shut down on exit; one already running
    (``main`` starts one for all sections) is used as it is."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


class MeasuredRolloutWorker(RolloutWorker):
    """A ``RolloutWorker`` that also reports its actor process's peak memory."""

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()


class MeasuredLearner(Learner):
    """A ``Learner`` that also reports its peak memory and can change its PPO epochs."""

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def set_epochs(self, epochs: int) -> None:
        """Make later ``train`` calls take ``epochs`` passes (the rest of the config unchanged)."""
        self.ppo = dataclasses.replace(self.ppo, epochs=epochs)


def bench_config(model: str) -> RunConfig:
    """The packaged config ``model`` at batch 8 x 32 new tokens, one optimizer step per epoch."""
    return load_config(
        model,
        {
            "rollout.batch_size": BATCH_SIZE,
            "rollout.max_new_tokens": MAX_NEW_TOKENS,
            "ppo.minibatch_size": BATCH_SIZE,
            "ppo.epochs": 1,
        },
    )


def bench_prompts(config: RunConfig, tokenizer: Tokenizer) -> list[list[int]]:
    """The first ``rollout.batch_size`` packaged prompts, encoded as the driver encodes them."""
    examples = load_examples(config.data.train, limit=config.rollout.batch_size)
    return encode_prompts(examples, tokenizer, config.tokenizer, config.data)


def _clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call of ``fn``, and what it returned."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _rounded(values: list[float]) -> list[float]:
    """Per-repetition figures, kept in the JSON to show how noisy the medians are."""
    return [round(v, 2) for v in values]


def _ratio(value: float | None, reference: float) -> float | None:
    return value / reference if value is not None and reference > 0 else None


def print_figures(title: str, unit: str, rows: dict[str, dict[str, Any]]) -> None:
    """Print rows of ``{unit}``, their reference, the ratio and peak memory as a table."""
    print(f"\n{title}")
    print(f"{'':<30}{unit:>12}{'raw ' + unit:>14}{'ratio':>8}{'peak MiB':>14}")

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for name, row in rows.items():
        peaks = row.get("peak_rss_mb")
        peak = "/".join(f"{p:.0f}" for p in peaks) if isinstance(peaks, list) else num(peaks, ".0f")
        print(
            f"{name:<30}{num(row['tokens_per_s'], '.1f'):>12}"
            f"{num(row.get('reference_tokens_per_s'), '.1f'):>14}"
            f"{num(row.get('ratio'), '.2f'):>8}{peak:>14}"
        )


# ---- rollout -------------------------------------------------------------------------------


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
        return out[:, input_ids.shape[1] :].numel()

    return generate


def bench_rollout(model: str, quick: bool) -> dict[str, Any]:
    """The rollout section: RolloutWorker actors (1 and 2) against a plain ``generate``."""
    from distrl.actors import actor_options, get, make_actor

    config = bench_config(model)
    cores, repeats = os.cpu_count() or 1, 3 if quick else 5
    torch.set_num_threads(cores)
    torch.manual_seed(config.seed)
    reset_peak_rss()
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    prompts = bench_prompts(config, tokenizer)
    example_ids = list(range(len(prompts)))
    # Loaded as every distrl role loads it (same weights, dtype, device); the timed call is HF's.
    raw = raw_generate(
        build_model(config.model, tokenizer, seed=config.seed), tokenizer, config.rollout, prompts
    )
    raw()  # warm-up
    raw_rates: list[float] = []
    rows: dict[str, dict[str, Any]] = {}
    with local_ray() as ray:
        for workers in (1, 2):
            threads = max(1, cores // workers)
            actors = [
                make_actor(
                    MeasuredRolloutWorker,
                    actor_options(cores / workers),
                    model=config.model,
                    tokenizer=config.tokenizer,
                    rollout=config.rollout,
                    seed=config.seed,
                    worker_index=i,
                    torch_threads=threads,
                )
                for i in range(workers)
            ]
            get([a.peak_rss_mb.remote() for a in actors])  # waits for the model loads

            def generate(actors: list[Any] = actors) -> list[Trajectories]:
                return get([a.generate.remote(prompts, example_ids) for a in actors])

            generate()  # warm-up
            rates, inside, real, paired = [], [], [], []
            for _ in range(repeats):
                seconds, tokens = _clock(raw)
                paired.append(tokens / seconds)
                seconds, batches = _clock(generate)
                positions = sum(b.response_ids.size for b in batches)
                rates.append(positions / seconds)
                inside.append(positions / max(b.seconds for b in batches))
                real.append(sum(b.num_tokens for b in batches) / positions)
            rows[f"{workers} worker{'s' * (workers > 1)}"] = {
                "workers": workers,
                "cpus_per_worker": cores / workers,
                "torch_threads_per_worker": threads,
                "tokens_per_s": statistics.median(rates),
                "samples": _rounded(rates),
                "in_actor_tokens_per_s": statistics.median(inside),
                "unpadded_fraction": statistics.mean(real),
                "peak_rss_mb": get([a.peak_rss_mb.remote() for a in actors]),
                # Against the raw repetitions interleaved with these: load drifts between phases.
                "reference_tokens_per_s": statistics.median(paired),
                "ratio": _ratio(statistics.median(rates), statistics.median(paired)),
            }
            raw_rates += paired
            for actor in actors:
                ray.kill(actor, no_restart=True)
    reference = statistics.median(raw_rates)
    result = {
        "model": config.model.name,
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
            f"model.generate in the driver with {cores} torch threads; medians of "
            f"{repeats} repetitions interleaved with distrl's, after one warm-up; each "
            "row's ratio is against the raw repetitions interleaved with it"
        ),
        "raw": {
            "tokens_per_s": reference,
            "samples": _rounded(raw_rates),
            "torch_threads": cores,
            "driver_peak_rss_mb": peak_rss_mb(),
        },
        "distrl": rows,
    }
    print_figures(
        f"rollout: {result['model']}, batch {result['batch_size']} x "
        f"{result['max_new_tokens']} new tokens, T={result['temperature']}; raw generate "
        f"{reference:.1f} tokens/s, driver peak {result['raw']['driver_peak_rss_mb']:.0f} MiB",
        "tokens/s",
        rows,
    )
    return result


# ---- learner -------------------------------------------------------------------------------


def raw_train_step(model: Any, ids: Any, mask: Any, lr: float, wd: float) -> Callable[[], None]:
    """A plain causal-LM step on ``ids`` (B, L): forward with labels, backward, AdamW."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    labels = ids.masked_fill(mask == 0, -100)
    model.train()

    def step() -> None:
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_learner(model: str, quick: bool) -> dict[str, Any]:
    """The learner section: ``Learner.train`` (whole, and one epoch of updates) against a
    plain training step, on a batch from a real rollout."""
    from distrl.actors import actor_options, get, make_actor

    config = bench_config(model)
    cores, repeats = os.cpu_count() or 1, 3 if quick else 5
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
    with local_ray() as ray:
        learner = make_actor(
            MeasuredLearner,
            actor_options(cores),
            model=config.model,
            tokenizer=config.tokenizer,
            learner=config.learner,
            ppo_config=config.ppo,
            temperature=config.rollout.temperature,
            seed=config.seed,
            torch_threads=cores,
        )
        batch_ref = ray.put(batch)

        def train(epochs: int) -> tuple[float, dict[str, float]]:
            get(learner.set_epochs.remote(epochs))
            return _clock(lambda: get(learner.train.remote(batch_ref, scores)))

        train(1)  # warm-up
        raw_s: list[float] = []
        wall, learn_s, reported = ({1: [], 3: []} for _ in range(3))
        for _ in range(repeats):
            raw_s.append(_clock(raw)[0])
            for epochs in (1, 3):
                seconds, metrics = train(epochs)
                wall[epochs].append(seconds)
                learn_s[epochs].append(metrics["time/learn_s"])
                reported[epochs].append(metrics["learner/tokens_per_s"])
        learner_peak = get(learner.peak_rss_mb.remote())
        ray.kill(learner, no_restart=True)
    reference = tokens / statistics.median(raw_s)
    # Two more epochs of one minibatch step each: half the difference is one update step.
    epochs_s = [(b - a) / 2 for a, b in zip(learn_s[1], learn_s[3])]
    epoch_s = statistics.median(epochs_s)
    update = tokens / epoch_s if epoch_s > 0 else None
    rows = {
        f"train, {e} epoch{'s' * (e > 1)}": {
            "tokens_per_s": e * tokens / statistics.median(wall[e]),
            "seconds": statistics.median(wall[e]),
            "samples": _rounded([e * tokens / t for t in wall[e]]),
            "learner_reported_tokens_per_s": statistics.median(reported[e]),
        }
        for e in (1, 3)
    }
    rows["update phase, one epoch"] = {
        "tokens_per_s": update,
        "seconds": epoch_s,
        "samples": _rounded([tokens / t if t > 0 else 0.0 for t in epochs_s]),
    }
    for row in rows.values():
        row["reference_tokens_per_s"] = reference
        row["ratio"] = _ratio(row["tokens_per_s"], reference)
        row["peak_rss_mb"] = learner_peak
    result = {
        "model": config.model.name,
        "batch_shape": list(ids.shape),
        "tokens": tokens,
        "repeats": repeats,
        "note": (
            "tokens = attention-mask tokens of the prompt+response batch (as the Learner's own "
            "learner/tokens_per_s counts them), times epochs; the batch is one real rollout "
            f"of batch_size {len(prompts)} with minibatch_size {len(prompts)}, so every epoch "
            "is one optimizer step; train rows are the driver's wall time of ray.get on "
            "Learner.train in an actor with every CPU (reference and value forwards, GAE, "
            "updates); the update phase is (learn_s at 3 epochs - at 1 epoch) / 2 from the "
            "Learner's own time/learn_s, paired per repetition; raw = plain HF forward with "
            "labels (LM head and loss over every position, where the Learner's cover the "
            "response only) + backward + AdamW step of the same model on the same ids and "
            f"mask in the driver with {cores} torch threads; medians of {repeats} "
            "interleaved repetitions after one warm-up"
        ),
        "raw": {
            "tokens_per_s": reference,
            "samples": _rounded([tokens / t for t in raw_s]),
            "torch_threads": cores,
        },
        "driver_peak_rss_mb": peak_rss_mb(),
        "distrl": rows,
    }
    print_figures(
        f"learner: {result['model']}, batch {tokens} tokens {tuple(ids.shape)}; raw step "
        f"{reference:.1f} tokens/s, driver peak {result['driver_peak_rss_mb']:.0f} MiB",
        "tokens/s",
        rows,
    )
    return result


# ---- reward --------------------------------------------------------------------------------


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

    def score_afresh() -> None:
        for component in in_process.reward.components:  # else repeats hit the LM's memo
            if (lm := getattr(component, "lm", None)) is not None:
                lm._memo = None
        in_process.score(pool_batch)

    score_afresh()
    local = len(pool_batch) / _timed(score_afresh, repeats)

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


SECTIONS: dict[str, Callable[[str, bool], dict[str, Any]]] = {
    "rollout": bench_rollout,
    "learner": bench_learner,
    "reward": bench_reward,
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


if __name__ == "__main__":
    sys.exit(main())
