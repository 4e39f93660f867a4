"""Attention cost by sequence length: the Performer's FAVOR+ (linear) against softmax attention
(quadratic), the reason the ``performer`` Q-network can read long states."""

from __future__ import annotations

from typing import Any

from distrl.bench.common import BenchOptions
from distrl.qnets import benchmark_attention


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
