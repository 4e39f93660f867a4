"""Weight publication: the learner's weights into every rollout worker, in float32 and bfloat16,
with full fine-tuning and with LoRA adapters (then only the adapters move).

distrl's way (``Trainer.publish``): the learner returns ``publish_weights``, numpy views of its
parameters (bfloat16 as its raw int16 bits); Ray writes them into the object store once; each
worker maps them without a copy and loads them (``RolloutWorker.set_weights``). The plain way a
Ray user writes first: return the state dict's torch tensors (pickled, with a copy at each end)
and ``load_state_dict`` them. Same model, same two receiving workers, same device.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch

from distrl.bench.common import (
    LORA_RANK,
    BenchOptions,
    actor_devices,
    bench_config,
    clock,
    gpu_share,
    local_ray,
    ratio,
    rounded,
)
from distrl.config import LoraConfig, ModelConfig, TokenizerConfig
from distrl.models.lora import add_lora
from distrl.models.policy import build_model, build_tokenizer
from distrl.pg.rollout import RolloutWorker
from distrl.weights.tensors import VersionedWeights, has_lora, publish_weights, published_names

WORKERS = 2
DTYPES = ("float32", "bfloat16")


class Publisher:
    """Holds the policy as a learner does and publishes it both ways, a new version each time."""

    def __init__(
        self,
        *,
        model: ModelConfig,
        tokenizer: TokenizerConfig,
        seed: int,
        torch_threads: int,
        lora: LoraConfig | None = None,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.model = build_model(model, build_tokenizer(model, tokenizer), seed=seed)
        if lora is not None and lora.rank:
            add_lora(self.model, lora, seed=seed)
        self.device = next(self.model.parameters()).device
        self.version = 0

    def weights(self) -> VersionedWeights:
        """distrl's publication (``Learner.weights``)."""
        self.version += 1
        return publish_weights(self.model, self.version)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The plain publication: the state dict's tensors (with LoRA: the adapters'), on the
        host."""
        state = self.model.state_dict()
        if has_lora(self.model):
            state = {name: state[name] for name in published_names(self.model)}
        return {name: t.detach().cpu() for name, t in state.items()}

    def nbytes(self) -> int:
        """Bytes of one publication (tied tensors once)."""
        return publish_weights(self.model, self.version).nbytes


class Receiver(RolloutWorker):
    """A rollout worker that can also load a plain state dict."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> int:
        """``load_state_dict`` into the policy; returns the number of tensors."""
        self.model.load_state_dict(state, strict=False)
        return len(state)


def publish_round(
    options: BenchOptions, dtype: str, repeats: int, lora_rank: int = 0
) -> dict[str, Any]:
    """Seconds per publication into ``WORKERS`` workers, both ways, for one dtype (with LoRA
    adapters of ``lora_rank``, 0: full weights)."""
    from distrl.runtime.actors import actor_options, get, make_actor

    config = bench_config(dataclasses.replace(options, dtype=dtype), lora_rank)
    args = {
        "model": config.model,
        "tokenizer": config.tokenizer,
        "seed": config.seed,
        "lora": config.learner.lora,
    }
    gpus = gpu_share(options, WORKERS + 1)
    publisher = make_actor(Publisher, actor_options(0.0, gpus), **args, torch_threads=1)
    workers = [
        make_actor(
            Receiver,
            actor_options(0.0, gpus),
            **args,
            rollout=config.rollout,
            worker_index=i,
            torch_threads=1,
        )
        for i in range(WORKERS)
    ]
    devices = actor_devices([publisher, *workers])  # waits for the model loads

    def distrl() -> None:
        weights_ref = publisher.weights.remote()
        get([w.set_weights.remote(weights_ref) for w in workers])

    def plain() -> None:
        state_ref = publisher.state_dict.remote()
        get([w.load_state_dict.remote(state_ref) for w in workers])

    distrl(), plain()  # warm-up
    ours, raw = [], []
    for _ in range(repeats):
        raw.append(clock(plain)[0])
        ours.append(clock(distrl)[0])
    nbytes = get(publisher.nbytes.remote())
    import ray

    for actor in [publisher, *workers]:
        ray.kill(actor, no_restart=True)
    seconds, raw_seconds = statistics.median(ours), statistics.median(raw)
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "samples": rounded(ours),
        "reference_seconds": raw_seconds,
        "reference_samples": rounded(raw),
        "ratio": ratio(raw_seconds, seconds),  # > 1: distrl is faster
        "devices": {"learner": devices[0], "workers": devices[1:]},
        "gpus_per_actor": gpus,
    }


def bench_publish(options: BenchOptions) -> dict[str, Any]:
    """The publish section: distrl's publication against the plain one, per dtype."""
    repeats = 3 if options.quick else 5
    with local_ray():
        rows = {dtype: publish_round(options, dtype, repeats) for dtype in DTYPES}
        lora = {dtype: publish_round(options, dtype, repeats, LORA_RANK) for dtype in DTYPES}
    model = bench_config(options).model.name
    print(f"\npublish: {model} into {WORKERS} rollout workers (seconds per publication)")
    print(f"{'dtype':<22}{'MiB':>10}{'distrl s':>12}{'plain s':>12}{'speed-up':>10}")
    named = {**rows, **{f"{dtype}, LoRA rank {LORA_RANK}": row for dtype, row in lora.items()}}
    for name, row in named.items():
        print(
            f"{name:<22}{row['bytes'] / 2**20:>10.2f}{row['seconds']:>12.3f}"
            f"{row['reference_seconds']:>12.3f}{row['ratio']:>10.2f}"
        )
    return {
        "model": model,
        "workers": WORKERS,
        "repeats": repeats,
        "note": (
            "seconds = driver wall time from asking the learner-like actor for its weights to "
            f"all {WORKERS} workers having loaded them; distrl = publish_weights + "
            "set_weights (as Trainer.publish); plain = the state dict's torch tensors through "
            "the object store + load_state_dict; medians of interleaved repetitions after a "
            "warm-up; ratio = plain seconds / distrl seconds; lora: the same with rank "
            f"{LORA_RANK} adapters on every linear layer, where only the adapters are "
            "published (kept in float32 whatever the model's dtype)"
        ),
        "dtypes": rows,
        "lora": {"rank": LORA_RANK, "dtypes": lora},
    }
