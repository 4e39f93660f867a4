"""Rewards: components over a batch of samples, their weighted composite, and the scorer role.

    from distrl.rewards import RewardBatch, RewardScorer
    scorer = RewardScorer(run_config.reward)
    result = scorer.score(RewardBatch(responses, prompts=prompts, targets=targets))
    result.total, result.components["diversity"], result.dropped

Plain classes without Ray; ``distrl.runtime.actors.RewardPool`` runs ``RewardScorer`` as actors.
"""

from distrl.rewards.base import Component, RewardBatch, SampleError
from distrl.rewards.components import COMPONENTS
from distrl.rewards.composite import (
    CompositeReward,
    RewardScorer,
    ScoreResult,
    check_reward_config,
    component_keys,
    compute_reward,
    trial_score,
)
from distrl.rewards.user import UserFunction, import_function

__all__ = [
    "COMPONENTS",
    "Component",
    "CompositeReward",
    "RewardBatch",
    "RewardScorer",
    "SampleError",
    "ScoreResult",
    "UserFunction",
    "check_reward_config",
    "component_keys",
    "compute_reward",
    "import_function",
    "trial_score",
]
