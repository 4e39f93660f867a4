import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from distrl.algos import ppo
from distrl.algos.pg import group_advantages
from distrl.algos.registry import ALGOS
from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.errors import DistrlError, ModelError
from distrl.models.policy import encode_prompts, response_hidden
from distrl.pg.learner import Learner
from distrl.pg.passes import Passes, plan_passes
from distrl.pg.rollout import RolloutWorker
from distrl.runtime.checkpoint import OPTIMIZER_FILE


def make(config):
    return Learner(**Learner.arguments(config)), RolloutWorker(**RolloutWorker.arguments(config))


@pytest.fixture(scope="module")
def prompts():
    config = load_config("tiny")
    _, worker = make(config)
    examples = load_examples("default", limit=8)
    return encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recomputed_logprobs_match_the_workers(prompts, model, temperature):
    """With weights unchanged, the first PPO ratio is exactly 1 (within 1e-4 in log space)."""
    config = load_config(
        "tiny",
        {"model.name": model, "rollout.temperature": temperature, "rollout.max_new_tokens": 12},
    )
    learner, worker = make(config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    recomputed = learner.logprobs(batch)
    assert np.abs(recomputed - batch.logprobs).max() < 1e-4


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.8)])
def test_worker_logprobs_ignore_top_k_and_top_p(prompts, top_k, top_p):
    """Top-k / top-p only choose what may be sampled: the recorded logprobs are those of the
    full softmax(logits / temperature), as the learner computes them."""
    config = load_config(
        "tiny",
        {
            "rollout.temperature": 0.7,
            "rollout.top_k": top_k,
            "rollout.top_p": top_p,
            "rollout.max_new_tokens": 12,
        },
    )
    learner, worker = make(config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    assert np.abs(learner.logprobs(batch) - batch.logprobs).max() < 1e-4


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_recomputed_logprobs_match_the_workers_in_bfloat16(prompts, model):
    """In bfloat16 the worker's cached decoding and the learner's single forward round
    differently; they still agree within 0.05 nats per token (a wrong temperature or a
    shifted token is off by far more)."""
    config = load_config(
        "tiny",
        {
            "model.name": model,
            "model.dtype": "bfloat16",
            "rollout.temperature": 0.7,
            "rollout.max_new_tokens": 12,
        },
    )
    learner, worker = make(config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    assert np.abs(learner.logprobs(batch) - batch.logprobs).max() < 0.05


def test_train_step_changes_parameters_and_bumps_version(prompts):
    config = load_config("tiny", {"ppo.epochs": 2})
    learner, worker = make(config)
    before = {k: v.clone() for k, v in learner.net.named_parameters()}
    batch = worker.generate(prompts, list(range(len(prompts))))
    scores = np.linspace(-1, 1, len(prompts)).astype(np.float32)
    metrics = learner.train(batch, scores)
    assert learner.version == 1 and learner.weights().version == 1
    changed = [k for k, v in learner.net.named_parameters() if not torch.equal(v, before[k])]
    assert any("value_head" in k for k in changed)
    assert any("value_head" not in k for k in changed)
    for key in (
        "policy_loss",
        "value_loss",
        "entropy",
        "clipfrac",
        "approx_kl",
        "kl",
        "kl_coef",
        "grad_norm",
        "tokens_per_s",
    ):
        assert np.isfinite(metrics[f"learner/{key}"]), key


def test_learning_raises_the_rewarded_tokens_probability(prompts):
    """Reward sequences by whether they contain token 11 (','); its logprob must rise."""
    config = load_config("tiny", {"learner.lr": 1e-2, "ppo.epochs": 4, "ppo.kl_coef": 0.0})
    learner, worker = make(config)
    batch = worker.generate(prompts * 4, list(range(len(prompts) * 4)))
    scores = (batch.response_ids == batch.response_ids[0, 0]).any(1).astype(np.float32)
    assert 0 < scores.sum() < len(scores)
    before = learner.logprobs(batch)
    for _ in range(3):
        learner.train(batch, scores)
    after = learner.logprobs(batch)
    rewarded = scores.astype(bool)
    gain = (after - before).sum(1)
    assert gain[rewarded].mean() > gain[~rewarded].mean()


def test_nonfinite_updates_are_skipped_then_stop(prompts):
    config = load_config("tiny", {"learner.max_nonfinite_updates": 2, "ppo.epochs": 1})
    learner, worker = make(config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    before = {k: v.clone() for k, v in learner.net.named_parameters()}
    scores = np.full(len(prompts), np.nan, dtype=np.float32)
    with pytest.raises(RuntimeError, match="non-finite"):
        learner.train(batch, scores)
    for k, v in learner.net.named_parameters():
        assert torch.equal(v, before[k]), k


def test_save_and_load_round_trip(tmp_path, prompts):
    config = load_config("tiny")
    learner, worker = make(config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    learner.train(batch, np.ones(len(prompts), dtype=np.float32))
    learner.save(str(tmp_path), {"step": 1})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.config.vocab_size == learner.tokenizer.vocab_size
    fresh, _ = make(config)
    assert fresh.load(str(tmp_path)) == {"step": 1}
    assert fresh.version == 1 and fresh.steps == learner.steps
    assert np.allclose(fresh.logprobs(batch), learner.logprobs(batch), atol=1e-6)
    saved, restored = learner.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["state"].keys() == restored["state"].keys()
    for k, v in saved["state"].items():
        assert torch.equal(v["exp_avg_sq"], restored["state"][k]["exp_avg_sq"]), k
    # Without its optimizer file (an older step, best/, final/) it loads with fresh moments,
    # and says so.
    (tmp_path / OPTIMIZER_FILE).unlink()
    again, _ = make(config)
    with pytest.warns(UserWarning, match="no optimizer state"):
        assert again.load(str(tmp_path)) == {"step": 1}
    assert not again.optimizer.state_dict()["state"]
    assert np.allclose(again.logprobs(batch), learner.logprobs(batch), atol=1e-6)


def test_a_checkpoint_of_a_pickle_wrong_shapes_or_nan_names_its_folder(tmp_path, prompts):
    from test_models_loading import RunsCode

    config = load_config("tiny")
    learner, _ = make(config)
    learner.save(str(tmp_path), {"step": 1})
    weights = tmp_path / "model.safetensors"
    shapes = {k: v.shape for k, v in load_file(weights).items()}
    save_file({k: torch.zeros(2, 2) for k in shapes}, weights)  # every tensor the wrong shape
    with pytest.raises(ModelError, match=f"cannot resume from {tmp_path}: "):
        make(config)[0].load(str(tmp_path))
    save_file({k: torch.zeros(shape) for k, shape in shapes.items()}, weights)
    state = torch.load(tmp_path / "distrl_state.pt", weights_only=True)
    name = next(iter(state["value_head"]))
    state["value_head"][name][0] = float("nan")
    torch.save(state, tmp_path / "distrl_state.pt")
    with pytest.raises(ModelError, match=f"cannot resume from {tmp_path}: value_head.{name} holds"):
        make(config)[0].load(str(tmp_path))
    weights.unlink()
    torch.save({"w": RunsCode(tmp_path / "code-ran")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(DistrlError) as refused:
        make(config)[0].load(str(tmp_path))
    assert str(refused.value).startswith(
        f"cannot load weights from {tmp_path}: no *.safetensors there (it holds ["
    )
    assert not (tmp_path / "code-ran").exists()


def test_reference_metrics(prompts):
    config = load_config("tiny")
    learner, _ = make(config)
    refs = [[11, 12, 13]] * len(prompts)
    out = learner.reference_metrics(prompts, refs)
    assert 0.0 <= out["eval/ref_token_accuracy"] <= 1.0
    # A random 50k-vocab model is about uniform: perplexity near the vocabulary size.
    assert 1e4 < out["eval/ref_perplexity"] < 2e5


def test_without_a_kl_penalty_the_reference_model_is_not_run(prompts):
    def count_reference_passes(learner) -> list[int]:
        calls: list[int] = []  # a hook on the transformer every reference pass goes through
        learner.reference.model.base_model.register_forward_pre_hook(lambda *_: calls.append(1))
        return calls

    learner, worker = make(load_config("tiny", {"ppo.kl_coef": 0.0}))
    batch = worker.generate(prompts, list(range(len(prompts))))
    calls = count_reference_passes(learner)
    metrics = learner.train(batch, np.ones(len(prompts)))
    assert not calls and "learner/kl" not in metrics and learner.version == 1
    with_kl = make(load_config("tiny", {"ppo.kl_coef": 0.01}))[0]
    calls = count_reference_passes(with_kl)
    assert "learner/kl" in with_kl.train(batch, np.ones(len(prompts)))
    assert calls  # the hook sees the reference pass when there is one


def zero_reward_update(model: dict, algo: str, prompts=None):
    """The default config's update (lr, epochs, minibatches, KL penalty, whitening) on a batch
    whose rewards are all 0: the learner, the batch and its logprobs before the update."""
    config = load_config(
        "default", {**model, "algo": algo, "rollout.samples_per_prompt": 1 + (algo == "grpo")}
    )
    learner, worker = make(config)
    if prompts is None:
        examples = load_examples("default", limit=8)
        prompts = encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)
    batch = worker.generate(prompts, list(range(len(prompts))))
    before = learner.logprobs(batch)
    initial = {k: v.clone() for k, v in learner.net.named_parameters()}
    metrics = learner.train(
        batch, np.zeros(len(prompts), dtype=np.float32), groups=np.arange(len(prompts)) // 2
    )
    assert metrics["learner/version"] == 1
    return learner, batch, before, initial


def k3_kl(learner, batch, before) -> float:
    """KL(before || after) per response token, k3 estimator on tokens sampled from before."""
    log_ratio = learner.logprobs(batch) - before
    kl = ((np.exp(log_ratio) - 1 - log_ratio) * batch.response_mask).sum()
    return float(kl / batch.response_mask.sum())


@pytest.mark.parametrize("algo", ["ppo", "reinforce_pp", "grpo"])
def test_a_batch_without_reward_leaves_the_policy_in_place(prompts, algo):
    """The value head starts at 0 and the old logprobs of a KL-in-reward update are the
    learner's own (the KL is exactly 0 while the policy is the reference), so nothing moves."""
    tiny = {"model.name": "tiny-llama", "tokenizer.name": "tiktoken:gpt2"}
    learner, batch, before, initial = zero_reward_update(tiny, algo, prompts)
    for k, v in learner.net.named_parameters():
        assert torch.equal(v, initial[k]), k
    assert k3_kl(learner, batch, before) == 0.0


@pytest.mark.slow  # the real model
def test_without_reward_the_default_model_stays_in_place():
    """SmolLM2 under the default config: a batch of all-zero rewards moves it by KL < 1e-3 (with
    the workers' logprobs as old ones, round-off whitened and normalised by Adam moved it 0.9)."""
    learner, batch, before, _ = zero_reward_update({}, "ppo")
    assert k3_kl(learner, batch, before) < 1e-3


# ---- truncated importance sampling (ppo.rollout_is) ---------------------------------------

SHIFT = 5.0  # nats below the learner's: an importance weight of e^5 = 148 before the cap


def with_rollout_logprobs(learner, batch, shift: bool = False):
    """``batch`` whose rollout logprobs are the learner's own, with ``shift``: ``SHIFT`` lower
    on every third response token of every other row; and the (B, T) bool mask of those."""
    own = learner.logprobs(batch)
    rows, cols = np.indices(own.shape)
    shifted = (batch.response_mask > 0) & (cols % 3 == 0) & (rows % 2 == 0) & shift
    logprobs = (own - SHIFT * shifted).astype(np.float32)
    return dataclasses.replace(batch, logprobs=logprobs), shifted


def group_update(prompts, **overrides):
    """A GRPO learner, its worker's batch of 8 (4 groups of 2) and the scores."""
    config = load_config(
        "tiny", {"algo": "grpo", "rollout.samples_per_prompt": 2, "ppo.epochs": 1, **overrides}
    )
    learner, worker = make(config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    scores = np.linspace(-1, 1, len(prompts)).astype(np.float32)
    return config, learner, batch, scores, np.arange(len(prompts)) // 2


@pytest.mark.parametrize(
    ("algo", "dtype"), [("ppo", "float32"), ("grpo", "float32"), ("grpo", "bfloat16")]
)
def test_truncated_is_without_a_mismatch_is_the_plain_update(prompts, algo, dtype):
    """Rollout logprobs equal to the learner's: every weight is exactly 1, so two epochs of
    minibatch updates with rollout_is truncated are bit for bit those without it."""
    overrides = {
        "algo": algo,
        "model.dtype": dtype,
        "rollout.samples_per_prompt": 2,
        "ppo.epochs": 2,
        "ppo.minibatch_size": 4,
    }
    plain, worker = make(load_config("tiny", overrides))
    initial = {k: v.clone() for k, v in plain.net.named_parameters()}
    batch, _ = with_rollout_logprobs(plain, worker.generate(prompts, list(range(len(prompts)))))
    scores = np.linspace(-1, 1, len(prompts)).astype(np.float32)
    groups = np.arange(len(prompts)) // 2
    torch.manual_seed(0)  # the same minibatches for both
    plain.train(batch, scores, groups=groups)
    tis, _ = make(load_config("tiny", {**overrides, "ppo.rollout_is": "truncated"}))
    torch.manual_seed(0)
    metrics = tis.train(batch, scores, groups=groups)
    after = dict(tis.net.named_parameters())
    for k, v in plain.net.named_parameters():
        assert torch.equal(v, after[k]), k
    assert any(not torch.equal(v, initial[k]) for k, v in after.items())  # it did update
    assert metrics["learner/rollout_is_weight"] == 1.0
    assert metrics["learner/rollout_is_truncated"] == 0.0
    assert metrics["learner/logprob_mismatch"] == 0.0


def test_truncated_is_caps_the_weight_of_tokens_the_rollout_found_unlikely(prompts):
    """Some tokens have rollout logprob = learner's - 5: their weight e^5 is capped
    at 2, the metrics say so exactly, the ratio is the learner's (1 on the first step) and the
    loss and gradient are the surrogate with those tokens' terms doubled."""
    overrides = {
        "ppo.minibatch_size": 8,
        "ppo.rollout_is": "truncated",
        "ppo.rollout_is_cap": 2.0,
        "learner.max_grad_norm": 1e9,  # no clipping: the step's gradient is the loss's
    }
    config, learner, batch, scores, groups = group_update(prompts, **overrides)
    batch, shifted = with_rollout_logprobs(learner, batch, shift=True)
    metrics = learner.train(batch, scores, groups=groups)
    n_real, n_shifted = batch.response_mask.sum(), shifted.sum()
    assert 0 < n_shifted < n_real
    assert metrics["learner/rollout_is_truncated"] == pytest.approx(n_shifted / n_real)
    assert metrics["learner/rollout_is_weight"] == pytest.approx(
        (2.0 * n_shifted + (n_real - n_shifted)) / n_real
    )
    assert metrics["learner/clipfrac"] == 0.0
    assert metrics["learner/approx_kl"] == pytest.approx(0.0, abs=1e-6)

    # The same loss recomputed directly from the initial weights: -mean over tokens of A * w.
    fresh, _ = make(config)
    ids = torch.from_numpy(np.concatenate([batch.prompt_ids, batch.response_ids], 1))
    mask = torch.from_numpy(
        np.concatenate([batch.prompt_mask, batch.response_mask.astype(np.int64)], 1)
    )
    rmask = torch.from_numpy(batch.response_mask).float()
    start = batch.prompt_ids.shape[1]
    advantages = group_advantages(
        scores=torch.from_numpy(scores), groups=torch.from_numpy(groups), mask=rmask
    )
    model = fresh.net.model
    hidden = response_hidden(model, ids, mask, start)
    logits = model.get_output_embeddings()(hidden).float() / config.rollout.temperature
    logprobs = ppo.logprobs_from_logits(logits, torch.from_numpy(batch.response_ids))
    ratio = (logprobs - logprobs.detach()).exp()  # 1, with the gradient of logprobs
    weights = 1.0 + torch.from_numpy(shifted).float()  # the cap, 2, on shifted tokens
    loss = -ppo.masked_mean(advantages * ratio * weights, rmask)
    assert metrics["learner/policy_loss"] == pytest.approx(loss.item(), rel=1e-5)
    unweighted = -ppo.masked_mean(advantages * ratio, rmask)
    assert abs(unweighted.item() - loss.item()) > 1e-3  # the weights matter here
    loss.backward()
    stepped = dict(learner.net.model.named_parameters())
    compared = 0
    for k, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().max() > 0:
            assert torch.allclose(stepped[k].grad, p.grad, rtol=1e-4, atol=1e-7), k
            compared += 1
    assert compared > 0


@pytest.mark.parametrize(
    ("algo", "minibatch_size"),
    [("grpo", 8), ("ppo", 4)],  # the first minibatch's forward; the KL pass's recomputation
)
def test_logprob_mismatch_is_the_known_shift(prompts, algo, minibatch_size):
    """Rollout logprobs 5 nats below the learner's on some tokens: the mean gap is 5 x their
    share, the largest is 5, with rollout_is off."""
    _, learner, batch, scores, groups = group_update(
        prompts, algo=algo, **{"ppo.minibatch_size": minibatch_size}
    )
    batch, shifted = with_rollout_logprobs(learner, batch, shift=True)
    metrics = learner.train(batch, scores, groups=groups)
    share = shifted.sum() / batch.response_mask.sum()
    assert metrics["learner/logprob_mismatch"] == pytest.approx(SHIFT * share, rel=1e-5)
    assert metrics["learner/logprob_mismatch_max"] == pytest.approx(SHIFT, rel=1e-5)
    assert "learner/rollout_is_weight" not in metrics


def test_no_mismatch_metric_without_a_forward_of_the_old_weights_over_the_batch(prompts):
    """GRPO without a KL term and with two minibatches never runs the old weights over every
    row, and logs no mismatch rather than a partial one."""
    _, learner, batch, scores, groups = group_update(prompts, **{"ppo.minibatch_size": 4})
    metrics = learner.train(batch, scores, groups=groups)
    assert "learner/logprob_mismatch" not in metrics


# (algo, ppo overrides, batch rows, KL coefficient, deterministic forward) -> passes:
# reference, recompute, old_pass, values_in_update, probe, kl_in_reward.
PLANS = [
    # PPO as configured by default: the reference for the KL in the reward, old logprobs and
    # values from one pass before its several minibatches.
    ("ppo", {}, 16, 0.05, True, (1, 1, 1, 0, 0, 1)),
    # PPO without a KL and one step over the whole batch: the step's own forward does it all.
    ("ppo", {"epochs": 1, "minibatch_size": 16}, 16, 0.0, True, (0, 0, 0, 1, 1, 1)),
    # ... with two epochs the values come from a pass before the update.
    ("ppo", {"epochs": 2, "minibatch_size": 16}, 16, 0.0, True, (0, 0, 1, 0, 1, 1)),
    # an adaptive KL runs the reference even at coefficient 0.
    ("ppo", {"kl_target": 6.0}, 16, 0.0, True, (1, 1, 1, 0, 0, 1)),
    # GRPO without a KL: nothing but the minibatches, the first of which probes the mismatch.
    ("grpo", {"minibatch_size": 16}, 16, 0.05, True, (0, 0, 0, 0, 1, 0)),
    ("grpo", {"minibatch_size": 8}, 16, 0.05, True, (0, 0, 0, 0, 0, 0)),
    # its KL is a loss term: the reference runs, the workers' logprobs stay the old ones.
    ("grpo", {"kl_loss_coef": 0.01, "minibatch_size": 16}, 16, 0.05, True, (1, 0, 0, 0, 1, 0)),
    # truncated importance sampling needs the learner's own old logprobs beside the workers'.
    ("grpo", {"rollout_is": "truncated", "minibatch_size": 16}, 16, 0.0, True, (0, 1, 1, 0, 0, 0)),
    # adapter dropout: a training forward is not the old policy's, so nothing is probed.
    ("gspo", {"minibatch_size": 16}, 16, 0.0, False, (0, 0, 0, 0, 0, 0)),
    ("cispo", {"kl_loss_coef": 0.01, "minibatch_size": 16}, 16, 0.0, True, (1, 0, 0, 0, 1, 0)),
    # REINFORCE++ keeps its KL in the reward: with the reference running, old logprobs are
    # recomputed so the KL of an unchanged policy is exactly 0.
    ("reinforce_pp", {}, 16, 0.05, True, (1, 1, 1, 0, 0, 1)),
    ("reinforce_pp", {"kl_loss_coef": 0.01}, 16, 0.0, True, (1, 1, 1, 0, 0, 1)),
    ("reinforce_pp", {"minibatch_size": 16}, 16, 0.0, True, (0, 0, 0, 0, 1, 1)),
]


@pytest.mark.parametrize(
    ("algo", "overrides", "rows", "kl_coef", "deterministic", "expected"), PLANS
)
def test_the_update_plans_its_passes_once(algo, overrides, rows, kl_coef, deterministic, expected):
    config = load_config("tiny", {"algo": algo})
    ppo_config = dataclasses.replace(config.ppo, **overrides)
    passes = plan_passes(
        ALGOS[algo], ppo_config, batch_size=rows, kl_coef=kl_coef, deterministic=deterministic
    )
    assert passes == Passes(*map(bool, expected))


# The same update, computed another way: packed rows, or micro-batches of at most 40 tokens
# (several per minibatch) with their gradients accumulated.
WAYS = {
    "packed": {"learner.packing": True},
    "micro-batches": {"learner.max_tokens_per_micro_batch": 40},
    "packed micro-batches": {"learner.packing": True, "learner.max_tokens_per_micro_batch": 40},
}


@pytest.mark.parametrize("way", list(WAYS))
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_packing_and_micro_batches_take_the_step_one_padded_minibatch_takes(prompts, algo, way):
    """``learner.packing`` runs every sequence's real tokens in one row, no padding;
    ``learner.max_tokens_per_micro_batch`` accumulates a minibatch's gradients over parts: the
    losses, the gradient norm and the updated weights are those of one padded minibatch."""
    over = {"algo": algo, "rollout.samples_per_prompt": 2, "ppo.minibatch_size": 8}
    _, worker = make(load_config("tiny", over))
    rows = [p for p in prompts for _ in range(2)]
    batch = worker.generate(rows, list(range(len(rows))))
    # Responses of 1 to 8 tokens, as if each ended at an EOS: rows of unequal lengths.
    width = batch.response_mask.shape[1]
    keep = np.arange(width)[None, :] < (1 + np.arange(len(rows)) % width)[:, None]
    batch = dataclasses.replace(
        batch, response_mask=batch.response_mask * keep, logprobs=batch.logprobs * keep
    )
    scores = np.linspace(-1.0, 1.0, len(rows))
    groups = np.repeat(np.arange(len(prompts)), 2)
    out = []
    for extra in ({}, WAYS[way]):
        torch.manual_seed(0)
        learner, _ = make(load_config("tiny", {**over, **extra}))
        metrics = learner.train(batch, scores, groups=groups)
        out.append((metrics, {k: v.clone() for k, v in learner.net.state_dict().items()}))
    (padded, weights), (packed, packed_weights) = out
    for key in ("learner/policy_loss", "learner/grad_norm", "learner/entropy"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), key
    gaps = torch.cat([(packed_weights[k] - weights[k]).abs().flatten() for k in weights])
    assert float((gaps > 1e-6).float().mean()) < 1e-4  # AdamW's sign flips on round-off
