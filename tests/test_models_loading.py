import os
import pickle
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distrl.errors import ModelError
from distrl.models.loading import (
    DEFAULT_MODEL_DIRNAME,
    QHead,
    ValueHead,
    count_parameters,
    load_policy,
    model_source_dir,
    save_pretrained_atomic,
    select_device,
    select_dtype,
    tiny_model,
)
from distrl.models.policy import PolicyWithValue
from distrl.weights.tensors import get_weights

VOCAB = 101
SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
KINDS = ["tiny-llama", "tiny-gpt2"]


def tiny(kind: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    return load_policy(
        kind, vocab_size=VOCAB, special_ids=SPECIAL, device="cpu", seed=seed, **kwargs
    )


def batch(b: int = 3, t: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :2] = 0  # one left-padded row
    return ids, mask


def logits_of(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_builds_fast_with_vocab_and_special_ids(kind):
    start = time.perf_counter()
    model = tiny(kind)
    print(f"{kind} build: {time.perf_counter() - start:.3f} s")
    assert not model.training and model.dtype == torch.float32
    assert model.config.vocab_size == VOCAB and model.config.eos_token_id == 2
    assert count_parameters(model) < 200_000
    ids, mask = batch()
    assert logits_of(model, ids, mask).shape == (3, 7, VOCAB)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_is_deterministic_per_seed(kind):
    ids, _ = batch()
    rng_before = torch.get_rng_state()
    same = torch.equal(logits_of(tiny(kind, seed=3), ids), logits_of(tiny(kind, seed=3), ids))
    assert same
    assert not torch.allclose(
        logits_of(tiny(kind, seed=3), ids), logits_of(tiny(kind, seed=4), ids)
    )
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeding left the global RNG alone


def test_tiny_model_rejects_out_of_range_special_ids():
    with pytest.raises(ModelError, match="eos_token_id"):
        tiny_model("tiny-llama", vocab_size=10, special_ids={"eos_token_id": 10})


@pytest.mark.parametrize("kind", KINDS)
def test_policy_with_value_matches_plain_logits(kind):
    model = tiny(kind)
    ids, mask = batch()
    policy = PolicyWithValue(model)
    with torch.no_grad():
        logits, values = policy(ids, mask)
    assert torch.allclose(logits, logits_of(model, ids, mask), atol=1e-6)
    assert values.shape == (3, 7) and values.dtype == torch.float32
    assert values.abs().max() < 1.0  # small init keeps early values near zero
    _, values = policy(ids, mask)
    values.sum().backward()
    assert policy.value_head.linear.weight.grad is not None
    assert model.get_input_embeddings().weight.grad is not None  # gradients reach the LM


def test_value_head_shapes_and_dropout():
    head = ValueHead(8, dropout=0.5)
    assert head(torch.randn(2, 5, 8)).shape == (2, 5)
    assert head(torch.randn(2, 5, 8, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_q_head_starts_equal_to_logits_and_is_a_copy(kind):
    model = tiny(kind)
    ids, mask = batch()
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        for head in (QHead(model.get_output_embeddings()), QHead(model.lm_head.weight)):
            assert torch.allclose(head(hidden), logits_of(model, ids, mask), atol=1e-6)
        head.linear.weight.add_(1.0)
    assert not torch.equal(head.linear.weight, model.lm_head.weight)


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_atomic_loads_back_identical(kind, tmp_path):
    model = tiny(kind, seed=5)
    folder = save_pretrained_atomic(model, None, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids, mask = batch()
    assert torch.equal(logits_of(model, ids, mask), logits_of(loaded, ids, mask))
    assert any(folder.glob("*.safetensors"))
    # Saving again replaces the folder and leaves no temp or old siblings behind.
    save_pretrained_atomic(tiny(kind, seed=6), None, folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    reloaded = load_policy(str(folder), device="cpu")
    assert torch.equal(logits_of(reloaded, ids, mask), logits_of(tiny(kind, seed=6), ids, mask))
    assert model_source_dir(str(folder)) == folder


def test_save_pretrained_atomic_without_overwrite_keeps_existing(tmp_path):
    folder = save_pretrained_atomic(tiny("tiny-llama", seed=1), None, tmp_path / "m")
    before = (folder / "model.safetensors").read_bytes()
    with pytest.raises(OSError):
        save_pretrained_atomic(tiny("tiny-llama", seed=2), None, folder, overwrite=False)
    assert (folder / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


class BrokenTokenizer:
    def save_pretrained(self, folder):
        raise KeyboardInterrupt  # the user hits Ctrl-C halfway through a save


def test_interrupted_save_leaves_no_folder_and_keeps_the_old_one(tmp_path):
    model = tiny("tiny-llama")
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(model, BrokenTokenizer(), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    folder = save_pretrained_atomic(model, None, tmp_path / "old")
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_atomic(tiny("tiny-llama", seed=9), BrokenTokenizer(), folder)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    ids, _ = batch()
    assert torch.equal(
        logits_of(load_policy(str(folder), device="cpu"), ids), logits_of(model, ids)
    )


def test_load_policy_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match=f"model path {missing} does not exist"):
        load_policy(str(missing), device="cpu")
    with pytest.raises(ModelError, match="does not exist"):
        load_policy("./no-such-checkpoint", device="cpu")


def test_load_policy_folder_without_config(tmp_path):
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(ModelError, match=f"{tmp_path} is not a Hugging Face model folder"):
        load_policy(str(tmp_path), device="cpu")


def test_load_policy_folder_without_weights(tmp_path):
    tiny("tiny-llama").config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="no weights"):
        load_policy(str(tmp_path), device="cpu")


class RunsCode:
    """What an attacker pickles: unpickling it would create ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_model_folder(folder, marker):
    """A model folder whose weights are a pickle that runs code when loaded unsafely."""
    tiny("tiny-llama").config.save_pretrained(folder)
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": RunsCode(marker)}, f)
    return folder


def test_a_pickled_or_torn_model_folder_is_one_line_naming_it(tmp_path):
    marker = tmp_path / "code-ran"
    folder = pickled_model_folder(tmp_path / "pickled", marker)
    with pytest.raises(ModelError) as refused:
        load_policy(str(folder), device="cpu")
    message = str(refused.value)
    assert message.startswith(f"cannot load the model in {folder}: ") and "\n" not in message
    assert "pickle that weights-only loading refuses" in message and "safetensors" in message
    assert not marker.exists()  # nothing was unpickled
    torn = tmp_path / "torn"
    save_pretrained_atomic(tiny("tiny-llama"), None, torn)
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match=f"cannot load the model in {torn}: ") as refused:
        load_policy(str(torn), device="cpu")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("kind", KINDS)
def test_load_policy_tiny_needs_vocab_size(kind):
    with pytest.raises(ModelError, match=kind):
        load_policy(kind, device="cpu")
    assert model_source_dir(kind) is None


def test_load_policy_hub_id_offline_names_the_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="no-such-org/no-such-model.*network"):
        load_policy("no-such-org/no-such-model", device="cpu")


def test_select_dtype():
    cpu = torch.device("cpu")
    assert select_dtype("auto", cpu) == torch.float32
    assert select_dtype("bfloat16", cpu) == torch.bfloat16
    assert select_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ModelError, match="float64"):
        select_dtype("float64", cpu)
    assert load_policy("tiny-gpt2", vocab_size=VOCAB, device="cpu", dtype="bfloat16").dtype == (
        torch.bfloat16
    )


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelError, match="nonsense"):
        select_device("nonsense")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_select_device_cuda_without_cuda():
    with pytest.raises(ModelError, match="no CUDA"):
        select_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_policy_on_cuda():
    model = load_policy("tiny-llama", vocab_size=VOCAB, device="cuda")
    assert model.device.type == "cuda" and model.dtype == select_dtype("auto", "cuda")
    ids, mask = batch()
    logits, values = PolicyWithValue(model)(ids.cuda(), mask.cuda())
    assert logits.shape == (3, 7, VOCAB) and values.shape == (3, 7)
    assert all(t.device.type == "cpu" for t in get_weights(model).values())


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory):
    """A fresh distrl cache with the packaged SmolLM2 converted once (exercises the GGUF path)."""
    cache = tmp_path_factory.mktemp("distrl-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DISTRL_CACHE_DIR", str(cache))
        start = time.perf_counter()
        load_policy("default", device="cpu")
        print(f"GGUF conversion + first load: {time.perf_counter() - start:.1f} s")
    return cache


@pytest.mark.slow
def test_default_model_answers_in_english(default_cache, monkeypatch):
    monkeypatch.setenv("DISTRL_CACHE_DIR", str(default_cache))
    folder = model_source_dir("default")
    assert folder == default_cache / "models" / DEFAULT_MODEL_DIRNAME
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # no temp left behind
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.chat_template and tok.eos_token_id == tok.pad_token_id == 2 and len(tok) == 49152
    model = load_policy("default", device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(model.config, "quantization_config")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    assert "Paris" in answer
    assert "lm_head.weight" not in get_weights(model)


@pytest.mark.slow
def test_default_model_reloads_from_cache(default_cache, monkeypatch):
    monkeypatch.setenv("DISTRL_CACHE_DIR", str(default_cache))
    folder = default_cache / "models" / DEFAULT_MODEL_DIRNAME
    written = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    model = load_policy("default", device="cpu")
    # Loaded from the cached folder as it was: a reconversion would have rewritten it.
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == written
    assert model.config.vocab_size == 49152
    assert 130e6 < count_parameters(model) < 140e6
