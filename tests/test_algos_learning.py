"""Each policy-gradient algorithm learns a synthetic verifiable task with a tiny model.

The task: answer only with tokens from the lower half of the vocabulary (ids below ``LOW``). The
reward is exact (the share of such ids among a response's tokens, EOS included); sampling from
the model's top 20 tokens, a random tiny model scores about 0.55, and 1 only once the policy
ranks lower-half tokens first wherever it writes. The real ``RolloutWorker`` and
``Learner`` classes run in this process (no Ray): generate ``samples_per_prompt`` completions per
prompt, score them, update, publish the weights to the worker, repeat.
"""

import numpy as np
import pytest

from distrl.config import load_config
from distrl.pg.learner import Learner
from distrl.pg.rollout import RolloutWorker

PROMPTS = [[464, 3290, 373], [40, 588, 257, 3797], [1212, 318], [818, 262, 3726, 286]]
UPDATES = 25
LOW = 25_000
TARGET = 0.85  # mean reward of the last 5 updates, for 2 of 3 seeds (the third runs if needed)


def low_share(response_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(B,) share of low token ids among each response's real tokens."""
    return ((response_ids < LOW) * mask).sum(1) / np.maximum(mask.sum(1), 1)


def learn(algo: str, seed: int, **overrides) -> list[float]:
    """Mean reward of each of ``UPDATES`` iterations of ``algo`` on the even-token task."""
    n = 4
    config = load_config(
        "tiny",
        {
            "algo": algo,
            "seed": seed,
            "rollout.samples_per_prompt": n,
            "rollout.max_new_tokens": 6,
            "rollout.temperature": 1.0,
            "rollout.top_k": 20,
            "learner.lr": 3e-3,
            "ppo.epochs": 1,
            "ppo.minibatch_size": len(PROMPTS) * n,
            **overrides,
        },
    )
    worker = RolloutWorker(**RolloutWorker.arguments(config))
    learner = Learner(**Learner.arguments(config))
    prompts = [p for p in PROMPTS for _ in range(n)]
    groups = np.repeat(np.arange(len(PROMPTS)), n)
    curve = []
    for _ in range(UPDATES):
        batch = worker.generate(prompts, list(range(len(prompts))))
        scores = low_share(batch.response_ids, batch.response_mask)
        curve.append(float(scores.mean()))
        learner.train(batch, scores, groups=groups)
        worker.set_weights(learner.weights())
    return curve


@pytest.mark.slow  # a few hundred tiny updates
@pytest.mark.parametrize(
    "algo, overrides",
    [
        ("grpo", {}),
        ("dr_grpo", {}),
        ("rloo", {}),
        ("reinforce_pp", {"ppo.kl_coef": 0.0}),
        ("grpo", {"ppo.loss_agg": "seq_mean_token_mean"}),  # the original GRPO loss
        ("ppo", {"ppo.kl_coef": 0.0}),
        ("gspo", {}),
        ("cispo", {}),
    ],
    ids=["grpo", "dr_grpo", "rloo", "reinforce_pp", "grpo_seq_mean", "ppo", "gspo", "cispo"],
)
def test_the_algorithm_learns_the_low_token_task(algo, overrides):
    # PPO's value head starts random and its advantages are noisier on a task this short.
    target = 0.75 if algo == "ppo" else TARGET
    finals = []
    for seed in (0, 1, 2):
        curve = learn(algo, seed, **overrides)
        finals.append(float(np.mean(curve[-5:])))
        assert np.mean(curve[:3]) < 0.7  # it starts near chance
        learned = sum(f >= target for f in finals)
        if learned == 2 or len(finals) - learned == 2:
            break  # 2 of 3 is decided: a third seed cannot change the verdict
    assert learned >= 2, f"{algo}: final rewards {finals} (target {target})"
