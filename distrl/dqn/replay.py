"""Experience replay for token-level DQN: a columnar ring buffer, uniform or prioritized.

Plain classes without Ray; the actor module makes one ``PrioritizedReplay`` the replay actor.
Transitions are numpy columns, never Python objects. Token-level DQN stores ``obs`` int32 (L,)
padded token ids with ``obs_len``, ``action`` int64, ``reward`` float32, ``next_obs`` /
``next_obs_len`` (the state n tokens later), ``done`` bool and ``discount`` float32 (gamma^n, 0
past an episode end); any other field a caller adds is stored the same way.

``sample`` hands out transition *ids*: how many transitions were added before each one. A
transition lives in slot ``id % capacity`` until overwritten, so ``update_priorities`` spots ids
overwritten since they were sampled (the slot now holds a newer id) and ignores them.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from distrl.config import ReplayConfig

_META_KEY = b"distrl.replay"  # in snapshots already written: kept as it was


class SumTree:
    """Array-based binary sum tree over float64 priorities; all operations vectorised.

    Node 1 is the root, node ``i`` has children ``2i`` and ``2i+1``, leaf ``j`` is node
    ``capacity + j``. Parents are always recomputed from their children (never by adding
    deltas), so the tree is a pure function of its leaves and cannot drift.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.depth = (capacity - 1).bit_length()
        self.capacity = 1 << self.depth
        self.tree = np.zeros(2 * self.capacity, dtype=np.float64)
        self._high = 0  # leaves [0, _high) have been written; min() looks only there

    @property
    def total(self) -> float:
        """Sum of all priorities."""
        return float(self.tree[1])

    @property
    def leaves(self) -> np.ndarray:
        """(capacity,) view of the leaf priorities."""
        return self.tree[self.capacity :]

    def min(self) -> float:
        """Smallest priority among the leaves written so far (0.0 if none)."""
        return float(self.leaves[: self._high].min()) if self._high else 0.0

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set leaves ``indices`` (N,) to ``priorities`` (N,); loops over levels, not items."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size == 0:
            return
        self.tree[idx + self.capacity] = priorities
        self._high = max(self._high, int(idx.max()) + 1)
        node = np.sort(idx + self.capacity)
        for _ in range(self.depth):
            node >>= 1
            keep = np.empty(node.size, dtype=bool)
            keep[0] = True
            np.not_equal(node[1:], node[:-1], out=keep[1:])
            node = node[keep]
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]

    def set_leaves(self, priorities: np.ndarray) -> None:
        """Replace all leaves by ``priorities`` (n,) then zeros, and rebuild the tree."""
        self.tree[self.capacity :] = 0.0
        self.tree[self.capacity : self.capacity + len(priorities)] = priorities
        self._high = len(priorities)
        self.rebuild()

    def rebuild(self) -> None:
        """Recompute every internal node from the leaves."""
        for level in range(self.depth - 1, -1, -1):
            lo, hi = 1 << level, 2 << level
            self.tree[lo:hi] = self.tree[2 * lo : 2 * hi : 2] + self.tree[2 * lo + 1 : 2 * hi : 2]

    def find(self, prefix_sums: np.ndarray) -> np.ndarray:
        """Leaf indices (N,) whose cumulative-priority interval holds each of ``prefix_sums``.

        Only leaves with positive priority are returned, even for sums at the rounding edge.
        """
        s = np.array(prefix_sums, dtype=np.float64)
        node = np.ones(s.size, dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * node
            left_sum = self.tree[left]
            go_right = (s >= left_sum) & (self.tree[left + 1] > 0)
            s = np.where(go_right, s - left_sum, s)
            node = left + go_right
        return node - self.capacity


class Transitions:
    """Columnar ring buffer: one preallocated array per field, dtype/shape fixed at first add."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.count = 0  # transitions ever added; the next one gets this id
        self.columns: dict[str, np.ndarray] = {}
        self.ids = np.full(capacity, -1, dtype=np.int64)  # id held by each slot

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def add(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Append a batch of equal-length columns, overwriting the oldest; return their ids."""
        arrays = {k: np.asarray(v) for k, v in batch.items()}
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns must have one length, got {sorted(lengths)}")
        if not self.columns:
            self._allocate(arrays)
        elif arrays.keys() != self.columns.keys():
            raise ValueError(f"fields {sorted(arrays)} != stored {sorted(self.columns)}")
        n = lengths.pop()
        skip = max(0, n - self.capacity)  # a batch larger than the buffer keeps its tail
        for name, col in self.columns.items():
            v = arrays[name]
            if v.shape[1:] != col.shape[1:] or not np.can_cast(v.dtype, col.dtype, "same_kind"):
                raise ValueError(f"{name}: got {v.dtype}{v.shape[1:]}, stored {col.dtype}")
        start = self.count + skip
        ids = np.arange(start, self.count + n, dtype=np.int64)
        pos = start % self.capacity
        for name, col in self.columns.items():
            _ring_write(col, pos, arrays[name][skip:])
        _ring_write(self.ids, pos, ids)
        self.count += n
        return ids

    def _allocate(self, arrays: dict[str, np.ndarray]) -> None:
        for name, v in arrays.items():
            if not name or name.startswith("_"):
                raise ValueError(f"field names must not be empty or start with '_': {name!r}")
            self.columns[name] = np.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)

    def gather(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """The transitions in ``slots`` (N,) as a dict of (N, ...) arrays."""
        return {name: col[slots] for name, col in self.columns.items()}

    def state_dict(self) -> dict[str, Any]:
        """Copies of the stored prefix of every column and the write counter."""
        n = len(self)
        return {
            "count": self.count,
            "fields": {k: [v.dtype.str, list(v.shape[1:])] for k, v in self.columns.items()},
            "columns": {k: v[:n].copy() for k, v in self.columns.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()`` (same capacity)."""
        self.count, n = int(state["count"]), min(int(state["count"]), self.capacity)
        self.columns = {
            k: np.zeros((self.capacity, *shape), dtype=np.dtype(dt))
            for k, (dt, shape) in state["fields"].items()
        }
        for k, v in state["columns"].items():
            self.columns[k][:n] = v
        self.ids.fill(-1)
        held = np.arange(self.count - n, self.count, dtype=np.int64)
        self.ids[held % self.capacity] = held


def _ring_write(col: np.ndarray, pos: int, values: np.ndarray) -> None:
    """Write ``values`` (n <= len(col)) into ``col`` from slot ``pos``, wrapping at the end."""
    head = min(len(values), len(col) - pos)
    col[pos : pos + head] = values[:head]
    col[: len(values) - head] = values[head:]


class UniformReplay:
    """Uniform sampling with replacement; same interface as ``PrioritizedReplay``."""

    kind = "uniform"

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.store = Transitions(capacity)
        self.rng = np.random.default_rng(seed)
        self.sample_calls = 0
        self.stale_updates = 0

    def __len__(self) -> int:
        return len(self.store)

    def add(self, batch: dict[str, np.ndarray], priorities: np.ndarray | None = None) -> np.ndarray:
        """Store a batch of transitions (``priorities`` ignored); return their ids (N,)."""
        return self.store.add(batch)

    def sample(
        self, batch_size: int, step: int | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Draw ``batch_size`` transitions: (batch, ids (N,) int64, weights (N,) float32 = 1)."""
        if not len(self):
            raise ValueError("cannot sample from an empty replay buffer")
        slots = self.rng.integers(0, len(self), batch_size)
        self.sample_calls += 1
        weights = np.ones(batch_size, dtype=np.float32)
        return self.store.gather(slots), self.store.ids[slots], weights

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> int:
        """No-op for uniform replay; returns 0 (priorities applied)."""
        return 0

    def stats(self) -> dict[str, float]:
        """Plain metrics dict under ``replay/`` keys."""
        return {
            "replay/size": float(len(self)),
            "replay/added": float(self.store.count),
            "replay/sample_calls": float(self.sample_calls),
            "replay/stale_updates": float(self.stale_updates),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: data, counters and the RNG state."""
        return {
            "kind": self.kind,
            "capacity": self.store.capacity,
            **self.store.state_dict(),
            "rng": self.rng.bit_generator.state,
            "sample_calls": self.sample_calls,
            "stale_updates": self.stale_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; kind and capacity must match this buffer's."""
        if (state["kind"], state["capacity"]) != (self.kind, self.store.capacity):
            raise ValueError(
                f"snapshot is {state['kind']}/{state['capacity']}, "
                f"buffer is {self.kind}/{self.store.capacity}"
            )
        self.store.load_state_dict(state)
        self.rng.bit_generator.state = state["rng"]
        self.sample_calls = int(state["sample_calls"])
        self.stale_updates = int(state["stale_updates"])

    def save_parquet(self, path: str | os.PathLike) -> None:
        """Write a Parquet snapshot atomically (temp file in the same directory + os.replace)."""
        state = self.state_dict()
        columns, fields = state.pop("columns"), state["fields"]
        arrays = {k: _to_arrow(v) for k, v in columns.items()}
        if "priorities" in state:
            arrays["_priority"] = pa.array(state.pop("priorities"))
        table = pa.table(arrays)
        meta = json.dumps({**state, "fields": fields})
        table = table.replace_schema_metadata({_META_KEY: meta.encode()})
        tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, path)  # readers see the old snapshot or the new one, never half
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load_parquet(self, path: str | os.PathLike) -> None:
        """Restore a snapshot written by ``save_parquet``."""
        table = pq.read_table(path)
        state = json.loads(table.schema.metadata[_META_KEY])
        state["columns"] = {
            k: _from_arrow(table.column(k), dt, shape) for k, (dt, shape) in state["fields"].items()
        }
        if "_priority" in table.column_names:
            state["priorities"] = table.column("_priority").to_numpy()
        self.load_state_dict(state)


def _to_arrow(v: np.ndarray) -> pa.Array:
    """A column as a flat array, or a FixedSizeList of its flattened trailing dimensions."""
    if v.ndim == 1:
        return pa.array(v)
    width = int(np.prod(v.shape[1:]))
    if width == 0:  # e.g. no candidate actions (dqn.action_top_k 0): Arrow has no size-0 lists
        return pa.array([[]] * len(v), type=pa.list_(pa.from_numpy_dtype(v.dtype)))
    return pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), width)


def _from_arrow(col: pa.ChunkedArray, dtype: str, shape: list[int]) -> np.ndarray:
    if 0 in shape:
        return np.zeros((len(col), *shape), dtype=np.dtype(dtype))
    arr = col.combine_chunks()
    if shape:
        arr = arr.flatten()
    out = arr.to_numpy(zero_copy_only=False).astype(np.dtype(dtype), copy=False)
    return out.reshape(len(col), *shape)


class PrioritizedReplay(UniformReplay):
    """Proportional prioritized replay (Schaul et al., 2016) over a vectorised ``SumTree``.

    P(i) = p_i / sum_j p_j with p_i = (|td_i| + eps)^alpha. IS weights are (N P(i))^-beta
    divided by the largest weight in the buffer, i.e. (p_i / p_min)^-beta, with beta annealed
    linearly from ``beta_start`` to ``beta_end`` over ``beta_anneal_steps``. ``eps > 0`` keeps
    transitions with zero TD error sampleable (and p_min positive).
    """

    kind = "prioritized"

    def __init__(
        self,
        capacity: int,
        alpha: float = 0.6,
        beta_start: float = 0.4,
        beta_end: float = 1.0,
        beta_anneal_steps: int = 10_000,
        eps: float = 1e-6,
        seed: int = 0,
    ) -> None:
        if alpha < 0 or eps < 0:
            raise ValueError(f"alpha and eps must be >= 0, got {alpha}, {eps}")
        super().__init__(capacity, seed)
        self.alpha, self.eps = alpha, eps
        self.beta_start, self.beta_end = beta_start, beta_end
        self.beta_anneal_steps = beta_anneal_steps
        self.tree = SumTree(capacity)
        self.max_priority = 1.0  # largest leaf priority seen; new transitions get it

    def beta(self, step: int) -> float:
        """IS exponent at learner ``step``."""
        frac = min(1.0, max(0, step) / self.beta_anneal_steps)
        return self.beta_start + (self.beta_end - self.beta_start) * frac

    def priority(self, td_errors: np.ndarray) -> np.ndarray:
        """Leaf priorities (|td| + eps)^alpha, float64."""
        return (np.abs(np.asarray(td_errors, dtype=np.float64)) + self.eps) ** self.alpha

    def add(self, batch: dict[str, np.ndarray], priorities: np.ndarray | None = None) -> np.ndarray:
        """Store transitions at the max priority, or at ``priorities`` (N,) raw |TD|-like
        values from the workers (Ape-X), transformed like ``update_priorities``; return ids."""
        leaf = None if priorities is None else self.priority(priorities)
        if leaf is not None and leaf.shape != (len(next(iter(batch.values()))),):
            raise ValueError(f"priorities {leaf.shape} do not match the batch")
        ids = self.store.add(batch)
        if leaf is None:
            leaf = np.full(ids.size, self.max_priority)
        else:
            leaf = leaf[leaf.size - ids.size :]  # a batch larger than the buffer keeps its tail
            self.max_priority = max(self.max_priority, float(leaf.max(initial=0.0)))
        self.tree.update(ids % self.store.capacity, leaf)
        return ids

    def sample(
        self, batch_size: int, step: int | None = None
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """Stratified proportional draw: (batch, ids (N,) int64, IS weights (N,) float32).

        ``step`` sets beta; by default the number of earlier ``sample`` calls.
        """
        if not len(self):
            raise ValueError("cannot sample from an empty replay buffer")
        beta = self.beta(self.sample_calls if step is None else step)
        self.sample_calls += 1
        edges = np.arange(batch_size) + self.rng.random(batch_size)
        slots = self.tree.find(edges * (self.tree.total / batch_size))
        weights = (self.tree.leaves[slots] / self.tree.min()) ** -beta
        return self.store.gather(slots), self.store.ids[slots], weights.astype(np.float32)

    def update_priorities(self, indices: np.ndarray, td_errors: np.ndarray) -> int:
        """Set priorities of ids ``indices`` (N,) from ``td_errors`` (N,); ids whose slot was
        overwritten since sampling are skipped. Returns how many were applied."""
        ids = np.asarray(indices, dtype=np.int64)
        slots = ids % self.store.capacity
        fresh = self.store.ids[slots] == ids
        self.stale_updates += int(ids.size - fresh.sum())
        leaf = self.priority(np.asarray(td_errors)[fresh])
        self.tree.update(slots[fresh], leaf)
        self.max_priority = max(self.max_priority, float(leaf.max(initial=0.0)))
        return int(fresh.sum())

    def stats(self) -> dict[str, float]:
        """Plain metrics dict under ``replay/`` keys (priorities in leaf space, p^alpha)."""
        leaves = self.tree.leaves[: len(self)]
        return {
            **super().stats(),
            "replay/priority_mean": float(leaves.mean()) if leaves.size else 0.0,
            "replay/priority_max": float(leaves.max()) if leaves.size else 0.0,
            "replay/beta": self.beta(self.sample_calls),
        }

    def state_dict(self) -> dict[str, Any]:
        """As ``UniformReplay.state_dict`` plus the leaf priorities and the running max."""
        state = super().state_dict()
        state["priorities"] = self.tree.leaves[: len(self)].copy()
        state["max_priority"] = self.max_priority
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; the tree is rebuilt bit-identically from its leaves."""
        super().load_state_dict(state)
        self.tree.set_leaves(np.asarray(state["priorities"], dtype=np.float64))
        self.max_priority = float(state["max_priority"])


def replay_spec(config: ReplayConfig, seed: int = 0) -> tuple[type, dict[str, Any]]:
    """The buffer class and keyword arguments a ``ReplayConfig`` describes (for an actor)."""
    if not config.prioritized:
        return UniformReplay, {"capacity": config.capacity, "seed": seed}
    return PrioritizedReplay, {
        "capacity": config.capacity,
        "alpha": config.alpha,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "beta_anneal_steps": config.beta_anneal_steps,
        "seed": seed,
    }


def from_config(config: ReplayConfig, seed: int = 0) -> UniformReplay | PrioritizedReplay:
    """The buffer a ``ReplayConfig`` describes."""
    cls, kwargs = replay_spec(config, seed)
    return cls(**kwargs)
