"""The sharded learner: two gloo ranks on the CPU take the step one learner takes.

Each case builds the same learner in every rank (same seed, same batch), forms a group of two,
shards it with FSDP2 and trains once; rank 0 gathers the whole updated state, which must equal
what one unsharded learner computes from the same batch.
"""

import dataclasses
import pickle
import threading

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.dqn.learner import QNET_FILE, QLearner
from distrl.dqn.rollout import QRolloutWorker, make_transitions
from distrl.loop.driver import train
from distrl.models.lora import ADAPTER_WEIGHTS
from distrl.models.policy import encode_prompts
from distrl.outputs.metrics import read_metrics
from distrl.pg.learner import Learner
from distrl.pg.rollout import RolloutWorker
from distrl.runtime.checkpoint import OPTIMIZER_FILE, SHARDS_DIR
from distrl.runtime.shards import Shards, split_by_tokens
from distrl.weights.sync import WeightGroup

# The ranks sum float32 gradients in another order. AdamW moves a weight by about lr times the
# sign of its gradient, so where a gradient is round-off on both sides its step may flip: all
# but one weight in 10^4 agree within 1e-6, and none differs by more than 2 lr per optimizer
# step. A wrong normalisation (a rank's mean where the global one belongs) moves most weights.
WEIGHT_TOLERANCE = 1e-6
FLIPPED_SHARE = 1e-4
LR = 1e-3
STEPS = 8  # at most: 4 minibatches, 2 epochs

CASES = {
    "grpo/token_mean": {"algo": "grpo", "ppo.loss_agg": "token_mean"},
    "grpo/seq_mean_token_mean": {"algo": "grpo", "ppo.loss_agg": "seq_mean_token_mean"},
    "grpo/seq_mean_token_sum": {"algo": "grpo", "ppo.loss_agg": "seq_mean_token_sum"},
    "dr_grpo/seq_mean_token_sum_norm": {"algo": "dr_grpo"},
    "ppo/critic, 2 epochs": {"algo": "ppo", "ppo.epochs": 2},
    "reinforce_pp/whitened, KL loss": {"algo": "reinforce_pp", "ppo.kl_loss_coef": 0.1},
    "grpo/packed": {"algo": "grpo", "learner.packing": True},
    "grpo/gradient checkpointing": {"algo": "grpo", "model.gradient_checkpointing": True},
    # Parts of at most 30 tokens: the ranks' shares split into different numbers of parts.
    "ppo/packed micro-batches": {"learner.packing": True, "learner.max_tokens_per_micro_batch": 30},
    # FSDP gathers float32 masters as bfloat16; each rank's bfloat16 gradients of its rows are
    # summed in float32, one learner's are of all rows: they agree to bfloat16 round-off.
    "ppo/bfloat16": {"algo": "ppo", "model.dtype": "bfloat16"},
    # LoRA: float32 adapters and value head trained over a frozen base, sharded in its dtype.
    "grpo/lora": {"algo": "grpo", "learner.lora.rank": 4},
    "ppo/lora, bfloat16": {"algo": "ppo", "learner.lora.rank": 4, "model.dtype": "bfloat16"},
}
BF16_METRIC_TOLERANCE = 1e-3
# The tests on the module's two gloo processes (every case trained in each, about a minute on 2
# cores) are left out of the quick loop.
GLOO_PAIR = pytest.mark.slow


def case_config(over: dict):
    return load_config(
        "tiny",
        {
            "learner.lr": LR,
            "learner.warmup_steps": 0,
            "rollout.samples_per_prompt": 2,
            "ppo.minibatch_size": 5,  # minibatches of 5, 5, 5 and 1 row: one rank runs none
            **over,
        },
    )


DQN_CASES = {
    "dqn": {},
    "dqn/bfloat16": {"model.dtype": "bfloat16"},
    # The target's adapters swapped into the online network's shards for its forward.
    "dqn/lora": {"learner.lora.rank": 4},
}


def dqn_config(over: dict):
    return load_config(
        "tiny",
        {
            "algo": "dqn",
            "learner.lr": LR,
            "learner.warmup_steps": 0,
            "dqn.q_network": "lm_head",
            "dqn.action_top_k": 4,
            "dqn.batch_size": 16,
            "dqn.tau": 0.5,  # a Polyak step after the update, on the target's shards
            "rollout.max_new_tokens": 4,
            **over,
        },
    )


def dqn_updates(over: dict) -> int:
    """Two TD updates, the second with a target that differs from the online network; one in
    bfloat16, whose round-off two steps compound past the metrics' tolerance."""
    return 1 if over.get("model.dtype") == "bfloat16" else 2


def dqn_update(over: dict, path, join=None):
    sample = pickle.loads(path.read_bytes())
    torch.manual_seed(0)
    learner = QLearner(**QLearner.arguments(dqn_config(over)))
    if join:
        join(learner)
    for _ in range(dqn_updates(over)):
        result = learner.update(sample)
    return learner, result


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """16 rows (8 prompts, 2 samples each) with scores and group ids, in a file the ranks read."""
    config = case_config({})
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    examples = load_examples("default", limit=8)
    prompts = encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)
    rows = [p for p in prompts for _ in range(2)]
    trajectories = worker.generate(rows, list(range(len(rows))))
    # Responses of 1 to 8 tokens (as if each ended at an EOS): a rank's share of the tokens
    # then differs from its share of the sequences, which the loss aggregations weigh apart.
    lengths = 1 + np.arange(len(rows)) % trajectories.response_mask.shape[1]
    keep = np.arange(trajectories.response_mask.shape[1])[None, :] < lengths[:, None]
    trajectories = dataclasses.replace(
        trajectories,
        response_mask=trajectories.response_mask * keep,
        logprobs=trajectories.logprobs * keep,
    )
    scores = np.random.default_rng(0).normal(size=len(rows))
    groups = np.repeat(np.arange(len(prompts)), 2)
    path = tmp_path_factory.mktemp("shards") / "batch.pkl"
    path.write_bytes(pickle.dumps((trajectories, scores, groups)))
    # A replay sample of DQN transitions with unequal importance weights, beside it.
    config = dqn_config({})
    worker = QRolloutWorker(**QRolloutWorker.arguments(config))
    out = worker.generate(prompts, list(range(len(prompts))))
    cols, _ = make_transitions(
        out, np.linspace(0.0, 1.0, len(prompts)), gamma=0.99, n_step=2, width=worker.width
    )
    n = len(cols["reward"])
    weights = np.random.default_rng(1).uniform(0.2, 1.0, n).astype(np.float32)
    path.with_name("dqn.pkl").write_bytes(pickle.dumps((cols, np.arange(n), weights)))
    return path


def train_one(over: dict, path, join=None) -> tuple[Learner, dict]:
    trajectories, scores, groups = pickle.loads(path.read_bytes())
    torch.manual_seed(0)
    learner = Learner(**Learner.arguments(case_config(over)))
    if join:
        join(learner)
    return learner, learner.train(trajectories, scores, groups=groups)


# Resumed across learner counts: one step, a checkpoint, one more step.
RESUME = {"algo": "ppo", "ppo.epochs": 2}
LORA_RESUME = {**RESUME, "learner.lora.rank": 4}
BF16_RESUME = {**RESUME, "model.dtype": "bfloat16"}


def rank_main(rank: int, world: int, path, out, queue) -> None:
    """One rank: every case in turn, each on a group of its own; then the resume cases."""

    def join(learner):
        if rank == 0:
            address = learner.learner_group_address("127.0.0.1")
            for _ in range(world - 1):
                queue.put(address)
        else:
            address = queue.get(timeout=60)
        learner.join_learner_group(address, rank, world, timeout_s=60)

    for name, over in CASES.items():
        learner, metrics = train_one(over, path, join)
        state = learner.shards.full_state(learner.net)
        memory = learner.state_memory()
        if rank == 0:
            saved = {"state": state, "metrics": metrics, "memory": memory}
            torch.save(saved, out / f"{name.replace('/', '_')}.pt")
        learner.shards.close()
    for name, over in DQN_CASES.items():
        learner, (_, td, metrics) = dqn_update(over, path.with_name("dqn.pkl"), join)
        state = learner.shards.full_state(learner.qnet)
        target = dict(learner.shards.full_tensors(learner.target_float))
        memory = learner.state_memory()
        if rank == 0:
            saved = {"state": state, "target": target, "td": td, "metrics": metrics}
            torch.save({**saved, "memory": memory}, out / f"{name.replace('/', '_')}.pt")
        learner.shards.close()
    # 2 -> 1: one step by two ranks, saved; the parent resumes it alone.
    learner, _ = train_one(RESUME, path, join)
    learner.save(str(out / "two_saved"), {"step": 1})
    learner.shards.close()
    # 2 -> 2 in bfloat16: the shards of the optimizer state and float32 masters each rank
    # wrote resume the step the uninterrupted group takes.
    trajectories, scores, _ = pickle.loads(path.read_bytes())
    learner, _ = train_one(BF16_RESUME, path, join)
    learner.save(str(out / "two_saved_bf16"), {"step": 1})
    saved = learner.shards.full_state(learner.net)
    learner.train(trajectories, scores)
    uninterrupted = learner.shards.full_state(learner.net)
    learner.shards.close()
    learner = Learner(**Learner.arguments(case_config(BF16_RESUME)))
    join(learner)
    learner.load(str(out / "two_saved_bf16"))
    learner.train(trajectories, scores)
    resumed = learner.shards.full_state(learner.net)
    if rank == 0:
        states = {"saved": saved, "uninterrupted": uninterrupted, "resumed": resumed}
        torch.save(states, out / "two_then_two_bf16.pt")
    learner.shards.close()
    # The same with LoRA, and the merged policy best/ and final/ hold.
    learner, _ = train_one(LORA_RESUME, path, join)
    learner.save(str(out / "two_saved_lora"), {"step": 1})
    learner.export_merged(str(out / "two_merged_lora"))
    learner.shards.close()
    # 1 -> 2: the parent's one-step checkpoint, resumed by two ranks for a second step.
    trajectories, scores, _ = pickle.loads(path.read_bytes())
    learner = Learner(**Learner.arguments(case_config(RESUME)))
    join(learner)
    learner.load(str(out / "one_saved"))
    learner.train(trajectories, scores)
    weights = learner.weights()
    if rank == 0:
        torch.save(weights.tensors(), out / "one_then_two.pt")
    else:
        assert weights is None
    learner.shards.close()
    learner = Learner(**Learner.arguments(case_config(LORA_RESUME)))
    join(learner)
    learner.load(str(out / "one_saved_lora"))
    learner.train(trajectories, scores)
    weights = learner.weights()
    if rank == 0:
        torch.save(weights.tensors(), out / "one_then_two_lora.pt")
    learner.shards.close()
    broadcast_to_a_worker(rank, world, path, out, queue, join)


def broadcast_to_a_worker(rank, world, path, out, queue, join) -> None:
    """Two ranks broadcast their policy to one receiver (a thread of rank 1) in small buckets:
    each bucket is gathered and sent before the next."""
    learner, _ = train_one(CASES["ppo/bfloat16"], path, join)
    received = []
    if rank == 0:
        queue.put(learner.weight_group_address("127.0.0.1"))
        learner.join_weight_group(2, timeout_s=60)
        learner.weight_group.bucket_bytes = 64 * 1024
    else:

        def receive():
            host, port = queue.get(timeout=60)
            group = WeightGroup.join(host, port, 1, 2, timeout_s=60)
            received.append(group.receive())

        receiver = threading.Thread(target=receive)
        receiver.start()
    version = learner.broadcast_weights()
    published = learner.published_state()
    if rank == 0:
        sent = learner.publish_metrics()["publish/bytes"]
        buckets = len(learner.weight_group.layout)
        torch.save({"published": published, "bytes": sent, "buckets": buckets}, out / "sent.pt")
    else:
        receiver.join(timeout=60)
        version_in, tensors = received[0]  # checked against the digest sent after the buckets
        assert version_in == version
        torch.save({k: v.clone() for k, v in tensors.items()}, out / "received.pt")
    learner.shards.close()


@pytest.fixture(scope="module")
def sharded(batch, tmp_path_factory):
    """Each case's state and metrics after one update by two ranks."""
    out = tmp_path_factory.mktemp("sharded")
    learner, _ = train_one(RESUME, batch)
    (out / "one_saved").mkdir()
    learner.save(str(out / "one_saved"), {"step": 1})
    learner, _ = train_one(LORA_RESUME, batch)
    learner.save(str(out / "one_saved_lora"), {"step": 1})
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(rank_main, args=(2, batch, out, queue), nprocs=2, start_method="spawn")
    return out


@GLOO_PAIR
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_take_the_step_one_learner_takes(name, batch, sharded):
    single, metrics = train_one(CASES[name], batch)
    saved = torch.load(sharded / f"{name.replace('/', '_')}.pt")
    two, two_metrics = saved["state"], saved["metrics"]
    one = single.opt.float32(single.net)  # float32 masters of a bfloat16 learner
    assert two.keys() == one.keys()
    # Float32 masters of everything trained (a frozen LoRA base keeps its dtype).
    assert {k: v.dtype for k, v in two.items()} == {k: v.dtype for k, v in one.items()}
    trained = set(single.opt.names)
    assert {two[k].dtype for k in trained} == {torch.float32}
    if "lora" in name:
        frozen = [k for k in one if k not in trained and not k.startswith("value_head")]
        assert all(torch.equal(two[k], one[k]) for k in frozen)
    gaps = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
    assert float(gaps.max()) < 2 * LR * STEPS, name
    bf16 = "bfloat16" in name
    if not bf16:
        assert float((gaps > WEIGHT_TOLERANCE).float().mean()) < FLIPPED_SHARE, name
    rel = BF16_METRIC_TOLERANCE if bf16 else 1e-4
    for key in ("learner/policy_loss", "learner/grad_norm", "learner/entropy"):
        assert two_metrics[key] == pytest.approx(metrics[key], rel=rel, abs=1e-6), key


@GLOO_PAIR
@pytest.mark.parametrize("name", list(DQN_CASES))
def test_two_ranks_take_the_td_step_one_learner_takes(name, batch, sharded):
    """The online network, the target after its Polyak steps, the new priorities and the
    metrics of TD updates on two ranks equal one learner's."""
    single, (_, td, metrics) = dqn_update(DQN_CASES[name], batch.with_name("dqn.pkl"))
    saved = torch.load(sharded / f"{name.replace('/', '_')}.pt", weights_only=False)
    bf16 = "bfloat16" in name
    for two, one in [
        (saved["state"], single.opt.float32(single.qnet)),
        (saved["target"], single.target_float),
    ]:
        assert two.keys() == one.keys()
        gaps = torch.cat([(two[k] - one[k]).abs().flatten() for k in one])
        assert float(gaps.max()) < 2 * LR * dqn_updates(DQN_CASES[name]), name
        if not bf16:
            assert float((gaps > WEIGHT_TOLERANCE).float().mean()) < FLIPPED_SHARE, name
    rel = BF16_METRIC_TOLERANCE if bf16 else 1e-4
    assert saved["td"] == pytest.approx(td, rel=rel, abs=1e-5)
    for key in ("learner/td_loss", "learner/q_mean", "learner/grad_norm"):
        assert saved["metrics"][key] == pytest.approx(metrics[key], rel=rel, abs=1e-6), key


# Per rank, two ranks hold at most this share of one learner's state (half, plus what FSDP
# cannot split evenly: a tensor's rows round up per rank).
MEMORY_SHARE = 0.6


@GLOO_PAIR
@pytest.mark.parametrize("name", ["ppo/critic, 2 epochs", "ppo/bfloat16", "dqn/bfloat16"])
def test_each_of_two_ranks_holds_about_half_the_learner_state(name, batch, sharded):
    if name.startswith("dqn"):
        single, _ = dqn_update(DQN_CASES[name], batch.with_name("dqn.pkl"))
    else:
        single, _ = train_one(CASES[name], batch)
    one = single.state_memory()
    two = torch.load(sharded / f"{name.replace('/', '_')}.pt", weights_only=False)["memory"]
    # A sharded bfloat16 learner's parameters are its float32 masters: count them together.
    for memory in (one, two):
        memory["weights"] = memory["parameters"] + memory["masters"]
    for part in ("weights", "gradients", "optimizer", "total"):
        assert two[part] <= MEMORY_SHARE * one[part], (part, two[part], one[part])
    assert one["optimizer"] == pytest.approx(2 * one["gradients"], rel=0.01)  # two moments


@GLOO_PAIR
def test_a_resume_continues_exactly_across_learner_counts(batch, sharded):
    """2 -> 1 and 1 -> 2 end where one learner's two uninterrupted steps end; the weights a
    sharded learner publishes are its whole policy."""
    trajectories, scores, _ = pickle.loads(batch.read_bytes())
    uninterrupted, _ = train_one(RESUME, batch)
    uninterrupted.train(trajectories, scores)
    expected = uninterrupted.weights().tensors()

    def check(weights):
        assert weights.keys() == expected.keys()
        gaps = torch.cat([(weights[k] - expected[k]).abs().flatten() for k in expected])
        assert float((gaps > WEIGHT_TOLERANCE).float().mean()) < FLIPPED_SHARE
        assert float(gaps.max()) < 2 * LR * STEPS

    check(torch.load(sharded / "one_then_two.pt"))
    alone = Learner(**Learner.arguments(case_config(RESUME)))
    assert alone.load(str(sharded / "two_saved")) == {"step": 1}
    assert alone.version == 1 and alone.steps == uninterrupted.steps // 2
    alone.train(trajectories, scores)
    check(alone.weights().tensors())


@GLOO_PAIR
def test_a_group_resumes_its_own_shards_exactly_and_one_learner_reads_them(batch, sharded):
    """Each rank's shards of the optimizer state and float32 masters of a bfloat16 run: two
    ranks resume them and take the step the uninterrupted two take; one learner reads the
    masters whole (without them it would continue from their bfloat16 rounding)."""
    states = torch.load(sharded / "two_then_two_bf16.pt")
    assert (sharded / "two_saved_bf16" / SHARDS_DIR / ".metadata").is_file()
    assert not (sharded / "two_saved_bf16" / OPTIMIZER_FILE).exists()
    resumed, uninterrupted = states["resumed"], states["uninterrupted"]
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k
    alone = Learner(**Learner.arguments(case_config(BF16_RESUME)))
    alone.load(str(sharded / "two_saved_bf16"))
    masters = alone.opt.float32(alone.net)
    for k in alone.opt.names:
        assert torch.equal(masters[k], states["saved"][k]), k
    moments = alone.opt.state_dict()["state"]
    assert moments.keys() == set(alone.opt.names)


@GLOO_PAIR
def test_a_lora_resume_and_merge_continue_exactly_across_learner_counts(batch, sharded, tmp_path):
    """A LoRA learner's adapter saved by two ranks resumes on one, and one's on two, exactly;
    the policy merged by two ranks is the one a single learner merges."""
    trajectories, scores, _ = pickle.loads(batch.read_bytes())
    uninterrupted, _ = train_one(LORA_RESUME, batch)
    uninterrupted.export_merged(str(tmp_path))
    two_merged = load_file(sharded / "two_merged_lora" / "model.safetensors")
    one_merged = load_file(tmp_path / "model.safetensors")
    assert two_merged.keys() == one_merged.keys()
    gaps = torch.cat([(two_merged[k] - one_merged[k]).abs().flatten() for k in one_merged])
    assert float(gaps.max()) < 2 * LR * STEPS
    assert float((gaps > WEIGHT_TOLERANCE).float().mean()) < FLIPPED_SHARE
    uninterrupted.train(trajectories, scores)
    expected = uninterrupted.weights().tensors()
    alone = Learner(**Learner.arguments(case_config(LORA_RESUME)))
    assert alone.load(str(sharded / "two_saved_lora")) == {"step": 1}
    alone.train(trajectories, scores)
    for weights in (alone.weights().tensors(), torch.load(sharded / "one_then_two_lora.pt")):
        assert weights.keys() == expected.keys() and all("lora_" in k for k in weights)
        gaps = torch.cat([(weights[k] - expected[k]).abs().flatten() for k in expected])
        assert float((gaps > WEIGHT_TOLERANCE).float().mean()) < FLIPPED_SHARE
        assert float(gaps.max()) < 2 * LR * STEPS


@GLOO_PAIR
def test_a_sharded_learner_broadcasts_its_whole_policy_bucket_by_bucket(sharded):
    sent = torch.load(sharded / "sent.pt")
    received = torch.load(sharded / "received.pt")
    published = sent["published"]
    assert sent["buckets"] > 1  # 64 KiB buckets
    assert received.keys() == published.keys()
    assert {v.dtype for v in received.values()} == {torch.bfloat16}  # what the workers run
    assert all(torch.equal(received[k], published[k]) for k in published)
    assert sent["bytes"] == sum(v.numel() * v.element_size() for v in published.values())


def test_rows_are_dealt_by_tokens():
    assert split_by_tokens([5, 1, 1, 3], 2) == [[0], [1, 2, 3]]
    assert split_by_tokens([2], 2) == [[0], []]
    share = Shards(1, 2).share(torch.tensor([4]))  # no row left: one row, weighed 0
    assert share.rows.tolist() == [0] and share.tokens == share.seqs == 0.0
    whole = Shards().share(torch.tensor([3, 1]))
    assert whole.rows.tolist() == [0, 1] and whole.tokens == whole.seqs == 1.0


# ---- end to end on Ray -------------------------------------------------------------------


E2E = {
    "ppo": {"algo": "ppo"},
    "grpo": {"algo": "grpo", "rollout.weight_sync": "broadcast", "rollout.samples_per_prompt": 2},
    "grpo/lora": {"algo": "grpo", "learner.lora.rank": 4, "rollout.samples_per_prompt": 2},
    "dqn": {
        "algo": "dqn",
        "dqn.learning_starts": 16,
        "dqn.batch_size": 16,
        "dqn.updates_per_iteration": 2,
        "dqn.action_top_k": 8,
    },
}
E2E["dqn/lora"] = {**E2E["dqn"], "learner.lora.rank": 4}


@pytest.mark.slow  # runs on Ray
@pytest.mark.parametrize("name", list(E2E))
def test_a_run_trains_on_two_learner_workers(ray_session, tmp_path, name):
    """Two learner actors act as the one learner: the run trains, publishes (through the object
    store, or the broadcast group) and leaves checkpoints one learner loads."""
    over = {
        **E2E[name],
        "resources.learner_workers": 2,
        "iterations": 2,
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": False,
        "output.tensorboard": False,
        "output.checkpoint_every": 2,
        "output.eval_every": 2,
    }
    run_dir = train(load_config("tiny", over))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    last = records[-1]
    dqn = name.startswith("dqn")
    loss = "learner/td_loss" if dqn else "learner/policy_loss"
    assert np.isfinite(last[loss]) and last["publish/bytes"] > 0
    alone_config = load_config("tiny", E2E[name])
    cls = QLearner if dqn else Learner
    alone = cls(**cls.arguments(alone_config))
    assert alone.load(str(run_dir / "checkpoints" / "step_2"))["step"] == 2
    if "lora" in name:  # final/ holds the merged network, adapters folded in
        assert not (run_dir / "final" / ADAPTER_WEIGHTS).exists()
        merged = load_file(run_dir / "final" / (QNET_FILE if dqn else "model.safetensors"))
        assert merged and not any("lora_" in k for k in merged)
    if name == "dqn":
        assert last["learner/updates"] == 4 and alone.steps == 4
    else:
        assert alone.version == 2 and last["rollout/policy_lag"] <= 1
