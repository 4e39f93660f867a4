"""Policy models: loading, tiny test models, value and Q heads, and saving a model folder.

Shapes: ``B`` sequences, ``T`` tokens, ``H`` hidden size, ``V`` vocabulary.

``load_policy`` takes the same names as ``ModelConfig.name``: ``"default"`` (the packaged
SmolLM2-135M-Instruct, converted once from GGUF to a safetensors folder in distrl's cache),
``"tiny-llama"`` / ``"tiny-gpt2"`` (random, built from a config, for tests), a local Hugging Face
folder, or a hub id. Models come back in eval mode; a learner calls ``.train()`` itself.

The weights that move between roles (versioned, by name, LoRA adapters apart) are in
``distrl.weights.tensors``.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
)

from distrl.assets import cache_dir, smollm2_gguf
from distrl.errors import AssetError, ModelError

DEFAULT_MODEL = "default"
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"

# Small enough to build in milliseconds, big enough to exercise attention, MLP and tying.
# tiny-llama's 4 heads are 32 wide (head_dim set, as hidden_size / heads would give 16): the
# narrowest vLLM's CPU attention runs, so the tiny config also runs with rollout.engine vllm.
# GPT-2 dropout is off: RL fine-tuning (TRL, OpenRLHF) disables it so logprobs are repeatable.
TINY_MODELS: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "tiny-llama": (
        LlamaConfig,
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
        ),
    ),
    "tiny-gpt2": (
        GPT2Config,
        dict(
            n_embd=64,
            n_inner=128,
            n_layer=2,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
}
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
_HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")


def select_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name`` ("auto" = CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ModelError(f"model.device: unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"model.device is {name!r} but no CUDA device is available")
    return device


def select_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """Return the parameter dtype ("auto" = bfloat16 on a CUDA device with bf16, else float32)."""
    if name == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ModelError(f"model.dtype: {name!r} is not one of auto, {', '.join(dtypes)}")
    return dtypes[name]


def default_model_dir() -> Path:
    """Return the safetensors folder of the packaged SmolLM2, converting the GGUF on first use.

    The conversion (~15 s) de-quantises the Q4_1 GGUF to float32 and writes the model and its
    tokenizer (chat template included) to ``cache_dir()/models/SmolLM2-135M-Instruct``. The
    folder is renamed into place only when complete, so an interrupted conversion leaves
    nothing that later calls trust; concurrent callers wait on a file lock and reuse it.
    """
    folder = cache_dir() / "models" / DEFAULT_MODEL_DIRNAME
    if (folder / "config.json").is_file():
        return folder
    gguf = smollm2_gguf()
    if not gguf.is_file():
        raise AssetError(f"{gguf} is missing; run `python -m distrl.assets` to reinstall it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Several actors may start on a fresh machine at once: one converts, the others wait for
    # it (the OS drops the lock if the converter dies) instead of each spending ~15 s and RAM.
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "config.json").is_file():
            _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantise ``gguf`` and save it with its tokenizer as a safetensors folder."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelError(f"the tokenizer in {gguf} has no chat template")
    # The GGUF quantizer marks the model as quantized, which blocks save_pretrained; the
    # weights are already de-quantised float32, so dropping the marker loses nothing.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        save_pretrained_atomic(model, tokenizer, folder, overwrite=False)
    except OSError:
        # A writer without the lock (another filesystem's view) may have won; theirs is whole.
        if not (folder / "config.json").is_file():
            raise


def tiny_model(
    name: str,
    *,
    vocab_size: int,
    special_ids: dict[str, int | None] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool | None = None,
) -> PreTrainedModel:
    """Build a randomly initialised tiny model from ``TINY_MODELS`` (no files, milliseconds).

    Args:
        name: "tiny-llama" or "tiny-gpt2".
        vocab_size: the tokenizer's id space, so any tokenizer fits.
        special_ids: ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` for the config.
        seed: initialisation seed; the global RNG state is left untouched.
        dtype: parameter dtype.
        tie_word_embeddings: share the input embedding with the LM head (None = config default).
    """
    config_cls, sizes = TINY_MODELS[name]
    # Unset ids are None rather than the config class's default (GPT-2's 50256 may not exist).
    ids = dict.fromkeys(SPECIAL_ID_KEYS) | (special_ids or {})
    bad = [k for k, v in ids.items() if k not in SPECIAL_ID_KEYS or not 0 <= (v or 0) < vocab_size]
    if bad:
        raise ModelError(f"{name}: bad special ids {bad} for vocab_size {vocab_size}: {ids}")
    extra = {} if tie_word_embeddings is None else {"tie_word_embeddings": tie_word_embeddings}
    config = config_cls(vocab_size=vocab_size, **sizes, **ids, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def model_source_dir(name: str) -> Path | None:
    """Return the folder a model (and its tokenizer) loads from; None for tiny models and hub ids.

    Raises:
        ModelError: ``name`` looks like a path that does not exist, or is not a model folder.
    """
    if name == DEFAULT_MODEL:
        return default_model_dir()
    if name in TINY_MODELS:
        return None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} is not a Hugging Face model folder (no config.json)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise ModelError(f"{name} is not a Hugging Face model folder (no weights)")
        return path
    # A hub id is "org/name"; "./x", "~/x", "a/b/c" or "runs/x" beside a local runs/ are paths.
    parent_is_dir = path.parent != Path(".") and path.parent.is_dir()
    if name.startswith((".", "~")) or not _HUB_ID.fullmatch(name) or parent_is_dir:
        raise ModelError(f"model path {name} does not exist")
    return None


# What a model folder that cannot be loaded raises: missing or unreadable files, a config or
# weights that do not fit, a torn safetensors file, a pickle that weights-only loading refuses.
LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError, pickle.PickleError)


def load_error(err: BaseException) -> str:
    """One line for a ``LOAD_ERRORS`` error (torch's refusal of a pickle is a page of advice)."""
    if isinstance(err, pickle.PickleError):
        return (
            "its weights are a pickle that weights-only loading refuses (loading it could run "
            "code); save the model as safetensors (save_pretrained) and load that"
        )
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_policy(
    name: str,
    *,
    vocab_size: int | None = None,
    special_ids: dict[str, int | None] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
) -> PreTrainedModel:
    """Load a causal LM by ``ModelConfig.name``, on ``device`` in ``dtype``, in eval mode.

    Args:
        name: "default", "tiny-llama", "tiny-gpt2", a local Hugging Face folder or a hub id.
        vocab_size: required for tiny models (the tokenizer's); ignored otherwise.
        special_ids: bos/eos/pad ids for tiny models (keys as in ``SPECIAL_ID_KEYS``).
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: "auto", "float32", "bfloat16" or "float16".
        seed: initialisation seed of tiny models.
    """
    torch_device = select_device(device)
    torch_dtype = select_dtype(dtype, torch_device)
    if name in TINY_MODELS:
        if vocab_size is None:
            raise ModelError(f"model {name!r} is random and needs vocab_size (the tokenizer's)")
        model = tiny_model(
            name, vocab_size=vocab_size, special_ids=special_ids, seed=seed, dtype=torch_dtype
        )
    elif (folder := model_source_dir(name)) is not None:
        try:
            with warnings.catch_warnings():  # a refused pickle is reported below, in one line
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch_dtype, local_files_only=True
                )
        except LOAD_ERRORS as err:
            raise ModelError(f"cannot load the model in {folder}: {load_error(err)}") from None
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        except LOAD_ERRORS as err:
            raise ModelError(
                f"model {name!r} is not a local folder and could not be loaded as a hub id "
                f"(hub ids need network access or a filled Hugging Face cache): {load_error(err)}"
            ) from None
    return model.to(torch_device).eval()


class ValueHead(nn.Module):
    """A scalar value per token from hidden states: (B, T, H) -> (B, T), kept in float32."""

    def __init__(self, hidden_size: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, 1)
        # Zero init: every value starts at 0, so before the critic learns, the advantages are
        # the rewards themselves, not the noise of a random head.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Values (B, T) for hidden states (B, T, H)."""
        hidden = hidden.to(self.linear.weight.dtype)
        return self.linear(self.dropout(hidden)).squeeze(-1)


class QHead(nn.Module):
    """Token Q-values from hidden states, (B, T, H) -> (B, T, V), initialised as the LM head.

    A copy (not a tie), so TD updates leave the policy's own head alone; initial Q-values
    equal the logits, which gives DQN a sensible greedy policy from step 0.
    """

    def __init__(self, lm_head: nn.Linear | torch.Tensor, bias: bool = True) -> None:
        super().__init__()
        weight = lm_head.weight if isinstance(lm_head, nn.Linear) else lm_head
        head_bias = lm_head.bias if isinstance(lm_head, nn.Linear) else None
        vocab, hidden = weight.shape
        self.linear = nn.Linear(hidden, vocab, bias=bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            if bias:
                self.linear.bias.copy_(head_bias if head_bias is not None else 0.0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Q-values (B, T, V) for hidden states (B, T, H)."""
        return self.linear(hidden)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model``, tied ones counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_pretrained_atomic(
    model: PreTrainedModel, tokenizer: object | None, folder: str | Path, *, overwrite: bool = True
) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` as a Hugging Face folder, all or nothing.

    Writes a hidden temp sibling and renames it into place, so ``folder`` never holds a
    half-written model. An existing ``folder`` is replaced, unless ``overwrite`` is False:
    then an ``OSError`` is raised and the existing folder is kept.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is ordinary data
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if overwrite and folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(folder, old)
        # rename(2) refuses a non-empty target, so a concurrent writer's folder is kept.
        os.rename(tmp, folder)
    except BaseException:
        if old is not None and not folder.exists():
            os.rename(old, folder)  # put the previous save back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder
