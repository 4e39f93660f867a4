"""PPO for language models as pure functions over tensors.

Shapes: ``B`` sequences, ``T`` response tokens, ``V`` vocabulary. ``mask`` is 1.0 on real
response tokens and 0.0 on padding after a sequence ended. Each function is keyword-only and
tested against hand-computed examples in ``tests/test_algos_ppo.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (any shape, same for both)."""
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(
    x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, min_std: float = 0.0
) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over masked positions; padding stays 0.

    A spread below ``min_std`` is divided by ``min_std`` instead: noise (a batch whose rewards
    are all equal, with round-off in its KL term) is not scaled up to unit size.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var.clamp(min=min_std**2) + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of ``tokens`` (B, T) under ``logits`` (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_shaped_rewards(
    *,
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    turn_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: a KL penalty at every token plus the sequence score at the last one
    (and, in a multi-turn episode, each turn's reward on that turn's last token).

    Args:
        scores: (B,) reward of each whole sequence (less its turns' rewards).
        logprobs: (B, T) sampled tokens' log-probabilities under the acting policy.
        ref_logprobs: (B, T) the same under the frozen reference model.
        mask: (B, T) response-token mask.
        kl_coef: penalty coefficient beta.
        turn_rewards: (B, T) rewards that arrived during the sequence, on the tokens they
            followed, or None.

    Returns:
        rewards (B, T) and the per-token KL estimate ``logprobs - ref_logprobs`` (B, T), masked.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    rewards = rewards + last.float() * scores.unsqueeze(-1)
    if turn_rewards is not None:
        rewards = rewards + turn_rewards * mask
    return rewards, kl


def gae(
    *,
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; an episode ends at its last token.

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) value estimates V(s_t) of the state before each token.
        mask: (B, T) 1 on the tokens the policy chose; a 0 between them (an environment's
            turn of a multi-turn episode) is skipped, its next state being the next chosen
            token's, and the episode ends after the last 1.
        gamma: discount; lam: GAE lambda.

    Returns:
        advantages (B, T) and returns ``advantages + values`` (B, T), zero where mask is 0.
    """
    T = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])  # after the last chosen token: terminal
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        chosen = mask[:, t] > 0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(chosen, adv, 0.0)
        next_adv = torch.where(chosen, adv, next_adv)
        next_value = torch.where(chosen, values[:, t], next_value)
    returns = (advantages + values) * mask
    return advantages, returns


def value_loss(
    *,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)``; clip 0 = plain.

    Args:
        values, old_values, returns, mask: (B, T); clip: value clip range.

    Returns:
        the loss and the share of tokens where the clipped term was the larger.
    """
    plain = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * masked_mean(plain, mask), torch.zeros(())
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).float(), mask).detach()


@dataclass
class KLController:
    """KL penalty coefficient: fixed, or adaptive toward ``target`` (Ziegler et al., 2019).

    The adaptive rule multiplies the coefficient by ``1 + clip(kl / target - 1, -0.2, 0.2) *
    n / horizon`` after ``n`` samples whose mean sequence KL was ``kl``.
    """

    value: float
    target: float | None = None
    horizon: int = 10_000

    def update(self, *, kl: float, n_samples: int) -> float:
        """Adapt after ``n_samples`` samples of mean sequence KL ``kl``; return the new value."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float | int | None]:
        """The controller's state, for checkpoints."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore from ``state_dict()``."""
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]
