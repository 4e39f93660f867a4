"""State encoders and the MLP Q-network over a state embedding.

``StateEncoder`` turns token ids into one embedding per state with a (optionally magnitude
pruned) causal LM backbone (a pruned transformer); ``StateAutoencoder`` compresses that
embedding, trained by a reconstruction loss beside the TD loss; ``MLPQNetwork`` is
a one-hidden-layer Q-network over it. ``StateQNetwork`` chains them behind the common
``QNetwork`` interface. Shapes: ``B`` states, ``L`` tokens, ``H`` embedding size, ``V`` vocab.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from transformers.pytorch_utils import Conv1D

from distrl.dqn.qnets.base import QNetwork, full_mask, gather_last, position_ids
from distrl.errors import ModelError

# GPT-2 writes its linear layers as Conv1D (a transposed nn.Linear); both have a `weight`.
LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_layers(module: nn.Module) -> list[nn.Module]:
    """The nn.Linear and GPT-2 Conv1D layers inside ``module``."""
    return [m for m in module.modules() if isinstance(m, LINEAR_TYPES)]


def sparsity(module: nn.Module) -> float:
    """Fraction of exact zeros among the weights of ``module``'s linear layers."""
    weights = [m.weight for m in linear_layers(module)]
    if not weights:
        return 0.0
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / sum(w.numel() for w in weights)


@torch.no_grad()
def prune_linear_layers(module: nn.Module, amount: float) -> int:
    """Zero the smallest-magnitude ``amount`` of each linear layer's weight, permanently.

    ``prune.l1_unstructured`` per layer (so each layer, and the whole, reaches ``amount``), then
    ``prune.remove`` so the zeros are baked into ``weight`` and no mask or hook is left behind.
    Biases, embeddings and norms are kept. Returns the number of layers pruned.
    """
    layers = linear_layers(module)
    if amount <= 0.0:
        return 0
    for layer in layers:
        prune.l1_unstructured(layer, name="weight", amount=amount)
        prune.remove(layer, "weight")
    return len(layers)


class StateEncoder(nn.Module):
    """A causal LM backbone reading token ids into state embeddings: (B, L) -> (B, H) float32.

    Takes ownership of ``model``'s base transformer (its LM head is dropped) and prunes it in
    place: pass a copy to keep the original intact. A frozen encoder stays in eval mode and
    runs without gradients, so its embeddings are a fixed function of the state (and pruned
    weights stay zero; a trainable backbone may regrow them).

    Args:
        model: a Hugging Face causal LM (or its base model).
        pool: "last" (hidden state at the last real token) or "mean" (over real tokens).
        prune_sparsity: magnitude-prune every linear layer to this fraction of zeros.
        freeze: keep the backbone fixed (TD updates train only what reads the embedding).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pool: Literal["last", "mean"] = "last",
        prune_sparsity: float = 0.0,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        if pool not in ("last", "mean"):
            raise ModelError(f"state encoder pool must be 'last' or 'mean', not {pool!r}")
        if not 0.0 <= prune_sparsity < 1.0:
            raise ModelError(f"prune_sparsity must be in [0, 1), not {prune_sparsity}")
        self.backbone = getattr(model, "base_model", model)
        self.out_dim: int = self.backbone.config.hidden_size
        self.pool, self.freeze = pool, freeze
        prune_linear_layers(self.backbone, prune_sparsity)
        if freeze:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> StateEncoder:
        """Set training mode, except that a frozen backbone stays in eval mode (no dropout)."""
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """State embeddings (B, H) for token ids (B, L) and mask (B, L)."""
        mask = full_mask(input_ids, attention_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            hidden = self.backbone(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids(mask),
                use_cache=False,
            ).last_hidden_state.float()
        if self.pool == "last":
            return gather_last(hidden, mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class StateAutoencoder(nn.Module):
    """MLP autoencoder compressing state embeddings (B, in_dim) to codes (B, code_dim).

    Args:
        in_dim: embedding size.
        code_dim: compressed size.
        hidden: hidden width of encoder and decoder (default: midway between the two).
    """

    def __init__(self, in_dim: int, code_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or (in_dim + code_dim) // 2
        self.code_dim = code_dim
        self.encoder = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, code_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(code_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes (B, code_dim) for embeddings (B, in_dim)."""
        return self.encoder(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Reconstructed embeddings (B, in_dim) for codes (B, code_dim)."""
        return self.decoder(code)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes (B, code_dim) and reconstructions (B, in_dim) of embeddings (B, in_dim)."""
        code = self.encode(x)
        return code, self.decode(code)

    def reconstruction_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error of embeddings (B, in_dim), a scalar."""
        return F.mse_loss(self.decode(self.encode(x)), x)


class MLPQNetwork(nn.Module):
    """The MLP Q-network: one hidden ReLU layer, state embedding (B, state_dim) -> (B, V)."""

    def __init__(self, state_dim: int, vocab_size: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, vocab_size)
        )

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """Q-values (B, V) for state embeddings (B, state_dim)."""
        return self.net(state)


class StateQNetwork(QNetwork):
    """``StateEncoder`` -> optional ``StateAutoencoder`` code -> ``MLPQNetwork``.

    With an autoencoder, ``aux_loss()`` is the reconstruction loss of the states in the last
    forward pass run with gradients enabled (a no-grad pass, e.g. for targets, leaves it be).
    """

    def __init__(
        self,
        encoder: StateEncoder,
        q_mlp: MLPQNetwork,
        autoencoder: StateAutoencoder | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.q_mlp, self.autoencoder = encoder, q_mlp, autoencoder
        self._aux: torch.Tensor | None = None

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q-values (B, V) for token ids (B, L) and mask (B, L)."""
        state = self.encoder(input_ids, attention_mask)
        if self.autoencoder is not None:
            code, reconstruction = self.autoencoder(state)
            if torch.is_grad_enabled():
                self._aux = F.mse_loss(reconstruction, state)
            state = code
        return self.q_mlp(state).float()

    def aux_loss(self) -> torch.Tensor:
        """The autoencoder's reconstruction loss (scalar); zero without an autoencoder."""
        if self.autoencoder is None or self._aux is None:
            return super().aux_loss()
        return self._aux
