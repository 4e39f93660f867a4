"""Which forward passes a policy-gradient update runs (``plan_passes``, decided once from the
algorithm's registry entry and the config), and the tensors of the batch it runs them on
(``PPOBatch``)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from distrl.algos import registry
from distrl.config import PPOConfig


@dataclass(frozen=True)
class Passes:
    """The forward passes one update runs besides its minibatch steps.

    Attributes:
        reference: run the reference model (a KL penalty in the reward, or a KL loss term).
        recompute: the learner recomputes the old log-probabilities before updating, and they
            replace the workers' (an algorithm with the KL in the reward that runs the
            reference: while the policy is the reference the KL is then exactly 0, not
            round-off that whitening would blow up; or truncated importance sampling, which
            needs both); it also measures their mismatch.
        old_pass: a no-grad forward of the policy before updating (for ``recompute``, or for
            the critic's old values when the update takes several optimizer steps).
        values_in_update: the first minibatch's own forward gives the critic's old values (one
            optimizer step over the whole batch, so no separate pass is needed).
        probe: the first minibatch is a forward of the old weights over every row, so it
            measures the rollout/learner mismatch for free.
        kl_in_reward: the reward carries the per-token KL penalty.
    """

    reference: bool
    recompute: bool
    old_pass: bool
    values_in_update: bool
    probe: bool
    kl_in_reward: bool


def plan_passes(
    algo: registry.Algo,
    ppo_config: PPOConfig,
    *,
    batch_size: int,
    kl_coef: float,
    deterministic: bool,
    split: bool = False,
) -> Passes:
    """Which passes an update of ``batch_size`` rows runs (see ``Passes``).

    Args:
        algo: the algorithm's registry entry.
        ppo_config: the run's policy-gradient settings.
        batch_size: rows in the batch.
        kl_coef: the KL controller's current coefficient (0 and fixed: no reference pass).
        deterministic: a training-mode forward gives an eval-mode one's logprobs (no dropout).
        split: each minibatch is split (over learner ranks, or into micro-batches): the
            critic's old values come from an old pass over the whole batch, so GAE and
            whitening see every row, not one part's.
    """
    c = ppo_config
    whole_batch = c.minibatch_size >= batch_size
    single_step = algo.critic and c.epochs == 1 and whole_batch and not split
    # Without a KL penalty (fixed coefficient 0) the reference model is not run, as GRPO
    # does with beta 0.
    penalty = algo.kl_in_reward and (kl_coef > 0 or c.kl_target is not None)
    reference = penalty or c.kl_loss_coef > 0
    recompute = (algo.kl_in_reward and reference) or c.rollout_is == "truncated"
    old_pass = recompute or (algo.critic and not single_step)
    return Passes(
        reference=reference,
        recompute=recompute,
        old_pass=old_pass,
        values_in_update=algo.critic and not old_pass,
        probe=not recompute and whole_batch and deterministic,
        kl_in_reward=algo.kl_in_reward,
    )


@dataclass
class PPOBatch:
    """Tensors of one PPO update, all (B, T) over response tokens except ``ids``/``mask``
    (B, P+T), with the per-row reference responses for the optional cross-entropy term."""

    ids: torch.Tensor
    mask: torch.Tensor
    tokens: torch.Tensor
    rmask: torch.Tensor
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    references: list[list[int]] | None
    ref_logprobs: torch.Tensor | None = None  # for a KL loss term
    is_weights: torch.Tensor | None = None  # truncated importance weights (ppo.rollout_is)
    # None when one update covers the whole batch: its own forward supplies the old values.
    old_values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> PPOBatch:
        """The minibatch of rows ``idx``."""
        refs = None if self.references is None else [self.references[i] for i in idx.tolist()]
        tensors = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx]
            for f in fields(self)
            if f.name != "references"
        }
        return PPOBatch(**tensors, references=refs)
