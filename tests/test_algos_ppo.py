import math

import pytest
import torch

from distrl.algos.ppo import (
    KLController,
    entropy_from_logits,
    gae,
    kl_shaped_rewards,
    logprobs_from_logits,
    masked_mean,
    value_loss,
    whiten,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_undiscounted_terminal_reward():
    adv, ret = gae(
        rewards=t([0, 0, 1]), values=t([0.5, 0.5, 0.5]), mask=t([1, 1, 1]), gamma=1.0, lam=1.0
    )
    assert torch.allclose(adv, t([0.5, 0.5, 0.5]))
    assert torch.allclose(ret, t([1, 1, 1]))


def test_gae_discounted_with_padding():
    # t=1 is the last token: delta1 = 0 - 2 = -2 (no bootstrap past the end);
    # delta0 = 1 + 0.9 * 2 - 1 = 1.8; adv0 = 1.8 + 0.9 * 0.5 * -2 = 0.9.
    adv, ret = gae(rewards=t([1, 0, 2]), values=t([1, 2, 3]), mask=t([1, 1, 0]), gamma=0.9, lam=0.5)
    assert torch.allclose(adv, t([0.9, -2.0, 0.0]))
    assert torch.allclose(ret, t([1.9, 0.0, 0.0]))


def test_gae_rows_are_independent():
    rewards, values, mask = (
        t([1, 0, 2], [0, 0, 1]),
        t([1, 2, 3], [0.5, 0.5, 0.5]),
        t([1, 1, 0], [1, 1, 1]),
    )
    adv, _ = gae(rewards=rewards, values=values, mask=mask, gamma=0.9, lam=0.5)
    alone, _ = gae(rewards=rewards[1:], values=values[1:], mask=mask[1:], gamma=0.9, lam=0.5)
    assert torch.allclose(adv[1:], alone)


def test_gae_skips_an_environment_turn_as_if_it_were_not_there():
    # Tokens 2 and 3 are an environment's turn between two model turns: the model's tokens
    # get what they would get in the sequence without them.
    rewards, values = t([0.1, 0.2, 9.0, 9.0, 0.3, 1.0]), t([0.5, 0.6, 7.0, 7.0, 0.7, 0.8])
    mask = t([1, 1, 0, 0, 1, 1])
    adv, ret = gae(rewards=rewards, values=values, mask=mask, gamma=0.9, lam=0.7)
    keep = mask[0] > 0
    alone, alone_ret = gae(
        rewards=rewards[:, keep], values=values[:, keep], mask=mask[:, keep], gamma=0.9, lam=0.7
    )
    assert torch.allclose(adv[:, keep], alone) and torch.allclose(ret[:, keep], alone_ret)
    assert adv[0, 2:4].abs().sum() == 0 and ret[0, 2:4].abs().sum() == 0


def test_kl_shaped_rewards_put_score_on_last_token():
    rewards, kl = kl_shaped_rewards(
        scores=torch.tensor([2.0]),
        logprobs=t([-1, -2, -3]),
        ref_logprobs=t([-1.5, -2, -2]),
        mask=t([1, 1, 0]),
        kl_coef=0.1,
    )
    assert torch.allclose(kl, t([0.5, 0.0, 0.0]))
    assert torch.allclose(rewards, t([-0.05, 2.0, 0.0]))


def test_an_episodes_turn_rewards_land_where_their_turns_ended():
    # Model tokens 0-1, an environment turn (2-3), model tokens 4-5: 0.1 after the first turn.
    mask = t([1, 1, 0, 0, 1, 1])
    rewards, _ = kl_shaped_rewards(
        scores=torch.tensor([1.0]),
        logprobs=t([0.0] * 6),
        ref_logprobs=t([0.0] * 6),
        mask=mask,
        kl_coef=0.1,
        turn_rewards=t([0, 0.1, 0, 0, 0, 0]),
    )
    assert torch.allclose(rewards, t([0, 0.1, 0, 0, 0, 1.0]))


def test_value_loss_clipped_and_plain():
    # v moves 0 -> 1 with clip 0.2: clipped value 0.2, (0.2 - 2)^2 = 3.24 > (1 - 2)^2 = 1.
    loss, frac = value_loss(
        values=t([1.0]), old_values=t([0.0]), returns=t([2.0]), mask=t([1.0]), clip=0.2
    )
    assert loss.item() == pytest.approx(0.5 * 3.24)
    assert frac.item() == 1.0
    plain, _ = value_loss(
        values=t([1.0]), old_values=t([0.0]), returns=t([2.0]), mask=t([1.0]), clip=0.0
    )
    assert plain.item() == pytest.approx(0.5)


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.1)
    assert fixed.update(kl=50.0, n_samples=1000) == 0.1
    adaptive = KLController(0.1, target=6.0, horizon=10_000)
    assert adaptive.update(kl=12.0, n_samples=1000) == pytest.approx(0.1 * 1.02)
    assert adaptive.update(kl=5.4, n_samples=1000) == pytest.approx(0.1 * 1.02 * 0.99)
    again = KLController(1.0)
    again.load_state_dict(adaptive.state_dict())
    assert again == adaptive


def test_whiten_and_masked_mean():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(w**2, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert w[..., 3].item() == 0.0


def test_whiten_does_not_scale_a_spread_below_min_std_up():
    x, mask = t([1e-6, -1e-6, 3e-6, 5.0]), t([1.0, 1.0, 1.0, 0.0])
    centred = x - masked_mean(x, mask)
    w = whiten(x, mask, min_std=0.01)
    assert torch.allclose(w[..., :3], centred[..., :3] / 0.01)  # centred, divided by the floor
    assert w.abs().max().item() < 1e-3  # not unit size
    big = t([1.0, 2.0, 3.0, 0.0])
    assert torch.allclose(whiten(big, mask, min_std=0.01), whiten(big, mask))  # above: as before


def test_logprobs_and_entropy_of_uniform():
    logits = torch.zeros(1, 2, 4)
    tokens = torch.tensor([[0, 3]])
    assert torch.allclose(logprobs_from_logits(logits, tokens), torch.full((1, 2), -math.log(4)))
    assert torch.allclose(entropy_from_logits(logits), torch.full((1, 2), math.log(4)))
