"""PNG plots of a run's metrics and of a sweep's summary.

One panel per metric (small multiples), so a metric near 1 is not flattened by one near 50,000:
raw points plus an exponential moving average (``SMOOTHING``, TensorBoard's default weight),
the key as the panel's title and a unit derived from the key on its y axis. Counters (faults,
versions, rounds) are drawn as steps with whole-number ticks and no smoothing; fault counters
that stayed at zero get no panel.

Figures use an Agg canvas, not pyplot: no global backend switch, safe off the main thread.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SMOOTHING = 0.6  # EMA weight of the smoothed line (TensorBoard's default)
GROUP_ORDER = ("reward", "learner", "eval", "rollout", "time")
# training.png: what a user looks at first (patterns, in panel order).
OVERVIEW = (
    "reward/total",
    "reward/*",
    "eval/reward",
    "learner/kl",
    "learner/approx_kl",
    "learner/entropy",
    "learner/policy_loss",
    "learner/td_loss",
    "time/iteration_s",
)
# (pattern searched in the key, y label); the first match wins.
UNITS = (
    (r"perplexity", "perplexity"),
    (r"tokens_per_s$", "tokens/s"),
    (r"_s$", "seconds"),
    (r"bytes", "MiB"),
    (r"dropped|^faults/", "count"),
    (r"(^|/)(approx_)?kl$|entropy|logprob_mismatch", "nats"),
    (r"^reward/|^eval/reward", "reward"),
    (r"frac|accuracy", "fraction"),
    (r"loss$", "loss"),
    (r"length$", "tokens"),
    (r"policy_lag|sample_age|version$", "policy versions"),
    (r"^replay/(size|added)$", "transitions"),
    (r"/lr$", "learning rate"),
    (r"grad_norm", "L2 norm"),
)
MIB = 2**20
# Counters: whole numbers that only step (drawn as steps, without an EMA).
COUNTERS = r"^faults/|dropped$|/version$|/rounds$|/updates$|/steps$|/restarts$"

Series = dict[str, tuple[list[int], list[float]]]


def metric_series(history: Sequence[dict[str, Any]]) -> Series:
    """``{key: (steps, values)}`` of every key with at least one finite value, by namespace
    (``GROUP_ORDER`` first) then key. A step that logged the key as None or non-finite is NaN
    (a gap in the plot); a step without the key is left out."""
    series: Series = {}
    for record in history:
        for key, value in record.items():
            if key == "step" or isinstance(value, (str, bool)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(record["step"])
            values.append(float(value) if _finite(value) else math.nan)
    rank = {name: i for i, name in enumerate(GROUP_ORDER)}
    keep = [k for k, (_, v) in series.items() if any(map(math.isfinite, v))]
    return {
        k: series[k]
        for k in sorted(keep, key=lambda k: (rank.get(namespace(k), len(rank)), namespace(k), k))
    }


def namespace(key: str) -> str:
    """The part of ``key`` before its first ``/`` (``other`` without one)."""
    return key.split("/", 1)[0] if "/" in key else "other"


def overview_keys(keys: Sequence[str]) -> list[str]:
    """The keys ``training.png`` shows, in ``OVERVIEW`` order (no ``*dropped`` counts)."""
    chosen: list[str] = []
    for pattern in OVERVIEW:
        for key in sorted(keys):
            if fnmatch.fnmatchcase(key, pattern) and key not in chosen:
                chosen.append(key)
    return [k for k in chosen if not k.endswith("dropped")]


def unit(key: str) -> str:
    """The y label of ``key``'s panel: ``time/learn_s`` -> seconds, ``publish/bytes`` -> MiB
    (values are divided by 2**20), ``learner/kl`` -> nats, ``reward/*`` -> reward."""
    return next((label for pattern, label in UNITS if re.search(pattern, key)), "value")


def is_counter(key: str) -> bool:
    """Whether ``key`` counts something (``faults/*``, ``learner/version``, ...)."""
    return re.search(COUNTERS, key) is not None


def ema(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average; NaN (a gap) stays NaN
    and is skipped by the average."""
    out, last, n = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            out.append(math.nan)
            continue
        n += 1
        last = last * weight + (1 - weight) * value
        out.append(last / (1 - weight**n))
    return out


def figure(series: Series, title: str) -> Any:
    """A matplotlib Figure with one panel per key of ``series``: raw points (a faint line, gaps
    at NaN) and their EMA, the key as the title, ``unit(key)`` as the y label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ncols = min(len(series), 3)
    nrows = math.ceil(len(series) / ncols)
    # At least 7 inches wide: the title (left) and the legend (right) share the top line.
    width, height = max(4.2 * ncols + 0.6, 7), 2.8 * nrows + 0.8
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.suptitle(title, x=0.01, ha="left", y=1 - 0.12 / height, va="top")
    fig.supxlabel("iteration", y=0.08 / height, va="bottom")
    # Fixed margins in inches (a layout engine measures every tick label: seconds per run).
    fig.subplots_adjust(
        left=0.95 / width,
        right=1 - 0.2 / width,
        top=1 - 0.75 / height,
        bottom=0.6 / height,
        wspace=1.0 / (4.2 - 1.0),
        hspace=0.65 / (2.8 - 0.65),
    )
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    handles: dict[str, Any] = {}
    for ax, (key, (steps, values)) in zip(axes, series.items()):
        label = unit(key)
        if label == "MiB":
            values = [v / MIB for v in values]
        if is_counter(key):
            (line,) = ax.plot(steps, values, "o-", color="C1", lw=1.5, ms=3, drawstyle="steps-post")
            handles.setdefault("count (no smoothing)", line)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            finite = [v for v in values if math.isfinite(v)]
            bottom = min(0.0, *finite)
            # A count that never moved gets a whole unit of room, so its ticks stay whole.
            ax.set_ylim(bottom, None if max(finite, default=0.0) > bottom else bottom + 1)
        else:
            (raw,) = ax.plot(steps, values, "o-", color="C0", alpha=0.35, lw=0.8, ms=3)
            (smooth,) = ax.plot(steps, ema(values), color="C0", lw=1.8)
            handles.setdefault("raw", raw)
            handles.setdefault(f"EMA (weight {SMOOTHING})", smooth)
        if label == "perplexity" and all(v > 0 for v in values if math.isfinite(v)):
            ax.set_yscale("log")
            label = "perplexity (log)"
        ax.set_title(key, fontsize="medium")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(set(steps)) == 1:  # one point: whole-number iterations around it
            ax.set_xlim(steps[0] - 1, steps[0] + 1)
        ax.grid(alpha=0.3)
    for ax in axes[len(series) :]:
        ax.set_visible(False)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="upper right",
        bbox_to_anchor=(1 - 0.05 / width, 1 - 0.05 / height),
        ncols=len(handles),
        frameon=False,
    )
    return fig


def no_faults_figure(title: str) -> Any:
    """``faults.png`` of a run whose every fault counter stayed 0: one line that says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 1.2), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(f"{title}: faults", x=0.01, ha="left")
    fig.text(0.5, 0.4, "no faults: every faults/* counter stayed 0", ha="center", va="center")
    return fig


def figures(history: Sequence[dict[str, Any]], title: str) -> dict[str, Any]:
    """``{filename: Figure}``: ``training.png`` (the ``OVERVIEW`` metrics) and
    ``<namespace>.png`` (every metric of the namespace), from metrics records
    (``{"step": int, key: value}``); empty when no metric has a finite value."""
    series = metric_series(history)
    if not series:
        return {}
    main = {k: series[k] for k in overview_keys(list(series))} or series
    out = {"training.png": figure(main, f"{title}: main curves")}
    for name in dict.fromkeys(namespace(k) for k in series):
        group = {k: v for k, v in series.items() if namespace(k) == name}
        if name == "faults":  # a counter that stayed 0 says nothing; all of them: one line
            group = {k: v for k, v in group.items() if any(x != 0 for x in v[1])}
        filename = re.sub(r"[^\w.-]", "_", name) + ".png"
        out[filename] = figure(group, f"{title}: {name}") if group else no_faults_figure(title)
    return out


def plot_history(history: Sequence[dict[str, Any]], out_dir: Path, title: str) -> list[Path]:
    """Write ``figures(history, title)`` into ``out_dir``.

    Returns:
        The PNG files written; empty when no metric has a finite value.
    """
    pngs = figures(history, title)
    if pngs:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return [_save(fig, Path(out_dir) / name) for name, fig in pngs.items()]


STATUS_COLOURS = {
    "finished": ("tab:blue", "finished"),
    "stopped": ("tab:orange", "stopped early (ASHA or interrupted)"),
    "error": ("tab:red", "error"),
}


def plot_sweep(rows: Sequence[dict[str, Any]], *, path: Path, **kwargs: Any) -> Path:
    """Write ``sweep_figure(rows, **kwargs)`` to ``path`` (a sweep's ``summary.png``)."""
    return _save(sweep_figure(rows, **kwargs), Path(path))


def sweep_figure(
    rows: Sequence[dict[str, Any]],
    *,
    metric: str,
    mode: str,
    params: Sequence[tuple[str, bool]],
    best: str | None,
) -> Any:
    """The best ``metric`` per trial (coloured by status, with a legend; the ``best`` trial
    outlined) and the best metric against each parameter.

    Args:
        rows: One dict per trial with ``trial``, ``status``, ``best_<metric>`` and each
            parameter's value.
        params: ``(field, log)`` per searched field; ``log`` draws its axis on a log scale.
        best: The trial named as the sweep's best (``best_config.yaml``), or None.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    key = f"best_{metric}"
    ok = [r for r in rows if r[key] is not None]
    n = 1 + len(params)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    axes[0].bar(
        range(len(ok)),
        [r[key] for r in ok],
        color=[STATUS_COLOURS[r["status"]][0] for r in ok],
        edgecolor=["black" if r["trial"] == best else "none" for r in ok],
        linewidth=2,
    )
    axes[0].set_xticks(range(len(ok)), [r["trial"].split("_")[-1] for r in ok], rotation=90)
    axes[0].set_title(f"best {metric} per trial ({mode})")
    statuses = dict.fromkeys(r["status"] for r in ok)
    handles = [Patch(color=STATUS_COLOURS[s][0], label=STATUS_COLOURS[s][1]) for s in statuses]
    if best in {r["trial"] for r in ok}:
        handles.append(Patch(facecolor="none", edgecolor="black", lw=2, label="best trial"))
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncols=len(handles))
    for ax, (field, log) in zip(axes[1:], params):
        ax.scatter([r[field] for r in ok], [r[key] for r in ok])
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(field)
        ax.set_ylabel(metric)
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path
