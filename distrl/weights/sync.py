"""Weights from the learner to the rollout workers by a torch.distributed broadcast.

The learner is rank 0: it serves a ``TCPStore`` (``host_store``) and every rollout worker joins
as rank 1, 2, ... (``WeightGroup``). The process group is made directly on that store
(``ProcessGroupGloo`` / ``ProcessGroupNCCL``), never through ``init_process_group``: the default
group of the process stays free for an inference engine (vLLM) that wants it. NCCL when every
member holds its weights on a GPU, gloo otherwise (host memory).

The learner leads over the store, so a missing member makes every other one raise
``WeightSyncError`` within ``timeout_s`` instead of hanging:

- forming: each member writes its device; the learner waits for all of them, then writes the
  backend (or why it gives up), which the others wait for.
- publication ``n``: each receiver writes ``ready/n/<rank>`` and waits for ``go/n``; the learner
  waits until every receiver is ready, then writes ``go/n`` (or why it gives up) and
  broadcasts a header (version, tensor count, layout id) and one flat buffer per dtype (split
  at ``bucket_bytes``; bfloat16 stays bfloat16), then a trailer: the digest of every bucket's
  bytes, which receivers check what they received and loaded against. The layout (each
  bucket's dtype, names and shapes) goes through the store whenever it changes: receivers
  need no names in advance.

A group whose forming or broadcast failed is spent: rebuild it (a new store, a new port).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from distrl.errors import DistrlError
from distrl.weights.tensors import WeightMismatch, device_digest, digest

# Largest flat buffer per backend; a bucket's copy is the sender's extra memory. Gloo moves
# small buffers faster (SmolLM2 float32 to two workers on one host: 0.57 s in 4 MiB buckets,
# 1.3 s in 512 MiB ones); NCCL wants few large ones.
BUCKET_BYTES = {"gloo": 4 * 1024**2, "nccl": 256 * 1024**2}
# Receivers wait this much longer than the learner, so they hear why it gave up.
FOLLOW_MARGIN_S = 2.0
# Buckets of one dtype: the dtype's name and the (name, shape) of each tensor packed in order.
Layout = list[tuple[str, list[tuple[str, tuple[int, ...]]]]]


class WeightSyncError(DistrlError):
    """A weight group did not form, or a broadcast failed (a member missing, hung or gone)."""


def _delta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def host_store(host: str, timeout_s: float) -> tuple[dist.TCPStore, int]:
    """Serve a ``TCPStore`` on ``host`` at a port the OS picks; returns it and the port.

    The listening socket is bound before the store takes it, so no other process can take the
    port in between, and it listens on ``host`` alone (loopback stays loopback).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
    except OSError as err:
        sock.close()
        raise WeightSyncError(f"cannot serve the weight group's store on {host}: {err}") from None
    store = dist.TCPStore(
        host, port, None, True, _delta(timeout_s), wait_for_workers=False,
        master_listen_fd=sock.detach(),
    )  # fmt: skip
    return store, port


def default_host() -> str:
    """This machine's address as other machines see it (its hostname's), else loopback."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def route_to(host: str) -> str:
    """This machine's address on the interface that reaches ``host`` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))
        return sock.getsockname()[0]


def plan_buckets(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> Layout:
    """Group ``tensors`` by dtype (in order of first appearance), each dtype's run split into
    buckets of at most ``bucket_bytes`` (a larger tensor is a bucket of its own)."""
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    layout: Layout = []
    for dtype, items in by_dtype.items():
        bucket: list[tuple[str, tuple[int, ...]]] = []
        size = 0
        for name, tensor in items:
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > bucket_bytes:
                layout.append((_dtype_name(dtype), bucket))
                bucket, size = [], 0
            bucket.append((name, tuple(tensor.shape)))
            size += nbytes
        layout.append((_dtype_name(dtype), bucket))
    return layout


def pack(
    tensors: dict[str, torch.Tensor], entries: list[tuple[str, tuple[int, ...]]]
) -> torch.Tensor:
    """One bucket of a layout as a flat buffer: its tensors flattened, in order."""
    parts = [tensors[name].detach().reshape(-1) for name, _ in entries]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def encode_layout(layout: Layout) -> bytes:
    """``layout`` as JSON: the store carries plain data, never a pickle."""
    return json.dumps(layout, separators=(",", ":")).encode()


def decode_layout(data: bytes) -> Layout:
    """A layout read from the store, checked field by field.

    Raises:
        WeightSyncError: ``data`` is not JSON of a layout's shape (a forged or damaged key); it
            is never unpickled or evaluated.
    """
    try:
        raw = json.loads(data)
        layout: Layout = []
        for dtype, entries in raw:
            _dtype(dtype)
            bucket = [(str(name), tuple(int(d) for d in shape)) for name, shape in entries]
            if not all(isinstance(n, str) for n, _ in entries) or any(
                d < 0 for _, shape in bucket for d in shape
            ):
                raise ValueError("bad entry")
            layout.append((dtype, bucket))
    except WeightSyncError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError):
        raise WeightSyncError(
            f"the weight layout in the group's store is not a layout ({data[:40]!r}...): "
            "something other than the learner wrote it"
        ) from None
    return layout


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise WeightSyncError(f"the weight layout names an unknown dtype {name!r}")
    return dtype


def _process_group(backend: str, store: Any, rank: int, size: int, timeout_s: float, host: str):
    """A gloo or NCCL group on ``store`` that is not torch.distributed's default group."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _delta(timeout_s)
        return dist.ProcessGroupNCCL(store, rank, size, options)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = _delta(timeout_s)
    # As torch.distributed does: GLOO_SOCKET_IFNAME names the interface, else the one that
    # reaches the learner (loopback when it listens on loopback).
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if ifname:
        options._devices = [dist.ProcessGroupGloo.create_device(interface=ifname.split(",")[0])]
    else:
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=route_to(host))]
    return dist.ProcessGroupGloo(store, rank, size, options)


class WeightGroup:
    """One member of a weight group: rank 0 sends (``send``), the others receive (``receive``).

    Args:
        store: the group's ``TCPStore`` (rank 0's from ``host_store``, others' a client of it).
        rank: this member's rank; 0 is the learner.
        world_size: members, the learner included.
        device: where this member keeps its weights (NCCL only if every member's is a GPU).
        timeout_s: how long any step waits for the other members before raising.
        bucket_bytes: largest flat buffer the sender packs (default: ``BUCKET_BYTES`` of
            the backend).

    Raises:
        WeightSyncError: the group did not form within ``timeout_s`` (a member missing).
    """

    def __init__(
        self,
        store: dist.TCPStore,
        rank: int,
        world_size: int,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = 300.0,
        bucket_bytes: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise WeightSyncError(f"weight group: rank {rank} outside 0..{world_size - 1}")
        self.store, self.rank, self.world_size = store, rank, world_size
        self.timeout_s = timeout_s
        store.set_timeout(_delta(timeout_s + (FOLLOW_MARGIN_S if rank else 0.0)))
        self.publications = 0  # publications so far: their store keys are numbered
        self.layout: Layout | None = None
        self.layout_id = 0
        self.sent_digest = 0  # of the publication being sent (rank 0)
        self.spent = False
        device = torch.device(device)
        self.backend = self._rendezvous(device)
        self.device = device if self.backend == "nccl" else torch.device("cpu")
        self.bucket_bytes = bucket_bytes or BUCKET_BYTES[self.backend]
        try:
            self.pg = _process_group(self.backend, store, rank, world_size, timeout_s, store.host)
        except RuntimeError as err:
            raise self._fail(f"the group did not form within {timeout_s:g} s ({err})") from None

    @classmethod
    def join(
        cls,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = 300.0,
    ) -> WeightGroup:
        """Join the group whose store rank 0 serves at ``host:port`` as ``rank`` (> 0)."""
        try:
            store = dist.TCPStore(
                host, port, None, False, _delta(timeout_s), wait_for_workers=False
            )
        except RuntimeError as err:
            raise WeightSyncError(
                f"weight group rank {rank}: cannot reach the learner's store at {host}:{port} "
                f"within {timeout_s:g} s ({err})"
            ) from None
        return cls(store, rank, world_size, device=device, timeout_s=timeout_s)

    # ---- coordination over the store ---------------------------------------------------

    def _fail(self, why: str) -> WeightSyncError:
        self.spent = True
        return WeightSyncError(f"weight group rank {self.rank}: {why}")

    def _get(self, key: str) -> bytes:
        try:
            return self.store.get(key)
        except RuntimeError as err:  # DistStoreError: the learner never wrote it, or is gone
            raise self._fail(f"no word from the learner ({key}) within {self.timeout_s:g} s "
                             f"({err})") from None  # fmt: skip

    def _await(self, keys: dict[int, str], what: str) -> None:
        """Rank 0: wait until every other member wrote its key in ``keys``; past the timeout,
        write why under ``what`` (where the others wait for word) and raise."""
        try:
            self.store.wait(list(keys.values()), _delta(self.timeout_s))
        except RuntimeError:
            missing = [r for r, key in keys.items() if not self.store.check([key])]
            why = (
                f"rank(s) {missing} of {self.world_size} did not reach {what} within "
                f"{self.timeout_s:g} s"
            )
            self.store.set(what, b"abort: " + why.encode())
            raise self._fail(why) from None

    def _follow(self, what: str) -> bytes:
        """A receiver: the learner's word under ``what``; raise if it gave up."""
        answer = self._get(what)
        if answer.startswith(b"abort: "):
            raise self._fail(f"the learner gave up: {answer[7:].decode()}")
        return answer

    def _rendezvous(self, device: torch.device) -> str:
        """Every member states its device; rank 0 picks the backend for all."""
        nccl = device.type == "cuda" and dist.is_nccl_available()
        self.store.set(f"member/{self.rank}", b"nccl" if nccl else b"gloo")
        if self.rank:
            return self._follow("backend").decode()
        keys = {r: f"member/{r}" for r in range(1, self.world_size)}
        self._await(keys, "backend")
        kinds = {self.store.get(key) for key in keys.values()} | {b"nccl" if nccl else b"gloo"}
        backend = "nccl" if kinds == {b"nccl"} else "gloo"
        self.store.set("backend", backend.encode())
        return backend

    # ---- the broadcast -----------------------------------------------------------------

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        try:
            self.pg.broadcast([tensor], options).wait()
        except RuntimeError as err:  # a member hung past the timeout or went away
            raise self._fail(f"broadcast failed ({err})") from None

    def _next(self) -> int:
        if self.spent:
            raise WeightSyncError(
                f"weight group rank {self.rank}: the group failed before; rebuild it"
            )
        n = self.publications
        self.publications += 1
        return n

    def send(self, tensors: dict[str, torch.Tensor], version: int) -> int:
        """Rank 0: broadcast ``tensors`` stamped with ``version``; returns the bytes sent.

        Raises:
            WeightSyncError: a receiver was not ready within the timeout, or the broadcast
                failed; the group is then spent.
        """
        layout = plan_buckets(tensors, self.bucket_bytes)
        self.announce(layout, version)
        sent = sum(self.send_bucket(pack(tensors, entries)) for _, entries in layout)
        self.finish()
        return sent

    def announce(self, layout: Layout, version: int) -> None:
        """Rank 0: start a publication of ``layout`` (``plan_buckets``) stamped with
        ``version``: wait until every receiver is ready, then broadcast the header. Each of
        the layout's buckets follows, in order, by ``send_bucket``; ``send`` does both.

        Raises:
            WeightSyncError: a receiver was not ready within the timeout, or the broadcast
                failed; the group is then spent.
        """
        if self.rank:
            raise WeightSyncError(f"weight group rank {self.rank}: only rank 0 sends")
        n = self._next()
        self._await({r: f"ready/{n}/{r}" for r in range(1, self.world_size)}, f"go/{n}")
        if layout != self.layout:
            if self.layout_id:  # every receiver is past the publication that read it
                self.store.delete_key(f"layout/{self.layout_id}")
            self.layout, self.layout_id = layout, self.layout_id + 1
            self.store.set(f"layout/{self.layout_id}", encode_layout(layout))
        self.store.set(f"go/{n}", b"go")
        if n:  # every receiver read the previous publication's keys
            for key in [f"go/{n - 1}", *(f"ready/{n - 1}/{r}" for r in range(1, self.world_size))]:
                self.store.delete_key(key)
        count = sum(len(entries) for _, entries in layout)
        header = [version, count, self.layout_id]
        self._broadcast(torch.tensor(header, dtype=torch.int64, device=self.device))
        self.sent_digest = 0

    def send_bucket(self, flat: torch.Tensor) -> int:
        """Rank 0: broadcast the announced layout's next bucket, its tensors flattened and
        concatenated in order (``pack``); returns its bytes.

        Raises:
            WeightSyncError: the broadcast failed; the group is then spent.
        """
        flat = flat.to(self.device)
        self.sent_digest = self.digest([flat], self.sent_digest)
        self._broadcast(flat)
        return flat.numel() * flat.element_size()

    def finish(self) -> None:
        """Rank 0: end the publication with the digest of its buckets' bytes, which each
        receiver checks what it received and loaded against.

        Raises:
            WeightSyncError: the broadcast failed; the group is then spent.
        """
        trailer = torch.tensor([self.sent_digest], dtype=torch.int64, device=self.device)
        self._broadcast(trailer)

    def digest(self, buffers: list[torch.Tensor], start: int = 0) -> int:
        """What a publication's bytes are checked by: ``device_digest`` where they lie on a GPU
        (NCCL), else the host's CRC-32 (``digest``)."""
        if self.device.type == "cuda":
            return device_digest(buffers, start)
        return digest(buffers, start)

    def receive(self) -> tuple[int, dict[str, torch.Tensor]]:
        """A receiver: the next publication's version and tensors (views of this member's
        buffers, on its device under NCCL, in host memory under gloo), checked against the
        digest the learner sent after them.

        Raises:
            WeightSyncError: the learner gave up or went quiet past the timeout, or the
                broadcast failed; the group is then spent.
            WeightMismatch: what arrived is not what was sent (the group stays usable).
        """
        if not self.rank:
            raise WeightSyncError("weight group rank 0 sends; it does not receive")
        n = self._next()
        self.store.set(f"ready/{n}/{self.rank}", b"")
        self._follow(f"go/{n}")
        header = torch.zeros(3, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        version, count, layout_id = header.tolist()
        if layout_id != self.layout_id:
            self.layout = decode_layout(self._get(f"layout/{layout_id}"))
            self.layout_id = layout_id
        assert self.layout is not None
        out: dict[str, torch.Tensor] = {}
        got = 0
        for dtype, entries in self.layout:
            sizes = [math.prod(shape) for _, shape in entries]
            flat = torch.empty(sum(sizes), dtype=_dtype(dtype), device=self.device)
            self._broadcast(flat)
            got = self.digest([flat], got)
            for (name, shape), part in zip(entries, flat.split(sizes)):
                out[name] = part.view(shape)
        trailer = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._broadcast(trailer)
        if len(out) != count:
            raise self._fail(f"publication {n} announced {count} tensors, its layout {len(out)}")
        sent = int(trailer.item())
        if got != sent:
            raise WeightMismatch(
                f"received weights have digest {got:08x}, the learner published {sent:08x}"
            )
        return version, out

    def close(self) -> None:
        """Leave the group (rank 0: stop serving its store)."""
        pg, self.pg, self.spent = getattr(self, "pg", None), None, True
        if pg is not None:
            pg.shutdown()
