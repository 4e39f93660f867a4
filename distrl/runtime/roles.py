"""What every role shares, written once. A learner: its optimizer step
(``distrl.runtime.optimizer``), version, checkpoint state and place in a learner group. Every
role: how weights go from the learner to the workers, through Ray's object store (``weights`` /
``set_weights``) or a torch.distributed broadcast (``broadcast_weights`` / ``receive_weights``,
``distrl.weights.sync``). Both end in ``WorkerRole.apply_weights``.

``Learner`` and ``QLearner`` build on ``LearnerRole``; ``RolloutWorker`` and ``QRolloutWorker`` on
``WorkerRole``. Plain classes: ``distrl.runtime.actors`` makes them actors.
"""

from __future__ import annotations

import datetime
import functools
import json
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from distrl.models.tokenizers import Tokenizer
from distrl.runtime.checkpoint import (
    MASTERS_FILE,
    OPTIMIZER_FILE,
    SHARDS_DIR,
    load_torch_state,
    rng_state,
    save_torch_state,
    set_rng_state,
)
from distrl.runtime.optimizer import OptimizerStep
from distrl.runtime.shards import LearnerGroupError, Shards
from distrl.weights.sync import (
    WeightGroup,
    WeightSyncError,
    default_host,
    host_store,
    pack,
    plan_buckets,
)
from distrl.weights.tensors import (
    VersionedWeights,
    check_loaded,
    check_received,
    published_names,
    set_weights,
)


class LearnerRole:
    """What every learner shares: the optimizer step, the version it publishes, the size of
    its last publication, and the common part of its checkpoint state."""

    opt: OptimizerStep
    tokenizer: Tokenizer
    version: int
    published_bytes: int = 0
    weight_store: tuple[Any, str, int] | None = None  # the store this learner serves
    weight_group: WeightGroup | None = None
    shards: Shards = Shards()  # this learner's rank in the learner group (one rank until joined)
    dtype: torch.dtype = torch.float32  # what its workers run
    # What one learner publishes each tensor as (a sharded learner's shards are float32).
    published_dtypes: dict[str, torch.dtype] = {}
    group_store: Any = None  # the learner group's store (rank 0 serves it)
    # Sharded, whether the trained weights are float32 masters of low-precision ones (``shard``).
    float32_masters: bool = False
    device: torch.device

    # ---- the learner group (distrl.runtime.shards) -----------------------------------------

    def learner_group_address(self, host: str | None = None) -> tuple[str, int]:
        """As rank 0, serve the learner group's store on ``host`` (default: this machine's
        address) at a free port; returns ``(host, port)`` for every rank's
        ``join_learner_group``."""
        host = host or default_host()
        self.group_store, port = host_store(host, timeout_s=60.0)
        return host, port

    def join_learner_group(
        self, address: tuple[str, int], rank: int, world: int, *, timeout_s: float
    ) -> int:
        """Join the learner group at ``address`` as ``rank`` of ``world`` and shard this
        learner's networks over it (``shard``); returns the rank.

        Raises:
            LearnerGroupError: the group did not form within ``timeout_s``.
        """
        if rank == 0:
            store = self.group_store
        else:
            host, port = address
            try:
                store = dist.TCPStore(
                    host, port, None, False, datetime.timedelta(seconds=timeout_s)
                )
            except (RuntimeError, dist.DistError) as err:
                raise LearnerGroupError(
                    f"learner rank {rank} cannot reach the group's store at {host}:{port} "
                    f"({str(err).splitlines()[0]})"
                ) from None
        self.shards = Shards.join(store, rank, world, device=self.device, timeout_s=timeout_s)
        state = self.published_module().state_dict()
        self.published_dtypes = {name: tensor.dtype for name, tensor in state.items()}
        self.shard()
        return rank

    def shard(self) -> None:
        """Shard this learner's networks over ``shards`` (FSDP2) and rebuild its optimizer."""
        raise NotImplementedError(f"{type(self).__name__} runs as one learner")

    def published_module(self) -> nn.Module:
        """The network whose weights the rollout workers get."""
        raise NotImplementedError

    def publish_version(self) -> int:
        """The version the next publication carries: ``version`` (a learner that counts
        publications rather than updates bumps it here)."""
        return self.version

    # ---- weights by broadcast (distrl.weights.sync) -----------------------------------------

    def weight_group_address(self, host: str | None = None) -> tuple[str, int]:
        """Serve a new weight group's store on ``host`` (default: this machine's address) at
        a free port; returns ``(host, port)`` for the workers' ``join_weight_group``. Any
        earlier group is left."""
        self.leave_weight_group()
        host = host or default_host()
        store, port = host_store(host, timeout_s=60.0)
        self.weight_store = (store, host, port)
        return host, port

    def join_weight_group(self, world_size: int, *, timeout_s: float) -> str:
        """Form the group on the store ``weight_group_address`` serves, as rank 0 of
        ``world_size`` members, waiting at most ``timeout_s`` for the others; returns the
        backend the members share ("nccl" or "gloo").

        Raises:
            WeightSyncError: no store is served, or a member did not join in time.
        """
        if self.weight_store is None:
            raise WeightSyncError("the learner serves no weight group (weight_group_address)")
        device = next(self.published_module().parameters()).device
        store = self.weight_store[0]
        self.weight_group = WeightGroup(store, 0, world_size, device=device, timeout_s=timeout_s)
        return self.weight_group.backend

    def broadcast_weights(self) -> int:
        """Broadcast ``published_module()``'s published tensors (``published_names``) to the
        weight group; returns their version. ``published_bytes`` records the bytes sent.

        Raises:
            WeightSyncError: no group, or a worker was not ready or failed (the group is spent).
        """
        version = self.publish_version()
        if self.shards.sharded:
            return self._broadcast_shards(version)
        if self.weight_group is None:
            raise WeightSyncError("the learner is in no weight group (join_weight_group)")
        self.published_bytes = self.weight_group.send(self.published_state(), version)
        return version

    def _broadcast_shards(self, version: int) -> int:
        """``broadcast_weights`` for a sharded learner, every rank: the tensors are gathered
        whole a bucket at a time, and rank 0 sends each bucket before the next is gathered.
        Rank 0 raises where the broadcast fails; the other ranks still gather to the end, so
        the learner group stays in step."""
        module = self.published_module()
        state = module.state_dict()
        names = published_names(module)
        group = self.weight_group if self.shards.rank == 0 else None
        error: WeightSyncError | None = None
        if self.shards.rank == 0 and group is None:
            error = WeightSyncError("the learner is in no weight group (join_weight_group)")
        bucket_bytes = group.bucket_bytes if group is not None else 1
        if not self.shards.broadcast_object(error is None):
            if error is not None:
                raise error
            return version
        dtypes = self.published_dtypes
        shapes = {n: torch.empty(state[n].shape, dtype=dtypes[n], device="meta") for n in names}
        layout = plan_buckets(shapes, bucket_bytes)  # other ranks: the same order of tensors
        if group is not None:
            try:
                group.announce(layout, version)
            except WeightSyncError as err:
                error = err
        sent = 0
        for _, entries in layout:
            part = {name: state[name] for name, _ in entries}
            device = group.device if group is not None else "cpu"
            bucket = dict(self.shards.full_tensors(part, dtypes, device=device))
            if group is not None and error is None:
                try:
                    sent += group.send_bucket(pack(bucket, entries))
                except WeightSyncError as err:
                    error = err
        if group is not None and error is None:
            try:
                group.finish()
            except WeightSyncError as err:
                error = err
        if error is not None:
            raise error
        self.published_bytes = sent
        return version

    def published_state(self) -> dict[str, torch.Tensor]:
        """``published_module()``'s published tensors (``published_names``) in the workers'
        dtype. A sharded learner gathers them on rank 0's CPU one at a time (a collective;
        other ranks get ``{}``)."""
        module = self.published_module()
        names = published_names(module)
        state = module.state_dict()
        tensors = {name: state[name] for name in names}
        if not self.shards.sharded:
            return tensors
        return dict(self.shards.full_tensors(tensors, self.published_dtypes))

    def leave_weight_group(self) -> None:
        """Leave the weight group and stop serving its store."""
        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group, self.weight_store = None, None

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return self.opt.steps

    @staticmethod
    def sees(path: str) -> bool:
        """Whether ``path`` exists where the learner runs (checkpoints must reach the driver)."""
        return Path(path).exists()

    def publish_metrics(self) -> dict[str, float]:
        """``publish/bytes``: the size of the weights the last publication sent (``weights``
        or ``broadcast_weights``)."""
        return {"publish/bytes": float(self.published_bytes)}

    def role_state(self, extra: dict | None, folder: Path) -> dict[str, Any]:
        """Version, step count, RNG and the driver's ``extra`` for a checkpoint. The optimizer
        state (by parameter name) and a low-precision run's float32 masters go to files of
        their own in ``folder`` (``RESUME_ONLY``: only the newest step checkpoint keeps them).

        Sharded, every rank calls it and writes its own shards of both into
        ``folder / SHARDS_DIR`` (``Shards.save_sharded``): nothing is gathered.
        """
        if self.shards.sharded:
            names = self.opt.names if self.float32_masters else None
            state = self.shards.trained_state(self.trained_root(), self.opt.optimizer, names)
            self.shards.save_sharded(folder / SHARDS_DIR, state)
        else:
            save_torch_state(folder / OPTIMIZER_FILE, self.opt.state_dict())
            masters = self.opt.masters_by_name()
            if masters:
                save_torch_state(folder / MASTERS_FILE, masters)
        return {
            "version": self.version,
            "steps": self.steps,
            "rng": rng_state(),
            "extra": extra or {},
        }

    def trained_root(self) -> nn.Module:
        """The module the optimizer's parameter names are relative to."""
        return self.published_module()

    def held_modules(self) -> list[nn.Module]:
        """Every network this learner holds (the trained one, a reference or target)."""
        return [self.trained_root()]

    def state_memory(self) -> dict[str, float]:
        """MiB of learner state this rank holds (its shards when sharded): ``parameters`` of
        every network it holds, ``gradients``, ``optimizer`` (AdamW's moments) and
        ``masters`` (float32 copies of low-precision weights), and their ``total``."""

        def mib(tensors: Iterable[torch.Tensor]) -> float:
            unique = {id(t): t for t in tensors if t is not None}.values()
            local = [t.to_local() if isinstance(t, DTensor) else t for t in unique]
            return sum(t.numel() * t.element_size() for t in local) / 2**20

        params = [p for m in self.held_modules() for p in m.parameters()]
        moments = [
            v
            for state in self.opt.optimizer.state.values()
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        ]
        memory = {
            "parameters": mib(params),
            "gradients": mib([p.grad for p in params] + [m.grad for m in self.opt.trained]),
            "optimizer": mib(moments),
            "masters": mib(self.opt.masters.values()),
        }
        return {**memory, "total": sum(memory.values())}

    @staticmethod
    def read_masters(folder: Path) -> dict[str, torch.Tensor]:
        """The float32 masters a checkpoint one learner wrote holds by parameter name (``{}``:
        none)."""
        path = folder / MASTERS_FILE
        return load_torch_state(path) if path.is_file() else {}

    def load_role_state(self, state: dict[str, Any], folder: Path) -> dict:
        """Restore what ``role_state`` saved, by one learner or a group of any size; returns
        the driver's ``extra``. Sharded, every rank calls it with the state rank 0 read, after
        loading the weights (the masters replace their rounding).

        A checkpoint without optimizer state (an older step, or ``best``/``final``) resumes with
        fresh AdamW moments, with a warning: only the newest step checkpoint resumes exactly.
        """
        sharded = folder / SHARDS_DIR
        kind = None  # where the optimizer state is: "sharded", "file", "state" or None
        if self.shards.rank == 0:
            if sharded.is_dir():
                kind = "sharded"
            elif (folder / OPTIMIZER_FILE).is_file():
                kind = "file"
            elif "optimizer" in state:  # written before the optimizer had a file of its own
                kind = "state"
        kind = self.shards.broadcast_object(kind)
        if kind == "sharded" and self.shards.sharded:
            has_masters = self.shards.broadcast_object(
                self.shards.rank == 0 and Shards.holds_masters(sharded)
            )
            names = self.opt.names if has_masters and self.float32_masters else None
            self.shards.load_sharded(sharded, self.trained_root(), self.opt.optimizer, names)
        elif self.shards.sharded:
            optimizer = None
            if self.shards.rank == 0 and kind is not None:
                optimizer = self._optimizer_state(kind, state, folder)
            if kind is not None:
                by_name = self.opt.by_name(optimizer) if optimizer is not None else {}
                self.shards.load_optimizer_state(self.trained_root(), self.opt.optimizer, by_name)
        elif kind == "sharded":  # one learner resuming a group's checkpoint
            saved = Shards.read_sharded(sharded)
            self.opt.load_state_dict(saved["optimizer"], saved.get("masters", {}))
        else:
            optimizer = None if kind is None else self._optimizer_state(kind, state, folder)
            self.opt.load_state_dict(optimizer, self.read_masters(folder))
        if kind is None and self.shards.rank == 0:
            warnings.warn(
                f"{folder} holds no optimizer state (only the newest step checkpoint keeps it): "
                "AdamW starts from fresh moments",
                stacklevel=2,
            )
        self.version, self.opt.steps = int(state["version"]), int(state["steps"])
        set_rng_state(state["rng"])
        return state["extra"]

    @staticmethod
    def _optimizer_state(kind: str, state: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The optimizer state one learner saved: in its file, or (older) in ``state``."""
        return state["optimizer"] if kind == "state" else load_torch_state(folder / OPTIMIZER_FILE)

    def write_tokenizer_spec(self, folder: Path, spec: str) -> None:
        """Name the tokenizer a checkpoint was trained with (chat and validate rebuild it), and
        save it as Hugging Face tokenizer files so transformers loads the folder too (a tiktoken
        encoding is converted: ``Tokenizer.save_pretrained``)."""
        (folder / "distrl_tokenizer.json").write_text(json.dumps({"spec": spec}))
        self.tokenizer.save_pretrained(folder)


Call = TypeVar("Call", bound=Callable[..., Any])


def generating(method: Call) -> Call:
    """Mark a rollout worker's generating call: the batch it returns records how long the
    worker sat idle before the call (``idle_s``: since its previous call ended)."""

    @functools.wraps(method)
    def call(self: WorkerRole, *args: Any, **kwargs: Any) -> Any:
        idle = 0.0 if self.free_since is None else time.perf_counter() - self.free_since
        batch = method(self, *args, **kwargs)
        batch.idle_s = idle
        self.free_since = time.perf_counter()
        return batch

    return call  # type: ignore[return-value]


class WorkerRole:
    """What every rollout worker shares: the version it holds and how published weights reach
    it (object store: ``set_weights``; broadcast: ``receive_weights``), both ending in
    ``apply_weights``, which an engine with its own weight loading overrides."""

    version: int = 0
    weight_group: WeightGroup | None = None
    free_since: float | None = None  # when its last call ended (None: none yet)

    def trainable(self) -> nn.Module:
        """The network the learner trains and publishes (the policy, or the Q-network)."""
        raise NotImplementedError

    def apply_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load published tensors, by the learner's names (Hugging Face names for a policy),
        into the network that generates: by default ``trainable()``."""
        set_weights(self.trainable(), tensors)

    def weight_device(self) -> torch.device:
        """Where received weights are wanted (NCCL carries them if every member's is a GPU):
        the role's ``device`` where it keeps one (an engine's), else ``trainable()``'s."""
        device = getattr(self, "device", None)
        if device is not None:
            return torch.device(device)
        return next(self.trainable().parameters()).device

    def loaded_module(self) -> nn.Module | None:
        """The module received weights load into, read back to check a delivery; None where
        an engine with its own weight loading holds them (vLLM: only the bytes received are
        checked)."""
        try:
            return self.trainable()
        except NotImplementedError:  # an engine with its own weight loading holds them
            return None

    def load_checked(self, version: int, tensors: dict[str, torch.Tensor], check: bool) -> int:
        """Load ``tensors`` of ``version`` (already checked as received) and, if ``check``,
        that the network holds them now; returns the version now held.

        Raises:
            WeightMismatch: it does not; this worker then holds no version (-1), so nothing it
                generates passes for a version's, until a delivery succeeds.
        """
        self.version = -1  # until the new weights are in and checked: never half of a version
        self.apply_weights(tensors)
        module = self.loaded_module()
        if check and module is not None:
            check_loaded(module, tensors)
        self.version = version
        return version

    def set_weights(self, weights: VersionedWeights) -> int:
        """Load published weights; returns the version now held."""
        if weights.version != self.version:
            tensors = weights.tensors()
            if weights.digest is not None:  # before anything is loaded: a bad copy changes nothing
                check_received(tensors, weights.digest)
            self.load_checked(weights.version, tensors, check=weights.digest is not None)
        self.free_since = time.perf_counter()
        return self.version

    def join_weight_group(
        self, address: tuple[str, int], rank: int, world_size: int, *, timeout_s: float
    ) -> str:
        """Join the learner's weight group at ``address`` as ``rank`` (1.. ``world_size`` -
        1), leaving any earlier one; returns the backend the members share.

        Raises:
            WeightSyncError: the group did not form within ``timeout_s``.
        """
        self.leave_weight_group()
        host, port = address
        self.weight_group = WeightGroup.join(
            host, port, rank, world_size, device=self.weight_device(), timeout_s=timeout_s
        )
        return self.weight_group.backend

    def receive_weights(self) -> int:
        """Take the learner's next broadcast and load it; returns the version now held.

        Raises:
            WeightSyncError: no group (a restarted worker), or the broadcast failed.
        """
        if self.weight_group is None:
            raise WeightSyncError("this rollout worker is in no weight group (restarted?)")
        version, tensors = self.weight_group.receive()  # checked as received
        return self.load_checked(version, tensors, check=True)

    def leave_weight_group(self) -> None:
        """Leave the weight group, if any."""
        if self.weight_group is not None:
            self.weight_group.close()
        self.weight_group = None
