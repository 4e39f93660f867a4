"""Training metrics: one JSON line per step, TensorBoard scalars and PNG plots; sample
completions in ``samples.jsonl`` and as TensorBoard text; optional other experiment loggers
(``Sink``) fed the same.

Keys are namespaced (``reward/total``, ``learner/policy_loss``, ``time/rollout_s``); the part
before the first ``/`` picks the plot a key is drawn in.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from distrl.errors import DataError
from distrl.outputs.plots import plot_history
from distrl.runtime.checkpoint import fsync_dir

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
Record = dict[str, Any]


class Sink(Protocol):
    """Another experiment logger fed what ``MetricsLogger`` writes (MLflow, W&B)."""

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log one step's finite scalars."""

    def samples(self, step: int, rows: list[Record]) -> None:
        """Log one step's sample completions (the rows of ``samples.jsonl``)."""

    def close(self) -> None:
        """Flush and finish."""


class MetricsLogger:
    """Writes metrics for one run under ``run_dir``.

    Args:
        run_dir: The run's output folder (created if missing).
        tensorboard: Also write scalars under ``run_dir/tensorboard/``.
        plots: Whether ``plot`` draws anything.
        resume: Keep an existing ``metrics.jsonl`` and ``samples.jsonl`` (minus a truncated last
            line) instead of starting new ones.
        sinks: Other loggers fed every step's scalars and samples.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        plots: bool = True,
        resume: bool = False,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        self.tensorboard = tensorboard
        self.plots = plots
        self.sinks = list(sinks)
        self.history: list[Record] = []
        if resume and self.path.exists():
            self.history, complete = _read(self.path)
            if not complete:
                _rewrite(self.path, self.history)
        else:
            _rewrite(self.path, [])
        if resume and self.samples_path.exists():
            samples, complete = _read(self.samples_path)
            if not complete:
                _rewrite(self.samples_path, samples)
        else:
            _rewrite(self.samples_path, [])
        # TensorBoard hides events at or after purge_step left by an earlier process.
        steps = [r["step"] for r in self.history]
        self._purge_step = max(steps) + 1 if steps else 0
        self._writer = None  # made on first use, so truncate_after can still set purge_step
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._samples = open(self.samples_path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one step's metrics; the line is on disk when this returns.

        Args:
            step: Training iteration the metrics belong to.
            metrics: Namespaced scalars; non-finite floats are stored as ``null``.
        """
        if "step" in metrics:
            raise ValueError("metrics must not contain a 'step' key; pass it as `step`")
        record: Record = {"step": int(step)}
        record.update({key: _clean(key, value) for key, value in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.history.append(record)
        if self.tensorboard:
            writer = self._tensorboard_writer()
            for key, value in record.items():
                if key != "step" and _is_number(value):
                    writer.add_scalar(key, value, global_step=record["step"])
            writer.flush()
        finite = {k: v for k, v in record.items() if k != "step" and _is_number(v)}
        for sink in self.sinks:
            sink.scalars(record["step"], finite)

    def log_samples(self, step: int, rows: list[Record]) -> None:
        """Append one step's sample completions to ``samples.jsonl``, one line each (``step``
        first), and write them as a TensorBoard text table; on disk when this returns.

        Args:
            step: Training iteration the samples were generated for.
            rows: JSON-able dicts, e.g. prompt, response, version and each reward component.
        """
        rows = [{"step": int(step), **{k: _sample_value(v) for k, v in r.items()}} for r in rows]
        self._samples.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
        self._samples.flush()
        os.fsync(self._samples.fileno())
        if self.tensorboard and rows:
            writer = self._tensorboard_writer()
            writer.add_text("samples", markdown_table(rows), global_step=int(step))
            writer.flush()
        for sink in self.sinks:
            sink.samples(int(step), rows)

    def truncate_after(self, step: int) -> None:
        """Drop every logged step after ``step`` (a run resuming from an earlier checkpoint)."""
        self.history = [r for r in self.history if r["step"] <= step]
        self._file.close()
        _rewrite(self.path, self.history)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._samples.close()
        kept = [r for r in _read(self.samples_path)[0] if r["step"] <= step]
        _rewrite(self.samples_path, kept)
        self._samples = open(self.samples_path, "a", encoding="utf-8")  # noqa: SIM115
        if self._writer is None:
            self._purge_step = min(self._purge_step, step + 1)

    def plot(self) -> list[Path]:
        """Draw ``plots/training.png`` (the main curves) and ``plots/<namespace>.png`` (every
        metric), one panel per metric (see ``distrl.outputs.plots``).

        Returns:
            The PNG files written; empty when plotting is off or nothing was logged.
        """
        if not self.plots:
            return []
        return plot_history(self.history, self.run_dir / "plots", title=self.run_dir.name)

    def close(self) -> None:
        """Close the JSONL files, the TensorBoard writer and the sinks."""
        self._file.close()
        self._samples.close()
        for sink in self.sinks:
            sink.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _tensorboard_writer(self):
        if self._writer is None:
            # Imported here: tensorboard is slow to import and optional (tensorboard=False).
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.run_dir / "tensorboard"
            self._writer = SummaryWriter(str(log_dir), purge_step=self._purge_step)
        return self._writer


def read_metrics(path: Path) -> list[Record]:
    """Read a ``metrics.jsonl``, dropping a truncated last line (a killed writer).

    Raises:
        DataError: A line other than the last is not a JSON object with a ``step``.
    """
    return _read(Path(path))[0]


def format_progress(metrics: dict[str, Any], keys: list[str]) -> str:
    """Short ``name=value`` pairs for a tqdm postfix, e.g. ``total=0.512 kl=0.0031``.

    Keys missing from ``metrics`` or not finite numbers are left out; a key is shortened to its
    last ``/`` part unless that would be ambiguous among ``keys``; values under 5e-5 in size
    show as 0.
    """
    short = [key.rsplit("/", 1)[-1] for key in keys]
    parts = []
    for key, name in zip(keys, short):
        value = metrics.get(key)
        if _is_number(value):
            label = name if short.count(name) == 1 else key
            shown = value if abs(value) >= 5e-5 else 0  # round-off such as kl=-2e-08 is 0
            parts.append(f"{label}={shown:.4g}")
    return " ".join(parts)


def _clean(key: str, value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        value = value.item()
    if value is None or isinstance(value, (str, int)):
        return int(value) if isinstance(value, bool) else value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r} is a {type(value).__name__}, not a number")


def _sample_value(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def markdown_table(rows: list[Record]) -> str:
    """Rows as a Markdown table (TensorBoard renders text as Markdown); columns in first-seen
    order, floats to 4 significant digits, an episode's turns one per line (role, content,
    reward), ``|`` and newlines escaped."""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(value: Any) -> str:
        if isinstance(value, list) and all(isinstance(t, dict) and "role" in t for t in value):
            text = "\n".join(_turn(t) for t in value)
        else:
            text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _turn(turn: dict[str, Any]) -> str:
    """One turn of an episode as a line: ``role: content``, then its reward or error."""
    text = f"{turn['role']}: {' '.join(str(turn.get('content', '')).split())}"
    if "reward" in turn:
        text += f" (reward {turn['reward']:.4g})"
    if "error" in turn:
        text += f" (error: {turn['error']})"
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read(path: Path) -> tuple[list[Record], bool]:
    """Records and whether the file was complete (no truncated last line)."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    records: list[Record] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a JSON object with an integer 'step'")
        except ValueError as exc:
            if number == len(lines):
                warnings.warn(f"{path}: dropping truncated last line {number}", stacklevel=3)
                return records, False
            raise DataError(f"{path}:{number}: bad metrics line ({exc})") from None
        records.append(record)
    # A last line without its newline must be rewritten before anything is appended to it.
    return records, not text or text.endswith("\n")


def _rewrite(path: Path, records: list[Record]) -> None:
    """Replace ``path`` atomically so a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
