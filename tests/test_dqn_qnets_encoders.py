import pytest
import torch
from torch import nn

from distrl.dqn.qnets import (
    MLPQNetwork,
    StateAutoencoder,
    StateEncoder,
    StateQNetwork,
    prune_linear_layers,
    sparsity,
)
from distrl.dqn.qnets.encoders import linear_layers
from distrl.models.loading import tiny_model

VOCAB = 61
# Linear layers per tiny backbone: Llama 2 x (q, k, v, o, gate, up, down), GPT-2 2 x 4 Conv1D.
LAYERS = {"tiny-llama": 14, "tiny-gpt2": 8}
KINDS = list(LAYERS)


def ids_and_mask(b: int = 3, t: int = 7):
    ids = torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # one left-padded row
    return ids, mask


def test_sparsity_counts_zero_weights_of_linear_layers():
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].weight[:2] = 0.0  # 8 of 20
        net[2].weight.fill_(0.0)  # 10 of 10
        net[2].bias.fill_(0.0)  # biases do not count
    assert sparsity(net) == pytest.approx(18 / 30)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("amount", [0.3, 0.8])
def test_pruning_reaches_the_requested_sparsity_and_encoder_still_runs(kind, amount):
    model = tiny_model(kind, vocab_size=VOCAB, seed=0)
    embedding = model.get_input_embeddings().weight.clone()
    encoder = StateEncoder(model, prune_sparsity=amount)
    layers = linear_layers(encoder.backbone)
    assert len(layers) == LAYERS[kind]
    assert sparsity(encoder.backbone) == pytest.approx(amount, abs=0.01)
    for layer in layers:
        assert sparsity(layer) == pytest.approx(amount, abs=0.01)
        # prune.remove made it permanent: a plain parameter, no mask buffer or hook left.
        assert isinstance(layer.weight, nn.Parameter) and not layer._forward_pre_hooks
        assert not hasattr(layer, "weight_mask") and not hasattr(layer, "weight_orig")
    assert torch.equal(encoder.backbone.get_input_embeddings().weight, embedding)
    ids, mask = ids_and_mask()
    states = encoder(ids, mask)
    assert states.shape == (3, 64) and torch.isfinite(states).all()


def test_pruning_zeroes_the_smallest_magnitudes():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, -5.0, 0.3], [-0.2, 4.0, 0.05]]))
    assert prune_linear_layers(layer, 0.5) == 1
    assert torch.equal(layer.weight, torch.tensor([[0.0, -5.0, 0.3], [0.0, 4.0, 0.0]]))
    assert prune_linear_layers(layer, 0.0) == 0


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_state_encoder_pools_the_backbone_hidden_states(pool):
    model = tiny_model("tiny-llama", vocab_size=VOCAB, seed=0)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids).last_hidden_state
    expected = hidden[:, -1] if pool == "last" else hidden.mean(1)
    encoder = StateEncoder(model, pool=pool)
    assert torch.allclose(encoder(ids, torch.ones_like(ids)), expected, atol=1e-5)


def test_frozen_encoder_gets_no_gradient_and_stays_in_eval():
    encoder = StateEncoder(tiny_model("tiny-gpt2", vocab_size=VOCAB, seed=0))
    net = StateQNetwork(encoder, MLPQNetwork(encoder.out_dim, VOCAB, hidden=32)).train()
    assert not encoder.backbone.training and net.q_mlp.training
    ids, mask = ids_and_mask()
    q = net(ids, mask)
    assert q.shape == (3, VOCAB) and torch.isfinite(q).all()
    q.max(-1).values.sum().backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(p.grad is not None and p.grad.any() for p in net.q_mlp.parameters())
    assert net.aux_loss().item() == 0.0


def test_autoencoder_reconstruction_improves_with_adam():
    torch.manual_seed(0)
    # Embeddings on a 6-dimensional subspace of 32 dims: a code of 8 can hold them.
    data = torch.randn(128, 6) @ torch.randn(6, 32)
    autoencoder = StateAutoencoder(32, 8)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=3e-3)
    first = autoencoder.reconstruction_loss(data).item()
    for _ in range(50):
        optimizer.zero_grad()
        loss = autoencoder.reconstruction_loss(data)
        loss.backward()
        optimizer.step()
    last = autoencoder.reconstruction_loss(data).item()
    print(f"reconstruction loss {first:.3f} -> {last:.3f}")
    assert last < 0.7 * first
    code, reconstruction = autoencoder(data)
    assert code.shape == (128, 8) and reconstruction.shape == (128, 32)


def test_autoencoder_aux_loss_comes_from_the_last_grad_forward():
    torch.manual_seed(0)
    encoder = StateEncoder(tiny_model("tiny-llama", vocab_size=VOCAB, seed=0), pool="mean")
    autoencoder = StateAutoencoder(encoder.out_dim, 8)
    net = StateQNetwork(encoder, MLPQNetwork(8, VOCAB, hidden=16), autoencoder)
    ids, mask = ids_and_mask()
    q = net(ids, mask)
    assert q.shape == (3, VOCAB)
    aux = net.aux_loss()
    assert aux.item() > 0 and aux.requires_grad
    with torch.no_grad():
        net(ids[:, :4], mask[:, :4])  # e.g. the next states for targets
    assert net.aux_loss() is aux
    (q.mean() + aux).backward()
    assert autoencoder.decoder[0].weight.grad is not None
    assert autoencoder.encoder[0].weight.grad.any()
