"""The run directory: checked before Ray starts, held by one run at a time, resumed only as it was.

A run directory belongs to one process: ``RunLock`` holds an exclusive ``flock`` on
``.distrl.lock`` (the OS drops it when the process dies, however it dies), so a second run on
the same directory is refused with the holder's PID instead of interleaving checkpoints. A
``--resume`` is refused, with nothing touched, when no checkpoint loads or when the config
differs from the saved one in a field that changes what is learned. A directory whose run
stopped before finishing its first step holds nothing worth keeping: the same command starts
afresh in it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

from distrl.config import RunConfig, load_config
from distrl.config.schema import to_dict
from distrl.errors import ConfigError, DistrlError
from distrl.runtime.checkpoint import latest_checkpoint

LOCK_FILE = ".distrl.lock"
CONFIG_FILE = "config.yaml"
# What a run writes before its first step completes: its config, logs and their folders.
BEFORE_FIRST_STEP = {CONFIG_FILE, LOCK_FILE, "metrics.jsonl", "samples.jsonl", "tensorboard"}
BEFORE_FIRST_STEP |= {"plots", "checkpoints", "mlruns", "mlflow_run_id", "wandb", "wandb_run_id"}
# What may change when a run is resumed: how long it runs, where and how it writes, where it
# runs and how faults are handled. Everything else would make the resumed run a different one.
RESUMABLE_CHANGES = ("iterations", "output.", "resources.", "faults.")


class RunLock:
    """An exclusive lock on ``run_dir`` for the life of this process (or until ``release``).

    Raises:
        DistrlError: another process holds it (the message names its PID).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise DistrlError(
                f"output directory {run_dir} is in use by another distrl run (PID {holder}); "
                f"wait for it to finish or stop it, or choose another --output-dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (the file stays; an unlocked file means nothing)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_output_dir(run_dir: Path) -> None:
    """Refuse an output directory that is, or lies under, a regular file."""
    for path in [run_dir, *run_dir.parents]:
        if path.is_dir():
            return
        if path == run_dir and path.exists():
            raise DistrlError(f"output directory {run_dir} is a file, not a folder")
        if path.exists():
            raise DistrlError(f"output directory {run_dir} cannot be created: {path} is a file")


def is_empty(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but (perhaps) a lock file."""
    return not run_dir.exists() or all(p.name == LOCK_FILE for p in run_dir.iterdir())


def stopped_before_first_step(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that stopped before it finished a step (a reward that
    failed at the first scoring, a crash at start-up): its config.yaml and nothing else of
    value, no metrics record, no checkpoint, no file distrl did not write."""
    if not (run_dir / CONFIG_FILE).is_file():
        return False
    if not {p.name for p in run_dir.iterdir()} <= BEFORE_FIRST_STEP:
        return False
    metrics, checkpoints = run_dir / "metrics.jsonl", run_dir / "checkpoints"
    if metrics.is_file() and metrics.read_text(encoding="utf-8", errors="replace").strip():
        return False
    return not (checkpoints.is_dir() and any(checkpoints.iterdir()))


def clear_unstarted_run(run_dir: Path) -> None:
    """Remove what a run that stopped before its first step left (``stopped_before_first_step``);
    call it holding the directory's lock."""
    for path in run_dir.iterdir():
        if path.name == LOCK_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def checkpoint_to_resume(run_dir: Path) -> Path:
    """The newest complete checkpoint of ``run_dir``.

    Raises:
        DistrlError: there is none (the message says so and that nothing was changed).
    """
    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        raise DistrlError(f"--resume: {saved} does not exist; there is no run to resume")
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        raise DistrlError(
            f"--resume: {run_dir / 'checkpoints'} holds no complete checkpoint, so there is "
            f"nothing to resume from (nothing was changed); start a new run with another "
            f"--output-dir"
        )
    return path


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def check_resumed_config(run_dir: Path, config: RunConfig) -> None:
    """Refuse a resume whose config differs from the saved one outside ``RESUMABLE_CHANGES``.

    Raises:
        ConfigError: naming the first field that differs, with both values.
    """
    saved = _flat(to_dict(load_config(str(run_dir / CONFIG_FILE))))
    new = _flat(to_dict(config))
    for key in sorted(saved.keys() | new.keys()):
        if key.startswith(RESUMABLE_CHANGES) or key == "iterations":
            continue
        if saved.get(key) != new.get(key):
            raise ConfigError(
                f"--resume: {key} is {new.get(key)!r} but the run in {run_dir} was started "
                f"with {saved.get(key)!r}; a resume may change only iterations, output.*, "
                f"resources.* and faults.* (nothing was changed)"
            )


def resume_hint(run_dir: Path) -> str:
    """What a stopped run can be continued from, as the end of an error message."""
    path = latest_checkpoint(run_dir / "checkpoints")
    if path is None:
        return "no checkpoint was written yet"
    return (
        f"the newest checkpoint is {path.name}; continue with: python -m distrl.run --resume "
        f"--output-dir {run_dir}"
    )
