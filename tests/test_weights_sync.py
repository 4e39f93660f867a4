"""Weights by torch.distributed broadcast: a gloo group of a learner and receivers (threads of
this test, no Ray), then tiny runs on Ray with ``rollout.weight_sync: broadcast``."""

import copy
import dataclasses
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import ray
import torch
from test_reliability import run_with_kill  # the same fault injection
from test_reliability import tiny as quiet_tiny
from torch import nn

from distrl.data.prompts import prepare
from distrl.errors import DistrlError
from distrl.loop.trainer import Trainer
from distrl.models.loading import tiny_model
from distrl.runtime import actors
from distrl.runtime.roles import LearnerRole, WorkerRole
from distrl.weights import sync
from distrl.weights.sync import WeightGroup, WeightSyncError, host_store, plan_buckets
from distrl.weights.tensors import (
    VersionedWeights,
    WeightMismatch,
    device_digest,
    digest,
    publish_weights,
    published_names,
    set_weights,
)

TIMEOUT_S = 3.0


def model(seed: int) -> nn.Module:
    """A tied bfloat16 tiny Llama beside a float32 head: two dtypes, one tied pair."""
    policy = tiny_model("tiny-llama", vocab_size=97, seed=seed, dtype=torch.bfloat16,
                        tie_word_embeddings=True)  # fmt: skip
    head = nn.Linear(64, 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(head.weight)
    return nn.ModuleDict({"policy": policy, "head": head})


class Publisher(LearnerRole):
    """The learner's half of the roles around a plain module."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.version = module, 0

    def published_module(self) -> nn.Module:
        return self.module


class Receiver(WorkerRole):
    """A rollout worker's half of the roles around a plain module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def trainable(self) -> nn.Module:
        return self.module


class Recorder(WorkerRole):
    """A receiver with no network of the learner's kind (as an inference engine): it learns the
    names from the broadcast and keeps copies of what arrives."""

    def __init__(self) -> None:
        self.received: dict[str, torch.Tensor] = {}

    def weight_device(self) -> torch.device:
        return torch.device("cpu")

    def apply_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.received = {name: t.clone() for name, t in tensors.items()}


def in_threads(*calls: Callable[[], Any], limit_s: float = 60) -> list[Any]:
    """Run ``calls`` at once; each one's result or exception. Fails if any is still running
    after ``limit_s`` (a hang)."""
    out: list[Any] = [None] * len(calls)

    def run(k: int) -> None:
        try:
            out[k] = calls[k]()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out[k] = err

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(calls))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + limit_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a member hung"
    return out


def form(learner: Publisher, workers: list[WorkerRole]) -> None:
    address = learner.weight_group_address("127.0.0.1")
    world = len(workers) + 1
    joins = [
        lambda r=r, w=w: w.join_weight_group(address, r, world, timeout_s=TIMEOUT_S)
        for r, w in enumerate(workers, start=1)
    ]
    results = in_threads(lambda: learner.join_weight_group(world, timeout_s=TIMEOUT_S), *joins)
    assert results == ["gloo"] * world, results


def publish(learner: Publisher, workers: list[WorkerRole]) -> list[Any]:
    return in_threads(learner.broadcast_weights, *(w.receive_weights for w in workers))


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def test_a_group_of_a_learner_and_two_receivers_delivers_each_version_exactly():
    learner = Publisher(model(seed=0))
    receiver, recorder = Receiver(model(seed=1)), Recorder()
    assert not same_state(learner.module, receiver.module)
    form(learner, [receiver, recorder])
    learner.weight_group.bucket_bytes = 4096  # several buckets per dtype

    learner.version = 3
    assert publish(learner, [receiver, recorder]) == [3, 3, 3]
    assert same_state(learner.module, receiver.module)
    assert receiver.version == recorder.version == 3
    # The tie survives: the LM head is still the embedding.
    policy = receiver.module["policy"]
    assert policy.lm_head.weight.data_ptr() == policy.model.embed_tokens.weight.data_ptr()
    # The recorder knew no name in advance: it got the learner's names, dtypes and values.
    names = published_names(learner.module)
    assert list(recorder.received) != [] and sorted(recorder.received) == sorted(names)
    state = learner.module.state_dict()
    assert {recorder.received[n].dtype for n in names} == {torch.bfloat16, torch.float32}
    assert all(torch.equal(recorder.received[n], state[n]) for n in names)
    bytes_sent = sum(state[n].numel() * state[n].element_size() for n in names)
    assert learner.published_bytes == bytes_sent

    with torch.no_grad():  # a later version replaces the earlier one
        for p in learner.module.parameters():
            p.add_(0.5)
    learner.version = 4
    assert publish(learner, [receiver, recorder]) == [4, 4, 4]
    assert same_state(learner.module, receiver.module)
    assert all(torch.equal(recorder.received[n], learner.module.state_dict()[n]) for n in names)
    learner.leave_weight_group()


def test_buckets_keep_each_dtype_apart_and_split_at_the_size_limit():
    tensors = {
        "a": torch.zeros(4),  # 16 bytes
        "b": torch.zeros(2, dtype=torch.bfloat16),
        "c": torch.zeros(2, 2),
        "d": torch.zeros(10),  # alone: larger than the limit
    }
    assert plan_buckets(tensors, bucket_bytes=32) == [
        ("float32", [("a", (4,)), ("c", (2, 2))]),
        ("float32", [("d", (10,))]),
        ("bfloat16", [("b", (2,))]),
    ]


def test_a_member_that_never_joins_makes_the_others_raise_within_the_timeout():
    store, port = host_store("127.0.0.1", TIMEOUT_S)
    start = time.monotonic()
    learner, joined = in_threads(
        lambda: WeightGroup(store, 0, 3, timeout_s=TIMEOUT_S),
        lambda: WeightGroup.join("127.0.0.1", port, 1, 3, timeout_s=TIMEOUT_S),
    )
    assert time.monotonic() - start < TIMEOUT_S + 10
    assert isinstance(learner, WeightSyncError) and "rank(s) [2] of 3" in str(learner)
    assert isinstance(joined, WeightSyncError) and "rank(s) [2] of 3" in str(joined)


def test_a_member_that_stops_receiving_makes_the_broadcast_raise_and_spends_the_group():
    learner, ready, idle = Publisher(model(seed=0)), Receiver(model(seed=1)), Recorder()
    form(learner, [ready, idle])
    start = time.monotonic()
    sent, received = in_threads(learner.broadcast_weights, ready.receive_weights)  # idle: not
    assert time.monotonic() - start < TIMEOUT_S + 10
    assert isinstance(sent, WeightSyncError) and "rank(s) [2] of 3" in str(sent)
    assert isinstance(received, WeightSyncError) and "the learner gave up" in str(received)
    with pytest.raises(WeightSyncError, match="rebuild it"):
        learner.broadcast_weights()


def test_the_layout_travels_as_json_and_anything_else_is_refused_unread(tmp_path):
    from test_models_loading import RunsCode

    layout = plan_buckets(model(seed=0).state_dict(), 4096)
    assert sync.decode_layout(sync.encode_layout(layout)) == layout
    marker = tmp_path / "code-ran"
    forged = [
        pickle.dumps(RunsCode(marker)),
        b'[["float32", [["w", [2, -1]]]]]',
        b'[["__class__", [["w", [2]]]]]',
        b'{"a": 1}',
    ]
    for data in forged:
        with pytest.raises(WeightSyncError, match="not a layout|unknown dtype"):
            sync.decode_layout(data)
    assert not marker.exists()


def test_a_forged_layout_in_the_store_stops_the_receiver_without_running_it(tmp_path, monkeypatch):
    """What reaches a receiver through the store is the bytes at ``layout/N``; here they are
    a pickle that would run code (as anyone reaching the store could write them)."""
    from test_models_loading import RunsCode

    learner, receiver = Publisher(model(seed=0)), Receiver(model(seed=1))
    form(learner, [receiver])
    marker = tmp_path / "code-ran"
    monkeypatch.setattr(sync, "encode_layout", lambda layout: pickle.dumps(RunsCode(marker)))
    sent, received = publish(learner, [receiver])
    assert isinstance(received, WeightSyncError) and "not a layout" in str(received)
    assert isinstance(sent, WeightSyncError)  # the receiver left: the broadcast fails, bounded
    assert not marker.exists()


def test_a_worker_outside_any_group_and_a_learner_without_one_say_so():
    with pytest.raises(WeightSyncError, match="in no weight group"):
        Recorder().receive_weights()
    with pytest.raises(WeightSyncError, match="in no weight group"):
        Publisher(model(seed=0)).broadcast_weights()


def flip_first_byte(tensor: torch.Tensor | np.ndarray) -> None:
    """One bit of ``tensor``'s first byte flipped in place (a fault on the way)."""
    raw = tensor.reshape(-1).view(torch.uint8 if isinstance(tensor, torch.Tensor) else np.uint8)
    raw[0] ^= 1


def test_a_bit_flipped_in_a_broadcast_is_detected_and_the_next_publication_loads(monkeypatch):
    learner, receiver, recorder = Publisher(model(seed=0)), Receiver(model(seed=1)), Recorder()
    form(learner, [receiver, recorder])
    learner.weight_group.bucket_bytes = 4096
    group, calls = receiver.weight_group, []
    broadcast = group._broadcast

    def flipping(tensor: torch.Tensor) -> None:  # the receiver's copy of the third bucket
        broadcast(tensor)
        calls.append(tensor)
        if len(calls) == 4:  # after the header
            flip_first_byte(tensor)

    monkeypatch.setattr(group, "_broadcast", flipping)
    learner.version = 3
    sent, received, recorded = publish(learner, [receiver, recorder])
    assert sent == recorded == 3  # the others took it intact
    assert isinstance(received, WeightMismatch), received
    assert "received weights have digest" in str(received)
    # Checked before loading: the receiver still holds its own weights, whole, and says so.
    assert receiver.version == 0 and not same_state(learner.module, receiver.module)
    monkeypatch.setattr(group, "_broadcast", broadcast)
    learner.version = 4
    assert publish(learner, [receiver, recorder]) == [4, 4, 4]
    assert same_state(learner.module, receiver.module)


class LoadsElsewhere(Receiver):
    """A worker whose loading misses the network it generates with (a copy takes the weights)."""

    def apply_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        set_weights(copy.deepcopy(self.module), tensors)


def test_a_worker_checks_what_it_received_and_what_it_holds_after_loading():
    source = model(seed=0)
    weights = publish_weights(source, version=5)
    assert weights.digest == digest(weights.state.values())
    state = {name: array.copy() for name, array in weights.state.items()}
    flip_first_byte(state[next(iter(state))])
    corrupted = dataclasses.replace(weights, state=state)
    receiver = Receiver(model(seed=1))
    before = copy.deepcopy(receiver.module)
    with pytest.raises(WeightMismatch, match="received weights have digest"):
        receiver.set_weights(corrupted)
    assert receiver.version == 0 and same_state(before, receiver.module)  # nothing loaded
    assert receiver.set_weights(weights) == 5 and same_state(source, receiver.module)
    elsewhere = LoadsElsewhere(model(seed=1))
    with pytest.raises(WeightMismatch, match="does not hold the weights it was sent"):
        elsewhere.set_weights(weights)
    assert elsewhere.version == -1  # no version: a batch it made would never pass as one
    # Unstamped weights (no digest) load unchecked, as before.
    assert LoadsElsewhere(model(seed=1)).set_weights(dataclasses.replace(weights, digest=None)) == 5


def test_the_device_digest_sees_a_flipped_bit_and_a_moved_word():
    a = torch.randn(1001)  # 4004 bytes: whole words, and a bfloat16 view with a 2-byte tail
    b = a.clone()
    assert device_digest([a]) == device_digest([b]) == device_digest([b.view(torch.int32)])
    flip_first_byte(b)
    assert device_digest([b]) != device_digest([a])
    swapped = a.clone()
    swapped[[3, 700]] = a[[700, 3]]
    assert device_digest([swapped]) != device_digest([a])
    odd = torch.randn(3).to(torch.bfloat16)  # 6 bytes: one word and a tail
    flipped = odd.clone()
    flipped.view(torch.uint8)[5] ^= 1
    assert device_digest([flipped]) != device_digest([odd])
    assert device_digest([a, odd]) != device_digest([odd, a])  # order counts


@ray.remote
class DamagedOnArrival(Receiver):
    """A rollout worker whose first ``faults`` deliveries each arrive with one bit flipped:
    through the object store, its copy of the weights; by broadcast, its copy of a bucket."""

    def __init__(self, faults: int) -> None:
        super().__init__(model(seed=1))
        self.faults = faults

    def set_weights(self, weights: VersionedWeights) -> int:
        if self.faults:
            self.faults -= 1
            state = {name: array.copy() for name, array in weights.state.items()}
            flip_first_byte(state[next(iter(state))])
            weights = dataclasses.replace(weights, state=state)
        return super().set_weights(weights)

    def join_weight_group(self, *args: Any, **kwargs: Any) -> str:
        backend = super().join_weight_group(*args, **kwargs)
        group = self.weight_group
        broadcast = group._broadcast

        def flipping(tensor: torch.Tensor) -> None:
            broadcast(tensor)
            if self.faults and tensor.numel() > 3:  # a bucket, not the header or the trailer
                self.faults -= 1
                flip_first_byte(tensor)

        group._broadcast = flipping
        return backend

    def holds(self, reference: VersionedWeights) -> bool:
        return same_state(self.module, load_into(model(seed=2), reference))


@ray.remote
class ObjectStoreLearner(Publisher):
    """The learner's half through the object store, at version 1 (workers start at 0)."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.version = module, 1

    def weights(self) -> VersionedWeights:
        return publish_weights(self.module, self.version)


def load_into(module: nn.Module, weights: VersionedWeights) -> nn.Module:
    set_weights(module, weights.tensors())
    return module


@pytest.fixture
def test_actors(ray_session):
    """A list the test puts the actors it makes in; they are killed after it. This module is not
    importable by Ray's workers, so its classes travel by value meanwhile."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    made: list[Any] = []
    yield made
    for actor in made:
        ray.kill(actor)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def publisher_of(learner: Any, workers: list[Any], counted: list[str], *, broadcasts: bool):
    """The run's ``Publisher`` over this test's started actors; faults land in ``counted``, and
    replacing a worker fails the test."""
    from distrl.config import FaultsConfig
    from distrl.runtime.crew import Crew
    from distrl.weights.publish import Publisher as WeightPublisher

    ray.get([actor.__ray_ready__.remote() for actor in [learner, *workers]])
    crew = Crew(
        learner=lambda: learner,
        workers=lambda: workers,
        wait=lambda role, ref: ray.get(ref),
        renew_worker=lambda i: pytest.fail("no worker is replaced"),
        dead_role=lambda: None,
        count_fault=counted.append,
    )
    return WeightPublisher(crew, FaultsConfig(), broadcasts=broadcasts)


@pytest.mark.slow  # actors on Ray
@pytest.mark.parametrize("posted", [False, True], ids=["waited-for", "posted"])
def test_a_corrupted_delivery_is_sent_again_and_counted_and_a_second_one_stops_the_run(
    test_actors, capfd, posted
):
    """Waited for (sync mode), or posted behind a worker's batches and checked once loaded
    (async mode, where nothing is waited for): the damaged copy is counted and sent again."""
    source = model(seed=0)
    learner = ObjectStoreLearner.remote(source)
    workers = [DamagedOnArrival.remote(0), DamagedOnArrival.remote(1)]
    test_actors += [learner, *workers]
    counted: list[str] = []
    publisher = publisher_of(learner, workers, counted, broadcasts=False)
    if posted:
        version, refs = publisher.post()
        assert version == 1 and len(refs) == 2 and counted == []  # nothing waited for
        ray.wait(refs, num_returns=2)
        for i, ref in enumerate(refs):
            publisher.checked(i, ref)
    else:
        assert publisher.publish() == (1, [])
    assert counted == ["faults/weight_mismatch"]
    assert "rollout worker 1: received weights have digest" in capfd.readouterr().err
    reference = publish_weights(source, 1)
    assert ray.get([w.holds.remote(reference) for w in workers]) == [True, True]
    workers[1] = DamagedOnArrival.remote(2)  # every delivery damaged: twice in a row
    test_actors.append(workers[1])
    with pytest.raises(DistrlError, match="rollout worker 1: .* on two deliveries in a row"):
        if posted:
            publisher.checked(1, publisher.post()[1][1])
        else:
            publisher.publish()


@pytest.mark.slow  # actors on Ray
def test_a_bit_flipped_in_a_broadcast_run_is_counted_said_and_the_group_sends_again(
    test_actors, capfd
):
    source = model(seed=0)
    learner = ObjectStoreLearner.remote(source)
    workers = [DamagedOnArrival.remote(0), DamagedOnArrival.remote(1)]
    test_actors += [learner, *workers]
    counted: list[str] = []
    publisher = publisher_of(learner, workers, counted, broadcasts=True)
    assert publisher.publish() == (1, [])
    assert counted == ["faults/weight_mismatch", "faults/weight_group_rebuilds"]
    err = capfd.readouterr().err
    assert "the weight broadcast failed (rollout worker 1: received weights have" in err
    assert "forming the group again" in err
    reference = publish_weights(source, 1)
    assert ray.get([w.holds.remote(reference) for w in workers]) == [True, True]


# ---- tiny runs on Ray ----------------------------------------------------------------------


def tiny(tmp_path, **overrides):
    """test_reliability's quiet tiny run, publishing by broadcast."""
    broadcast = {"rollout.weight_sync": "broadcast", "faults.generate_timeout_s": 30}
    return quiet_tiny(tmp_path, **{**broadcast, **overrides})


def weights_held(trainer: Trainer) -> tuple[dict[str, torch.Tensor], list[tuple[int, dict]]]:
    """The learner's published tensors, and each worker's version and tensors of those names."""

    def published(learner: LearnerRole) -> dict[str, torch.Tensor]:  # by value: runs in actors
        module = learner.published_module()
        state = module.state_dict()
        return {n: state[n].detach().cpu().clone() for n in published_names(module)}

    def held(worker: WorkerRole) -> tuple[int, dict[str, torch.Tensor]]:
        module = worker.trainable()
        state = module.state_dict()
        return worker.version, {n: state[n].detach().cpu().clone() for n in published_names(module)}

    learner_state = actors.get(trainer.learner.__ray_call__.remote(published), timeout=60)
    return learner_state, actors.get(
        [w.__ray_call__.remote(held) for w in trainer.workers], timeout=120
    )


def assert_workers_hold_the_learners_weights(trainer: Trainer) -> int:
    """Every worker holds the learner's published tensors at the trainer's version; returns
    their bytes."""
    learner_state, held = weights_held(trainer)
    for version, state in held:
        assert version == trainer.version
        assert state.keys() == learner_state.keys()
        assert all(torch.equal(state[n], learner_state[n]) for n in state)
    return sum(t.numel() * t.element_size() for t in learner_state.values())


@pytest.mark.slow  # a tiny run on Ray
@pytest.mark.parametrize("algo", ["ppo", "dqn"])
def test_a_broadcast_run_leaves_every_worker_with_the_learners_weights(ray_session, tmp_path, algo):
    dqn = {"dqn.learning_starts": 8, "dqn.batch_size": 8, "dqn.action_top_k": 8}
    config = tiny(tmp_path, algo=algo, iterations=2, **(dqn if algo == "dqn" else {}))
    trainer = Trainer(config, tmp_path / "run", *prepare(config))
    try:
        trainer.start()
        assert trainer.publisher.groups_formed == 1
        assert_workers_hold_the_learners_weights(trainer)
        versions = []
        for _ in range(config.iterations):
            metrics = trainer.iterate()
            versions.append(trainer.version)
            nbytes = assert_workers_hold_the_learners_weights(trainer)
            assert metrics["time/publish_s"] > 0 and metrics["publish/bytes"] == nbytes
        assert versions == [1, 2]  # one version per iteration, as through the object store
        assert trainer.publisher.groups_formed == 1
        assert trainer.faults["faults/weight_group_rebuilds"] == 0
    finally:
        trainer.shutdown()


@pytest.mark.slow  # a tiny run on Ray
def test_a_sigkilled_worker_rejoins_a_rebuilt_group_and_the_run_finishes(ray_session, tmp_path):
    config = tiny(tmp_path, iterations=4)
    check = assert_workers_hold_the_learners_weights
    records = run_with_kill(config, tmp_path / "run", lambda t: t.workers[:1], inspect=check)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[0]["faults/weight_group_rebuilds"] == 0
    assert records[-1]["faults/weight_group_rebuilds"] >= 1
    # The restart was seen before the broadcast: no publish waited out a member.
    assert max(r["time/publish_s"] for r in records) < config.faults.generate_timeout_s


@pytest.mark.slow  # waits out a timeout
def test_a_sigstopped_worker_is_replaced_and_the_group_rebuilt(ray_session, tmp_path):
    config = tiny(tmp_path, iterations=3, **{"faults.generate_timeout_s": 8})
    check = assert_workers_hold_the_learners_weights
    records = run_with_kill(
        config, tmp_path / "run", lambda t: t.workers[1:], sig=signal.SIGSTOP, inspect=check
    )
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["faults/rollout_timeouts"] >= 1
    assert records[-1]["faults/weight_group_rebuilds"] >= 1
