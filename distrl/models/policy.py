"""From config to a ready policy: its tokenizer, its model, and prompts encoded for it.

Rollout workers, the learner, validation and chat all build their policy here, so the same
config gives the same tokenizer, the same special ids and the same prompt tokens everywhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from distrl.config import DataConfig, ModelConfig, TokenizerConfig
from distrl.data.examples import Example
from distrl.errors import ModelError
from distrl.models.loading import TINY_MODELS, ValueHead, load_policy, model_source_dir
from distrl.models.tokenizers import Tokenizer, check_vocab, load_tokenizer


def build_tokenizer(model: ModelConfig, tokenizer: TokenizerConfig) -> Tokenizer:
    """The tokenizer ``tokenizer.name`` names; ``auto`` is the model's own (GPT-2's for tiny)."""
    if tokenizer.name != "auto":
        return load_tokenizer(tokenizer.name)
    if model.name in TINY_MODELS:
        return load_tokenizer("gpt2")
    folder = model_source_dir(model.name)
    return load_tokenizer("auto", str(folder) if folder else model.name)


def build_model(
    model: ModelConfig, tokenizer: Tokenizer, *, seed: int, name: str | None = None
) -> PreTrainedModel:
    """Load the policy (or ``name``, e.g. a reference model) and check it fits ``tokenizer``."""
    transformers.utils.logging.disable_progress_bar()  # no loading bars in every actor's log
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    policy = load_policy(
        name or model.name,
        vocab_size=tokenizer.vocab_size,
        special_ids=special,
        device=model.device,
        dtype=model.dtype,
        seed=seed,
    )
    check_vocab(tokenizer, policy.get_input_embeddings().num_embeddings)
    return policy


def prompt_text(
    example: Example, tokenizer: Tokenizer, tok: TokenizerConfig, data: DataConfig
) -> str:
    """The text the policy continues: chat-templated when configured and available."""
    messages = example.prompt_messages
    if data.system_prompt:
        messages = [{"role": "system", "content": data.system_prompt}, *messages]
    if tok.chat_template and tokenizer.has_chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if len(messages) == 1:
        return messages[0]["content"]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def encode_prompts(
    examples: Sequence[Example], tokenizer: Tokenizer, tok: TokenizerConfig, data: DataConfig
) -> list[list[int]]:
    """Token ids of each example's prompt, cut to its last ``data.max_prompt_tokens`` tokens."""
    texts = [prompt_text(e, tokenizer, tok, data) for e in examples]
    return [ids[-data.max_prompt_tokens :] for ids in tokenizer.encode_batch(texts)]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists into ids (B, L) int64 and an attention mask (B, L) int64."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = s
            mask[i, width - len(s) :] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` computes them: (B, L) -> (B, L)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def distinct_prompts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of left-padded prompts ``ids`` (B, P): the row index of each distinct
    prompt's first occurrence (U,), and per row the index of its prompt among them (B,)."""
    _, inverse = torch.unique(ids, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), ids.shape[0], device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(ids.shape[0], device=ids.device), "amin")
    return first, inverse


def cache_kwargs(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``cache`` as the keyword argument ``module``'s forward takes: ``cache`` from
    transformers 5.20, ``past_key_values`` before (vLLM's CPU build pins 5.19)."""
    params = inspect.signature(module.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` from transformers 5.20, ``past_key_values``
    before)."""
    return out.cache if hasattr(out, "cache") else out.past_key_values


def new_cache(model: PreTrainedModel) -> dict[str, DynamicCache]:
    """A fresh KV cache as a keyword argument of ``model``'s forward and ``generate``."""
    return cache_kwargs(model.base_model, DynamicCache(config=model.config))


def prefill_shared(
    model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[dict[str, DynamicCache], torch.Tensor]:
    """Run each distinct prompt of ``ids`` (B, P) once and copy its KV cache to every row that
    repeats it, as a group of samples of one prompt does.

    Gradients flow through the copies into the one computation, so this is the plain forward
    over all rows done once per prompt instead of once per sample.

    Returns:
        the cache keyword argument (B rows, P positions) and the last hidden state (B, 1, H).
    """
    first, inverse = distinct_prompts(ids)
    cache = new_cache(model)
    out = model.base_model(
        input_ids=ids[first],
        attention_mask=mask[first],
        position_ids=position_ids(mask[first]),
        use_cache=True,
        **cache,
    )
    next(iter(cache.values())).batch_select_indices(inverse)
    return cache, out.last_hidden_state[inverse, -1:]


def packed_hidden(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, L, H) of left-padded prompts followed by right-padded responses
    (``ids``, ``mask``: (B, L)), computed on their real tokens only: every row's run of real
    tokens goes, one after the other, into one row whose positions restart at 0 for each, so
    attention stays within a sequence (transformers masks packed rows by their positions) and no
    compute goes to padding. Padding positions hold zeros.

    Raises:
        ModelError: a row's real tokens are not one run (padding inside a sequence).
    """
    real = mask.bool()
    lengths = real.sum(-1)
    first = real.int().argmax(-1)
    runs = torch.arange(ids.shape[1], device=ids.device)[None, :] - first[:, None]
    if not bool((real == ((runs >= 0) & (runs < lengths[:, None]))).all()):
        raise ModelError("packing needs each sequence's tokens in one run (no padding inside)")
    positions = runs[real][None]  # 0.. per sequence, in row order
    out = model.base_model(input_ids=ids[real][None], position_ids=positions, use_cache=False)
    hidden = out.last_hidden_state[0]
    full = hidden.new_zeros((*ids.shape, hidden.shape[-1]))
    full[real] = hidden
    return full


def response_hidden(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    start: int,
    *,
    share_prompts: bool = True,
    pack: bool = False,
) -> torch.Tensor:
    """Last hidden states (B, T, H) at the positions that predict ``ids[:, start:]``.

    Rows that share a prompt (the samples of one group) run it once: its KV cache is computed
    for the distinct prompts and copied, and only the responses run per row. A sharded learner
    passes ``share_prompts=False``: every rank must run the same passes, whatever its rows.
    With ``pack`` the rows' tokens run as one packed row instead (``packed_hidden``).

    Args:
        model: a causal LM. ids, mask: (B, L) left-padded prompts followed by responses.
        start: column where responses begin (the padded prompt width).
    """
    if pack:
        return packed_hidden(model, ids, mask)[:, start - 1 : -1]
    first, _ = distinct_prompts(ids[:, :start])
    if not share_prompts or len(first) == ids.shape[0] or start == ids.shape[1]:
        out = model.base_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False
        )
        return out.last_hidden_state[:, start - 1 : -1]
    cache, last = prefill_shared(model, ids[:, :start], mask[:, :start])
    if ids.shape[1] - start == 1:
        return last
    out = model.base_model(
        input_ids=ids[:, start:-1],
        attention_mask=mask[:, :-1],
        position_ids=position_ids(mask)[:, start:-1],
        use_cache=True,
        **cache,
    )
    return torch.cat([last, out.last_hidden_state], dim=1)


def with_responses(
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    responses: Sequence[Sequence[int]],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded prompts (B, P) followed by right-padded ``responses``.

    Returns:
        ids (B, P+T), mask (B, P+T), response ids (B, T) and response mask (B, T) float32.
    """
    width = max(len(r) for r in responses)
    resp = np.full((len(responses), width), pad_id, dtype=np.int64)
    resp_mask = np.zeros((len(responses), width), dtype=np.int64)
    for i, r in enumerate(responses):
        resp[i, : len(r)], resp_mask[i, : len(r)] = r, 1
    ids = torch.from_numpy(np.concatenate([prompt_ids, resp], 1))
    mask = torch.from_numpy(np.concatenate([prompt_mask, resp_mask], 1))
    return ids, mask, torch.from_numpy(resp), torch.from_numpy(resp_mask).float()


@torch.no_grad()
def reference_metrics(
    model: PreTrainedModel | PolicyWithValue,
    prompts: Sequence[Sequence[int]],
    references: Sequence[Sequence[int]],
    pad_id: int,
    *,
    share_prompts: bool = True,
) -> dict[str, float]:
    """Perplexity and greedy token accuracy of reference responses after their prompts; pairs
    without a reference are skipped, and no pairs give ``{}``. A ``PolicyWithValue`` runs its
    ``responses`` (a sharded learner's, with ``share_prompts`` False)."""
    pairs = [(p, r) for p, r in zip(prompts, references) if r]
    if not pairs:
        return {}
    device = next(model.parameters()).device
    p_ids, p_mask = left_pad([p for p, _ in pairs], pad_id)
    ids, mask, refs, ref_mask = (
        t.to(device) for t in with_responses(p_ids, p_mask, [r for _, r in pairs], pad_id)
    )
    if isinstance(model, PolicyWithValue):
        logits, _ = model.responses(ids, mask, p_ids.shape[1], share_prompts=share_prompts)
    else:
        logits = model.get_output_embeddings()(response_hidden(model, ids, mask, p_ids.shape[1]))
    logp = torch.log_softmax(logits.float(), -1)
    nll = -(logp.gather(-1, refs.unsqueeze(-1)).squeeze(-1) * ref_mask).sum() / ref_mask.sum()
    hits = ((logits.argmax(-1) == refs).float() * ref_mask).sum() / ref_mask.sum()
    return {
        "eval/ref_perplexity": float(torch.exp(nll.clamp(max=50.0))),
        "eval/ref_token_accuracy": float(hits),
    }


class PolicyWithValue(nn.Module):
    """A causal LM plus a ``ValueHead`` on its last hidden state (for PPO).

    One pass of the base transformer feeds both heads, rather than asking the LM for all
    hidden states. Assumes logits = output embeddings(last hidden state), true of Llama,
    GPT-2 and most causal LMs; models with logit soft-capping are refused.
    """

    def __init__(self, model: PreTrainedModel, value_head: ValueHead | None = None) -> None:
        super().__init__()
        if getattr(model.config, "final_logit_softcapping", None):
            raise ModelError(f"{type(model).__name__} soft-caps its logits; not supported")
        self.model = model
        head = model.get_output_embeddings().weight
        self.value_head = value_head or ValueHead(model.config.hidden_size).to(head.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values for a batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 on real tokens, 0 on padding.
            position_ids: (B, T); pass ``mask.cumsum(-1) - 1`` for left-padded batches so
                positions match those ``generate`` used.

        Returns:
            logits (B, T, V) in the model's dtype and values (B, T) in float32.
        """
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        return self.model.get_output_embeddings()(hidden), self.value_head(hidden)

    def responses(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: int,
        *,
        values: bool = False,
        share_prompts: bool = True,
        pack: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) predicting ``ids[:, start:]`` and, with ``values``, values (B, T):
        the learner's forward (see ``response_hidden``; ``pack``: ``packed_hidden``). A sharded
        learner registers it as an FSDP forward method, so it gathers the weights as
        ``forward`` does."""
        hidden = response_hidden(
            self.model, ids, mask, start, share_prompts=share_prompts, pack=pack
        )
        logits = self.model.get_output_embeddings()(hidden)
        return logits, (self.value_head(hidden) if values else None)
