"""A role's weights as they are published and loaded: by name, tied aliases once, LoRA adapters
kept apart, versioned.

The learner publishes ``publish_weights`` (``VersionedWeights``: numpy views Ray copies into the
object store once); a worker loads them with ``set_weights``; ``get_weights`` gives detached CPU
copies for checkpoints. ``published_names`` says which tensors move: all of a model's state,
each tied tensor once, or with LoRA adapters in it (``distrl.models.lora``, ``learner.lora.rank >
0``) only what is trained: the adapters and any layer outside the adapted model (a Q head), never
its frozen base.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distrl.errors import ModelError


@dataclass(frozen=True)
class VersionedWeights:
    """Weights published by the learner, stamped with the policy version that made them.

    ``state`` maps names to numpy arrays (Ray copies them into the object store once and
    readers map them without a copy) or torch tensors. numpy has no bfloat16, so a bfloat16
    tensor travels as its raw 16-bit pattern, an int16 array, with its name in ``bfloat16``;
    ``tensors()`` reinterprets it, again without a copy.
    """

    version: int
    state: dict[str, torch.Tensor | np.ndarray]
    bfloat16: frozenset[str] = frozenset()
    digest: int | None = None  # ``digest(state.values())`` as published; None: unchecked

    @property
    def nbytes(self) -> int:
        """Bytes of the published tensors: what one publish puts in the object store."""
        return sum(int(value.nbytes) for value in self.state.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """``state`` as torch tensors sharing its memory, bfloat16 ones reinterpreted."""
        out = {}
        with warnings.catch_warnings():  # arrays from Ray's object store are read-only: we read
            warnings.simplefilter("ignore", UserWarning)
            for name, value in self.state.items():
                tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                out[name] = tensor.view(torch.bfloat16) if name in self.bfloat16 else tensor
        return out


class WeightMismatch(ModelError):
    """Weights a worker received or loaded are not the bytes the learner published."""


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s raw bytes as a flat uint8 tensor where it lies (any dtype; no copy when it
    is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def digest(buffers: Iterable[torch.Tensor | np.ndarray], start: int = 0) -> int:
    """CRC-32 of the raw bytes of ``buffers`` in order, read in host memory (about 2 GB/s on
    one core): what the object store's deliveries and a gloo group's are checked by."""
    value = start
    for buffer in buffers:
        if isinstance(buffer, torch.Tensor):
            buffer = _bytes(buffer).cpu().numpy()
        value = zlib.crc32(np.ascontiguousarray(buffer).reshape(-1).view(np.uint8).data, value)
    return value


DEVICE_DIGEST_CHUNK = 1 << 24  # 32-bit words summed at a time: 128 MiB of int64 at most


def device_digest(buffers: Iterable[torch.Tensor], start: int = 0) -> int:
    """A digest computed where ``buffers`` lie (on a GPU: no copy to the host): per buffer, the
    sum of its 32-bit words and of each word times its position, modulo 2**64, which any
    changed byte or moved word changes. What an NCCL group's deliveries are checked by."""
    value = start
    for buffer in buffers:
        raw = _bytes(buffer)
        whole = raw.numel() // 4 * 4
        words = raw[:whole].view(torch.int32)
        total = torch.zeros((), dtype=torch.int64, device=raw.device)
        weighted = torch.zeros_like(total)
        for first in range(0, words.numel(), DEVICE_DIGEST_CHUNK):
            part = words[first : first + DEVICE_DIGEST_CHUNK].to(torch.int64)
            positions = torch.arange(first + 1, first + 1 + part.numel(), device=raw.device)
            total += part.sum()
            weighted += (part * positions).sum()
        tail = raw[whole:].to(torch.int64).sum()  # the last 1-3 bytes, if any
        sums = [int(total), int(weighted), int(tail), raw.numel()]
        value = zlib.crc32(np.array(sums, dtype=np.int64).tobytes(), value)
    return value


def check_received(received: dict[str, torch.Tensor], sent: int) -> None:
    """Check that ``received`` are the bytes the learner published: ``sent`` is their
    ``digest``.

    Raises:
        WeightMismatch: they are not.
    """
    got = digest(received.values())
    if got != sent:
        raise WeightMismatch(
            f"received weights have digest {got:08x}, the learner published {sent:08x}"
        )


def check_loaded(model: nn.Module, received: dict[str, torch.Tensor]) -> None:
    """Check that ``model`` holds ``received`` after loading them (in its own dtypes).

    Raises:
        WeightMismatch: a tensor differs.
    """
    state = model.state_dict()
    for name, tensor in received.items():
        held = state[name]
        if not torch.equal(held, tensor.to(held.device, held.dtype)):
            raise WeightMismatch(
                f"after loading, the model does not hold the weights it was sent ({name})"
            )


def tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are a second name for one already listed (tied weights)."""
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return every - {name for name, _ in model.named_parameters()}


# Telling LoRA's tensors apart lives here, not in distrl.models.lora: the weight functions below
# need it, and distrl.models.lora imports this module.
def _adapted_prefixes(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` (``""``: itself) that ``lora.add_lora`` adapted."""
    return [prefix for prefix, m in model.named_modules() if hasattr(m, "peft_config")]


def _under(name: str, prefix: str) -> bool:
    return not prefix or name.startswith(prefix + ".")


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` (or a part of it) holds LoRA adapters."""
    return bool(_adapted_prefixes(model))


def is_adapter_name(name: str) -> bool:
    """Whether state name ``name`` is a LoRA adapter tensor (``q_proj.lora_A.default.weight``)."""
    return any(part.startswith("lora_") for part in name.split("."))


def published_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s state that weights move between learner and workers: all of it
    (each tied tensor once), or with LoRA adapters only what is trained: the adapter tensors
    and whatever lies outside the adapted model (e.g. a Q head beside its backbone)."""
    aliases = tied_aliases(model)
    names = [name for name in model.state_dict() if name not in aliases]
    adapted = _adapted_prefixes(model)
    if not adapted:
        return names
    return [n for n in names if is_adapter_name(n) or not any(_under(n, p) for p in adapted)]


def get_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``model``'s state, each tied tensor stored once (with LoRA: only
    the trained tensors, ``published_names``)."""
    state = model.state_dict()
    return {name: state[name].detach().to("cpu", copy=True) for name in published_names(model)}


def publish_weights(model: nn.Module, version: int) -> VersionedWeights:
    """``model``'s state as ``VersionedWeights`` of zero-copy numpy views (each tied tensor
    once; with LoRA adapters only the trained tensors, ``published_names``), to hand straight
    to Ray, which copies them into the object store once.

    Only for immediate serialisation: the views change with the model. bfloat16 tensors are
    viewed as int16 (their raw bits), not converted. Tensors on a GPU are first copied to host
    memory as they are (no dtype change); that copy is the only one.
    """
    full = model.state_dict()
    return publish_state({name: full[name] for name in published_names(model)}, version)


def publish_state(tensors: dict[str, torch.Tensor], version: int) -> VersionedWeights:
    """``tensors`` as ``VersionedWeights`` (see ``publish_weights``, which gives a model's)."""
    state: dict[str, np.ndarray | torch.Tensor] = {}
    bfloat16 = set()
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
            bfloat16.add(name)
        try:
            state[name] = tensor.numpy()
        except TypeError:  # a dtype numpy lacks (float8...): sent as a torch tensor, copied
            state[name] = tensor.clone()
    return VersionedWeights(version, state, frozenset(bfloat16), digest(state.values()))


def set_weights(model: nn.Module, state: dict[str, torch.Tensor | np.ndarray]) -> None:
    """Copy ``state`` (from ``get_weights`` or ``VersionedWeights.tensors()``) into ``model`` in
    place, keeping tied weights tied.

    Raises:
        ModelError: ``state`` has names ``model`` lacks, lacks some it needs, or holds a tensor
            of another shape.
    """
    with warnings.catch_warnings():  # arrays from Ray's object store are read-only; we only read
        warnings.simplefilter("ignore", UserWarning)
        state = {
            k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()
        }
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ModelError(
            f"weights do not fit {type(model).__name__}: {len(wrong)} tensors of another shape, "
            f"e.g. {k} is {tuple(state[k].shape)}, the model's {tuple(own[k].shape)}"
        )
    if has_lora(model):  # exactly the trained tensors: never a write into the frozen base
        names = set(published_names(model))
        missing, unexpected = names - state.keys(), state.keys() - names
        if not (missing or unexpected):
            model.load_state_dict(state, strict=False)
    else:
        # Copying into the first name of a tied pair updates the shared tensor: ties survive.
        result = model.load_state_dict(state, strict=False)
        missing = set(result.missing_keys) - tied_aliases(model)
        unexpected = set(result.unexpected_keys)
    if missing or unexpected:
        raise ModelError(
            f"weights do not fit {type(model).__name__}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )


def non_finite(module: nn.Module) -> list[str]:
    """The names of ``module``'s floating-point tensors (parameters and buffers) holding a NaN or
    an infinity: what a loaded state must not have."""
    return [
        name
        for name, tensor in module.state_dict().items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
