"""LoRA adapters through PEFT: adding them to a model, saving and loading the adapter alone, and
the merged weights a run exports.

``add_lora`` puts the adapters into the Hugging Face model in place (no ``PeftModel`` wrapper),
so distrl's forward passes and the weight functions of ``distrl.weights.tensors`` work on it
unchanged; those then move only the trained tensors. Step checkpoints hold the adapter in PEFT's
own format; ``best/`` and ``final/`` hold the merged model, which loads without PEFT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from distrl.config import LoraConfig
from distrl.errors import ModelError
from distrl.weights.tensors import is_adapter_name, tied_aliases

ADAPTER_NAME = "default"  # PEFT's name for a model's one adapter
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # how PEFT's files name a model's tensors


def add_lora(model: PreTrainedModel, config: LoraConfig, *, seed: int = 0) -> PreTrainedModel:
    """Put LoRA adapters (``config``, ``learner.lora``) into ``model`` in place and freeze the
    rest of it; returns ``model``.

    PEFT's ``inject_adapter_in_model`` swaps the target layers for LoRA layers inside the same
    Hugging Face object, so ``model.base_model`` is still its transformer and
    ``model.get_output_embeddings()`` its LM head (never adapted): distrl's forward passes read
    it as before. LoRA's B starts at zero, so the model computes what its base does until
    trained, and A is drawn from ``seed`` (learner and workers build the same adapters). The
    adapters are float32 whatever the model's dtype (PEFT's ``autocast_adapter_dtype``), as the
    value head is: small updates are not rounded away in bfloat16.

    Raises:
        ModelError: no layer of ``model`` matches ``config.target_modules``.
    """
    import peft
    from peft.tuners.tuners_utils import cast_adapter_dtype
    from transformers.pytorch_utils import Conv1D

    targets = list(config.target_modules)
    lora = peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        # GPT-2's Conv1D layers store their weight transposed.
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft.inject_adapter_in_model(lora, model, ADAPTER_NAME)
    except ValueError as err:
        raise ModelError(
            f"learner.lora.target_modules {targets} fits no layer of {type(model).__name__}: {err}"
        ) from err
    cast_adapter_dtype(model, ADAPTER_NAME)
    model.peft_config[ADAPTER_NAME].base_model_name_or_path = model.name_or_path or None
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` as its frozen base: its LoRA adapters are off inside the block. A LoRA
    learner's reference model is its own policy run this way, not a second copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:  # also makes the adapters trainable again (PEFT's set_adapter)
            layer.enable_adapters(True)


def save_adapter(
    model: PreTrainedModel, folder: str | Path, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write ``model``'s adapter in PEFT's format: ``adapter_model.safetensors`` and
    ``adapter_config.json`` (``peft.PeftModel.from_pretrained`` loads them onto the base).
    ``state``: the adapter's tensors by ``model``'s names where they are not its own (a sharded
    learner's, gathered whole)."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, state_dict=state, adapter_name=ADAPTER_NAME)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    model.peft_config[ADAPTER_NAME].save_pretrained(str(folder))


def read_adapter(model: PreTrainedModel, folder: str | Path) -> dict[str, torch.Tensor]:
    """The adapter ``save_adapter`` wrote in ``folder``, by ``model``'s own names.

    Raises:
        ModelError: ``folder`` holds no adapter, or one of another rank, scale or layers.
    """
    from peft import PeftConfig

    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ModelError(
            f"{folder} holds no LoRA adapter ({ADAPTER_WEIGHTS}): a run with learner.lora.rank "
            "> 0 resumes from its own step checkpoints"
        )
    saved, ours = PeftConfig.from_pretrained(str(folder)), model.peft_config[ADAPTER_NAME]
    for key in ("r", "lora_alpha", "target_modules"):
        if getattr(saved, key) != getattr(ours, key):
            raise ModelError(
                f"{folder / ADAPTER_CONFIG}: {key} {getattr(saved, key)!r} differs from this "
                f"run's {getattr(ours, key)!r} (learner.lora)"
            )
    # PEFT's files name a tensor without the adapter's name (lora_A.weight for
    # lora_A.default.weight).
    names = {
        name.replace(f".{ADAPTER_NAME}", ""): name
        for name in model.state_dict()
        if is_adapter_name(name)
    }
    stored = {
        k.removeprefix(PEFT_PREFIX): v for k, v in load_file(folder / ADAPTER_WEIGHTS).items()
    }
    missing = [k for k in names if k not in stored]
    unexpected = [k for k in stored if k not in names]
    if missing or unexpected:
        raise ModelError(
            f"{folder / ADAPTER_WEIGHTS} does not fit the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return {names[k]: v for k, v in stored.items()}


def load_adapter(model: PreTrainedModel, folder: str | Path) -> None:
    """Load the adapter ``save_adapter`` wrote in ``folder`` into ``model``'s adapters.

    Raises:
        ModelError: ``folder`` holds no adapter, or one of another rank, scale or layers.
    """
    state = read_adapter(model, folder)
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(own[name].shape):
                raise ModelError(
                    f"{Path(folder) / ADAPTER_WEIGHTS}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model's {tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)


def merged_weights(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """CPU copies of ``model``'s state with each LoRA update merged into its base weight, under
    the names the model has without adapters (each tied tensor once). ``state``: the whole
    state by ``model``'s names where it is not its own (a sharded learner's, gathered). The
    model itself is left as it is: merging in place and back would round its base weights.

    Raises:
        ModelError: an adapted layer is neither linear nor an embedding.
    """
    from peft.tuners.lora import Embedding, Linear, LoraLayer
    from peft.utils.other import transpose

    own = model.state_dict() if state is None else state
    merges = {}  # base weight's name: (A, B, scale, transposed)
    for prefix, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        scale = m.scaling[ADAPTER_NAME]
        if isinstance(m, Linear):
            a, b = (f"{prefix}.lora_{x}.{ADAPTER_NAME}.weight" for x in "AB")
            merges[f"{prefix}.base_layer.weight"] = (a, b, scale, m.fan_in_fan_out)
        elif isinstance(m, Embedding):
            a, b = (f"{prefix}.lora_embedding_{x}.{ADAPTER_NAME}" for x in "AB")
            merges[f"{prefix}.base_layer.weight"] = (a, b, scale, True)
        else:
            raise ModelError(f"{prefix}: LoRA on a {type(m).__name__} layer cannot be merged")
    out = {}
    aliases = tied_aliases(model)
    with torch.no_grad():
        for name, tensor in own.items():
            if name in aliases or is_adapter_name(name):
                continue
            if name in merges:
                a, b, scale, transposed = merges[name]
                delta = transpose(own[b].float() @ own[a].float(), transposed) * scale
                tensor = (tensor.float() + delta).to(tensor.dtype)
            out[name.replace(".base_layer.", ".")] = tensor.detach().to("cpu", copy=True)
    return out


def save_merged(
    model: PreTrainedModel, folder: str | Path, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Write ``model`` with its LoRA updates merged as a plain Hugging Face folder (config,
    generation config, ``model.safetensors``) that ``from_pretrained`` loads without PEFT
    (``state``: as for ``merged_weights``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    save_file(merged_weights(model, state), folder / "model.safetensors", metadata={"format": "pt"})
