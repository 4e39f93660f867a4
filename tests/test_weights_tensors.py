"""A role's weights as published and loaded (``distrl.weights.tensors``): round trips, tied
embeddings stored once, zero-copy views, bfloat16 through Ray's object store, and CUDA to CPU."""

import numpy as np
import pytest
import torch
from test_models_loading import KINDS, VOCAB, batch, logits_of, tiny  # the same tiny policies

from distrl.errors import ModelError
from distrl.models.loading import count_parameters, load_policy, select_dtype, tiny_model
from distrl.weights.tensors import VersionedWeights, get_weights, publish_weights, set_weights


@pytest.mark.parametrize("kind", KINDS)
def test_weights_round_trip_between_models(kind):
    a, b = tiny(kind, seed=0), tiny(kind, seed=1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = get_weights(a)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    set_weights(b, state)
    ids, mask = batch()
    assert torch.equal(logits_of(a, ids, mask), logits_of(b, ids, mask))
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert not torch.equal(next(a.parameters()).detach(), state[next(iter(state))])  # a copy


def test_tied_embeddings_stored_once_and_stay_tied():
    a = tiny_model("tiny-llama", vocab_size=VOCAB, seed=0, tie_word_embeddings=True).eval()
    b = tiny_model("tiny-llama", vocab_size=VOCAB, seed=1, tie_word_embeddings=True).eval()
    untied = tiny_model("tiny-llama", vocab_size=VOCAB, tie_word_embeddings=False)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    assert count_parameters(untied) - count_parameters(a) == VOCAB * 64
    with torch.no_grad():
        a.model.embed_tokens.weight.mul_(2.0)
    state = get_weights(a)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    set_weights(b, VersionedWeights(version=7, state=state).state)
    assert b.lm_head.weight is b.model.embed_tokens.weight
    ids, mask = batch()
    assert torch.equal(logits_of(a, ids, mask), logits_of(b, ids, mask))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_published_weights_are_views_of_the_parameters(dtype):
    """Publishing makes no element-wise copy: each array is the parameter's own memory
    (bfloat16 as its raw int16 bits), and the receiver gets the same values bit for bit."""
    a, b = tiny("tiny-llama", seed=0, dtype=dtype), tiny("tiny-llama", seed=1, dtype=dtype)
    published = publish_weights(a, version=4)
    assert published.version == 4
    bits = torch.int16 if dtype == "bfloat16" else torch.float32
    for name, param in a.state_dict().items():
        array = published.state[name]
        assert isinstance(array, np.ndarray), name
        assert np.shares_memory(array, param.view(bits).numpy()), name
    assert published.bfloat16 == (set(published.state) if dtype == "bfloat16" else set())
    params = a.state_dict().values()
    assert published.nbytes == sum(p.numel() * p.element_size() for p in params)
    set_weights(b, published.tensors())
    for name, param in b.state_dict().items():
        assert param.dtype == select_dtype(dtype, "cpu")
        assert torch.equal(param, a.state_dict()[name]), name


def test_bfloat16_weights_cross_the_object_store_without_a_copy(ray_session):
    """Through Ray the int16 views are written once and read back as read-only views of the
    object store (no unpickling copy), then reinterpreted as bfloat16."""
    model = tiny("tiny-gpt2", dtype="bfloat16")
    fetched = ray_session.get(ray_session.put(publish_weights(model, version=1)))
    assert fetched.bfloat16 == set(fetched.state)
    assert all(not a.flags.writeable for a in fetched.state.values())  # mapped, not copied
    received = tiny("tiny-gpt2", seed=3, dtype="bfloat16")
    set_weights(received, fetched.tensors())
    ids, mask = batch()
    assert torch.equal(logits_of(model, ids, mask), logits_of(received, ids, mask))


def test_set_weights_refuses_a_state_of_another_model():
    with pytest.raises(ModelError, match="unexpected"):
        set_weights(tiny("tiny-llama"), get_weights(tiny("tiny-gpt2")))


def test_versioned_weights_is_frozen():
    weights = VersionedWeights(version=1, state={})
    with pytest.raises(AttributeError):
        weights.version = 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_weights_published_from_cuda_load_into_a_cpu_model():
    model = load_policy("tiny-llama", vocab_size=VOCAB, device="cuda", dtype="bfloat16")
    published = publish_weights(model, version=1)
    assert all(isinstance(a, np.ndarray) for a in published.state.values())
    received = tiny("tiny-llama", seed=1, dtype="bfloat16")
    set_weights(received, published.tensors())
    for name, param in received.state_dict().items():
        assert torch.equal(param, model.state_dict()[name].cpu()), name
