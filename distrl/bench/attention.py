"""Attention cost by sequence length: the Performer's FAVOR+ (linear) against softmax attention
(quadratic), the reason the ``performer`` Q-network can read long states."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from distrl.bench.common import BenchOptions
from distrl.dqn.qnets.favor import FavorAttention, TensorMemory, softmax_attention


def bench_attention(options: BenchOptions) -> dict[str, Any]:
    """Milliseconds and peak extra MiB of causal FAVOR+ and softmax attention per length, on
    the CPU (both sides; the memory count follows CPU tensors)."""
    quick = options.quick
    lengths = [256, 512, 1024, 2048] if quick else [256, 512, 1024, 2048, 4096, 8192]
    rows = benchmark_attention(lengths, repeats=2 if quick else 3, softmax_max_len=4096)
    print("\nattention (causal, 2 heads x 16 dims, 64 random features), batch 1")
    print(f"{'length':>8}{'FAVOR+ ms':>12}{'FAVOR+ MiB':>12}{'softmax ms':>12}{'softmax MiB':>13}")

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        print(
            f"{r['length']:>8}{num(r['favor_ms'], '.2f'):>12}{num(r['favor_peak_mb'], '.2f'):>12}"
            f"{num(r['softmax_ms'], '.2f'):>12}{num(r['softmax_peak_mb'], '.2f'):>13}"
        )
    first, last = rows[0], rows[-1]
    growth = last["length"] / first["length"]
    out: dict[str, Any] = {"device": "cpu", "rows": rows, "length_growth": growth}
    for kind in ("favor", "softmax"):
        a, b = first[f"{kind}_peak_mb"], last[f"{kind}_peak_mb"]
        if a and b:
            out[f"{kind}_memory_growth"] = b / a
    growths = ", ".join(
        f"{k} memory x{out[f'{k}_memory_growth']:.1f}"
        for k in ("favor", "softmax")
        if f"{k}_memory_growth" in out
    )
    print(f"length x{growth:.0f}: {growths}")
    return out


def _measure(fn: Any, repeats: int) -> tuple[float, int, int]:
    """Best wall time (ms) over ``repeats`` calls, then peak bytes and largest tensor of one."""
    fn()  # warm-up: first calls pay for lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    with TensorMemory() as memory:
        fn()
    return min(times), memory.peak_bytes, memory.largest_numel


@torch.no_grad()
def benchmark_attention(
    lengths: list[int] | tuple[int, ...],
    *,
    dim_head: int = 16,
    heads: int = 2,
    num_features: int = 64,
    batch: int = 1,
    causal: bool = True,
    repeats: int = 3,
    softmax_max_len: int = 4096,
    seed: int = 0,
    threads: int | None = 1,
) -> list[dict[str, float | int | None]]:
    """Time and peak extra memory of FAVOR+ vs softmax attention at each sequence length.

    Returns one dict per length: ``length``, ``favor_ms``, ``favor_peak_mb``,
    ``favor_largest_numel``, and the same for ``softmax_*`` (None beyond ``softmax_max_len``,
    where the L x L matrix gets too big). Memory is that of tensors made inside the call.
    ``threads`` sets torch's thread count for the run (restored after; None = leave it): on a
    loaded machine several threads make each small op wait ~100 ms for a busy core.
    """
    attention = FavorAttention(dim_head, num_features, causal=causal, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    rows: list[dict[str, float | int | None]] = []
    try:
        for length in lengths:
            q, k, v = torch.randn(3, batch, heads, length, dim_head, generator=gen).unbind(0)
            ms, peak, largest = _measure(functools.partial(attention, q, k, v), repeats)
            row: dict[str, float | int | None] = {
                "length": length,
                "favor_ms": ms,
                "favor_peak_mb": peak / 2**20,
                "favor_largest_numel": largest,
            }
            soft: tuple[float | None, ...] = (None, None, None)
            if length <= softmax_max_len:
                fn = functools.partial(softmax_attention, q, k, v, causal=causal)
                ms, peak, largest = _measure(fn, repeats)
                soft = (ms, peak / 2**20, largest)
            row.update(zip(("softmax_ms", "softmax_peak_mb", "softmax_largest_numel"), soft))
            rows.append(row)
    finally:
        torch.set_num_threads(previous)
    return rows
