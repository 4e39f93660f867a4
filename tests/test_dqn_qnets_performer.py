import copy

import pytest
import torch

from distrl.dqn.qnets import PerformerQNetwork
from distrl.errors import ModelError

VOCAB = 53


def performer(seed: int = 0, **sizes) -> PerformerQNetwork:
    torch.manual_seed(seed)
    sizes = dict(dim=32, depth=2, heads=4, num_features=16, max_len=64) | sizes
    return PerformerQNetwork(VOCAB, **sizes, seed=seed)


def test_performer_gives_finite_q_and_trains_every_parameter():
    net = performer()
    ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(0))
    q = net(ids, torch.ones_like(ids))
    assert q.shape == (3, VOCAB) and q.dtype == torch.float32 and torch.isfinite(q).all()
    q.gather(1, ids[:, :1]).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []
    assert net.aux_loss().item() == 0.0


def test_q_of_a_state_does_not_depend_on_padding():
    net = performer().eval()
    state = torch.tensor([[5, 9, 11, 3, 7]])
    alone = net(state, torch.ones_like(state))
    left = torch.tensor([[0, 0, 0, 5, 9, 11, 3, 7]])
    right = torch.tensor([[5, 9, 11, 3, 7, 0, 0, 0]])
    for ids in (left, right):
        mask = (torch.arange(8) >= 3) if ids is left else (torch.arange(8) < 5)
        padded = net(ids, mask.long().unsqueeze(0))
        assert torch.allclose(padded, alone, atol=1e-5)


def test_q_of_a_prefix_ignores_later_tokens():
    net = performer().eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0  # the state is the first 12 tokens; what follows is right padding
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % VOCAB
    assert torch.equal(net(ids, mask), net(changed, mask))


def test_redraw_changes_q_and_a_copy_keeps_the_features():
    net = performer().eval()
    target = copy.deepcopy(net)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(net(ids), target(ids))
    net.redraw_features()
    assert not torch.allclose(net(ids), target(ids))
    target.load_state_dict(net.state_dict())
    assert torch.equal(net(ids), target(ids))


def test_longer_than_max_len_is_refused():
    net = performer(max_len=8)
    with pytest.raises(ModelError, match="max_len=8"):
        net(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ModelError, match="divisible"):
        performer(dim=30, heads=4)
