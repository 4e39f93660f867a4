import math

import pytest
import torch

from distrl.algos.pg import (
    aggregate_loss,
    cispo_loss,
    equal_reward_groups,
    group_advantages,
    gspo_loss,
    kl_penalty,
    overlong_penalty,
    policy_loss,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    truncated_is_weights,
)
from distrl.algos.ppo import kl_shaped_rewards


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def ids(*values):
    return torch.tensor(values, dtype=torch.int64)


# Two prompts with ids 5 and 2, interleaved; the last sequence has one padded token.
SCORES = torch.tensor([1.0, 0.0, 2.0, 1.0, 6.0])
GROUPS = ids(5, 2, 5, 2, 5)
MASK = t([1, 1], [1, 1], [1, 1], [1, 1], [1, 0])


def test_group_advantages_grpo_uses_unbiased_std():
    # Group 5 = {1, 2, 6}: mean 3, deviations -2, -1, 3, squares sum 14, unbiased var 14 / 2 = 7,
    # std sqrt(7) = 2.645751 -> -0.755929, -0.377964, 1.133893.
    # Group 2 = {0, 1}: mean 0.5, deviations -0.5, 0.5, var 0.5 / 1, std 0.707107 -> -+0.707107.
    # (Population std would give sqrt(14/3) = 2.160247 and 0.5: different numbers.)
    adv = group_advantages(scores=SCORES, groups=GROUPS, mask=MASK)
    a, b, c = -2 / math.sqrt(7), -1 / math.sqrt(7), 3 / math.sqrt(7)
    h = 0.5 / math.sqrt(0.5)
    expected = t([a, a], [-h, -h], [b, b], [h, h], [c, 0.0])
    assert torch.allclose(adv, expected, atol=1e-5)


def test_group_advantages_dr_grpo_drops_std():
    # Same groups, no division: group 5 -> 1-3, 2-3, 6-3 = -2, -1, 3; group 2 -> -0.5, 0.5.
    adv = group_advantages(scores=SCORES, groups=GROUPS, mask=MASK, std_normalize=False)
    assert torch.allclose(adv, t([-2, -2], [-0.5, -0.5], [-1, -1], [0.5, 0.5], [3, 0]))


def test_group_of_one_and_equal_rewards_give_zero_not_nan():
    # Group 0 has one sample (its own mean, std 0); group 1 is {2, 2, 2}: std 0, 0 / eps = 0.
    scores, groups, mask = t(5.0, 2.0, 2.0, 2.0), ids(0, 1, 1, 1), torch.ones(4, 3)
    for adv in (
        group_advantages(scores=scores, groups=groups, mask=mask),
        group_advantages(scores=scores, groups=groups, mask=mask, std_normalize=False),
        rloo_advantages(scores=scores, groups=groups, mask=mask),
    ):
        assert torch.isfinite(adv).all()
        assert torch.equal(adv, torch.zeros(4, 3))


def test_rloo_subtracts_mean_of_the_others():
    # Group 4 = {1, 2, 6}: 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5
    # (= 3/2 * (s - 3)). Group 9 = {3, 5}: 3 - 5 = -2, 5 - 3 = 2. Padding stays 0.
    adv = rloo_advantages(
        scores=t(1.0, 3.0, 2.0, 6.0, 5.0),
        groups=ids(4, 9, 4, 4, 9),
        mask=t([1, 1], [1, 0], [1, 1], [1, 1], [1, 1]),
    )
    assert torch.allclose(adv, t([-3, -3], [-2, 0], [-1.5, -1.5], [4.5, 4.5], [2, 2]))


def test_reinforce_pp_returns_discounted_and_ignores_padding():
    # gamma 0.5. Row 0: G2 = 1; G1 = 0.2 + 0.5 * 1 = 0.7; G0 = -0.1 + 0.5 * 0.7 = 0.25.
    # Row 1 ends at t=1, its reward 9 on padding is dropped: G1 = -0.5; G0 = 0.5 - 0.25 = 0.25.
    returns = reinforce_pp_returns(
        token_rewards=t([-0.1, 0.2, 1.0], [0.5, -0.5, 9.0]),
        mask=t([1, 1, 1], [1, 1, 0]),
        gamma=0.5,
    )
    assert torch.allclose(returns, t([0.25, 0.7, 1.0], [0.25, -0.5, 0.0]))


def test_reinforce_pp_returns_skip_an_environment_turn():
    rewards, mask = t([1.0, 5.0, 5.0, 2.0]), t([1, 0, 0, 1])
    returns = reinforce_pp_returns(token_rewards=rewards, mask=mask, gamma=0.5)
    assert torch.allclose(returns, t([1.0 + 0.5 * 2.0, 0.0, 0.0, 2.0]))


def test_reinforce_pp_returns_from_kl_shaped_rewards():
    # kl = [0.5, 0, 0], rewards = -0.2 * kl + score at t=2 = [-0.1, 0, 1]; gamma 1 -> 0.9, 1, 1.
    rewards, _ = kl_shaped_rewards(
        scores=t(1.0),
        logprobs=t([-1.0, -1.0, -1.0]),
        ref_logprobs=t([-1.5, -1.0, -1.0]),
        mask=t([1, 1, 1]),
        kl_coef=0.2,
    )
    returns = reinforce_pp_returns(token_rewards=rewards, mask=t([1, 1, 1]))
    assert torch.allclose(returns, t([0.9, 1.0, 1.0]))


def test_reinforce_pp_advantages_whiten_over_the_whole_batch():
    # gamma 1. Row 0 rewards [-2, 3] -> returns [1, 3]; row 1 [2, 1] -> [3, 1]; t=2 is padding.
    # The four real returns {1, 3, 3, 1}: mean 2, population var 1 -> [-1, 1], [1, -1].
    adv = reinforce_pp_advantages(
        token_rewards=t([-2.0, 3.0, 7.0], [2.0, 1.0, 7.0]), mask=t([1, 1, 0], [1, 1, 0])
    )
    assert torch.allclose(adv, t([-1, 1, 0], [1, -1, 0]), atol=1e-4)


def test_kl_penalty_estimators():
    # log r = logp - ref = [0.5, 0, -1].
    # k1 = log r; k2 = 0.5 (log r)^2 = [0.125, 0, 0.5];
    # k3 = exp(-log r) + log r - 1 = [e^-0.5 - 0.5 = 0.106531, 0, e - 2 = 0.718282].
    logp, ref = t([-1.0, -2.0, -3.0]), t([-1.5, -2.0, -2.0])
    assert torch.allclose(
        kl_penalty(logprobs=logp, ref_logprobs=ref, estimator="k1"), t([0.5, 0, -1])
    )
    assert torch.allclose(
        kl_penalty(logprobs=logp, ref_logprobs=ref, estimator="k2"), t([0.125, 0, 0.5])
    )
    k3 = t([math.exp(-0.5) - 0.5, 0.0, math.e - 2.0])
    assert torch.allclose(kl_penalty(logprobs=logp, ref_logprobs=ref, estimator="k3"), k3)
    assert torch.allclose(kl_penalty(logprobs=logp, ref_logprobs=ref, estimator="low_var_kl"), k3)


def test_kl_penalty_k3_clamped_with_finite_gradient():
    # ref - logp = 100 would be exp(100) = inf in float32; clamped to 20, then k3 clamped to 10.
    # ref - logp = -30: 29 before the clamp -> 10. Clamped values pass no gradient, and no NaN.
    logp = torch.tensor([[-100.0, 0.0]], requires_grad=True)
    k3 = kl_penalty(logprobs=logp, ref_logprobs=t([0.0, -30.0]), estimator="k3")
    assert torch.equal(k3.detach(), t([10.0, 10.0]))
    k3.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(1, 2))


def test_kl_penalty_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="'k4'"):
        kl_penalty(logprobs=t([0.0]), ref_logprobs=t([0.0]), estimator="k4")


@pytest.mark.parametrize(
    ("adv", "ratio", "loss", "clipfrac"),
    [
        (1.0, 1.5, -1.28, 1.0),  # gain capped at 1 + clip_high = 1.28
        (1.0, 1.25, -1.25, 0.0),  # inside the higher cap; symmetric 0.2 would give -1.2
        (-1.0, 0.75, 0.8, 1.0),  # floored at 1 - clip_low = 0.8; swapped (0.72) would give 0.75
        (-1.0, 0.5, 0.8, 1.0),
        (-1.0, 1.5, 1.5, 0.0),  # pessimistic side: unclipped -A r = 1.5 > -A * 1.28
        (2.0, 1.0, -2.0, 0.0),
    ],
)
def test_policy_loss_asymmetric_clipping(adv, ratio, loss, clipfrac):
    old = t([-1.0])
    out, stats = policy_loss(
        logprobs=old + math.log(ratio),
        old_logprobs=old,
        advantages=t([adv]),
        mask=t([1.0]),
        clip_low=0.2,
        clip_high=0.28,
        loss_agg="token_mean",
    )
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert stats["clipfrac"].item() == clipfrac
    assert stats["ratio"].item() == pytest.approx(ratio, abs=1e-6)
    assert stats["approx_kl"].item() == pytest.approx((ratio - 1) - math.log(ratio), abs=1e-6)


LOSS = t([1.0, 2.0, 3.0], [4.0, 5.0, 100.0])
LOSS_MASK = t([1, 1, 1], [1, 1, 0])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token_mean", 3.0),  # (1+2+3+4+5) / 5 tokens
        ("seq_mean_token_sum", 7.5),  # (6 + 9) / 2 sequences
        ("seq_mean_token_mean", 3.25),  # (6/3 + 9/2) / 2 = (2 + 4.5) / 2
        ("seq_mean_token_sum_norm", 2.5),  # (6 + 9) / (2 sequences * T=3)
    ],
)
def test_aggregate_loss_modes(mode, expected):
    assert aggregate_loss(loss=LOSS, mask=LOSS_MASK, mode=mode).item() == pytest.approx(expected)


def test_aggregate_loss_constant_normaliser_and_empty_sequence():
    # Dr. GRPO with a configured max length of 5 instead of T=3: 15 / (2 * 5) = 1.5.
    norm = aggregate_loss(loss=LOSS, mask=LOSS_MASK, mode="seq_mean_token_sum_norm", max_length=5)
    assert norm.item() == pytest.approx(1.5)
    # A sequence with no real token adds 0 and still counts in the mean: (6/2 + 0) / 2 = 1.5.
    empty = aggregate_loss(
        loss=t([2.0, 4.0], [9.0, 9.0]), mask=t([1, 1], [0, 0]), mode="seq_mean_token_mean"
    )
    assert empty.item() == pytest.approx(1.5)


def test_aggregate_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="'seq-mean-token-mean'"):
        aggregate_loss(loss=LOSS, mask=LOSS_MASK, mode="seq-mean-token-mean")


def test_policy_loss_gradient_flows_only_through_real_tokens():
    # ratio 1 everywhere, so d/dlogp of -A r / N is -A / N with N = 3 real tokens:
    # [[-1/3, -2/3, 0], [1/3, 0, 0]]. Padding holds a wild logprob (100) and advantage.
    logp = torch.tensor([[-1.0, -2.0, 100.0], [-0.5, 100.0, 100.0]], requires_grad=True)
    old = t([-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0])
    mask = t([1, 1, 0], [1, 0, 0])
    loss, _ = policy_loss(
        logprobs=logp,
        old_logprobs=old,
        advantages=t([1.0, 2.0, 3.0], [-1.0, 5.0, 7.0]),
        mask=mask,
        clip_low=0.2,
        clip_high=0.28,
        loss_agg="token_mean",
    )
    loss.backward()
    assert torch.allclose(logp.grad, t([-1 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]))
    assert (logp.grad[mask > 0] != 0).all()
    assert (logp.grad[mask == 0] == 0).all()


def test_equal_reward_groups():
    # Group 3 = {1, 1, 1} equal; group 8 = {0, 1} not; group 1 = {0.5} alone, so equal.
    flags = equal_reward_groups(
        scores=t(1.0, 0.0, 1.0, 0.5, 1.0, 1.0), groups=ids(3, 8, 3, 1, 8, 3)
    )
    assert flags.tolist() == [True, False, True, True, False, True]


def test_overlong_penalty_ramp():
    # max 20, buffer 4: free up to 16, then -(length - 16) / 4, capped at -1 from 20 on.
    lengths = torch.tensor([10, 16, 17, 18, 20, 25])
    pen = overlong_penalty(lengths=lengths, max_length=20, buffer=4)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    half = overlong_penalty(lengths=lengths, max_length=20, buffer=4, penalty_factor=0.5)
    assert torch.allclose(half, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths=lengths, max_length=20, buffer=0)


# PPO's surrogate is the symmetric case, aggregated over every token.
PPO = {"clip_low": 0.2, "clip_high": 0.2, "loss_agg": "token_mean"}


@pytest.mark.parametrize(
    ("adv", "ratio", "loss", "clipfrac"),
    [
        (1.0, 1.5, -1.2, 1.0),  # gain capped at 1 + eps
        (-1.0, 0.5, 0.8, 1.0),  # loss floored at 1 - eps
        (1.0, 0.5, -0.5, 0.0),  # pessimistic side: unclipped
        (2.0, 1.0, -2.0, 0.0),
    ],
)
def test_symmetric_clipping_is_ppos(adv, ratio, loss, clipfrac):
    old = t([-1.0])
    new = old + math.log(ratio)
    out, stats = policy_loss(
        logprobs=new, old_logprobs=old, advantages=t([adv]), mask=t([1.0]), **PPO
    )
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert stats["clipfrac"].item() == clipfrac
    assert stats["approx_kl"].item() == pytest.approx((ratio - 1) - math.log(ratio), abs=1e-6)


def test_symmetric_policy_loss_ignores_padding():
    out, _ = policy_loss(
        logprobs=t([0.0, 5.0]),
        old_logprobs=t([0.0, 0.0]),
        advantages=t([1.0, 100.0]),
        mask=t([1.0, 0.0]),
        **PPO,
    )
    assert out.item() == pytest.approx(-1.0)


def test_truncated_is_weights_worked_example():
    # learner - rollout per token: row 0 -> 0, 0.5, 5.5; row 1 -> -1, 0, padding (rollout -inf).
    # exp: 1, 1.648721, 244.69 (capped to 2); 0.367879, 1; padding 0.
    learner = t([-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0])
    rollout = t([-1.0, -2.5, -6.0], [-2.0, -1.0, -math.inf])
    mask = t([1, 1, 1], [1, 1, 0])
    weights, stats = truncated_is_weights(
        learner_logprobs=learner, rollout_logprobs=rollout, mask=mask, cap=2.0
    )
    expected = t([1.0, math.exp(0.5), 2.0], [math.exp(-1.0), 1.0, 0.0])
    assert weights.dtype == torch.float32 and torch.allclose(weights, expected, atol=1e-6)
    # Mean over the 5 real tokens: (1 + 1.648721 + 2 + 0.367879 + 1) / 5; the cap bound 1 of 5.
    assert stats["weight"].item() == pytest.approx((4.0 + math.exp(0.5) + math.exp(-1)) / 5)
    assert stats["truncated"].item() == pytest.approx(0.2)
    # With cap 1 the two tokens above 1 are truncated; the two at exactly 1 are not.
    weights, stats = truncated_is_weights(
        learner_logprobs=learner, rollout_logprobs=rollout, mask=mask, cap=1.0
    )
    assert torch.allclose(weights, t([1.0, 1.0, 1.0], [math.exp(-1.0), 1.0, 0.0]))
    assert stats["truncated"].item() == pytest.approx(0.4)


def test_truncated_is_weights_are_detached_float32_from_bfloat16():
    learner = t([-1.0, -2.0]).to(torch.bfloat16).requires_grad_()
    rollout = t([-1.5, -2.0]).to(torch.bfloat16)
    weights, _ = truncated_is_weights(
        learner_logprobs=learner, rollout_logprobs=rollout, mask=t([1, 1]), cap=3.0
    )
    assert weights.dtype == torch.float32 and not weights.requires_grad
    assert torch.allclose(weights, t([math.exp(0.5), 1.0]), atol=1e-6)


def test_policy_loss_weights_scale_each_token_before_aggregation():
    # Ratio 1, so each token's loss is -A; weighted: -A * w = [-2, -2], [0.5, padding].
    adv, mask = t([1.0, 2.0], [-1.0, 3.0]), t([1, 1], [1, 0])
    weights = t([2.0, 1.0], [0.5, 0.0])
    old = t([-1.0, -2.0], [-0.5, -3.0])
    expected = {"token_mean": -3.5 / 3, "seq_mean_token_mean": (-2.0 + 0.5) / 2}
    for mode, value in expected.items():
        logprobs = old.clone().requires_grad_()
        loss, _ = policy_loss(
            logprobs=logprobs,
            old_logprobs=old,
            advantages=adv,
            mask=mask,
            clip_low=0.2,
            clip_high=0.2,
            loss_agg=mode,
            weights=weights,
        )
        assert loss.item() == pytest.approx(value), mode
        if mode == "token_mean":
            # d/d logprob of -A w r / 3 at r = 1: -A w / 3; the weights carry no gradient.
            loss.backward()
            assert torch.allclose(logprobs.grad, t([-2 / 3, -2 / 3], [1 / 6, 0.0]))


# GSPO: row 0 has log-ratios 0.2, 0.1, 0.1 (mean 0.4 / 3), row 1 has 0.5, 0.5 and a padded token
# holding junk. Sequence ratios s0 = e^(0.4/3) = 1.142631 (inside [0.8, 1.2]) and s1 = e^0.5 =
# 1.648721 (above 1.2). Token-level PPO would see e^0.2 = 1.2214 (clipped) on row 0's first token.
GSPO_NEW = t([-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0])
GSPO_OLD = t([-1.2, -2.1, -0.6], [-1.5, -1.5, 0.0])
GSPO_MASK = t([1, 1, 1], [1, 1, 0])
S0, S1 = math.exp(0.4 / 3), math.exp(0.5)


@pytest.mark.parametrize(
    ("a1", "loss", "grad1", "clipfrac"),
    [
        # A1 = +1: row 1 is clipped at 1.2 (no gradient); seq_mean_token_mean averages the rows'
        # token means: (-s0 - 1.2) / 2. Row 0's gradient per token: -A s0 / 3 tokens / 2 rows.
        (1.0, (-S0 - 1.2) / 2, 0.0, 2 / 5),
        # A1 = -1: max(s1, 1.2) = s1 is the unclipped branch, gradient s1 / 2 tokens / 2 rows.
        (-1.0, (-S0 + S1) / 2, S1 / 4, 0.0),
    ],
)
def test_gspo_clips_one_ratio_per_sequence(a1, loss, grad1, clipfrac):
    new = GSPO_NEW.clone().requires_grad_(True)
    adv = t([1.0, 1.0, 1.0], [a1, a1, a1]) * GSPO_MASK
    out, stats = gspo_loss(
        logprobs=new,
        old_logprobs=GSPO_OLD,
        advantages=adv,
        mask=GSPO_MASK,
        clip_low=0.2,
        clip_high=0.2,
        loss_agg="seq_mean_token_mean",
    )
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(clipfrac)
    assert stats["ratio"].item() == pytest.approx((3 * S0 + 2 * S1) / 5, abs=1e-5)
    expected = t([-S0 / 6] * 3, [grad1, grad1, 0.0])
    assert torch.allclose(new.grad, expected, atol=1e-5)


def test_gspo_equals_token_level_ppo_on_policy():
    # On the policy that sampled (every ratio 1) both are -A on every token.
    adv = t([1.0, -2.0, 0.5], [3.0, 1.0, 0.0])
    kwargs = {"advantages": adv, "mask": GSPO_MASK, "clip_low": 3e-4, "clip_high": 4e-4}
    kwargs["loss_agg"] = "seq_mean_token_mean"
    a, b = GSPO_NEW.clone().requires_grad_(True), GSPO_NEW.clone().requires_grad_(True)
    gspo, _ = gspo_loss(
        logprobs=a, old_logprobs=GSPO_NEW.masked_fill(GSPO_MASK == 0, 5.0), **kwargs
    )
    ppo_, _ = policy_loss(logprobs=b, old_logprobs=GSPO_NEW, **kwargs)
    (gspo + ppo_).backward()
    assert gspo.item() == pytest.approx(ppo_.item(), abs=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


@pytest.mark.parametrize(
    ("adv", "new", "loss", "grad", "clipfrac"),
    [
        # r = [1, e^0.5 = 1.6487] -> weights [1, 1.2]; -w A logp = [2.0, 1.2], token mean 1.6.
        # Token 2 keeps its gradient -w A / 2 = -1.2 where PPO's clip would give it none.
        (2.0, [-1.0, -0.5, -3.0], 1.6, [-1.0, -1.2, 0.0], 0.5),
        # r = [1, e^-0.5 = 0.6065] -> weights [1, 0.8]; A = -2: -w A logp = [-2.0, -2.4],
        # token mean -2.2, gradient -w A / 2 = [1.0, 0.8].
        (-2.0, [-1.0, -1.5, -3.0], -2.2, [1.0, 0.8, 0.0], 0.5),
    ],
)
def test_cispo_clips_the_weight_and_keeps_every_gradient(adv, new, loss, grad, clipfrac):
    shared = {
        "old_logprobs": t([-1.0, -1.0, 0.0]),
        "advantages": t([adv, adv, adv]),
        "mask": t([1, 1, 0]),
        "clip_low": 0.2,
        "clip_high": 0.2,
        "loss_agg": "token_mean",
    }
    logprobs = t(new).requires_grad_(True)
    out, stats = cispo_loss(logprobs=logprobs, **shared)
    out.backward()
    assert out.item() == pytest.approx(loss, abs=1e-5)
    assert stats["clipfrac"].item() == pytest.approx(clipfrac)
    assert torch.allclose(logprobs.grad, t(grad), atol=1e-5)
    # PPO's clipped surrogate on the same tokens: the clipped token gets no gradient.
    ppo_logprobs = t(new).requires_grad_(True)
    ppo_loss, _ = policy_loss(logprobs=ppo_logprobs, **shared)
    ppo_loss.backward()
    assert ppo_logprobs.grad[0, 1].item() == 0.0
