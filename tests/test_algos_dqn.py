import math

import pytest
import torch
from torch import nn

from distrl.algos.dqn import (
    boltzmann_actions,
    epsilon,
    epsilon_greedy,
    n_step_returns,
    polyak_update,
    td_loss,
    td_targets,
    top_k_action_mask,
    ucb_actions,
    ucb_bonus,
)


def t(*rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def n_step_reference(rewards, dones, gamma, n):
    """Loop-by-loop definition, for comparison on random inputs."""
    B, T = rewards.shape
    out = torch.zeros(B, T), torch.zeros(B, T), torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        for s in range(T):
            g, m, ended = 0.0, 0, False
            while m < n and s + m < T and not ended:
                g += gamma**m * rewards[b, s + m].item()
                ended = bool(dones[b, s + m])
                m += 1
            out[0][b, s], out[1][b, s], out[2][b, s] = g, 0.0 if ended else gamma**m, s + m
    return out


def test_n_step_returns_with_an_episode_end_inside_the_window():
    rewards, dones = t([1, 2, 3, 4]), t([0, 0, 1, 0], dtype=torch.bool)
    ret, disc, boot = n_step_returns(rewards=rewards, dones=dones, gamma=0.5, n=2)
    # t=0: 1 + .5*2, bootstrap s_2 at .25; t=1: 2 + .5*3 and the episode ends: no bootstrap;
    # t=2: the last step of the episode; t=3: the row ends after one step: bootstrap s_4 at .5.
    assert torch.allclose(ret, t([2.0, 3.5, 3.0, 4.0]))
    assert torch.allclose(disc, t([0.25, 0.0, 0.0, 0.5]))
    assert boot.tolist() == [[2, 3, 3, 4]]


def test_n_step_returns_one_step_and_long_window():
    rewards, dones = t([1, 2, 3, 4]), t([0, 0, 1, 0], dtype=torch.bool)
    ret, disc, boot = n_step_returns(rewards=rewards, dones=dones, gamma=0.5, n=1)
    assert torch.equal(ret, rewards)
    assert torch.allclose(disc, t([0.5, 0.5, 0.0, 0.5]))
    assert boot.tolist() == [[1, 2, 3, 4]]
    ret, disc, boot = n_step_returns(rewards=rewards, dones=dones, gamma=0.5, n=10)
    assert torch.allclose(ret, t([2.75, 3.5, 3.0, 4.0]))
    assert torch.allclose(disc, t([0.0, 0.0, 0.0, 0.5]))
    assert boot.tolist() == [[3, 3, 3, 4]]


def test_n_step_returns_match_the_loop_definition():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 9, generator=g)
    dones = torch.rand(4, 9, generator=g) < 0.25
    for n in (1, 3, 5):
        got = n_step_returns(rewards=rewards, dones=dones, gamma=0.9, n=n)
        for a, b in zip(got, n_step_reference(rewards, dones, 0.9, n)):
            assert torch.allclose(a.to(b.dtype), b, atol=1e-6)


def test_double_and_plain_targets_differ():
    kwargs = dict(rewards=t(1.0), discounts=t(0.5), next_q_online=t([1.0, 3.0, 2.0]))
    kwargs["next_q_target"] = t([5.0, 1.0, 4.0])
    plain = td_targets(**kwargs, next_action_mask=None, double=False)
    double = td_targets(**kwargs, next_action_mask=None, double=True)
    assert plain.tolist() == [1.0 + 0.5 * 5.0]  # max of the target network
    assert double.tolist() == [1.0 + 0.5 * 1.0]  # online argmax = 1, valued by the target


def test_masked_actions_never_enter_the_max():
    kwargs = dict(rewards=t(1.0), discounts=t(0.5), next_q_online=t([1.0, 3.0, 2.0]))
    kwargs["next_q_target"] = t([5.0, 1.0, 4.0])
    no_best_target = t([0, 1, 1], dtype=torch.bool)
    assert td_targets(**kwargs, next_action_mask=no_best_target, double=False).item() == 3.0
    no_best_online = t([1, 0, 1], dtype=torch.bool)
    assert td_targets(**kwargs, next_action_mask=no_best_online, double=True).item() == 3.0


def test_terminal_targets_ignore_the_next_state():
    nan = t([float("nan"), float("-inf")])
    out = td_targets(
        rewards=t(2.0, -1.0),
        discounts=t(0.0, 0.0),
        next_q_online=torch.cat([nan, nan]),
        next_q_target=torch.cat([nan, nan]),
        next_action_mask=None,
        double=True,
    )
    assert out.tolist() == [2.0, -1.0]


def test_td_loss_huber_and_mse_with_weights():
    q = torch.zeros(3, requires_grad=True)
    targets, weights = torch.tensor([0.5, 2.0, -3.0]), torch.tensor([1.0, 0.5, 2.0])
    loss, td = td_loss(q=q, targets=targets, weights=weights, kind="huber")
    # Huber(delta=1): 0.5 * 0.25, 2 - 0.5, 3 - 0.5; weighted: 0.125 + 0.75 + 5.
    assert loss.item() == pytest.approx(5.875 / 3)
    assert td.tolist() == [0.5, 2.0, -3.0] and not td.requires_grad
    loss.backward()
    assert q.grad.tolist() == pytest.approx([-0.5 / 3, -0.5 / 3, 2.0 / 3])
    mse, _ = td_loss(q=q, targets=targets, weights=weights, kind="mse")
    assert mse.item() == pytest.approx((0.25 + 2.0 + 18.0) / 3)
    unweighted, _ = td_loss(q=q, targets=targets, weights=None, kind="mse")
    assert unweighted.item() == pytest.approx((0.25 + 4.0 + 9.0) / 3)
    with pytest.raises(ValueError, match="kind"):
        td_loss(q=q, targets=targets, kind="l1")


def test_polyak_update_averages_and_copies():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    target = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    online[1].num_batches_tracked += 5
    before = [p.clone() for p in target.parameters()]
    polyak_update(target=target.state_dict(), online=online.state_dict(), tau=0.5)
    for b, t_, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t_, (b + o) / 2)
    assert target[1].num_batches_tracked.item() == 5
    polyak_update(target=target.state_dict(), online=online.state_dict(), tau=1.0)
    for t_, o in zip(target.state_dict().values(), online.state_dict().values()):
        assert torch.equal(t_, o)


def test_epsilon_schedule_endpoints():
    sched = dict(start=0.2, end=0.02, decay_steps=1000)
    assert epsilon(step=0, **sched) == 0.2
    assert epsilon(step=500, **sched) == pytest.approx(0.11)
    assert epsilon(step=1000, **sched) == pytest.approx(0.02)
    assert epsilon(step=10**6, **sched) == pytest.approx(0.02)


def test_epsilon_greedy_never_picks_a_masked_action():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2000, 6, generator=g)
    mask = torch.rand(2000, 6, generator=g) < 0.4
    mask[:, 0] |= ~mask.any(-1)  # at least one allowed action per row
    for eps in (0.0, 0.5, 1.0):
        actions = epsilon_greedy(q=q, mask=mask, epsilon=eps, generator=g)
        assert mask.gather(-1, actions[:, None]).all()
    greedy = epsilon_greedy(q=q, mask=mask, epsilon=0.0, generator=g)
    assert torch.equal(greedy, q.masked_fill(~mask, -1e9).argmax(-1))
    explored = epsilon_greedy(q=q, mask=None, epsilon=1.0, generator=g)
    assert (explored != q.argmax(-1)).float().mean() > 0.7  # ~5/6 of uniform picks differ


def test_boltzmann_respects_mask_and_temperature():
    g = torch.Generator().manual_seed(0)
    q = t([1.0, 5.0, 2.0]).expand(500, 3)
    mask = t([1, 0, 1], dtype=torch.bool).expand(500, 3)
    hot = boltzmann_actions(q=q, mask=mask, temperature=10.0, generator=g)
    assert set(hot.tolist()) == {0, 2}
    cold = boltzmann_actions(q=q, mask=mask, temperature=0.01, generator=g)
    assert set(cold.tolist()) == {2}


def test_ucb_prefers_untried_and_respects_mask_and_ties():
    q, counts = t([1.0, 1.0, 0.5]), t([1.0, 0.0, 0.0])
    # bonus: sqrt(ln 2 / 2) = 0.589 for the tried action, sqrt(ln 2) = 0.833 for untried ones.
    bonus = ucb_bonus(counts=counts, total=1.0, c=1.0)
    assert bonus[0].tolist() == pytest.approx(
        [math.sqrt(math.log(2) / 2), *[math.sqrt(math.log(2))] * 2]
    )
    assert ucb_actions(q=q, counts=counts, total=1.0, c=1.0, mask=None).tolist() == [1]
    no_1 = t([1, 0, 1], dtype=torch.bool)
    assert ucb_actions(q=q, counts=counts, total=1.0, c=1.0, mask=no_1).tolist() == [0]
    even = ucb_actions(q=t([2.0, 2.0, 2.0]), counts=torch.zeros(3), total=4.0, c=1.0, mask=None)
    assert even.tolist() == [0]


def test_ucb_bonus_can_overturn_q_and_broadcasts_counts():
    # Action 0: 2 + sqrt(ln 11 / 11) = 2.467; action 1: 1.5 + sqrt(ln 11) = 3.049.
    q, counts = t([2.0, 1.5], [2.0, 1.5]), t(10.0, 0.0)
    actions = ucb_actions(q=q, counts=counts, total=t(10.0, 0.0), c=1.0, mask=None)
    assert actions.tolist() == [1, 0]  # row 2: total 0 means no bonus, so q decides
    assert ucb_actions(q=q, counts=counts, total=10.0, c=0.0, mask=None).tolist() == [0, 0]


def test_top_k_action_mask():
    logits = t([0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 1.0, 2.0])
    assert top_k_action_mask(logits=logits, k=2).tolist() == [
        [False, True, True, False],
        [True, False, False, True],
    ]
    assert top_k_action_mask(logits=logits, k=0).all()
    assert top_k_action_mask(logits=logits, k=9).all()
