"""FAVOR+ attention (Choromanski et al., 2021, "Rethinking Attention with Performers").

Softmax attention ``softmax(Q K^T / sqrt(d)) V`` builds an L x L matrix. FAVOR+ writes the
softmax kernel ``exp(q . k)`` as an expectation over positive random features
``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` (``W``: m orthogonal Gaussian rows), so attention
becomes ``phi(Q) (phi(K)^T V)`` normalised by ``phi(Q) (phi(K)^T 1)``: O(L m d) time and memory.
The causal variant uses prefix sums of ``phi(k) v^T``, computed chunk by chunk.

Shapes: ``B`` batch, ``H`` heads, ``L`` positions, ``d`` head dim, ``m`` random features.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TINY = torch.finfo(torch.float32).tiny


def orthogonal_gaussian(
    num_features: int, dim: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random projection (m, d): blocks of ``d`` exactly orthogonal rows (the "OR" in FAVOR+),
    each row scaled to the norm of an independent Gaussian vector so that every row is
    marginally N(0, I) and the kernel estimate stays unbiased."""
    gaussian = torch.randn(math.ceil(num_features / dim), dim, dim, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    # QR's sign convention skews the directions; fixing it gives Haar-uniform rotations.
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = q.transpose(-2, -1).reshape(-1, dim)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=-1, keepdim=True)
    return rows * norms


def favor_features(x: torch.Tensor, *, projection: torch.Tensor, is_query: bool) -> torch.Tensor:
    """Positive random features phi(x): (..., L, d) -> (..., L, m), with phi(q) . phi(k)
    estimating exp(q . k / sqrt(d)).

    A constant per query row cancels in the normalised attention, so queries subtract their row
    max (keeping exp() <= 1). Keys get no data-dependent shift: one shared over positions would
    let later keys touch earlier outputs; their exponent w.k - |k|^2/2 is at most |w|^2/2 anyway.
    """
    x = x * x.shape[-1] ** -0.25
    logits = x @ projection.T - (x * x).sum(-1, keepdim=True) / 2
    if is_query:
        logits = logits - logits.amax(-1, keepdim=True).detach()
    return torch.exp(logits) / math.sqrt(projection.shape[0])


def _linear_attention(qf: torch.Tensor, kf: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Non-causal phi(Q) (phi(K)^T [V 1]): (..., L, m) x2, (..., L, e) -> (..., L, e)."""
    return qf @ (kf.transpose(-2, -1) @ v1)


def _causal_linear_attention(
    qf: torch.Tensor, kf: torch.Tensor, v1: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Causal sum_{j<=i} (phi(q_i) . phi(k_j)) [v_j 1], chunk by chunk: (..., L, e) out.

    Earlier chunks enter through an exclusive prefix sum of phi(k)^T v (..., n, m, e); inside a
    chunk a lower-triangular C x C block does it. Memory O(L (m + C + m e / C)), no L x L term;
    exactly causal: a later token never enters an earlier output, not even through rounding.
    """
    *batch, length, _ = qf.shape
    pad = (-length) % chunk
    if pad:
        qf, kf, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v1))
    n = (length + pad) // chunk
    qc, kc, vc = (t.reshape(*batch, n, chunk, t.shape[-1]) for t in (qf, kf, v1))
    kv = kc.transpose(-2, -1) @ vc  # (..., n, m, e)
    before = torch.cat([torch.zeros_like(kv[..., :1, :, :]), kv[..., :-1, :, :].cumsum(-3)], -3)
    within = (qc @ kc.transpose(-2, -1)).tril() @ vc
    out = qc @ before + within
    return out.reshape(*batch, n * chunk, -1)[..., :length, :]


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    projection: torch.Tensor,
    causal: bool,
    key_mask: torch.Tensor | None = None,
    chunk: int = 64,
) -> torch.Tensor:
    """FAVOR+ approximation of softmax attention.

    Args:
        q, k: (..., L, d) queries and keys, e.g. (B, H, L, d).
        v: (..., L, dv) values.
        projection: (m, d) random features, from ``orthogonal_gaussian``.
        causal: position i attends to positions j <= i only.
        key_mask: broadcastable to (..., L), 1 on real tokens; 0 keys (padding) are ignored.
        chunk: block size of the causal prefix sums (speed/memory only, not the result).

    Returns:
        (..., L, dv) in the dtype of ``v``; computed in float32. Rows with no key give 0.
    """
    qf = favor_features(q.float(), projection=projection.float(), is_query=True)
    kf = favor_features(k.float(), projection=projection.float(), is_query=False)
    if key_mask is not None:
        kf = kf * key_mask.unsqueeze(-1).to(kf.dtype)
    # A ones column carries the normaliser phi(q) . sum phi(k) through the same products.
    v1 = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], -1)
    out = _causal_linear_attention(qf, kf, v1, chunk) if causal else _linear_attention(qf, kf, v1)
    return (out[..., :-1] / out[..., -1:].clamp_min(TINY)).to(v.dtype)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact ``softmax(Q K^T / sqrt(d)) V`` (the O(L^2) reference), same arguments and shapes
    as ``favor_attention``; rows with no key give 0."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if key_mask is not None:
        allowed = allowed & key_mask.unsqueeze(-2).bool()
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return (torch.nan_to_num(weights, nan=0.0) @ v.float()).to(v.dtype)


class FavorAttention(nn.Module):
    """FAVOR+ attention over per-head q, k, v (B, H, L, d) -> (B, H, L, d).

    The projection is a persistent buffer, so ``state_dict`` copies (target networks, weights
    sent to workers) use the same features. ``redraw_features`` draws new ones; a network whose
    features change must be re-synced with its target.

    Args:
        dim_head: d, the per-head query/key size.
        num_features: m, random features (more = closer to softmax, cost linear in m).
        causal: causal (prefix-sum) or bidirectional attention.
        seed: seeds the features; redraw ``n`` uses (seed, n), so it is reproducible.
        chunk: block size of the causal prefix sums.
    """

    def __init__(
        self,
        dim_head: int,
        num_features: int = 64,
        *,
        causal: bool = True,
        seed: int = 0,
        chunk: int = 64,
    ) -> None:
        super().__init__()
        self.dim_head, self.num_features = dim_head, num_features
        self.causal, self.seed, self.chunk = causal, seed, chunk
        self.draws = 0
        self.register_buffer("projection", self._draw(None))

    def _draw(self, generator: torch.Generator | None) -> torch.Tensor:
        if generator is None:
            (state,) = np.random.SeedSequence([self.seed, self.draws]).generate_state(1)
            generator = torch.Generator().manual_seed(int(state))
        return orthogonal_gaussian(self.num_features, self.dim_head, generator=generator)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection from ``generator``, or from the next seeded draw."""
        self.draws += 1
        self.projection.copy_(self._draw(generator))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output (B, H, L, d) for q, k, v (B, H, L, d) and key_mask (B, L)."""
        mask = None if key_mask is None else key_mask[:, None, :]
        return favor_attention(
            q,
            k,
            v,
            projection=self.projection,
            causal=self.causal,
            key_mask=mask,
            chunk=self.chunk,
        )


class TensorMemory(TorchDispatchMode):
    """Within the block, track bytes of tensors that torch ops newly allocate.

    CPU tensors live outside Python's allocator (``tracemalloc`` sees none of them), so this
    watches op outputs instead: ``peak_bytes`` of allocations alive at once, and the
    ``largest_numel`` of any one. Views and in-place results are not counted twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_numel = 0

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        fresh = all(r.alias_info is None for r in returns)
        for tensor in tree_leaves(out):
            if fresh and isinstance(tensor, torch.Tensor):
                nbytes = tensor.untyped_storage().nbytes()
                self.live_bytes += nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
                self.largest_numel = max(self.largest_numel, tensor.numel())
                weakref.finalize(tensor, self._release, nbytes)
        return out
