"""A dueling Q head on a causal LM's hidden states, initialised from its LM head.

``Q(s, a) = V(s) + log_softmax(W h_s)[a]``: the advantage part is a copy of the LM head read
through a log-softmax, the state value ``V`` a linear layer initialised to zero. At
initialisation Q(s, .) is the LM's next-token log-probabilities, so the greedy Q policy starts as
the LM's own greedy decoding, and the values start on the scale of rewards (a few units) rather
than of raw logits (tens), which TD learning would first have to unlearn.

The backbone and the Q head keep the policy's dtype (bfloat16 on a GPU); the state value is a
new layer trained from zero, kept in float32 (as PPO's value head) so small TD updates are not
rounded away, and reads the hidden state upcast to float32. Q-values come out in float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from distrl.dqn.qnets.base import QNetwork, full_mask, gather_last, position_ids
from distrl.errors import ModelError
from distrl.models.loading import QHead
from distrl.models.policy import cache_kwargs, output_cache


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
        hidden = lm_head.weight.shape[1]
        self.value = nn.Linear(hidden, 1, device=lm_head.weight.device, dtype=torch.float32)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        if vocab_size < rows:
            linear = self.q_head.linear
            linear.weight = nn.Parameter(linear.weight.detach()[:vocab_size].clone())
            linear.bias = nn.Parameter(linear.bias.detach()[:vocab_size].clone())
            linear.out_features = vocab_size

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Q-values (B, V) float32 from last hidden states (B, H): V(s) + log-softmax advantage."""
        advantage = torch.log_softmax(self.q_head(hidden).float(), dim=-1)
        return self.value(hidden.float()) + advantage

    def _backbone(
        self, input_ids: torch.Tensor, mask: torch.Tensor, cache: Any = None, *, use_cache: bool
    ) -> Any:
        """The backbone over ``input_ids`` (all of ``mask``'s tokens, or the newest ones after
        a ``cache``), with positions that skip left padding."""
        positions = position_ids(mask)[:, -input_ids.shape[1] :]
        return self.backbone(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=use_cache,
            **cache_kwargs(self.backbone, cache),
        )

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q-values (B, V) for token ids (B, L) and mask (B, L)."""
        mask = full_mask(input_ids, attention_mask)
        hidden = self._backbone(input_ids, mask, use_cache=False).last_hidden_state
        return self.head(gather_last(hidden, mask))

    def state_and_next(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, back: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``QNetwork.state_and_next`` from one causal pass: the state's Q-values are read
        ``back`` tokens before the end, where attention has not seen the later tokens."""
        mask = full_mask(input_ids, attention_mask)
        hidden = self._backbone(input_ids, mask, use_cache=False).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        q_state = self.head(hidden[rows, hidden.shape[1] - 1 - back])
        return q_state, self.head(hidden[:, -1]).detach()

    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        """As ``forward``, also returning the backbone's KV cache for ``step``."""
        mask = full_mask(input_ids, attention_mask)
        out = self._backbone(input_ids, mask, use_cache=True)
        return self.head(gather_last(out.last_hidden_state, mask)), output_cache(out)

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """Q-values after the last token of ``input_ids``, reading only it through the cache."""
        mask = full_mask(input_ids, attention_mask)
        out = self._backbone(input_ids[:, -1:], mask, cache, use_cache=True)
        return self.head(out.last_hidden_state[:, -1]), output_cache(out)
