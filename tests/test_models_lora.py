"""LoRA (``learner.lora.rank > 0``): adapters trained and published, the base model shared with
the reference, checkpoints in PEFT's format and merged Hugging Face exports, PPO and DQN."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from distrl.config import LoraConfig, cli, load_config
from distrl.data.examples import load_examples
from distrl.dqn.learner import QNET_FILE, RUN_FILE, QLearner, load_q_policy
from distrl.dqn.replay import from_config
from distrl.dqn.rollout import QRolloutWorker, make_transitions
from distrl.errors import ConfigError, DistrlError, ModelError
from distrl.loop.driver import train
from distrl.models.loading import load_policy, model_source_dir, tiny_model
from distrl.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_lora
from distrl.models.policy import build_model, build_tokenizer, encode_prompts
from distrl.outputs.metrics import read_metrics
from distrl.pg.learner import Learner
from distrl.pg.rollout import RolloutWorker
from distrl.run import parser as run_parser
from distrl.runtime.checkpoint import OPTIMIZER_FILE
from distrl.weights.tensors import get_weights, is_adapter_name, publish_weights, set_weights

LORA = {"learner.lora.rank": 8, "learner.lr": 1e-2}


def lora_config(**over):
    return load_config("tiny", {**LORA, **over})


def make(config):
    return Learner(**Learner.arguments(config)), RolloutWorker(**RolloutWorker.arguments(config))


@pytest.fixture(scope="module")
def prompts():
    config = load_config("tiny")
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    examples = load_examples("default", limit=8)
    return encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)


def updated(config, prompts, updates=1):
    """A learner after ``updates`` PPO updates on one batch, the worker (still holding the
    initial policy) and the batch."""
    learner, worker = make(config)
    batch = worker.generate(prompts, list(range(len(prompts))))
    scores = np.linspace(-1.0, 1.0, len(prompts)).astype(np.float32)
    for _ in range(updates):
        learner.train(batch, scores)
    return learner, worker, batch


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


# ---- config and injection ----------------------------------------------------------------


def test_the_flag_parses_and_bad_values_name_the_field():
    argv = ["--config", "tiny", "--learner.lora.rank", "8", "--learner.lora.alpha", "32"]
    argv += ["--learner.lora.target_modules", "[q_proj, v_proj]"]
    _, config = cli.parse_config(run_parser(argv), argv)
    assert config.learner.lora == LoraConfig(
        rank=8, alpha=32.0, target_modules=("q_proj", "v_proj")
    )
    assert load_config("tiny").learner.lora.rank == 0  # full fine-tuning unless asked
    for over, fragment in [
        ({"learner.lora.rank": -1}, "learner.lora.rank: -1 is out of range"),
        ({"learner.lora.dropout": 1.0}, "learner.lora.dropout"),
        ({"learner.lora.target_modules": "[]"}, "learner.lora: target_modules must name"),
        ({"learner.lora.target_modules": "[all-linear, q_proj]"}, "all-linear stands alone"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            load_config("tiny", over)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_adapters_go_in_place_and_start_as_the_base_model(name):
    model = tiny_model(name, vocab_size=300, dtype=torch.bfloat16)
    trunk, head = model.base_model, model.get_output_embeddings()
    ids = torch.randint(0, 300, (2, 9))
    before = logits(model, ids)
    assert add_lora(model, LoraConfig(rank=4)) is model
    # distrl's forward passes read the trunk and the LM head: both are still what they were.
    assert model.base_model is trunk and model.get_output_embeddings() is head
    assert torch.equal(logits(model, ids), before)  # B = 0: the base model's logits exactly
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(is_adapter_name(n) for n in trained)
    assert {p.dtype for p in trained.values()} == {torch.float32}  # adapters in float32
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    # Weights move as the adapters alone: a full state is refused, never written into the base.
    full = get_weights(tiny_model(name, vocab_size=300, dtype=torch.bfloat16, seed=1))
    with pytest.raises(ModelError, match="unexpected"):
        set_weights(model, full)
    assert torch.equal(logits(model, ids), before)
    set_weights(model, get_weights(model))


def test_target_modules_that_fit_no_layer_are_named():
    model = tiny_model("tiny-gpt2", vocab_size=300)
    with pytest.raises(ModelError, match="learner.lora.target_modules"):
        add_lora(model, LoraConfig(rank=4, target_modules=("q_proj",)))


# ---- PPO: training, publication, reference ------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2"])
def test_a_worker_with_the_published_adapters_computes_the_learners_logprobs(prompts, model):
    learner, worker, _ = updated(lora_config(**{"model.name": model}), prompts)
    weights = learner.weights()
    assert weights.state and all(is_adapter_name(n) for n in weights.state)
    adapters = [p for n, p in learner.net.model.named_parameters() if is_adapter_name(n)]
    assert weights.nbytes == sum(p.numel() * 4 for p in adapters)  # no base, no value head
    assert learner.publish_metrics() == {"publish/bytes": float(weights.nbytes)}
    stale = worker.generate(prompts, list(range(len(prompts))))
    assert np.abs(learner.logprobs(stale) - stale.logprobs).max() > 1e-3  # the update moved it
    assert worker.set_weights(weights) == 1
    fresh = worker.generate(prompts, list(range(len(prompts))))
    assert np.abs(learner.logprobs(fresh) - fresh.logprobs).max() < 1e-5


def test_the_reference_is_the_base_model_with_adapters_off(prompts):
    config = lora_config()
    learner, _, batch = updated(config, prompts, updates=2)
    assert learner.reference is None  # one base model in the learner, not a second copy
    base = build_model(config.model, learner.tokenizer, seed=config.seed)
    ids = torch.from_numpy(np.concatenate([batch.prompt_ids, batch.response_ids], 1))
    with learner.reference_model() as reference:
        assert torch.equal(logits(reference.model, ids), logits(base, ids))
    policy = logits(learner.net.model, ids)  # adapters back on after the block
    assert (policy - logits(base, ids)).abs().max() > 1e-3
    assert all(p.requires_grad for p in learner.opt.params)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_only_adapters_and_the_value_head_are_trained(prompts, algo):
    config = lora_config(algo=algo, **{"rollout.samples_per_prompt": 2, "ppo.minibatch_size": 4})
    learner, worker = make(config)
    names = {id(p): n for n, p in learner.net.named_parameters()}
    trained = [names[id(p)] for p in learner.opt.params]
    heads = [n for n in trained if not is_adapter_name(n)]
    assert heads == (["value_head.linear.weight", "value_head.linear.bias"] * (algo == "ppo"))
    before = {n: p.detach().clone() for n, p in learner.net.named_parameters()}
    batch = worker.generate([p for p in prompts for _ in range(2)], list(range(2 * len(prompts))))
    groups = np.repeat(np.arange(len(prompts)), 2)
    scores = np.tile([1.0, 0.0], len(prompts)).astype(np.float32)
    for _ in range(2):
        learner.train(batch, scores, groups=groups)
    after = dict(learner.net.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(trained)  # the base never moves
    assert any("lora_B" in n for n in changed)


def test_gradient_checkpointing_still_trains_the_adapters(prompts):
    learner, _, _ = updated(lora_config(**{"model.gradient_checkpointing": True}), prompts)
    lora_b = [p for n, p in learner.net.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B started at zero


# ---- checkpoints -------------------------------------------------------------------------


def test_checkpoint_resume_is_exact(tmp_path, prompts):
    config = lora_config()
    learner, _, batch = updated(config, prompts, updates=2)
    learner.save(str(tmp_path), {"step": 2})
    files = set(os.listdir(tmp_path))
    assert {ADAPTER_WEIGHTS, ADAPTER_CONFIG, OPTIMIZER_FILE} <= files
    assert "model.safetensors" not in files and "config.json" not in files  # no full weights
    fresh, _ = make(config)
    assert fresh.load(str(tmp_path)) == {"step": 2}
    assert fresh.version == learner.version == 2 and fresh.steps == learner.steps
    assert np.array_equal(fresh.logprobs(batch), learner.logprobs(batch))
    saved, restored = learner.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for k, v in saved["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(v[key], restored["state"][k][key]), (k, key)
    assert torch.equal(fresh.net.value_head.linear.weight, learner.net.value_head.linear.weight)
    # Both go on as one: the next update (minibatch order from the same RNG) is identical.
    scores = np.linspace(-1.0, 1.0, len(prompts)).astype(np.float32)
    rng = torch.get_rng_state()
    learner.train(batch, scores)
    torch.set_rng_state(rng)
    fresh.train(batch, scores)
    assert np.array_equal(fresh.logprobs(batch), learner.logprobs(batch))


def test_the_adapter_is_in_pefts_own_format(tmp_path, prompts):
    config = lora_config()
    learner, _, batch = updated(config, prompts)
    learner.save(str(tmp_path))
    base = build_model(config.model, learner.tokenizer, seed=config.seed)
    peft_model = PeftModel.from_pretrained(base, tmp_path)
    ids = torch.from_numpy(np.concatenate([batch.prompt_ids, batch.response_ids], 1))
    assert torch.equal(logits(peft_model, ids), logits(learner.net.model, ids))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_merged_export_is_a_plain_hugging_face_folder(tmp_path, prompts, dtype):
    config = lora_config(**{"model.dtype": dtype})
    learner, _, batch = updated(config, prompts)
    learner.save(str(tmp_path), {"step": 1})
    learner.export_merged(str(tmp_path))
    assert not (tmp_path / ADAPTER_WEIGHTS).exists() and not (tmp_path / ADAPTER_CONFIG).exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not any(is_adapter_name(n) for n in merged.state_dict())
    ids = torch.from_numpy(np.concatenate([batch.prompt_ids, batch.response_ids], 1))
    ours = logits(learner.net.model, ids)
    gap = (logits(merged, ids) - ours).abs().max()
    # float32: round-off only. bfloat16: the merged weights are rounded to bfloat16 once.
    assert gap < (1e-4 if dtype == "float32" else 0.1 * ours.abs().max())
    # As chat and validate load it: distrl's loader and the checkpoint's tokenizer.
    assert load_policy(str(tmp_path), device="cpu").config.vocab_size == merged.config.vocab_size


def test_full_and_lora_learners_refuse_each_others_checkpoints(tmp_path, prompts):
    full, _ = make(load_config("tiny"))
    full.save(str(tmp_path / "full"))
    lora, _ = make(lora_config())
    lora.save(str(tmp_path / "lora"))
    with pytest.raises(ModelError, match="holds no LoRA adapter"):
        make(lora_config())[0].load(str(tmp_path / "full"))
    with pytest.raises(DistrlError, match="holds a LoRA adapter"):
        make(load_config("tiny"))[0].load(str(tmp_path / "lora"))
    with pytest.raises(ModelError, match="r 8 differs"):
        make(lora_config(**{"learner.lora.rank": 4}))[0].load(str(tmp_path / "lora"))


def test_bfloat16_learner_and_worker_on_the_cpu(prompts):
    config = lora_config(**{"model.dtype": "bfloat16", "rollout.temperature": 0.7})
    learner, worker, _ = updated(config, prompts)
    weights = learner.weights()
    assert not weights.bfloat16  # the adapters travel in float32
    worker.set_weights(weights)
    batch = worker.generate(prompts, list(range(len(prompts))))
    assert np.abs(learner.logprobs(batch) - batch.logprobs).max() < 0.05  # as test_bf16's


# ---- DQN ---------------------------------------------------------------------------------


def tiny_dqn(**over):
    base = {
        "algo": "dqn",
        "dqn.action_top_k": 4,
        "dqn.batch_size": 32,
        "dqn.n_step": 3,
        "rollout.max_new_tokens": 3,
        **LORA,
        "learner.lr": 1e-3,
    }
    return load_config("tiny", {**base, **over})


def dqn_roles(config, prompts, updates=3):
    learner = QLearner(**QLearner.arguments(config))
    worker = QRolloutWorker(**QRolloutWorker.arguments(config))
    replay = from_config(config.replay)
    out = worker.generate(prompts[:4], list(range(4)), epsilon=0.5)
    cols, prio = make_transitions(
        out, np.array([1.0, 0.0, 0.5, 0.0]), gamma=0.99, n_step=3, width=worker.width
    )
    replay.add(cols, prio)
    for _ in range(updates):
        ids, td, _ = learner.update(replay.sample(32))
        replay.update_priorities(ids, td)
    return learner, worker, replay


def test_dqn_trains_and_publishes_adapters_and_the_q_head_only(prompts):
    config = tiny_dqn(**{"dqn.target_update_interval": 2})
    learner, worker, replay = dqn_roles(config, prompts, updates=0)
    names = {id(p): n for n, p in learner.qnet.named_parameters()}
    trained = {names[id(p)] for p in learner.opt.params}
    heads = {n for n in trained if not is_adapter_name(n)}
    assert heads == {"q_head.linear.weight", "q_head.linear.bias", "value.weight", "value.bias"}
    assert learner.target is None and set(learner.target_state) == trained  # no second base
    base = {n: t.clone() for n, t in learner.qnet.state_dict().items() if not is_adapter_name(n)}
    ids = torch.tensor([prompts[0][:6], prompts[1][:6]])
    with torch.no_grad():
        q0 = learner.qnet(ids)
    targets, onlines = [], []
    for _ in range(3):
        learner.update(replay.sample(32))
        targets.append(learner.target_q(ids))
        with torch.no_grad():
            onlines.append(learner.qnet(ids))
    # The target holds the first network until the hard copy of step 2, and only that.
    assert torch.equal(targets[0], q0) and not torch.allclose(onlines[0], q0)
    assert torch.allclose(targets[1], onlines[1], atol=1e-6)
    assert torch.equal(targets[2], targets[1]) and not torch.allclose(targets[2], onlines[2])
    state = learner.qnet.state_dict()
    assert all(torch.equal(state[n], t) for n, t in base.items() if n.startswith("backbone"))
    weights = learner.weights()
    assert set(weights.state) == trained
    worker.set_weights(weights)
    with torch.no_grad():
        assert torch.allclose(worker.trainable()(ids), onlines[2], atol=1e-5)


def test_dqn_checkpoint_resume_and_merged_export(tmp_path, prompts):
    config = tiny_dqn(**{"dqn.tau": 0.5})
    learner, worker, replay = dqn_roles(config, prompts)
    learner.save(str(tmp_path), {"step": 3})
    saved = load_file(tmp_path / QNET_FILE)
    assert saved.keys() == learner.weights().state.keys()  # trained tensors only
    fresh = QLearner(**QLearner.arguments(config))
    assert fresh.load(str(tmp_path)) == {"step": 3}
    sample = replay.sample(32)
    assert np.array_equal(fresh.update(sample)[1], learner.update(sample)[1])
    for name, tensor in learner.target_state.items():
        assert torch.equal(fresh.target_state[name], tensor), name
    # chat and validate decode a LoRA step checkpoint as the worker holding its weights does,
    worker.set_weights(learner.weights())
    learner.save(str(tmp_path), {"step": 4})
    ids = np.array([prompts[0]])
    expected = worker.generate([prompts[0]], [0], greedy=True)
    policy, _ = load_q_policy(tmp_path)
    out = policy.decode(ids, np.ones_like(ids), config.rollout.max_new_tokens)
    assert np.array_equal(out.response_ids, expected.response_ids)
    # and its merged export: the whole Q-network under a run config without adapters.
    learner.export_merged(str(tmp_path))
    assert load_config(str(tmp_path / RUN_FILE)).learner.lora.rank == 0
    policy, _ = load_q_policy(tmp_path)
    out = policy.decode(ids, np.ones_like(ids), config.rollout.max_new_tokens)
    assert np.array_equal(out.response_ids, expected.response_ids)
    np.testing.assert_allclose(out.q_taken, expected.q_taken, atol=1e-4)
    with pytest.raises(ModelError, match="learner.lora.rank 0"):
        QLearner(**QLearner.arguments(config)).load(str(tmp_path))


def test_dqn_lora_needs_a_language_model_q_network():
    with pytest.raises(ConfigError, match="learner.lora.rank"):
        QLearner(**QLearner.arguments(tiny_dqn(**{"dqn.q_network": "performer"})))


# ---- the real model's shape and whole runs -----------------------------------------------


@pytest.mark.slow  # reads the packaged model's config (converting it on first use)
def test_lora_publishes_20x_fewer_bytes_on_the_default_models_shape():
    shape = AutoConfig.from_pretrained(model_source_dir("default"))
    model = AutoModelForCausalLM.from_config(shape, dtype=torch.float32)  # random, no weights
    full = publish_weights(model, 1).nbytes
    lora = publish_weights(add_lora(model, LoraConfig(rank=8)), 1).nbytes
    assert full > 500e6 and full / lora >= 20, (full, lora)


def tiny_run(tmp_path, **over):
    base = {"output.dir": str(tmp_path / "run"), "output.progress": False, "iterations": 2}
    return load_config("tiny", {**base, "learner.lora.rank": 8, **over})


@pytest.mark.slow  # a whole run on Ray
def test_ppo_run_with_lora(ray_session, tmp_path):
    config = tiny_run(tmp_path, **{"output.checkpoint_every": 1})
    run_dir = train(config)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    full = publish_weights(build_model(config.model, tokenizer, seed=0), 0)
    assert 0 < records[-1]["publish/bytes"] < full.nbytes / 20
    step = run_dir / "checkpoints" / "step_2"
    assert (step / ADAPTER_WEIGHTS).is_file() and not (step / "model.safetensors").exists()
    # final/ is a plain, merged Hugging Face folder: no adapter, and it loads without PEFT.
    final = run_dir / "final"
    assert not (final / ADAPTER_WEIGHTS).exists()
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    resumed = train(tiny_run(tmp_path, iterations=3), resume=True)
    assert [r["step"] for r in read_metrics(resumed / "metrics.jsonl")][-1] == 3


@pytest.mark.slow  # a whole run on Ray
def test_dqn_run_with_lora(ray_session, tmp_path):
    over = {
        "algo": "dqn",
        "dqn.learning_starts": 16,
        "dqn.batch_size": 16,
        "dqn.updates_per_iteration": 2,
        "dqn.action_top_k": 8,
    }
    run_dir = train(tiny_run(tmp_path, **over))
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    saved = load_file(run_dir / "checkpoints" / "step_2" / QNET_FILE)
    assert any(is_adapter_name(n) for n in saved) and not any("base_layer" in n for n in saved)
    # final/ holds the whole Q-network, adapters merged, under a run config without LoRA.
    final = run_dir / "final"
    assert not any(is_adapter_name(n) for n in load_file(final / QNET_FILE))
    assert load_config(str(final / RUN_FILE)).learner.lora.rank == 0
    policy, _ = load_q_policy(final)
    assert policy.top_k == 8


@pytest.mark.slow  # starts a Ray of its own
def test_the_command_line_trains_with_lora(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distrl.run",
            "--config",
            "tiny",
            "--learner.lora.rank",
            "8",
            "--iterations",
            "2",
            "--output-dir",
            str(tmp_path / "run"),
            "--output.progress",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_2" / ADAPTER_WEIGHTS).is_file()
