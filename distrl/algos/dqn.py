"""Token-level DQN as pure functions over tensors.

Shapes: ``B`` transitions (or sequences), ``T`` steps, ``A`` actions (the vocabulary, of which a
boolean ``mask`` allows the reference LM's top-k candidates). Each function is keyword-only and
tested against hand-computed examples in ``tests/test_algos_dqn.py``.

Why a top-k action space: with a full vocabulary (~50k tokens) almost every action is one the
behaviour policy never tries, so the max in the TD target is taken over Q-values that were never
trained and overestimates wildly; restricting acting *and* the target's max to the reference
LM's top-k keeps both on tokens a fluent model would emit and makes exploration tractable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F


def n_step_returns(
    *, rewards: torch.Tensor, dones: torch.Tensor, gamma: float, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces of n-step TD targets ``G_t + discount_t * max_a Q(s_{bootstrap_t}, a)``.

    A row may hold several episodes: ``dones[b, t]`` ends one after step ``t``. The window from
    ``t`` stops after ``n`` steps, at an episode end, or at the end of the row (truncation: the
    state after the last step is bootstrapped, so pass it as index ``T``).

    Args:
        rewards: (B, T) reward after each step.
        dones: (B, T) bool, True where the episode ends after that step.
        gamma: discount per step; n: window length (>= 1).

    Returns:
        returns (B, T) ``sum_{k<m} gamma^k r_{t+k}`` over the ``m`` steps summed;
        discounts (B, T) ``gamma^m``, or 0 when the window reached an episode end;
        bootstrap_index (B, T) int64 ``t + m`` in [t+1, T], the state whose value is
        bootstrapped (irrelevant where the discount is 0).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    B, T = rewards.shape
    dones = dones.bool()
    returns = torch.zeros_like(rewards)
    steps = torch.zeros(B, T, dtype=torch.long, device=rewards.device)
    open_ = torch.ones(B, T, dtype=torch.bool, device=rewards.device)  # window still running
    ended = torch.zeros_like(open_)  # window hit an episode end
    for k in range(min(n, T)):
        # Position t looks at step t + k; steps past the row's end stay closed.
        r_k = F.pad(rewards[:, k:], (0, k))
        d_k = F.pad(dones[:, k:], (0, k))
        in_row = F.pad(torch.ones(B, T - k, dtype=torch.bool, device=rewards.device), (0, k))
        take = open_ & in_row
        returns = returns + torch.where(take, gamma**k * r_k, torch.zeros_like(r_k))
        steps = steps + take.long()
        ended = ended | (take & d_k)
        open_ = take & ~d_k
    discounts = torch.where(ended, torch.zeros_like(returns), gamma ** steps.to(returns.dtype))
    bootstrap_index = torch.arange(T, device=rewards.device) + steps
    return returns, discounts, bootstrap_index


@torch.no_grad()
def td_targets(
    *,
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    next_q_online: torch.Tensor,
    next_q_target: torch.Tensor,
    next_action_mask: torch.Tensor | None = None,
    double: bool = True,
) -> torch.Tensor:
    """TD targets ``r + discount * Q_target(s', a*)`` (no gradient).

    Double DQN picks ``a* = argmax_a Q_online(s', a)`` and evaluates it with the target network;
    plain DQN takes ``max_a Q_target(s', a)``. Masked actions never enter the max; a zero
    discount (terminal) ignores ``s'`` entirely, even if its Q-values are -inf or NaN.

    Args:
        rewards: (B,) n-step returns; discounts: (B,) gamma^n or 0.
        next_q_online: (B, A) online network at the bootstrap state (unused unless ``double``).
        next_q_target: (B, A) target network at the bootstrap state.
        next_action_mask: (B, A) bool allowed actions at the bootstrap state, or None for all.
        double: Double-DQN selection.

    Returns:
        targets (B,).
    """
    neg_inf = torch.finfo(next_q_target.dtype).min
    target = next_q_target
    if next_action_mask is not None:
        target = target.masked_fill(~next_action_mask, neg_inf)
    if double:
        online = next_q_online
        if next_action_mask is not None:
            online = online.masked_fill(~next_action_mask, torch.finfo(online.dtype).min)
        best = online.argmax(-1, keepdim=True)
        next_v = next_q_target.gather(-1, best).squeeze(-1)
    else:
        next_v = target.max(-1).values
    bootstrap = discounts * next_v
    return rewards + torch.where(discounts != 0, bootstrap, torch.zeros_like(bootstrap))


def td_loss(
    *,
    q: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    kind: Literal["huber", "mse"] = "huber",
    delta: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted TD loss (prioritized replay's weights on each error).

    Args:
        q: (B,) Q(s, a) of the taken actions, with gradient.
        targets: (B,) TD targets (treated as constants).
        weights: (B,) importance-sampling weights, or None for 1.
        kind: "huber" (quadratic within ``delta``, linear outside) or "mse" (``td^2``).
        delta: Huber threshold.

    Returns:
        the scalar loss ``mean(w * l(td))`` and td_errors (B,) ``targets - q`` (detached),
        for new priorities.
    """
    targets = targets.detach()
    if kind == "huber":
        per_item = F.huber_loss(q, targets, reduction="none", delta=delta)
    elif kind == "mse":
        per_item = (q - targets) ** 2
    else:
        raise ValueError(f"kind must be 'huber' or 'mse', got {kind!r}")
    if weights is not None:
        per_item = per_item * weights
    return per_item.mean(), (targets - q).detach()


@torch.no_grad()
def polyak_update(
    *, target: Mapping[str, torch.Tensor], online: Mapping[str, torch.Tensor], tau: float
) -> None:
    """In place ``target <- (1 - tau) target + tau online``, tensor by name; tau=1 copies
    exactly. Floating-point tensors are averaged; others (counters) are copied."""
    for name, t in target.items():
        o = online[name]
        if tau == 1.0 or not t.dtype.is_floating_point:
            t.copy_(o)
        else:
            t.lerp_(o.to(t.dtype), tau)


def epsilon(*, step: int, start: float, end: float, decay_steps: int) -> float:
    """Linear schedule from ``start`` at step 0 to ``end`` at ``decay_steps``, then flat."""
    frac = min(1.0, max(0, step) / max(1, decay_steps))
    return start + (end - start) * frac


def _masked(q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``q`` with disallowed actions at the lowest finite value (never an argmax if any allowed)."""
    return q if mask is None else q.masked_fill(~mask, torch.finfo(q.dtype).min)


def epsilon_greedy(
    *,
    q: torch.Tensor,
    mask: torch.Tensor | None,
    epsilon: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy action with probability 1 - epsilon, else uniform among the allowed actions.

    Args:
        q: (B, A) Q-values; mask: (B, A) bool allowed actions or None; epsilon: in [0, 1];
        generator: torch RNG for reproducible exploration.

    Returns:
        actions (B,) int64; never a masked action.
    """
    greedy = _masked(q, mask).argmax(-1)
    allowed = torch.ones_like(q, dtype=torch.float32) if mask is None else mask.float()
    random = torch.multinomial(allowed, 1, generator=generator).squeeze(-1)
    explore = torch.rand(q.shape[0], generator=generator, device=q.device) < epsilon
    return torch.where(explore, random, greedy)


def boltzmann_actions(
    *,
    q: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample actions (B,) from ``softmax(q / temperature)`` over the allowed actions (B, A)."""
    logits = q.float() / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def ucb_bonus(*, counts: torch.Tensor, total: torch.Tensor | float, c: float) -> torch.Tensor:
    """Count-based bonus ``c * sqrt(ln(total + 1) / (counts + 1))`` (UCB exploration).

    Args:
        counts: (B, A) or (A,) times each action was tried in the state's context.
        total: (B,) or scalar, visits of that context.
        c: exploration constant.

    Returns:
        the bonus, broadcast to counts' shape (with a leading B if ``total`` is (B,)).
    """
    total = torch.as_tensor(total, dtype=torch.float32, device=counts.device)
    if total.dim() == 1:
        total = total.unsqueeze(-1)
    return c * torch.sqrt(torch.log(total + 1.0) / (counts.float() + 1.0))


def ucb_actions(
    *,
    q: torch.Tensor,
    counts: torch.Tensor,
    total: torch.Tensor | float,
    c: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """``argmax_a q + ucb_bonus``: ties go to the lowest index, masked actions never win.

    Args:
        q: (B, A); counts: (B, A) or (A,); total: (B,) or scalar; c: exploration constant;
        mask: (B, A) bool allowed actions or None.

    Returns:
        actions (B,) int64.
    """
    score = q.float() + ucb_bonus(counts=counts, total=total, c=c)
    return _masked(score, mask).argmax(-1)


def top_k_action_mask(*, logits: torch.Tensor, k: int) -> torch.Tensor:
    """Allowed actions: the ``k`` highest-scoring tokens of the reference LM at each state.

    Args:
        logits: (B, V) reference-model next-token logits; k: candidates (0 = all tokens).

    Returns:
        (B, V) bool mask with exactly ``min(k, V)`` True per row (all True for k = 0).
    """
    if k <= 0 or k >= logits.shape[-1]:
        return torch.ones_like(logits, dtype=torch.bool)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    return mask.scatter_(-1, logits.topk(k, dim=-1).indices, True)
