"""Every role in bfloat16, and (where a GPU is present) on CUDA.

bfloat16 on the CPU catches the dtype class of bug without a GPU: a float32 layer fed a
bfloat16 backbone's hidden states fails here as it fails on a GPU. The device class of bug
(CPU tensors or generators meeting a CUDA model) needs CUDA: those tests are marked ``gpu``.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.dqn.learner import QNET_FILE, QLearner
from distrl.dqn.rollout import QRolloutWorker, make_transitions
from distrl.loop.driver import train
from distrl.models.policy import encode_prompts
from distrl.outputs.metrics import read_metrics
from distrl.pg.learner import Learner
from distrl.pg.rollout import RolloutWorker

# Q-network kinds as DQN runs build them, the mlp one also pruned and with an autoencoder.
Q_NETWORKS = {
    "lm_head": {"dqn.q_network": "lm_head"},
    "performer": {"dqn.q_network": "performer"},
    "mlp": {"dqn.q_network": "mlp"},
    "mlp_pruned_autoencoder": {
        "dqn.q_network": "mlp",
        "dqn.prune_sparsity": 0.5,
        "dqn.autoencoder_dim": 16,
    },
}
# Worker (KV-cached, step by step) and learner (one forward) round differently in bfloat16;
# in float32 they agree to 1e-4. A wrong temperature or an off-by-one token is off by > 0.1.
BF16_LOGPROB_TOLERANCE = 0.05

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def prompts_for(worker, config, n=4):
    examples = load_examples("default", limit=n)
    return encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)


def ppo_roles(device="cpu", dtype="bfloat16", **over):
    config = load_config(
        "tiny",
        {"model.dtype": dtype, "model.device": device, "rollout.max_new_tokens": 8, **over},
    )
    return (
        config,
        Learner(**Learner.arguments(config)),
        RolloutWorker(**RolloutWorker.arguments(config)),
    )


def check_ppo_roles(config, learner, worker, dtype):
    assert next(worker.model.parameters()).dtype == dtype
    prompts = prompts_for(worker, config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    assert np.isfinite(batch.logprobs).all()
    diff = np.abs(learner.logprobs(batch) - batch.logprobs)
    assert diff.max() < BF16_LOGPROB_TOLERANCE, diff.max()
    before = [p.detach().clone() for p in learner.net.parameters()]
    metrics = learner.train(batch, np.linspace(-1.0, 1.0, len(prompts)))
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["learner/skipped_updates"] == 0
    changed = [not torch.equal(a, b) for a, b in zip(before, learner.net.parameters())]
    assert any(changed)
    weights = learner.weights()
    assert worker.set_weights(weights) == 1
    for name, param in worker.model.state_dict().items():
        assert torch.equal(param, learner.net.model.state_dict()[name]), name
    greedy = worker.generate(prompts, list(range(len(prompts))), greedy=True)
    assert greedy.version == 1 and np.isfinite(greedy.logprobs).all()


def dqn_roles(kind, device="cpu", **over):
    config = load_config(
        "tiny",
        {
            "algo": "dqn",
            "model.dtype": "bfloat16",
            "model.device": device,
            "dqn.action_top_k": 4,
            "dqn.batch_size": 16,
            "rollout.max_new_tokens": 4,
            **Q_NETWORKS[kind],
            **over,
        },
    )
    return (
        config,
        QLearner(**QLearner.arguments(config)),
        QRolloutWorker(**QRolloutWorker.arguments(config)),
    )


def check_dqn_roles(config, learner, worker):
    prompts = prompts_for(worker, config)
    for explore in ("epsilon", "boltzmann", "ucb"):
        worker.dqn = dataclasses.replace(worker.dqn, exploration=explore)
        out = worker.generate(prompts, list(range(len(prompts))))
        assert out.q_taken.dtype == np.float32 and np.isfinite(out.q_max).all(), explore
    cols, prio = make_transitions(
        out, np.ones(len(prompts)), gamma=0.99, n_step=2, width=worker.width
    )
    assert np.isfinite(prio).all()
    n = len(prio)
    for _ in range(2):
        ids, td, metrics = learner.update((cols, np.arange(n), np.ones(n, np.float32)))
        assert np.isfinite(td).all() and metrics["learner/skipped_updates"] == 0
        assert math.isfinite(metrics["learner/td_loss"]), metrics
    weights = learner.weights()
    assert worker.set_weights(weights) == 1
    for name, param in worker.trainable().state_dict().items():
        assert torch.equal(param, learner.qnet.state_dict()[name]), name
    greedy = worker.generate(prompts, list(range(len(prompts))), greedy=True)
    assert np.isfinite(greedy.q_taken).all()


def test_ppo_roles_in_bfloat16():
    config, learner, worker = ppo_roles()
    check_ppo_roles(config, learner, worker, torch.bfloat16)


def saved_dtypes_fit(folder, kind) -> bool:
    """Layers copied from the policy keep its dtype; those trained from scratch are float32."""
    saved = load_file(folder / QNET_FILE)
    dtypes = {t.dtype for t in saved.values() if t.is_floating_point()}
    return dtypes == ({torch.float32} if kind == "performer" else {torch.bfloat16, torch.float32})


@pytest.mark.parametrize("kind", list(Q_NETWORKS))
def test_dqn_roles_in_bfloat16(kind, tmp_path):
    """Acting (every exploration rule), TD updates, weight loading and the saved Q-network's
    dtypes, in bfloat16."""
    config, learner, worker = dqn_roles(kind)
    check_dqn_roles(config, learner, worker)
    learner.save(str(tmp_path), {"step": 1})
    assert saved_dtypes_fit(tmp_path, kind)


# ---- float32 master weights ---------------------------------------------------------------

# One AdamW step moves every weight with a gradient by about lr. At lr 1e-5 that is below
# bfloat16's spacing for most weights: stepping the bfloat16 weights themselves changes about
# 7% of them where float32 changes about half. The float32 masters must change as float32 does.
MASTER_SHARE_MARGIN = 0.03


def changed_share(learner, batch, scores) -> float:
    before = {k: v.clone() for k, v in learner.opt.float32(learner.net).items()}
    learner.train(batch, scores)
    after = learner.opt.float32(learner.net)
    changed = sum(int((after[k] != v).sum()) for k, v in before.items() if v.is_floating_point())
    return changed / sum(v.numel() for v in before.values() if v.is_floating_point())


def test_bfloat16_learners_keep_small_updates_in_float32_masters(tmp_path):
    over = {"learner.lr": 1e-5, "learner.warmup_steps": 0, "ppo.epochs": 1}
    config, fp32, worker = ppo_roles(dtype="float32", **over)
    _, bf16, _ = ppo_roles(**over)
    prompts = prompts_for(worker, config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    scores = np.linspace(-1.0, 1.0, len(prompts))
    share32, share16 = changed_share(fp32, batch, scores), changed_share(bf16, batch, scores)
    assert share32 > 0.3, share32
    assert abs(share16 - share32) < MASTER_SHARE_MARGIN, (share16, share32)
    # The bfloat16 weights are the masters' rounding, and a resume restores the masters exactly.
    masters = bf16.opt.float32(bf16.net)
    for name, param in bf16.net.state_dict().items():
        assert torch.equal(param, masters[name].to(param.dtype)), name
    bf16.save(str(tmp_path), {"step": 1})
    _, again, _ = ppo_roles(**over)
    again.load(str(tmp_path))
    for name, value in again.opt.float32(again.net).items():
        assert torch.equal(value, masters[name]), name


def test_dqn_target_follows_in_float32():
    """Weights near 1 (bfloat16 spacing 0.008) and an online network 0.05 ahead: a Polyak step
    of tau 0.005 moves the target by 0.00025, which bfloat16 rounds away; the target's float32
    values move, and the target network holds their rounding."""
    config, learner, _ = dqn_roles("lm_head", **{"dqn.tau": 0.005})

    def set_online(change):
        with torch.no_grad():
            for p in learner.qnet.parameters():
                change(p)
        learner.opt.load_state_dict(None)  # masters re-taken from the weights

    set_online(lambda p: p.fill_(1.0))
    learner.update_target(1.0)
    set_online(lambda p: p.add_(0.05))
    before = {k: v.clone() for k, v in learner.target_float.items()}
    learner.update_target(0.005)
    floats = [k for k, v in before.items() if v.is_floating_point()]
    moved = sum(int((before[k] != learner.target_float[k]).sum()) for k in floats)
    assert moved == sum(before[k].numel() for k in floats)  # every entry, not none
    target = learner.target.state_dict()
    for name, value in learner.target_float.items():
        assert torch.equal(target[name], value.to(target[name].dtype)), name


# ---- end to end through the driver -------------------------------------------------------


def run_bf16(tmp_path, **over):
    base = {
        "model.dtype": "bfloat16",
        "iterations": 2,
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": False,
        "output.tensorboard": False,
        "output.checkpoint_every": 2,
        "output.eval_every": 2,
        "dqn.learning_starts": 16,
        "dqn.batch_size": 16,
        "dqn.updates_per_iteration": 2,
        "dqn.action_top_k": 8,
    }
    run_dir = train(load_config("tiny", {**base, **over}))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    return run_dir, records


@pytest.mark.slow
def test_ppo_end_to_end_in_bfloat16(ray_session, tmp_path):
    run_dir, records = run_bf16(tmp_path)
    last = records[-1]
    for key in ("learner/policy_loss", "learner/value_loss", "learner/kl", "eval/reward"):
        assert math.isfinite(last[key]), key
    assert last["learner/skipped_updates"] == 0
    saved = load_file(run_dir / "final" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


# The loop treats every Q-network alike; each kind's roles and saved dtypes are checked above
# without Ray. End to end: the LM head, and the pruned MLP encoder with its autoencoder.
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lm_head", "mlp_pruned_autoencoder"])
def test_dqn_end_to_end_in_bfloat16(ray_session, tmp_path, kind):
    run_dir, records = run_bf16(tmp_path, algo="dqn", **Q_NETWORKS[kind])
    last = records[-1]
    for key in ("learner/td_loss", "learner/q_mean", "replay/size", "eval/reward"):
        assert math.isfinite(last[key]), key
    assert last["learner/updates"] == 4
    assert saved_dtypes_fit(run_dir / "final", kind)


# ---- on a GPU ----------------------------------------------------------------------------


@pytest.mark.gpu
@cuda
def test_ppo_roles_on_cuda():
    config, learner, worker = ppo_roles(device="cuda", dtype="auto")
    assert worker.device.type == "cuda" and learner.device.type == "cuda"
    check_ppo_roles(config, learner, worker, next(learner.net.model.parameters()).dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kind", list(Q_NETWORKS))
def test_dqn_roles_on_cuda(kind):
    config, learner, worker = dqn_roles(kind, device="cuda")
    assert learner.device.type == "cuda" and worker.policy.device.type == "cuda"
    check_dqn_roles(config, learner, worker)
