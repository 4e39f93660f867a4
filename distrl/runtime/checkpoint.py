"""Atomic checkpoint folders, verified by a manifest of file sizes and SHA-256 sums.

A checkpoint is complete only once ``distrl_checkpoint.json`` (written last) is present and every
file it lists matches; a folder is filled under a ``.tmp-*`` name and renamed into place, so a
crash never leaves a half-written ``step_<N>``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from distrl.errors import DistrlError

MARKER = "distrl_checkpoint.json"
OPTIMIZER_FILE = "optimizer.pt"  # what only a resume needs, and the largest file
MASTERS_FILE = "masters.pt"  # float32 values of a low-precision run's weights: a resume needs them
# A sharded learner's optimizer state and masters: a file per rank (torch.distributed.checkpoint).
SHARDS_DIR = "sharded"
# Kept by the newest step checkpoint only (a folder: all its files).
RESUME_ONLY = frozenset({OPTIMIZER_FILE, MASTERS_FILE, SHARDS_DIR})
FORMAT_VERSION = 1


class CheckpointWriteError(DistrlError):
    """A checkpoint could not be written (a full disk, no permission); the folder it would
    have replaced, and every other checkpoint, are as they were."""


def write_checkpoint(
    root: Path, name: str, write: Callable[[Path], None], *, meta: dict[str, Any]
) -> Path:
    """Write a checkpoint folder ``root/name`` atomically.

    Args:
        root: Folder holding checkpoints (created if missing).
        name: Folder name, e.g. ``step_40`` or ``best``; an existing one is replaced.
        write: Fills the (empty, temporary) folder it is given.
        meta: JSON-serialisable facts stored in the marker (step, metrics, ...).

    Returns:
        The path of the finished checkpoint.

    Raises:
        CheckpointWriteError: a write failed (``OSError``: a full disk, no permission), here or
            in ``write`` (an actor's ``OSError`` arrives through ``actors.get`` as itself).
    """
    root = Path(root)
    marker_meta = json.dumps(meta, allow_nan=False)  # fail before the slow write, not after
    tmp = root / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointWriteError(f"cannot write checkpoint {root / name}: {_why(exc)}") from None
    try:
        write(tmp)
        readable = 0o666 & ~_umask()  # some writers (safetensors) leave their files 0600
        for rel in _files(tmp):
            os.chmod(tmp / rel, readable)
        files = {rel: _describe(tmp / rel, sync=True) for rel in _files(tmp)}
        marker = {"format": FORMAT_VERSION, "meta": json.loads(marker_meta), "files": files}
        with open(tmp / MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        for folder in {tmp, *((tmp / rel).parent for rel in files)}:
            fsync_dir(folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot write checkpoint {root / name}: {_why(exc)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dest = root / name
    old = None
    if dest.exists():
        # Directories cannot be renamed over non-empty ones; until the new copy is in place
        # the old one stays complete under a .tmp- name.
        old = root / f".tmp-{name}-old-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(dest, old)
    os.rename(tmp, dest)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def _why(exc: OSError) -> str:
    """``No space left on device (ENOSPC)`` for an ``OSError``, without its traceback."""
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror or exc} ({name})" if name else str(exc)


def _read_marker(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's files and meta of checkpoint ``path``."""
    marker_path = path / MARKER
    if not marker_path.is_file():
        raise DistrlError(f"checkpoint {path} is incomplete: {MARKER} is missing")
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        return marker["files"], marker["meta"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DistrlError(f"checkpoint {path}: {MARKER} is unreadable ({exc})") from None


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest.

    Returns:
        The ``meta`` dict given to ``write_checkpoint``.

    Raises:
        DistrlError: The marker is missing or unreadable, or a listed file is missing or has
            the wrong size or checksum (the message names the folder and the first bad file).
    """
    path = Path(path)
    files, meta = _read_marker(path)
    for rel, expected in sorted(files.items()):
        file = path / rel
        if not file.is_file() and rel not in _read_marker(path)[0]:
            continue  # dropped by ``drop_files`` (a live run pruning) since the marker was read
        if not file.is_file():
            raise DistrlError(f"checkpoint {path}: file {rel} is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise DistrlError(
                f"checkpoint {path}: file {rel} has {size} bytes, expected {expected['size']}"
            )
        if _describe(file)["sha256"] != expected["sha256"]:
            raise DistrlError(f"checkpoint {path}: file {rel} fails its sha256 checksum")
    return meta


def latest_checkpoint(root: Path, prefix: str = "step_") -> Path | None:
    """The ``<prefix><N>`` folder with the highest N that verifies, or None.

    Newer folders that fail verification are skipped with a warning naming them and why.
    """
    for _, path in sorted(_step_folders(Path(root), prefix), reverse=True):
        try:
            verify_checkpoint(path)
        except DistrlError as exc:
            warnings.warn(f"skipping corrupt checkpoint: {exc}", stacklevel=2)
            continue
        return path
    return None


def drop_files(path: Path, names: set[str]) -> None:
    """Delete ``names`` (files, or folders with all their files) from checkpoint ``path`` and
    from its manifest (rewritten atomically first, so the folder verifies at every moment);
    names it does not hold are ignored."""
    path = Path(path)
    marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    gone = sorted(rel for rel in marker["files"] if rel.split("/")[0] in names)
    if not gone:
        return
    marker["files"] = {rel: d for rel, d in marker["files"].items() if rel not in gone}
    marker["dropped"] = sorted({*marker.get("dropped", []), *gone})
    tmp = path / f".{MARKER}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MARKER)
    for rel in gone:
        (path / rel).unlink(missing_ok=True)
    for name in names:
        if (path / name).is_dir():
            shutil.rmtree(path / name, ignore_errors=True)
    fsync_dir(path)


def prune_checkpoints(
    root: Path, keep: int, prefix: str = "step_", newest_only: frozenset[str] = frozenset()
) -> None:
    """Delete all but the newest ``keep`` step folders and any stale ``.tmp-*`` folders, and
    the files ``newest_only`` from every kept folder but the newest (``OPTIMIZER_FILE``: only
    a resume needs it, and a resume starts from the newest).

    Call only while no ``write_checkpoint`` into ``root`` is running.
    """
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    root = Path(root)
    if not root.is_dir():
        return
    folders = sorted(_step_folders(root, prefix))
    for _, path in folders[: max(0, len(folders) - keep)]:
        shutil.rmtree(path, ignore_errors=True)
    for _, path in folders[max(0, len(folders) - keep) : -1]:
        if newest_only and (path / MARKER).is_file():
            drop_files(path, set(newest_only))
    for path in root.glob(".tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def save_torch_state(path: Path, state: dict[str, Any]) -> None:
    """Save tensors, numbers, strings, lists and dicts loadable with ``weights_only=True``."""
    torch.save(state, path)


def load_torch_state(path: Path) -> dict[str, Any]:
    """Load a ``save_torch_state`` file onto the CPU without unpickling arbitrary objects.

    Raises:
        DistrlError: The file is missing or holds something ``weights_only`` refuses.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = found.group(1) if found else "an object"
        raise DistrlError(
            f"cannot load training state {path}: it holds {what}, which weights_only loading "
            f"refuses (only tensors, numbers, strings, lists and dicts are allowed)"
        ) from None
    except (OSError, RuntimeError) as exc:
        raise DistrlError(f"cannot load training state {path}: {exc}") from None


def load_weights(path: Path, names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder's ``*.safetensors`` files (or of the files ``names``),
    on the CPU.

    Raises:
        DistrlError: Naming the folder: it holds no such file, or one cannot be read.
    """
    files = [path / n for n in names] if names else sorted(path.glob("*.safetensors"))
    if not files or not all(f.is_file() for f in files):
        found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        wanted = ", ".join(names) if names else "*.safetensors"
        raise DistrlError(
            f"cannot load weights from {path}: no {wanted} there (it holds {found or 'nothing'})"
        )
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            weights.update(load_file(file))
        except (OSError, SafetensorError) as exc:
            raise DistrlError(f"cannot load weights from {file}: {exc}") from None
    return weights


def rng_state() -> dict[str, Any]:
    """The python ``random``, numpy global and torch (CPU and CUDA) RNG states.

    Everything is a tensor, int, float or None so it survives ``weights_only`` loading.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by ``rng_state`` (CUDA only if the device count matches)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _step_folders(root: Path, prefix: str) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    return [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if path.is_dir() and (match := pattern.fullmatch(path.name))
    ]


def _files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` as a POSIX relative path, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _describe(file: Path, *, sync: bool = False) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
        if sync:  # the data must be on disk before the marker claims it is
            os.fsync(f.fileno())
    return {"size": size, "sha256": digest.hexdigest()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
