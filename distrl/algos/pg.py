"""Policy-gradient maths for language models (GRPO, Dr. GRPO, RLOO, REINFORCE++, GSPO, CISPO, DAPO).

Shapes: ``B`` sequences, ``T`` response tokens. ``scores`` (B,) is one reward per sequence;
``groups`` (B,) int64 names the prompt each sequence answers (ids need not be contiguous or
sorted); ``mask`` (B, T) is 1.0 on real response tokens and 0.0 on padding. Each function is
keyword-only and tested against hand-computed examples in ``tests/test_algos_pg.py``.

A loss is built from four choices: an advantage estimator (``group_advantages``,
``rloo_advantages``, ``reinforce_pp_advantages``, or PPO's GAE), a policy loss (the clipped
surrogate ``policy_loss``, GSPO's ``gspo_loss``, CISPO's ``cispo_loss``), the clip range
(``clip_low``/``clip_high``) and how per-token losses become a scalar (``aggregate_loss``). Which
algorithm takes which is declared once, in ``distrl.algos.registry``. DAPO = GRPO +
``token_mean`` + ``clip_high > clip_low`` + ``equal_reward_groups`` filtering +
``overlong_penalty``. ``truncated_is_weights`` corrects for rollouts sampled by an engine whose
log-probabilities differ from the learner's.
"""

from __future__ import annotations

import torch

from distrl.algos.ppo import masked_mean, whiten

LOSS_AGG_MODES = (
    "token_mean",
    "seq_mean_token_sum",
    "seq_mean_token_mean",
    "seq_mean_token_sum_norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def _group_index(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense group index (B,) in ``[0, G)`` and each sample's group size (B,), as float."""
    _, index = torch.unique(groups, return_inverse=True)
    sizes = torch.bincount(index).to(torch.float32)
    return index, sizes[index]


def _group_sum(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` (B,) over each sample's group, gathered back to (B,)."""
    # Dense ids are < G <= B, so a length-B buffer holds every group's sum.
    return torch.zeros_like(x).index_add_(0, index, x)[index]


def group_advantages(
    *,
    scores: torch.Tensor,
    groups: torch.Tensor,
    mask: torch.Tensor,
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO outcome advantage ``(score - group mean) / (group std + eps)`` on every token.

    The std is the unbiased (Bessel-corrected, ``n - 1``) sample std, as ``torch.std``. A group
    whose scores are all equal gets advantage 0 (``0 / eps``), and so does a group of one: with
    no other sample there is no baseline to compare against.

    Args:
        scores: (B,) reward of each sequence.
        groups: (B,) int64 prompt id of each sequence.
        mask: (B, T) response-token mask.
        std_normalize: divide by the group std (GRPO); False keeps ``score - mean`` (Dr. GRPO,
            which drops the std because it up-weights prompts that are nearly always right or
            nearly always wrong).
        eps: added to the std so an all-equal group divides 0 by ``eps``, not by 0.

    Returns:
        advantages (B, T), zero on padding.
    """
    index, n = _group_index(groups)
    mean = _group_sum(scores, index) / n
    adv = scores - mean
    if std_normalize:
        var = _group_sum(adv**2, index) / (n - 1.0).clamp(min=1.0)
        adv = adv / (var.sqrt() + eps)
    return adv.unsqueeze(-1) * mask


def rloo_advantages(
    *, scores: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """REINFORCE leave-one-out: ``score_i`` minus the mean of the *other* samples of its group.

    Equal to ``n / (n - 1) * (score_i - group mean)`` for a group of ``n``; a group of one has no
    other sample and gets 0.

    Args:
        scores: (B,); groups: (B,) int64; mask: (B, T).

    Returns:
        advantages (B, T), zero on padding.
    """
    index, n = _group_index(groups)
    mean = _group_sum(scores, index) / n
    adv = n / (n - 1.0).clamp(min=1.0) * (scores - mean)
    return adv.unsqueeze(-1) * mask


def reinforce_pp_returns(
    *, token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Discounted return-to-go ``G_t = r_t + gamma * G_{t+1}`` of each sequence, no baseline.

    Args:
        token_rewards: (B, T) per-token rewards, typically ``-kl_coef * kl`` at every token plus
            the score at the last one (``distrl.algos.ppo.kl_shaped_rewards``).
        mask: (B, T) 1 on the tokens the policy chose; rewards elsewhere are ignored, and a 0
            between them (an environment's turn) is skipped, not discounted.
        gamma: discount.

    Returns:
        returns (B, T), zero on padding.
    """
    rewards = token_rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        returns[:, t] = running
    return returns * mask


def reinforce_pp_advantages(
    *, token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, min_std: float = 0.0
) -> torch.Tensor:
    """REINFORCE++ advantage: the return-to-go whitened over every response token of the batch.

    The whole batch shares one mean and one (population) variance, so unlike the group
    estimators this needs no ``groups`` and does see the per-token KL.

    Args:
        token_rewards: (B, T); mask: (B, T); gamma: discount (see ``reinforce_pp_returns``).
        min_std: a spread of returns below this is not scaled up (see ``ppo.whiten``).

    Returns:
        advantages (B, T) with zero mean and unit variance over masked tokens, zero on padding.
    """
    returns = reinforce_pp_returns(token_rewards=token_rewards, mask=mask, gamma=gamma)
    return whiten(returns, mask, min_std=min_std)


def kl_penalty(
    *, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    With ``log r = logprobs - ref_logprobs``: ``k1 = log r`` (unbiased, can be negative),
    ``k2 = 0.5 (log r)^2``, ``k3 = exp(-log r) + log r - 1`` (``low_var_kl``: unbiased, >= 0, lower
    variance). For k3 the exponent is clamped to [-20, 20] and the result to at most 10, so one
    token far from the reference neither overflows ``exp`` (an inf there makes the gradient NaN)
    nor dominates the penalty.

    Args:
        logprobs: (B, T) under the policy; ref_logprobs: (B, T) under the reference model.
        estimator: one of ``KL_ESTIMATORS``.

    Returns:
        (B, T) unmasked values; the caller masks and aggregates them.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator in ("k3", "low_var_kl"):
        neg = (-log_ratio).clamp(-20.0, 20.0)
        return (neg.exp() - neg - 1.0).clamp(max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def aggregate_loss(
    *, loss: torch.Tensor, mask: torch.Tensor, mode: str, max_length: int | None = None
) -> torch.Tensor:
    """Reduce per-token losses (B, T) to a scalar; the choice sets how much each token weighs.

    Modes:
        ``token_mean``: sum over all real tokens / their number. Every token weighs the same, so
            long sequences count more (DAPO).
        ``seq_mean_token_sum``: per-sequence sum, then mean over the B sequences.
        ``seq_mean_token_mean``: per-sequence token mean, then mean over the B sequences. Every
            sequence weighs the same, so a token of a short one weighs more (original GRPO).
        ``seq_mean_token_sum_norm``: per-sequence sum divided by the constant ``max_length``,
            then mean over the B sequences, i.e. ``sum / (B * max_length)``. No length bias and a
            normaliser that does not move with the batch (Dr. GRPO).

    Args:
        loss: (B, T) per-token losses; mask: (B, T) response-token mask.
        mode: one of ``LOSS_AGG_MODES``.
        max_length: the constant of ``seq_mean_token_sum_norm``; pass the configured maximum
            response length so it stays fixed when batches are padded to different T. Default T.

    Returns:
        the scalar loss. A sequence with no real token contributes 0 (never NaN).
    """
    if mode == "token_mean":
        return masked_mean(loss, mask)
    seq_sum = (loss * mask).sum(-1)
    if mode == "seq_mean_token_sum":
        return seq_sum.mean()
    if mode == "seq_mean_token_mean":
        return (seq_sum / mask.sum(-1).clamp(min=1.0)).mean()
    if mode == "seq_mean_token_sum_norm":
        return seq_sum.mean() / (max_length if max_length is not None else mask.shape[-1])
    raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {LOSS_AGG_MODES}")


def policy_loss(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    loss_agg: str,
    max_length: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``, aggregated.

    ``clip_high > clip_low`` is DAPO's clip-higher: a token whose probability rises (A > 0) may
    move further before its gradient stops, which keeps low-probability tokens explorable.

    Args:
        logprobs: (B, T) under the policy being trained.
        old_logprobs: (B, T) recorded when the tokens were sampled.
        advantages: (B, T); mask: (B, T).
        clip_low, clip_high: the ratio is clamped to ``[1 - clip_low, 1 + clip_high]``.
        loss_agg: an ``aggregate_loss`` mode; max_length: its ``seq_mean_token_sum_norm`` constant.
        weights: (B, T) constant per-token factors on the surrogate, applied before aggregation
            (``truncated_is_weights``); None = 1.

    Returns:
        the loss and token-mean stats: ``clipfrac`` (share of tokens where clipping bit),
        ``approx_kl`` (k3 ``(r - 1) - log r`` of KL(old || new)) and ``ratio``.
    """
    # Padding is zeroed and the log-ratio clamped before exp, so no inf can reach the loss.
    log_ratio = ((logprobs - old_logprobs) * mask).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate_loss(loss=per_token, mask=mask, mode=loss_agg, max_length=max_length)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def gspo_loss(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    loss_agg: str,
    max_length: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: the clipped surrogate with one importance ratio per sequence.

    The ratio of sequence ``i`` is ``s_i = exp(mean_t (logprobs - old_logprobs))`` over its
    response tokens: its likelihood ratio normalised by its length, so one ratio serves a short
    and a long response alike. Every token of the sequence takes the value ``s_i`` with the
    gradient of ``s_i * logprob_t`` (GSPO-token: ``sg[s_i] * pi_t / sg[pi_t]``), and the surrogate
    ``-min(s A, clip(s, 1 - clip_low, 1 + clip_high) A)`` is taken per token; with a group
    algorithm's outcome advantage (the same on every token) this is the paper's sequence-level
    GSPO. Its clip ranges are small (the paper's 3e-4 and 4e-4): ``s_i`` is a geometric mean.

    Args:
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, loss_agg, max_length,
            weights: as ``policy_loss``.

    Returns:
        the loss and token-mean stats: ``clipfrac`` (share of tokens whose sequence's clip
        bit), ``approx_kl`` (k3 of KL(old || new) per token, as ``policy_loss``) and ``ratio``
        (the mean sequence ratio over tokens).
    """
    real = mask > 0
    # Padding may hold anything: it is set to 0 before any arithmetic, never multiplied.
    logprobs = torch.where(real, logprobs, 0.0)
    token_log_ratio = torch.where(real, logprobs - old_logprobs, 0.0).clamp(-20.0, 20.0)
    seq_log_ratio = token_log_ratio.sum(-1) / mask.sum(-1).clamp(min=1.0)
    # The detached sequence ratio is added last: logprobs - sg(logprobs) is exactly 0.
    log_ratio = (logprobs - logprobs.detach() + seq_log_ratio.detach().unsqueeze(-1)).clamp(
        max=10.0
    )
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate_loss(loss=per_token, mask=mask, mode=loss_agg, max_length=max_length)
    with torch.no_grad():
        token_ratio = token_log_ratio.exp()
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean((token_ratio - 1.0) - token_log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def cispo_loss(
    *,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    loss_agg: str,
    max_length: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: REINFORCE with the importance weight clipped and detached, per token.

    ``-sg(clip(r, 1 - clip_low, 1 + clip_high)) * A * logprob`` with ``r = exp(logprobs -
    old_logprobs)``. PPO's clip zeroes the gradient of a token whose ratio left the range, so
    rare tokens that matter (a "wait" or a "however") stop learning after one step; CISPO bounds
    the weight instead and every token keeps its gradient ``-w A grad(logprob)``.

    Args:
        logprobs, old_logprobs, advantages, mask, clip_low, clip_high, loss_agg, max_length,
            weights: as ``policy_loss``.

    Returns:
        the loss and token-mean stats: ``clipfrac`` (share of tokens whose weight the clip
        bound), ``approx_kl`` (k3 of KL(old || new), as ``policy_loss``) and ``ratio``.
    """
    real = mask > 0
    log_ratio = torch.where(real, logprobs - old_logprobs, 0.0).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    weight = ratio.clamp(1.0 - clip_low, 1.0 + clip_high).detach()
    per_token = -weight * advantages * torch.where(real, logprobs, 0.0)
    if weights is not None:
        per_token = per_token * weights
    loss = aggregate_loss(loss=per_token, mask=mask, mode=loss_agg, max_length=max_length)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((weight != ratio).float(), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def truncated_is_weights(
    *,
    learner_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Truncated importance weight ``min(exp(learner - rollout), cap)`` of each sampled token.

    The tokens were sampled by the rollout engine, whose log-probabilities can differ from the
    learner's for the same weights (another kernel, another precision). Weighting each token's
    policy loss by the ratio of the two corrects the gradient toward the learner's distribution;
    the cap bounds the variance a token the rollout found far less likely would add (TIS, as
    veRL's ``rollout_is`` and TRL's ``vllm_importance_sampling_correction``).

    Args:
        learner_logprobs: (B, T) the learner's old log-probabilities of the sampled tokens.
        rollout_logprobs: (B, T) those the rollout engine recorded when it sampled them.
        mask: (B, T) response-token mask.
        cap: upper bound of the weight, > 0.

    Returns:
        weights (B, T) in float32, detached, 0 on padding; and stats over masked tokens:
        ``weight`` (mean weight) and ``truncated`` (share of tokens whose weight the cap bound).
    """
    with torch.no_grad():
        real = mask > 0
        # Padding may hold anything (even -inf): it is set to 0 before exp, never multiplied.
        log_ratio = torch.where(real, learner_logprobs.float() - rollout_logprobs.float(), 0.0)
        raw = log_ratio.clamp(-20.0, 20.0).exp()
        weights = raw.clamp(max=cap) * real
        mask = real.float()
        stats = {
            "weight": masked_mean(weights, mask),
            "truncated": masked_mean((raw > cap).float(), mask),
        }
    return weights, stats


def equal_reward_groups(*, scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """True (B,) for samples whose group's scores are all equal, so their advantage is 0.

    DAPO's dynamic sampling drops these and samples more prompts until the batch is full. A group
    of one counts as equal: ``group_advantages`` and ``rloo_advantages`` give it 0 too.

    Args:
        scores: (B,); groups: (B,) int64.

    Returns:
        (B,) bool.
    """
    _, index = torch.unique(groups, return_inverse=True)
    lo = torch.zeros_like(scores).scatter_reduce(0, index, scores, "amin", include_self=False)
    hi = torch.zeros_like(scores).scatter_reduce(0, index, scores, "amax", include_self=False)
    return (lo == hi)[index]


def overlong_penalty(
    *, lengths: torch.Tensor, max_length: int, buffer: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the score of each sequence.

    0 while ``length <= max_length - buffer``, then falling linearly to ``-penalty_factor`` at
    ``length == max_length`` and staying there beyond.

    Args:
        lengths: (B,) response lengths in tokens.
        max_length: the generation limit; buffer: width of the linear ramp, ``0 < buffer <=
            max_length``; penalty_factor: the largest penalty.

    Returns:
        (B,) float penalties, all <= 0.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in (0, max_length={max_length}], got {buffer}")
    exceed = (lengths.float() - (max_length - buffer)).clamp(0.0, float(buffer))
    return -penalty_factor * exceed / buffer
