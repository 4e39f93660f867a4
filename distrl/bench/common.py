"""What every benchmark section shares: machine facts, timing, memory, the local Ray,
the benchmark config and prompts, and the table printer."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distrl.config import RunConfig, load_config
from distrl.data.examples import load_examples
from distrl.models.loading import select_device
from distrl.models.policy import encode_prompts
from distrl.models.tokenizers import Tokenizer

BATCH_SIZE = 8  # sequences per generate call and per learner batch (one PPO minibatch)
MAX_NEW_TOKENS = 32
LORA_RANK = 8  # the LoRA rows' learner.lora.rank (adapters on every linear layer)


@dataclass(frozen=True)
class BenchOptions:
    """What the command line asks of every section.

    Attributes:
        model: packaged config, "default" (SmolLM2-135M) or "tiny".
        quick: fewer samples and repeats.
        batch: sequences per generate call and per learner batch (rollout and learner).
        new_tokens: new tokens per sequence (rollout and learner).
        device: "auto" (CUDA when present), "cpu" or "cuda", for both sides of a comparison.
        dtype: "auto" (bfloat16 on a GPU, else float32), "float32", "bfloat16" or "float16".
        engine: the rollout section's generation engine, "hf" or "vllm".
        learner_workers: learner counts the learner section also compares (empty: none).
    """

    model: str = "default"
    quick: bool = False
    batch: int = BATCH_SIZE
    new_tokens: int = MAX_NEW_TOKENS
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "hf"
    learner_workers: tuple[int, ...] = ()

    @property
    def on_gpu(self) -> bool:
        """Whether the models run on CUDA."""
        return select_device(self.device).type == "cuda"


def gpu_share(options: BenchOptions, actors: int) -> float:
    """GPUs per actor when ``actors`` share the machine's GPUs (0 on the CPU): on a GPU
    machine distrl's actors hold GPU shares, as a run's would, not CPUs only."""
    if not options.on_gpu:
        return 0.0
    import ray

    return min(1.0, ray.cluster_resources().get("GPU", 0.0) / actors)


def _actor_device(actor: Any) -> str:
    return str(actor.device)


def actor_devices(handles: list[Any]) -> list[str]:
    """The torch device each actor's model is on, read from inside it."""
    import ray

    return ray.get([h.__ray_call__.remote(_actor_device) for h in handles])


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so a timed call is charged for all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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


def timed(fn: Callable[[], Any], repeats: int) -> float:
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


def _actor_peak(_actor: Any) -> float:
    return peak_rss_mb()


def actor_peak_rss_mb(handles: list[Any]) -> list[float]:
    """Peak resident memory (MiB) of each actor's process, read from inside it."""
    import ray

    return ray.get([h.__ray_call__.remote(_actor_peak) for h in handles])


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


def bench_config(options: BenchOptions, lora_rank: int = 0) -> RunConfig:
    """The packaged config ``options.model`` at ``options.batch`` x ``options.new_tokens``, on
    ``options.device`` in ``options.dtype``, one optimizer step per epoch, with LoRA adapters
    of ``lora_rank`` (0: full fine-tuning)."""
    return load_config(
        options.model,
        {
            "model.device": options.device,
            "model.dtype": options.dtype,
            "rollout.batch_size": options.batch,
            "rollout.max_new_tokens": options.new_tokens,
            "ppo.minibatch_size": options.batch,
            "ppo.epochs": 1,
            "learner.lora.rank": lora_rank,
        },
    )


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by this process's tensors in MiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def bench_prompts(config: RunConfig, tokenizer: Tokenizer) -> list[list[int]]:
    """The first ``rollout.batch_size`` packaged prompts, encoded as the driver encodes them
    (repeated when the set is smaller than the batch)."""
    n = config.rollout.batch_size
    examples = load_examples(config.data.train, limit=n)
    prompts = encode_prompts(examples, tokenizer, config.tokenizer, config.data)
    return (prompts * (n // len(prompts) + 1))[:n]


def clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of one call of ``fn``, and what it returned."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def rounded(values: list[float]) -> list[float]:
    """Per-repetition figures, kept in the JSON to show how noisy the medians are."""
    return [round(v, 2) for v in values]


def ratio(value: float | None, reference: float) -> float | None:
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
