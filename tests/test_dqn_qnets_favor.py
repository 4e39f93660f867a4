import copy
import functools

import pytest
import torch

from distrl.bench.attention import benchmark_attention
from distrl.dqn.qnets.favor import (
    FavorAttention,
    TensorMemory,
    favor_attention,
    favor_features,
    orthogonal_gaussian,
    softmax_attention,
)

SEEDS = range(8)


def qkv(seed: int, *, length: int = 32, dim: int = 16, scale: float = 0.5):
    """(B=2, H=2, L, d) queries, keys, values; FAVOR+'s error grows like exp(|q|^2 + |k|^2)
    in the scaled norms, so q and k are kept moderate (logits std ~0.25, as in a trained net)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, 2, 2, length, dim, generator=gen).unbind(0)
    return q * scale, k * scale, v


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


@functools.cache
def mean_favor_error(num_features: int, causal: bool) -> float:
    errors = []
    for seed in SEEDS:
        q, k, v = qkv(seed)
        proj = orthogonal_gaussian(num_features, 16, generator=torch.Generator().manual_seed(seed))
        approx = favor_attention(q, k, v, projection=proj, causal=causal)
        errors.append(rel_error(approx, softmax_attention(q, k, v, causal=causal)))
    return sum(errors) / len(errors)


def test_orthogonal_gaussian_blocks_are_orthogonal_and_seeded():
    proj = orthogonal_gaussian(40, 16, generator=torch.Generator().manual_seed(0))
    assert proj.shape == (40, 16)
    for block in (proj[:16], proj[16:32], proj[32:]):
        gram = block @ block.T
        assert torch.allclose(
            gram - torch.diag(torch.diagonal(gram)), torch.zeros_like(gram), atol=1e-4
        )
    again = orthogonal_gaussian(40, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(proj, again)


def test_favor_kernel_estimate_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 16, generator=gen).mul(0.5).unbind(0)
    proj = orthogonal_gaussian(65536, 16, generator=gen)
    # Key features carry no data-dependent shift, so their product is the raw estimate.
    estimate = (
        favor_features(q, projection=proj, is_query=False)
        * favor_features(k, projection=proj, is_query=False)
    ).sum(-1)
    exact = torch.exp((q * k).sum(-1) / 4.0)
    assert torch.allclose(estimate, exact, rtol=0.05)


@pytest.mark.parametrize("causal", [False, True])
def test_favor_is_close_to_softmax_with_enough_features(causal):
    error = mean_favor_error(256, causal)
    # The error of plain averaging (uniform attention): FAVOR+ must beat it clearly.
    uniform = sum(
        rel_error(
            softmax_attention(0 * q, k, v, causal=causal), softmax_attention(q, k, v, causal=causal)
        )
        for q, k, v in map(qkv, SEEDS)
    ) / len(SEEDS)
    print(f"causal={causal}: m=256 relative error {error:.3f}, uniform attention {uniform:.3f}")
    assert error < 0.2
    assert error < 0.7 * uniform


@pytest.mark.parametrize("causal", [False, True])
def test_favor_error_falls_as_features_grow(causal):
    few, many = mean_favor_error(16, causal), mean_favor_error(256, causal)
    print(f"causal={causal}: relative error m=16 {few:.3f}, m=256 {many:.3f}")
    assert many < 0.5 * few  # ~1/sqrt(m) would give 0.25


@pytest.mark.parametrize("chunk", [1, 7, 64, 200])
def test_chunked_causal_prefix_sums_equal_the_quadratic_form(chunk):
    q, k, v = qkv(0, length=50)
    proj = orthogonal_gaussian(32, 16, generator=torch.Generator().manual_seed(1))
    qf = favor_features(q, projection=proj, is_query=True)
    kf = favor_features(k, projection=proj, is_query=False)
    weights = (qf @ kf.transpose(-2, -1)).tril()
    expected = weights @ v / weights.sum(-1, keepdim=True)
    got = favor_attention(q, k, v, projection=proj, causal=True, chunk=chunk)
    assert torch.allclose(got, expected, atol=1e-5)


def test_causal_favor_is_exactly_causal():
    attention = FavorAttention(16, 32, causal=True, seed=0, chunk=8)
    q, k, v = qkv(0, length=40)
    out = attention(q, k, v)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[..., 21:, :] = torch.randn(t[..., 21:, :].shape) * 3.0  # same chunk as 16..20, and later
    out2 = attention(q2, k2, v2)
    assert torch.equal(out[..., :21, :], out2[..., :21, :])
    assert not torch.allclose(out[..., 21:, :], out2[..., 21:, :])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_are_ignored(causal):
    attention = FavorAttention(16, 64, causal=causal, seed=0)
    q, k, v = qkv(0, length=12)
    pad = 5
    q_pad, k_pad, v_pad = (torch.cat([torch.randn(2, 2, pad, 16), t], dim=2) for t in (q, k, v))
    mask = torch.cat([torch.zeros(2, pad), torch.ones(2, 12)], dim=1)
    for fn in (
        attention,
        lambda *a, key_mask: softmax_attention(*a, causal=causal, key_mask=key_mask[:, None]),
    ):
        padded = fn(q_pad, k_pad, v_pad, key_mask=mask)[..., pad:, :]
        assert torch.allclose(padded, fn(q, k, v, key_mask=mask[:, pad:]), atol=1e-5)


def test_redraw_features_is_seeded_and_kept_in_state_dict():
    attention, twin = FavorAttention(16, 32, seed=3), FavorAttention(16, 32, seed=3)
    assert torch.equal(attention.projection, twin.projection)
    first = attention.projection.clone()
    attention.redraw_features()
    assert not torch.equal(attention.projection, first)
    twin.redraw_features()
    assert torch.equal(attention.projection, twin.projection)
    attention.redraw_features(torch.Generator().manual_seed(9))
    assert "projection" in attention.state_dict()
    target = copy.deepcopy(twin)
    target.load_state_dict(attention.state_dict())
    assert torch.equal(target.projection, attention.projection)
    assert FavorAttention(16, 32, seed=4).projection.ne(first).any()


def test_causal_favor_at_2048_tokens_makes_no_length_squared_tensor():
    length = 2048
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, length, 16, generator=gen).unbind(0)
    attention = FavorAttention(16, 32, causal=True)
    with torch.no_grad(), TensorMemory() as memory:
        out = attention(q, k, v)
    assert out.shape == (1, 1, length, 16) and torch.isfinite(out).all()
    assert memory.largest_numel < length * length // 16
    # The tracker does see the quadratic reference's L x L scores.
    short = 256
    with torch.no_grad(), TensorMemory() as memory:
        softmax_attention(q[..., :short, :], k[..., :short, :], v[..., :short, :], causal=True)
    assert memory.largest_numel >= short * short


def test_benchmark_attention_reports_each_length():
    threads = torch.get_num_threads()
    rows = benchmark_attention([64, 128], repeats=1, softmax_max_len=64)
    assert torch.get_num_threads() == threads
    assert [row["length"] for row in rows] == [64, 128]
    assert rows[0]["favor_ms"] > 0 and rows[0]["softmax_peak_mb"] > 0
    assert rows[1]["softmax_ms"] is None and rows[1]["favor_peak_mb"] > rows[0]["favor_peak_mb"]


@pytest.mark.slow
def test_benchmark_attention_memory_grows_linearly():
    rows = benchmark_attention([512, 1024, 2048, 4096])
    for row in rows:
        print(row)
    favor = rows[-1]["favor_peak_mb"] / rows[1]["favor_peak_mb"]
    soft = rows[-1]["softmax_peak_mb"] / rows[1]["softmax_peak_mb"]
    assert favor < 6 < 12 < soft  # 4x the length: ~4x memory vs ~16x
