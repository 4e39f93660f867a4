"""Every algorithm ``--algo`` can name, each declared once.

A policy-gradient algorithm is an ``Algo``: its advantage estimator (or a critic's GAE), where
the KL to the reference goes, its policy loss, its default loss aggregation and clip range, and
its default group size. The ``--algo`` choices and help, the config's checks, the learner's
passes and losses, the loop's plug-in and the README's algorithm table are all read from
``ALGOS``; nothing else in distrl compares algorithm names (``tests/test_registry.py`` checks).

Adding a group algorithm is one pure function in ``distrl.algos.pg`` (tested on a worked
example) and one ``register`` call here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from distrl.algos import pg

Estimator = Callable[..., torch.Tensor]
"""``fn(*, scores (B,), groups (B,) | None, token_rewards (B, T), mask (B, T), gamma,
min_std) -> advantages (B, T)``: every estimator takes all of these and uses what it needs."""

PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``fn(*, logprobs, old_logprobs, advantages, mask, clip_low, clip_high, loss_agg,
max_length, weights) -> (loss, stats)``, as ``distrl.algos.pg.policy_loss``."""


@dataclass(frozen=True)
class Algo:
    """One algorithm, as ``--algo`` names it.

    Attributes:
        name: the ``--algo`` value.
        family: ``policy_gradient`` (the ``Learner``, on-policy batches) or ``q_learning``
            (the ``QLearner`` with a replay buffer).
        advantage: what its advantage is, in a few words (help text and the README table).
        estimator: the critic-free advantage (see ``Estimator``); None with a critic (GAE).
        critic: trains a value head (PPO).
        kl_in_reward: the KL to the reference is a per-token penalty in the reward
            (``ppo.kl_coef``); any algorithm can add it as a loss term (``ppo.kl_loss_coef``).
        policy_loss: the loss over the sampled tokens (see ``PolicyLoss``).
        loss_agg: the default of ``ppo.loss_agg``.
        clip: the default ``(ppo.clip_low, ppo.clip_high)``; None = ``ppo.clip`` both ways.
        group_size: the default ``rollout.samples_per_prompt``; above 1 the algorithm compares
            the completions of one prompt and needs 2 or more.
    """

    name: str
    family: Literal["policy_gradient", "q_learning"]
    advantage: str
    estimator: Estimator | None = None
    critic: bool = False
    kl_in_reward: bool = False
    policy_loss: PolicyLoss = pg.policy_loss
    loss_agg: str = "token_mean"
    clip: tuple[float, float] | None = None
    group_size: int = 1

    @property
    def needs_groups(self) -> bool:
        """Whether the algorithm compares the completions of one prompt."""
        return self.group_size > 1

    @property
    def uses_replay(self) -> bool:
        """Whether the algorithm learns from a replay-buffer actor."""
        return self.family == "q_learning"

    def kl_text(self) -> str:
        """Where the KL to the reference goes, for the help and the README table."""
        if self.family == "q_learning":
            return ""
        if self.kl_in_reward:
            return "in the reward (`ppo.kl_coef`, adaptive with `ppo.kl_target`)"
        return "a loss term (`ppo.kl_loss_coef`, `ppo.kl_estimator` k1/k2/k3)"

    def loss_text(self) -> str:
        """The policy loss, its aggregation and clip range, for the README table."""
        if self.family == "q_learning":
            return "TD (Huber or MSE), importance-weighted"
        clip = f", clip {self.clip[0]:g}/{self.clip[1]:g}" if self.clip else ""
        return f"`{self.policy_loss.__name__}`, `{self.loss_agg}`{clip}"


ALGOS: dict[str, Algo] = {}
DEFAULT = "ppo"  # the config's algo when none is given


def register(algo: Algo) -> Algo:
    """Add ``algo`` to ``ALGOS`` (its name must be new)."""
    if algo.name in ALGOS:
        raise ValueError(f"algorithm {algo.name!r} is registered twice")
    if algo.family == "policy_gradient" and (algo.estimator is None) != algo.critic:
        raise ValueError(f"{algo.name}: an estimator without a critic, or a critic alone")
    if algo.loss_agg not in pg.LOSS_AGG_MODES:
        raise ValueError(f"{algo.name}: unknown loss aggregation {algo.loss_agg!r}")
    ALGOS[algo.name] = algo
    return algo


def get(name: str) -> Algo:
    """The registered algorithm ``name``."""
    try:
        return ALGOS[name]
    except KeyError:
        raise KeyError(f"unknown algorithm {name!r}; expected one of {list(ALGOS)}") from None


# ---- estimators: the pure functions of distrl.algos.pg under one signature ----------------


def _group_mean_std(
    *, scores: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, **_: Any
) -> torch.Tensor:
    return pg.group_advantages(scores=scores, groups=groups, mask=mask)


def _group_mean(
    *, scores: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, **_: Any
) -> torch.Tensor:
    return pg.group_advantages(scores=scores, groups=groups, mask=mask, std_normalize=False)


def _leave_one_out(
    *, scores: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, **_: Any
) -> torch.Tensor:
    return pg.rloo_advantages(scores=scores, groups=groups, mask=mask)


def _whitened_returns(
    *, token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float, min_std: float, **_: Any
) -> torch.Tensor:
    return pg.reinforce_pp_advantages(
        token_rewards=token_rewards, mask=mask, gamma=gamma, min_std=min_std
    )


GROUP = 4  # completions per prompt of the group algorithms, unless rollout.samples_per_prompt
GRPO_ADVANTAGE = "(score - group mean) / group std, on every token"

register(
    Algo(
        "ppo",
        "policy_gradient",
        "GAE from a value head, whitened",
        critic=True,
        kl_in_reward=True,
    )
)
register(Algo("grpo", "policy_gradient", GRPO_ADVANTAGE, _group_mean_std, group_size=GROUP))
register(
    Algo(
        "dr_grpo",
        "policy_gradient",
        "score - group mean (no std)",
        _group_mean,
        loss_agg="seq_mean_token_sum_norm",
        group_size=GROUP,
    )
)
register(
    Algo(
        "rloo",
        "policy_gradient",
        "score - mean of the group's other samples",
        _leave_one_out,
        group_size=GROUP,
    )
)
register(
    Algo(
        "reinforce_pp",
        "policy_gradient",
        "discounted return of KL-shaped token rewards, whitened over the batch",
        _whitened_returns,
        kl_in_reward=True,
    )
)
register(
    Algo(
        "gspo",
        "policy_gradient",
        GRPO_ADVANTAGE,
        _group_mean_std,
        policy_loss=pg.gspo_loss,
        loss_agg="seq_mean_token_mean",
        clip=(3e-4, 4e-4),
        group_size=GROUP,
    )
)
register(
    Algo(
        "cispo",
        "policy_gradient",
        GRPO_ADVANTAGE,
        _group_mean_std,
        policy_loss=pg.cispo_loss,
        group_size=GROUP,
    )
)
register(
    Algo("dqn", "q_learning", "token-level Q-learning from a prioritized replay (docs/dqn.md)")
)


@dataclass(frozen=True)
class QNet:
    """One Q-network DQN can learn (``dqn.q_network``).

    Attributes:
        name: the ``dqn.q_network`` value.
        summary: what it is, in a few words (the help text).
        policy_lm: it is the policy LM with a Q head, so LoRA adapts it and a vLLM engine can
            run it (its logits are the Q-values).
        state_encoder: it reads a frozen state encoder that ``dqn.prune_sparsity`` and
            ``dqn.autoencoder_dim`` can prune and compress.
    """

    name: str
    summary: str
    policy_lm: bool = False
    state_encoder: bool = False


QNETS: dict[str, QNet] = {
    q.name: q
    for q in (
        QNet("lm_head", "a Q head on the policy LM", policy_lm=True),
        QNet("performer", "a Performer (FAVOR+ linear attention) over tokens"),
        QNet("mlp", "an MLP over a state embedding of the policy's backbone", state_encoder=True),
    )
}
"""Every Q-network by name; ``distrl.dqn.qnets.build_qnet`` builds each."""


def help_text() -> str:
    """The ``--algo`` help: every algorithm with its advantage."""
    return "learning algorithm: " + "; ".join(f"{a.name}: {a.advantage}" for a in ALGOS.values())


def markdown_table() -> str:
    """The README's algorithm table."""
    rows = [
        "| `--algo` | advantage | policy loss | KL to the reference | group size |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a in ALGOS.values():
        name = f"`{a.name}` (default)" if a.name == DEFAULT else f"`{a.name}`"
        group = str(a.group_size) if a.needs_groups else ""
        rows.append(f"| {name} | {a.advantage} | {a.loss_text()} | {a.kl_text()} | {group} |")
    return "\n".join(rows)
