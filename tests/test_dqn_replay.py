import os

import numpy as np
import pytest

from distrl.config import ReplayConfig
from distrl.dqn.replay import (
    PrioritizedReplay,
    SumTree,
    Transitions,
    UniformReplay,
    from_config,
)


def xs(*values):
    return {"x": np.asarray(values, dtype=np.int32)}


def stored_in_order(buf):
    """The stored ``x`` values from oldest to newest (ids ascending)."""
    n = len(buf)
    order = np.argsort(buf.store.ids[:n])
    return buf.store.columns["x"][:n][order].tolist()


def test_sum_tree_rounds_capacity_and_finds_intervals():
    tree = SumTree(5)
    assert tree.capacity == 8
    tree.update(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]))
    assert tree.total == 10.0
    assert tree.min() == 1.0
    found = tree.find(np.array([0.0, 0.999, 1.0, 2.9, 3.0, 5.9, 6.0, 9.99, 10.0]))
    assert found.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 3]


def test_sum_tree_never_finds_zero_priority_leaves():
    tree = SumTree(4)
    tree.update(np.arange(4), np.array([0.0, 1.0, 0.0, 1.0]))
    # 2.0 is the total: rounding at the edge must still land on a positive leaf.
    assert tree.find(np.array([0.0, 0.5, 1.0 - 1e-12, 1.0, 2.0])).tolist() == [1, 1, 1, 3, 3]


def test_sum_tree_parents_stay_exact_sums_after_vectorised_updates():
    rng = np.random.default_rng(0)
    tree = SumTree(100)
    for _ in range(20):
        idx = rng.integers(0, 100, 37)  # with duplicates
        tree.update(idx, rng.random(37))
    inner = np.arange(1, tree.capacity)
    assert np.array_equal(tree.tree[inner], tree.tree[2 * inner] + tree.tree[2 * inner + 1])
    rebuilt = SumTree(100)
    rebuilt.set_leaves(tree.leaves[:100].copy())
    assert np.array_equal(rebuilt.tree, tree.tree)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_sampling_frequencies_match_priorities(alpha):
    buf = PrioritizedReplay(10, alpha=alpha, eps=0.0, seed=0)
    raw = np.arange(1.0, 11.0)
    buf.add(xs(*range(10)), priorities=raw)
    expected = raw**alpha / (raw**alpha).sum()
    counts = np.zeros(10)
    for _ in range(200):
        _, ids, _ = buf.sample(1000)
        counts += np.bincount(ids, minlength=10)
    assert np.abs(counts / counts.sum() - expected).max() < 0.01


def test_is_weights_on_three_items():
    buf = PrioritizedReplay(3, alpha=1.0, beta_start=0.5, beta_end=0.5, eps=0.0, seed=1)
    buf.add(xs(10, 11, 12), priorities=np.array([1.0, 2.0, 4.0]))
    # P = (1, 2, 4) / 7; w = (3 P)^-0.5 / max_w, and max_w belongs to p = 1.
    expected = {i: (3 * p / 7) ** -0.5 / (3 / 7) ** -0.5 for i, p in enumerate([1, 2, 4])}
    assert expected[1] == pytest.approx(2**-0.5) and expected[2] == pytest.approx(0.5)
    batch, ids, weights = buf.sample(64)
    assert set(ids.tolist()) == {0, 1, 2}
    assert batch["x"].tolist() == (ids + 10).tolist()
    for i, w in zip(ids, weights):
        assert w == pytest.approx(expected[int(i)], rel=1e-6)


def test_beta_anneals_with_step():
    buf = PrioritizedReplay(3, alpha=1.0, beta_start=0.4, beta_end=1.0, beta_anneal_steps=10)
    assert [buf.beta(s) for s in (0, 5, 10, 20)] == pytest.approx([0.4, 0.7, 1.0, 1.0])
    buf.add(xs(0, 1, 2), priorities=np.array([1.0, 2.0, 4.0]))
    _, ids, weights = buf.sample(32, step=10)
    assert weights == pytest.approx(1.0 / np.array([1.0, 2.0, 4.0])[ids])


def test_new_items_get_max_priority_and_stale_updates_are_ignored():
    buf = PrioritizedReplay(4, alpha=1.0, eps=0.0, seed=0)
    buf.add(xs(0, 1, 2, 3))
    assert buf.tree.leaves[:4].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert buf.update_priorities(np.array([2, 3]), np.array([-9.0, 0.5])) == 2
    assert buf.max_priority == 9.0
    buf.add(xs(4, 5))  # ids 4, 5 overwrite slots 0, 1 (ids 0, 1) at the max priority
    assert buf.tree.leaves[:4].tolist() == [9.0, 9.0, 9.0, 0.5]
    applied = buf.update_priorities(np.array([0, 1, 4, 3]), np.array([7.0, 7.0, 2.0, 3.0]))
    assert applied == 2
    assert buf.tree.leaves[:4].tolist() == [2.0, 9.0, 9.0, 3.0]
    assert buf.stats()["replay/stale_updates"] == 2.0
    assert buf.tree.total == 23.0
    with pytest.raises(ValueError, match="priorities"):
        buf.add(xs(6, 7), priorities=np.ones(3))
    assert len(buf) == 4 and buf.store.count == 6


def test_uniform_overflow_keeps_newest_in_order():
    buf = UniformReplay(5, seed=0)
    buf.add(xs(0, 1, 2))
    buf.add(xs(3, 4, 5, 6))
    assert len(buf) == 5
    assert stored_in_order(buf) == [2, 3, 4, 5, 6]
    ids = buf.add(xs(*range(7, 19)))  # larger than the buffer: its tail survives
    assert ids.tolist() == list(range(14, 19))
    assert stored_in_order(buf) == [14, 15, 16, 17, 18]
    batch, ids, weights = buf.sample(50)
    assert set(batch["x"].tolist()) <= {14, 15, 16, 17, 18}
    assert batch["x"].tolist() == ids.tolist() and weights.tolist() == [1.0] * 50


def test_transitions_reject_mismatched_batches():
    store = Transitions(4)
    store.add({"obs": np.zeros((2, 3), np.int32), "reward": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="obs"):
        store.add({"obs": np.zeros((2, 4), np.int32), "reward": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="reward"):
        store.add({"obs": np.zeros((2, 3), np.int32), "reward": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="fields"):
        store.add({"obs": np.zeros((2, 3), np.int32)})
    with pytest.raises(ValueError, match="one length"):
        store.add({"obs": np.zeros((2, 3), np.int32), "reward": np.zeros(3, np.float32)})
    assert store.count == 2
    with pytest.raises(ValueError, match="empty"):
        UniformReplay(3).sample(1)


def token_batch(rng, n, width=8):
    return {
        "obs": rng.integers(0, 1000, (n, width), dtype=np.int32),
        "obs_len": rng.integers(1, width, n, dtype=np.int32),
        "action": rng.integers(0, 1000, n),
        "reward": rng.random(n, dtype=np.float32),
        "next_obs": rng.integers(0, 1000, (n, width), dtype=np.int32),
        "done": rng.random(n) < 0.3,
        "discount": np.full(n, 0.99, np.float32),
        "extra": rng.random((n, 2, 3)).astype(np.float16),
        "candidates": np.zeros((n, 0), np.int32),  # dqn.action_top_k 0: every token allowed
    }


def filled(kind, seed=3):
    rng = np.random.default_rng(seed)
    buf = PrioritizedReplay(16, seed=seed) if kind == "prioritized" else UniformReplay(16, seed)
    for n in (5, 7, 9, 6):  # wraps around
        buf.add(token_batch(rng, n), priorities=rng.random(n) if n == 7 else None)
        _, ids, _ = buf.sample(4)
        buf.update_priorities(ids, rng.standard_normal(4))
    return buf, rng


def assert_same_future(a, b, rng_seed=9):
    for step in range(3):
        for x, y in zip(a.sample(6, step=step * 100), b.sample(6, step=step * 100)):
            if isinstance(x, dict):
                assert x.keys() == y.keys()
                for k in x:
                    assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k
            else:
                assert x.dtype == y.dtype and np.array_equal(x, y)
    rng = np.random.default_rng(rng_seed)
    batch = token_batch(rng, 5)
    assert np.array_equal(a.add(batch), b.add(batch))
    _, ids, _ = a.sample(4)
    b.sample(4)
    a.update_priorities(ids, np.arange(4.0))
    b.update_priorities(ids, np.arange(4.0))
    assert a.stats() == b.stats()
    if isinstance(a, PrioritizedReplay):
        assert np.array_equal(a.tree.tree, b.tree.tree)


@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_state_dict_round_trip_is_exact(kind):
    buf, _ = filled(kind)
    clone = PrioritizedReplay(16, seed=99) if kind == "prioritized" else UniformReplay(16, 99)
    clone.load_state_dict(buf.state_dict())
    assert_same_future(buf, clone)


@pytest.mark.parametrize("kind", ["uniform", "prioritized"])
def test_parquet_snapshot_round_trip_is_exact(kind, tmp_path):
    buf, _ = filled(kind)
    path = tmp_path / "replay.parquet"
    buf.save_parquet(path)
    buf.save_parquet(path)  # overwriting an existing snapshot is atomic too
    assert os.listdir(tmp_path) == ["replay.parquet"]
    clone = PrioritizedReplay(16, seed=99) if kind == "prioritized" else UniformReplay(16, 99)
    clone.load_parquet(path)
    assert_same_future(buf, clone)


def test_snapshot_of_an_empty_buffer_and_mismatched_restore(tmp_path):
    path = tmp_path / "empty.parquet"
    PrioritizedReplay(8).save_parquet(path)
    restored = PrioritizedReplay(8)
    restored.load_parquet(path)
    assert len(restored) == 0
    with pytest.raises(ValueError, match="snapshot is prioritized/8"):
        PrioritizedReplay(4).load_parquet(path)
    with pytest.raises(ValueError, match="snapshot is prioritized/8"):
        UniformReplay(8).load_parquet(path)


def test_from_config_and_stats():
    uniform = from_config(ReplayConfig(capacity=8, prioritized=False), seed=1)
    assert type(uniform) is UniformReplay and uniform.store.capacity == 8
    per = from_config(ReplayConfig(capacity=8, alpha=0.5, beta_start=0.3), seed=1)
    assert isinstance(per, PrioritizedReplay) and (per.alpha, per.beta(0)) == (0.5, 0.3)
    per.add(xs(1, 2, 3), priorities=np.array([3.0, 0.0, 1.0]))
    stats = per.stats()
    assert stats["replay/size"] == 3.0
    assert stats["replay/priority_max"] == pytest.approx((3.0 + 1e-6) ** 0.5)
    assert {"replay/priority_mean", "replay/beta", "replay/added"} <= stats.keys()
