"""The learner as a group of ranks: a torch.distributed group, FSDP2 sharding, and the share of
a batch each rank computes.

Every rank receives the whole batch. ``share`` picks the rows a rank runs, balanced by tokens;
``gather_rows`` puts the ranks' per-row results back together (a sum of disjoint rows, so
exact). Advantages, group statistics and whitening then run over the whole batch on every rank,
as they do on one. In an update each rank's loss is its share of the global loss (its share of
the tokens, or of the sequences, times its local mean), and FSDP averages gradients over the
ranks, so a rank's loss is also multiplied by the world size: the step is the one a single
learner takes on the whole batch, whatever the number of ranks.

FSDP needs every rank to run the same forwards in the same order (each one gathers weights), so
a rank whose share of a minibatch would be empty runs one row with weight 0.

``Shards()`` (one rank) makes every method the identity: the learner has one code path.
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from distrl.errors import DistrlError


class LearnerGroupError(DistrlError):
    """The learner's ranks could not form their group (a rank missing or too slow)."""


@dataclass(frozen=True)
class Share:
    """The rows of a batch (or minibatch) one rank computes, and its weights in global means.

    Attributes:
        rows: (R,) positions into the batch, never empty.
        tokens: this rank's real tokens / all ranks' (0 for a rank that only keeps step).
        seqs: this rank's sequences / all ranks'.
    """

    rows: torch.Tensor
    tokens: float
    seqs: float


def split_by_tokens(tokens: list[int], world: int) -> list[list[int]]:
    """Rows ``0..len(tokens)-1`` dealt to ``world`` ranks, balancing tokens: longest first, each
    to the rank with the fewest tokens so far (the same answer on every rank)."""
    loads = [0] * world
    parts: list[list[int]] = [[] for _ in range(world)]
    for row in sorted(range(len(tokens)), key=lambda r: (-tokens[r], r)):
        rank = min(range(world), key=lambda k: (loads[k], len(parts[k]), k))
        parts[rank].append(row)
        loads[rank] += tokens[row]
    return [sorted(p) for p in parts]


def split_by_budget(costs: list[int], budget: int) -> list[list[int]]:
    """Positions ``0..len(costs)-1`` in consecutive runs whose costs sum to at most ``budget``
    (a position costlier than that is a run of its own)."""
    runs: list[list[int]] = []
    total = 0
    for i, cost in enumerate(costs):
        if runs and total + cost <= budget:
            runs[-1].append(i)
            total += cost
        else:
            runs.append([i])
            total = cost
    return runs


class Shards:
    """This learner's place in its group: ``rank`` of ``world``."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None) -> None:
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.mesh = None

    @classmethod
    def join(
        cls,
        store: dist.Store,
        rank: int,
        world: int,
        *,
        device: torch.device,
        timeout_s: float,
    ) -> Shards:
        """Form the group on ``store`` (rank 0 serves it) as ``rank`` of ``world``: NCCL on
        CUDA, gloo on the CPU. Every later collective also gives up after ``timeout_s``.

        Raises:
            LearnerGroupError: the other ranks did not join within ``timeout_s``.
        """
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        except (RuntimeError, dist.DistError) as err:
            raise LearnerGroupError(
                f"learner rank {rank} of {world}: the group did not form within {timeout_s:g} s "
                f"({str(err).splitlines()[0]})"
            ) from None
        shards = cls(rank, world, device)
        from torch.distributed.device_mesh import init_device_mesh

        shards.mesh = init_device_mesh(device.type, (world,))
        return shards

    @property
    def sharded(self) -> bool:
        """Whether there is more than one rank."""
        return self.world > 1

    def share(self, tokens: torch.Tensor) -> Share:
        """This rank's rows of a batch whose rows hold ``tokens`` (R,) real tokens."""
        counts = [int(t) for t in tokens.tolist()]
        mine = split_by_tokens(counts, self.world)[self.rank]
        total_tokens, total_rows = max(sum(counts), 1), max(len(counts), 1)
        if not mine:  # fewer rows than ranks: run one row, weigh it 0
            return Share(torch.zeros(1, dtype=torch.long), 0.0, 0.0)
        return Share(
            torch.tensor(mine, dtype=torch.long),
            sum(counts[r] for r in mine) / total_tokens,
            len(mine) / total_rows,
        )

    def parts(self, tokens: torch.Tensor, costs: torch.Tensor, budget: int | None) -> list[Share]:
        """This rank's share of a minibatch whose rows hold ``tokens`` (R,) real tokens, in
        micro-batches whose forward ``costs`` (R,) sum to at most ``budget`` (a costlier row
        alone; None: one part). Every rank gets as many parts as the rank with the most (FSDP
        runs each part's passes on every rank): the extra ones are one row weighed 0."""
        share = self.share(tokens)
        if budget is None:
            return [share]
        counts = [int(t) for t in tokens.tolist()]
        total_tokens, total_rows = max(sum(counts), 1), max(len(counts), 1)
        rows = share.rows.tolist() if share.seqs > 0 else []
        runs = split_by_budget([int(costs[r]) for r in rows], budget)
        parts = [
            Share(
                torch.tensor([rows[i] for i in run], dtype=torch.long),
                sum(counts[rows[i]] for i in run) / total_tokens,
                len(run) / total_rows,
            )
            for run in runs
        ]
        most = int(self.max(torch.tensor([len(parts)]))[0])
        idle = Share(torch.zeros(1, dtype=torch.long), 0.0, 0.0)
        return parts + [idle] * (most - len(parts))

    def gather_rows(self, local: torch.Tensor, share: Share, total: int) -> torch.Tensor:
        """The whole batch's (``total`` rows) tensor from each rank's ``local`` rows."""
        if not self.sharded:
            return local
        full = local.new_zeros((total, *local.shape[1:]))
        if share.seqs > 0:
            full[share.rows.to(local.device)] = local
        return self.sum(full)

    def _reduce(self, values: torch.Tensor, op: str) -> torch.Tensor:
        if not self.sharded:
            return values
        moved = values.to(self.device)  # NCCL moves device tensors only
        if op == "broadcast":
            dist.broadcast(moved, src=0)
        else:
            dist.all_reduce(moved, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return moved.to(values.device)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks."""
        return self._reduce(values, "sum")

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """The largest of ``values`` over the ranks."""
        return self._reduce(values, "max")

    def broadcast(self, values: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``values`` on every rank."""
        return self._reduce(values, "broadcast")

    def shard(
        self,
        root: nn.Module,
        layers: list[nn.Module],
        *,
        compute_dtype: torch.dtype | None,
        methods: tuple[str, ...] = (),
        float32: tuple[nn.Module, ...] = (),
    ) -> None:
        """Shard ``root`` with FSDP2: each of ``layers``, then the rest. Parameters stay as
        they are (float32 masters of a bfloat16 run); with ``compute_dtype`` they are gathered
        in it and gradients are reduced in float32, except the modules ``float32`` (small
        heads that compute in float32 on one learner too). ``methods`` of ``root`` gather its
        weights as ``forward`` does."""
        from torch.distributed.fsdp import (
            MixedPrecisionPolicy,
            fully_shard,
            register_fsdp_forward_method,
        )

        # The learner's forwards return a linear layer's output, a view; nothing writes into it.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        full = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for head in float32:
            fully_shard(head, mesh=self.mesh, mp_policy=full)
        fully_shard(root, mesh=self.mesh, mp_policy=policy)
        for method in methods:
            register_fsdp_forward_method(root, method)

    def reshard(self, module: nn.Module) -> None:
        """Free ``module``'s gathered weights after a forward without backward: FSDP keeps a
        root's gathered (for the backward it expects), which would hold a whole copy of a
        reference model's embeddings and head."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(module, FSDPModule):
            module.reshard()

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s whole state on rank 0's CPU (a collective; other ranks get ``{}``)."""
        if not self.sharded:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=options)

    def full_tensors(
        self,
        tensors: dict[str, torch.Tensor],
        dtypes: dict[str, torch.dtype] | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Each of ``tensors`` (a sharded module's ``state_dict()``, or part of it) gathered
        whole, one at a time, cast to its ``dtypes`` entry (before gathering: bfloat16 moves
        half the bytes) and moved to ``device``. A collective: every rank iterates to the end;
        rank 0 gets the pairs, the others nothing. Nothing but the tensor in hand is held
        whole, so a caller that packs a bucket at a time holds one bucket beyond its shards."""
        dtypes = dtypes or {}
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            if name in dtypes:
                tensor = tensor.to(dtypes[name])
            if isinstance(tensor, DTensor):
                tensor = tensor.full_tensor()
            if self.rank == 0:
                yield name, tensor.to(device)

    def load_tensors(self, shards: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
        """Copy rank 0's whole tensors ``full`` into ``shards`` of the same names (this rank's
        part of each where it is a DTensor) on every rank."""
        from torch.distributed.tensor import distribute_tensor

        for name, shard in shards.items():
            if self.rank == 0:
                whole = full[name].to(shard.device, shard.dtype)
            else:
                whole = torch.empty(shard.shape, dtype=shard.dtype, device=shard.device)
            if isinstance(shard, DTensor):
                part = distribute_tensor(
                    whole, shard.device_mesh, shard.placements, src_data_rank=0
                )
                shard.to_local().copy_(part.to_local())
            else:
                shard.copy_(self.broadcast(whole))

    def load_full_state(
        self, module: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True
    ) -> None:
        """Load rank 0's whole ``state`` into the sharded ``module`` on every rank (``strict``
        False: ``state`` holds some of its tensors, the rest stay)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(module, state if self.rank == 0 else {}, options=options)

    def load_optimizer_state(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        """Load rank 0's whole ``state`` (by parameter name) into the sharded ``optimizer``."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(
            module, optimizer, state if self.rank == 0 else {}, options=options
        )

    def trained_state(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, names: list[str] | None
    ) -> dict[str, Any]:
        """This rank's shards of ``optimizer``'s state (by parameter name) under
        ``"optimizer"``, and with ``names`` the shards of those parameters of ``module`` under
        ``"masters"``: what ``save_sharded`` writes and ``load_sharded`` fills."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        state: dict[str, Any] = {"optimizer": get_optimizer_state_dict(module, optimizer)}
        if names is not None:
            weights = get_model_state_dict(module)
            state["masters"] = {n: weights[n] for n in names}
        return state

    def save_sharded(self, folder: Path, state: dict[str, Any]) -> None:
        """Every rank writes its shards of ``state`` (``trained_state``) into ``folder`` with
        ``torch.distributed.checkpoint``: one file per rank and rank 0's index, ``.metadata``."""
        import torch.distributed.checkpoint as dcp

        dcp.save(state, checkpoint_id=folder)

    def load_sharded(
        self,
        folder: Path,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        names: list[str] | None,
    ) -> None:
        """Load ``folder`` (``save_sharded``, by any number of ranks) into this rank's shards
        of ``optimizer`` and, with ``names``, of those parameters of ``module``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state = self.trained_state(module, optimizer, names)
        dcp.load(state, checkpoint_id=folder)
        set_optimizer_state_dict(module, optimizer, state["optimizer"])
        if names is not None:
            options = StateDictOptions(strict=False)
            set_model_state_dict(module, state["masters"], options=options)

    @staticmethod
    def read_sharded(folder: Path) -> dict[str, Any]:
        """The whole of what ``save_sharded`` wrote into ``folder``, in this one process (a
        learner resuming alone what a group saved)."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        state: dict[str, Any] = {}
        reader = FileSystemReader(folder)
        _load_state_dict(
            state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
        return state

    @staticmethod
    def holds_masters(folder: Path) -> bool:
        """Whether ``save_sharded`` wrote float32 masters into ``folder``."""
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(folder).read_metadata().state_dict_metadata
        return any(key.startswith("masters.") for key in keys)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (small, picklable: it travels inside the group) on every rank."""
        if not self.sharded:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Leave the group."""
        if self.sharded and dist.is_initialized():
            dist.destroy_process_group()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor``: a DTensor's local shard (a view), else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """A Hugging Face model's repeated blocks (its ``_no_split_modules`` classes), the units
    FSDP gathers one at a time."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]
