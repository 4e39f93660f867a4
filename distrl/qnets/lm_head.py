"""A Q head on a causal LM's hidden states, initialised from its LM head.

At initialisation Q(s, .) equals the LM's next-token logits, so the greedy Q policy starts as
the LM's own greedy decoding and TD learning adjusts it from there.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from distrl.errors import ModelError
from distrl.models import QHead
from distrl.qnets.base import QNetwork, full_mask, gather_last, position_ids


class LMHeadQNetwork(QNetwork):
    """The LM's base transformer plus a ``QHead`` copied from its LM head: (B, L) -> (B, V).

    Takes ownership of ``model``'s base transformer (trained by TD updates): pass a copy to
    keep the policy intact. The LM head itself is not kept; Q is computed at the last real
    token only.

    Args:
        model: a Hugging Face causal LM whose logits are ``lm_head(last hidden state)``.
        vocab_size: keep only the first ``vocab_size`` rows of the head (a model may pad its
            vocabulary past the tokenizer's); None keeps them all.
    """

    def __init__(self, model: PreTrainedModel, vocab_size: int | None = None) -> None:
        super().__init__()
        if getattr(model.config, "final_logit_softcapping", None):
            raise ModelError(f"{type(model).__name__} soft-caps its logits; not supported")
        lm_head = model.get_output_embeddings()
        rows = lm_head.weight.shape[0]
        vocab_size = vocab_size or rows
        if vocab_size > rows:
            raise ModelError(f"vocab_size {vocab_size} is larger than the LM head's {rows} rows")
        self.backbone = model.base_model
        self.q_head = QHead(lm_head)
        if vocab_size < rows:
            linear = self.q_head.linear
            linear.weight = nn.Parameter(linear.weight.detach()[:vocab_size].clone())
            linear.bias = nn.Parameter(linear.bias.detach()[:vocab_size].clone())
            linear.out_features = vocab_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q-values (B, V) for token ids (B, L) and mask (B, L)."""
        mask = full_mask(input_ids, attention_mask)
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            use_cache=False,
        ).last_hidden_state
        return self.q_head(gather_last(hidden, mask)).float()
