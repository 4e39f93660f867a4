"""From config to a ready policy: its tokenizer, its model, and prompts encoded for it.

Rollout workers, the learner, validation and chat all build their policy here, so the same
config gives the same tokenizer, the same special ids and the same prompt tokens everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from distrl.config import DataConfig, ModelConfig, TokenizerConfig
from distrl.data import Example
from distrl.models import TINY_MODELS, load_policy, model_source_dir
from distrl.tokenizers import Tokenizer, check_vocab, load_tokenizer


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
