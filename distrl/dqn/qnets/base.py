"""The interface every token-level Q-network shares, and padding helpers.

A Q-network maps a batch of states (each the whole prefix: prompt + tokens generated so far)
to the Q-values of every next token: ``forward(input_ids (B, L), attention_mask (B, L)) -> (B, V)``
in float32. Batches may be left- or right-padded; the state is read at the last real token.
``aux_loss()`` is an extra loss the learner adds beside the TD loss (zero unless the network
has an autoencoder).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def full_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``attention_mask`` as int64 (B, L), or all ones when it is None."""
    if attention_mask is None:
        return torch.ones_like(input_ids)
    return attention_mask.to(device=input_ids.device, dtype=torch.long)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last real token of each row of ``attention_mask`` (B, L).

    Works for left and right padding; an all-padding row gives 0.
    """
    index = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (index * attention_mask.long()).argmax(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, L) counting real tokens only, so a left-padded prefix gets the positions it
    would have unpadded (as ``generate`` does); padding gets 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def gather_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Hidden states (B, L, H) at each row's last real token -> (B, H)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_positions(attention_mask)]


class QNetwork(nn.Module):
    """Base class: Q-values of the next token for each state, plus an auxiliary loss."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q-values (B, V) in float32 for token ids (B, L) and mask (B, L) (1 = real token)."""
        raise NotImplementedError

    def state_and_next(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, back: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Q-values (B, V) of a state and of a later state that extends it, for TD updates.

        ``input_ids``/``attention_mask`` (B, L) hold the later states, left-padded; each row's
        state is the same row without its last ``back[b]`` (>= 1) tokens. Gradients flow from
        the state's Q-values only. Here two passes (the state's tokens masked at the end);
        networks that can read both from one pass override this.
        """
        width = input_ids.shape[1]
        cols = torch.arange(width, device=input_ids.device)
        state_mask = attention_mask * (cols[None, :] < (width - back)[:, None])
        q_state = self(input_ids, state_mask)
        with torch.no_grad():
            q_next = self(input_ids, attention_mask)
        return q_state, q_next

    def start(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Q-values (B, V) of the states, and a cache for ``step`` (here none: ``step``
        recomputes; networks with a KV cache override both)."""
        return self(input_ids, attention_mask), None

    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any]:
        """Q-values (B, V) after one token was appended to every state: ``input_ids`` and
        ``attention_mask`` (B, L + 1) are the whole states, ``cache`` came from the previous
        ``start`` or ``step``. Returns the new cache too."""
        return self(input_ids, attention_mask), None

    def aux_loss(self) -> torch.Tensor:
        """Extra loss to add beside the TD loss; zero for networks without one."""
        param = next(self.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
