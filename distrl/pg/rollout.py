"""Rollout worker: holds a policy copy, loads published weights, generates continuations.

A plain class; ``distrl.runtime.actors`` makes it a Ray actor. Trajectories come back as numpy
arrays stamped with the policy version that made them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from distrl.config import (
    EnvConfig,
    LoraConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    TokenizerConfig,
)
from distrl.data.examples import Example
from distrl.models.lora import add_lora
from distrl.models.policy import (
    build_model,
    build_tokenizer,
    distinct_prompts,
    left_pad,
    prefill_shared,
)
from distrl.models.tokenizers import Tokenizer
from distrl.runtime.roles import WorkerRole, generating
from distrl.weights.tensors import set_weights

if TYPE_CHECKING:
    from distrl.envs.episodes import Episodes

PROMPT_FIELDS = ("prompt_ids", "prompt_mask")  # left-padded
ARRAY_FIELDS = (
    "prompt_ids",
    "prompt_mask",
    "response_ids",
    "response_mask",
    "logprobs",
    "texts",
    "example_ids",
    "row_versions",
)


@dataclass
class Trajectories:
    """A batch of generations. ``B`` sequences, ``P`` prompt and ``T`` response tokens.

    Attributes:
        prompt_ids: (B, P) int64, left-padded. prompt_mask: (B, P) int64.
        response_ids: (B, T) int64, right-padded. response_mask: (B, T) float32, 1 up to and
            including the first EOS.
        logprobs: (B, T) float32, log-probabilities of the sampled tokens under
            ``softmax(logits / temperature)``, the distribution the learner recomputes.
        texts: (B,) decoded responses. example_ids: (B,) indices into the prompt set.
        version: policy version that generated the batch (of a joined batch: the oldest).
        seconds: generation wall time.
        idle_s: how long the worker sat idle before it started this batch.
        row_versions: (B,) int64, the version that generated each row (filled from
            ``version`` when not given; kept row by row when batches are joined).
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    texts: np.ndarray
    example_ids: np.ndarray
    version: int
    seconds: float
    row_versions: np.ndarray | None = field(default=None, kw_only=True)
    idle_s: float = field(default=0.0, kw_only=True)

    array_fields = ARRAY_FIELDS  # per-sequence arrays, cut by ``select``
    # How ``concat`` joins the per-batch scalars: the oldest version, the slowest worker, the
    # workers' idle time together.
    reducers: ClassVar[dict[str, Callable[[list], Any]]] = {
        "version": min,
        "seconds": max,
        "idle_s": sum,
    }

    def __post_init__(self) -> None:
        if self.row_versions is None:
            self.row_versions = np.full(len(self.example_ids), self.version, dtype=np.int64)

    def attention(self) -> np.ndarray:
        """(B, T) int64 attention mask of the response columns: the tokens up to EOS."""
        return self.response_mask.astype(np.int64)

    @property
    def num_tokens(self) -> int:
        """Generated (unpadded) tokens."""
        return int(self.response_mask.sum())

    def select(self, rows: np.ndarray) -> Trajectories:
        """The sequences at ``rows`` (an index array), same padding."""
        return dataclasses.replace(
            self,
            **{name: getattr(self, name)[rows] for name in self.array_fields},
        )

    @classmethod
    def concat(cls, parts: list[Trajectories]) -> Trajectories:
        """Join batches of one class, every column kept (a subclass's too): prompts re-padded
        on the left, per-token columns on the right, to common widths."""
        first = parts[0]
        pad_p = max(p.prompt_ids.shape[1] for p in parts)
        pad_t = max(p.response_ids.shape[1] for p in parts)

        def join(name: str) -> np.ndarray:
            arrays = [getattr(p, name) for p in parts]
            if name in PROMPT_FIELDS:
                arrays = [np.pad(a, ((0, 0), (pad_p - a.shape[1], 0))) for a in arrays]
            elif arrays[0].ndim > 1:  # (B, T, ...) per-token columns
                widths = [
                    ((0, 0), (0, pad_t - a.shape[1]), *[(0, 0)] * (a.ndim - 2)) for a in arrays
                ]
                arrays = [np.pad(a, w) for a, w in zip(arrays, widths)]
            return np.concatenate(arrays)

        values = {name: join(name) for name in first.array_fields}
        for f in dataclasses.fields(first):
            if f.name not in values:
                reduce = first.reducers[f.name]  # a scalar without a reducer is a mistake
                values[f.name] = reduce([getattr(p, f.name) for p in parts])
        return type(first)(**values)


def response_mask(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1.0 on tokens up to and including the first ``eos_id`` of each row: (B, T) -> (B, T)."""
    if eos_id is None:
        return torch.ones_like(ids, dtype=torch.float32)
    is_eos = (ids == eos_id).long()
    before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before each position
    return (before == 0).float()


def response_texts(tokenizer: Tokenizer, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Decoded responses (B,) of ids (B, T) up to their mask's length (EOS included)."""
    texts = [tokenizer.decode(row[: int(m.sum())].tolist()) for row, m in zip(ids, mask)]
    return np.array(texts, dtype=np.str_)


class SampledLogprobs(LogitsProcessor):
    """Log-probabilities of the sampled tokens, recorded while ``generate`` runs.

    ``generate`` calls its logits processors once per step with the sequences so far and the
    next-token logits; user processors run before the sampling warpers (temperature, top-k,
    top-p), so these are the raw logits the learner recomputes. Each call reads the token
    sampled at the previous step off the sequences and keeps its log-probability under
    ``softmax(logits / temperature)``; only one step's (B, V) log-softmax is held at a time,
    never a (B, T, V) stack of every step's logits.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.pending: torch.Tensor | None = None  # (B, V) log-softmax of the latest step
        self.taken: list[torch.Tensor] = []  # (B,) per step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Record the previous step's token; keep this step's log-softmax; pass scores on."""
        if self.pending is not None:
            self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.taken.append(self.pending.gather(-1, tokens[:, None])[:, 0])
        self.pending = None

    def result(self, response: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, T) of ``response`` (B, T), the tokens ``generate`` returned
        (steps it ran and then undid are dropped)."""
        if len(self.taken) < response.shape[1]:
            self._take(response[:, len(self.taken)])  # the last step has no later call
        return torch.stack(self.taken[: response.shape[1]], dim=1)


class RolloutWorker(WorkerRole):
    """Generates batched continuations with the KV cache and records their logprobs.

    With ``lora`` (``learner.lora``, rank > 0) the policy carries the learner's LoRA adapters,
    at first a no-op (B = 0), and published weights are only theirs.
    """

    engine: Any = None  # a ``distrl.engines.vllm_engine.VLLMEngine`` with rollout.engine vllm

    def __init__(
        self,
        *,
        model: ModelConfig,
        tokenizer: TokenizerConfig,
        rollout: RolloutConfig,
        seed: int,
        worker_index: int = 0,
        torch_threads: int | None = None,
        lora: LoraConfig | None = None,
        max_prompt_tokens: int = 128,
        env: EnvConfig | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.config = rollout
        self.env = env
        self.system_prompt = system_prompt
        self.episodes_started = 0
        self.tokenizer = build_tokenizer(model, tokenizer)
        self.version = 0
        self.seed = seed * 1000 + worker_index
        self.calls = 0
        if rollout.engine == "vllm":
            from distrl.engines.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(
                model=model,
                rollout=rollout,
                tokenizer=self.tokenizer,
                max_prompt_tokens=max_prompt_tokens,
                seed=self.seed,
                build_hf=lambda: build_model(model, self.tokenizer, seed=seed),
            )
            self.device = self.engine.device
            return
        self.model = build_model(model, self.tokenizer, seed=seed)
        if lora is not None and lora.rank:
            add_lora(self.model, lora, seed=seed)
        self.device = next(self.model.parameters()).device

    @staticmethod
    def arguments(config: RunConfig, worker_index: int = 0) -> dict[str, Any]:
        """The keyword arguments that build rollout worker ``worker_index`` of run ``config``."""
        return {
            "model": config.model,
            "tokenizer": config.tokenizer,
            "rollout": config.rollout,
            "seed": config.seed,
            "worker_index": worker_index,
            "torch_threads": config.resources.torch_threads,
            "lora": config.learner.lora,
            # An episode's later turns continue from everything before them.
            "max_prompt_tokens": config.data.max_prompt_tokens
            + (config.env.max_total_tokens if config.env.name else 0),
            "env": config.env,
            "system_prompt": config.data.system_prompt,
        }

    def trainable(self) -> torch.nn.Module:
        """The policy (a Hugging Face model; with the vllm engine, the engine holds it)."""
        if self.engine is not None:
            raise NotImplementedError("the vllm engine holds the policy; see apply_weights")
        return self.model

    def apply_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load published tensors into the policy, or into the running vLLM engine."""
        if self.engine is not None:
            self.engine.load_weights(tensors)
        else:
            set_weights(self.model, tensors)

    def generation_config(self, greedy: bool = False) -> GenerationConfig:
        """Sampling settings from the rollout config (top_k 0 and top_p 1 mean off)."""
        c = self.config
        return GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else c.temperature,
            top_p=None if greedy else c.top_p,
            top_k=None if greedy else c.top_k,
            max_new_tokens=c.max_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @generating
    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], example_ids: list[int], *, greedy: bool = False
    ) -> Trajectories:
        """Generate one continuation per prompt.

        Args:
            prompts: token ids of each prompt (from ``distrl.models.policy.encode_prompts``).
            example_ids: index of each prompt in the prompt set, returned with the batch.
            greedy: argmax decoding (for evaluation) instead of sampling.
        """
        start = time.perf_counter()
        torch.manual_seed(self.seed + 7919 * self.calls)
        self.calls += 1
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        if self.engine is not None:
            response, rmask, logprobs, _ = self.engine.generate(prompts, greedy=greedy)
            return Trajectories(
                prompt_ids=ids,
                prompt_mask=mask,
                response_ids=response,
                response_mask=rmask,
                logprobs=logprobs,
                texts=response_texts(self.tokenizer, response, rmask),
                example_ids=np.asarray(example_ids, dtype=np.int64),
                version=self.version,
                seconds=time.perf_counter() - start,
            )
        ids_t = torch.from_numpy(ids).to(self.device)
        mask_t = torch.from_numpy(mask).to(self.device)
        # Raw logits (before top-k/top-p warping) over the temperature: what the learner computes.
        recorder = SampledLogprobs(1.0 if greedy else self.config.temperature)
        cache = {}
        if len(distinct_prompts(ids_t)[0]) < len(prompts) and ids.shape[1] > 1:
            # The samples of one prompt share its prefill: all but the last prompt token run
            # once per distinct prompt; generate continues from the copied cache.
            cache, _ = prefill_shared(self.model, ids_t[:, :-1], mask_t[:, :-1])
        sequences = self.model.generate(
            input_ids=ids_t,
            attention_mask=mask_t,
            generation_config=self.generation_config(greedy),
            logits_processor=LogitsProcessorList([recorder]),
            **cache,
        )
        response = sequences[:, ids.shape[1] :]
        logprobs = recorder.result(response)
        rmask = response_mask(response, self.tokenizer.eos_token_id)
        texts = response_texts(self.tokenizer, response.cpu().numpy(), rmask.cpu().numpy())
        return Trajectories(
            prompt_ids=ids,
            prompt_mask=mask,
            response_ids=response.cpu().numpy(),
            response_mask=rmask.cpu().numpy(),
            logprobs=(logprobs * rmask).cpu().numpy(),
            texts=texts,
            example_ids=np.asarray(example_ids, dtype=np.int64),
            version=self.version,
            seconds=time.perf_counter() - start,
        )

    @generating
    def generate_episodes(
        self, examples: list[Example], example_ids: list[int], *, greedy: bool = False
    ) -> Episodes:
        """Play one multi-turn episode per example with a fresh environment each (``env``).

        Args:
            examples: the data examples the episodes start from (``Environment.reset``).
            example_ids: index of each example in the prompt set, returned with the batch.
            greedy: argmax decoding (for evaluation) instead of sampling.
        """
        from distrl.envs.episodes import play

        def turn(seqs: list[list[int]]) -> tuple[list[list[int]], dict[str, list[np.ndarray]]]:
            batch = self.generate(seqs, list(range(len(seqs))), greedy=greedy)
            lengths = batch.response_mask.sum(1).astype(int)
            ids = [row[:n].tolist() for row, n in zip(batch.response_ids, lengths)]
            return ids, {"logprobs": [row[:n] for row, n in zip(batch.logprobs, lengths)]}

        return play(self, examples, example_ids, turn=turn)
