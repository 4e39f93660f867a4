"""A Performer Q-network: a small causal transformer with FAVOR+ attention, trained from scratch.

Its attention cost grows linearly with the state's length (``python -m distrl.bench attention``
measures it), so long prefixes stay cheap. Shapes: ``B`` states, ``L`` tokens, ``D`` model width,
``V`` vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from distrl.dqn.qnets.base import QNetwork, full_mask, gather_last, position_ids
from distrl.dqn.qnets.favor import FavorAttention
from distrl.errors import ModelError


class PerformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + MLP(norm(x)); (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, heads: int, num_features: int, seed: int) -> None:
        super().__init__()
        if dim % heads:
            raise ModelError(f"performer dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention = FavorAttention(dim // heads, num_features, causal=True, seed=seed)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), mask (B, L) with 1 on real tokens -> (B, L, D)."""
        b, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, D / heads)
        attended = self.attention(q, k, v, key_mask=mask).transpose(1, 2).reshape(b, length, dim)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class PerformerQNetwork(QNetwork):
    """Token + position embeddings, ``depth`` causal FAVOR+ blocks, a Q head to the vocabulary.

    Padding is ignored (padded keys are masked, positions count real tokens only), so a state
    gets the same Q-values however its batch is padded.

    Args:
        vocab_size: V, the action space.
        dim: D, model width.
        depth: number of blocks.
        heads: attention heads per block (``dim`` must divide by it).
        num_features: FAVOR+ random features per head.
        max_len: longest state (learned position embeddings).
        seed: seeds the blocks' random features (parameter init follows torch's global RNG).
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        num_features: int = 64,
        max_len: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(
            PerformerBlock(dim, heads, num_features, seed=seed + i) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.q_head = nn.Linear(dim, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)  # GPT-2's init: small initial Q-values
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q-values (B, V) for token ids (B, L) and mask (B, L)."""
        mask = full_mask(input_ids, attention_mask)
        positions = position_ids(mask)
        if int(positions.max()) >= self.max_len:
            raise ModelError(
                f"a state has {int(positions.max()) + 1} tokens; the performer Q-network "
                f"takes at most max_len={self.max_len}"
            )
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x, mask)
        return self.q_head(self.norm(gather_last(x, mask))).float()

    def redraw_features(self) -> None:
        """Draw new FAVOR+ features in every block (re-sync the target network afterwards)."""
        for block in self.blocks:
            block.attention.redraw_features()
