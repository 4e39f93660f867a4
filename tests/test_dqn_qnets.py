import pytest
import torch

from distrl.config import DQNConfig, load_config
from distrl.dqn.qnets import (
    LMHeadQNetwork,
    PerformerQNetwork,
    StateQNetwork,
    build_qnet,
    last_positions,
    position_ids,
    sparsity,
)
from distrl.errors import ConfigError, ModelError
from distrl.models.loading import tiny_model
from distrl.weights.tensors import get_weights

VOCAB = 61
KINDS = ["tiny-llama", "tiny-gpt2"]
BUILDS = {
    "lm_head": DQNConfig(q_network="lm_head"),
    "performer": DQNConfig(q_network="performer"),
    "mlp": DQNConfig(q_network="mlp"),
    "mlp+prune+autoencoder": DQNConfig(q_network="mlp", prune_sparsity=0.5, autoencoder_dim=8),
}


def ids_and_mask(b: int = 3, t: int = 7, seed: int = 0):
    ids = torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row
    return ids, mask


def test_last_positions_and_position_ids_handle_both_paddings():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    assert last_positions(mask).tolist() == [4, 2, 4, 0]
    assert position_ids(mask).tolist() == [
        [0, 0, 0, 1, 2],
        [0, 1, 2, 2, 2],
        [0, 1, 2, 3, 4],
        [0, 0, 0, 0, 0],
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_lm_head_q_starts_as_the_last_position_log_probabilities(kind):
    model = tiny_model(kind, vocab_size=VOCAB, seed=0).eval()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        q = LMHeadQNetwork(model)(ids, mask)
    assert q.shape == (3, VOCAB) and q.dtype == torch.float32
    assert torch.allclose(q, torch.log_softmax(logits[:, -1], -1), atol=1e-5)


def test_lm_head_q_keeps_the_tokenizer_vocabulary():
    model = tiny_model("tiny-llama", vocab_size=VOCAB, seed=0).eval()
    ids, mask = ids_and_mask()
    with torch.no_grad():
        full = LMHeadQNetwork(model)(ids, mask)
        q = LMHeadQNetwork(model, vocab_size=50)(ids, mask)
    # The advantage is a log-softmax over the kept vocabulary: same ranking, renormalised.
    assert q.shape == (3, 50)
    assert torch.allclose(q, torch.log_softmax(full[:, :50], -1), atol=1e-5)
    with pytest.raises(ModelError, match="larger than"):
        LMHeadQNetwork(model, vocab_size=VOCAB + 1)


@pytest.mark.parametrize("name", BUILDS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_q_network_gives_finite_q_with_gradients_and_leaves_the_policy(name, kind):
    policy = tiny_model(kind, vocab_size=VOCAB, seed=0).eval()
    before = get_weights(policy)
    qnet = build_qnet(BUILDS[name], policy, VOCAB, seed=1).train()
    expected = {"lm_head": LMHeadQNetwork, "performer": PerformerQNetwork}
    assert isinstance(qnet, expected.get(name, StateQNetwork))
    ids, mask = ids_and_mask()
    q = qnet(ids, mask)
    assert q.shape == (3, VOCAB) and q.dtype == torch.float32 and torch.isfinite(q).all()
    loss = torch.nn.functional.smooth_l1_loss(q.gather(1, ids[:, :1]), torch.ones(3, 1))
    (loss + qnet.aux_loss()).backward()
    trainable = [p for p in qnet.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert (qnet.aux_loss().item() > 0) == ("autoencoder" in name)
    if "prune" in name:
        assert sparsity(qnet.encoder) == pytest.approx(0.5, abs=0.01)
    assert sparsity(policy) == 0.0
    after = get_weights(policy)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_build_qnet_is_seeded_and_leaves_the_global_rng_alone():
    policy = tiny_model("tiny-llama", vocab_size=VOCAB, seed=0)
    ids, mask = ids_and_mask()
    state = torch.random.get_rng_state()
    first, again, other = (build_qnet(BUILDS["performer"], policy, VOCAB, s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.max_len == policy.config.max_position_embeddings
    with torch.no_grad():
        assert torch.equal(first(ids, mask), again(ids, mask))
        assert not torch.allclose(first(ids, mask), other(ids, mask))


def test_options_of_the_mlp_network_are_refused_on_other_kinds():
    with pytest.raises(ConfigError, match="apply to dqn.q_network=mlp only"):
        DQNConfig(q_network="lm_head", autoencoder_dim=8)
    with pytest.raises(ConfigError, match="dqn.prune_sparsity"):
        load_config("tiny", {"dqn.q_network": "performer", "dqn.prune_sparsity": 0.5})


@pytest.mark.parametrize("name", BUILDS)
@pytest.mark.parametrize("kind", KINDS)
def test_incremental_q_equals_the_full_forward(name, kind):
    """``start`` then ``step`` per appended token (the KV-cached path of lm_head, recompute
    elsewhere) gives the Q-values of a full forward over each longer state."""
    policy = tiny_model(kind, vocab_size=VOCAB, seed=0).eval()
    qnet = build_qnet(BUILDS[name], policy, VOCAB, seed=1).eval()
    ids, mask = ids_and_mask(t=9)
    with torch.no_grad():
        q, cache = qnet.start(ids[:, :6], mask[:, :6])
        assert torch.allclose(q, qnet(ids[:, :6], mask[:, :6]), atol=1e-5)
        for end in (7, 8, 9):
            q, cache = qnet.step(ids[:, :end], mask[:, :end], cache)
            assert torch.allclose(q, qnet(ids[:, :end], mask[:, :end]), atol=1e-4), end


@pytest.mark.parametrize("name", BUILDS)
@pytest.mark.parametrize("kind", KINDS)
def test_state_and_next_equal_separate_forwards(name, kind):
    """The TD update's Q(s) and Q(s') (s a prefix of s', shorter by ``back`` tokens) equal
    forwards over each state alone, and only Q(s) carries a gradient."""
    policy = tiny_model(kind, vocab_size=VOCAB, seed=0).eval()
    qnet = build_qnet(BUILDS[name], policy, VOCAB, seed=1).eval()
    ids, mask = ids_and_mask(t=9)
    back = torch.tensor([1, 3, 2])
    q_state, q_next = qnet.state_and_next(ids, mask, back)
    assert q_state.requires_grad and not q_next.requires_grad
    with torch.no_grad():
        assert torch.allclose(q_next, qnet(ids, mask), atol=1e-5)
        for row, b in enumerate(back.tolist()):
            alone = qnet(ids[row : row + 1, :-b], mask[row : row + 1, :-b])
            assert torch.allclose(q_state[row], alone[0], atol=1e-4), (row, b)
