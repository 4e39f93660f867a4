"""``--algo dqn`` end to end on a real local Ray: 2 rollout workers, the replay actor, the
learner; checkpoints carry the replay buffer and a resumed run keeps its experience."""

import numpy as np
import pytest

from distrl.config import load_config
from distrl.dqn.learner import is_dqn_checkpoint, load_q_policy
from distrl.dqn.replay import PrioritizedReplay
from distrl.loop.driver import train
from distrl.outputs.metrics import read_metrics
from distrl.runtime import actors
from distrl.validate import run_config_for, validate


def tiny_dqn(tmp_path, **over):
    base = {
        "algo": "dqn",
        "output.dir": str(tmp_path / "run"),
        "output.progress": False,
        "output.plots": False,
        "iterations": 4,
        "dqn.learning_starts": 16,
        "dqn.batch_size": 16,
        "dqn.updates_per_iteration": 2,
        "dqn.action_top_k": 8,
    }
    return load_config("tiny", {**base, **over})


@pytest.mark.slow  # a whole run on Ray
def test_dqn_run_with_two_workers_replay_and_resume(ray_session, tmp_path):
    config = tiny_dqn(tmp_path)
    assert config.rollout.num_workers == 2
    run_dir = train(config)
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    for key in (
        "reward/total",
        "reward/diversity",
        "learner/td_loss",
        "learner/q_mean",
        "learner/target_q_mean",
        "learner/sample_age",
        "replay/size",
        "replay/priority_mean",
        "replay/priority_max",
        "explore/epsilon",
        "rollout/tokens_per_s",
    ):
        assert key in last, key
    # Both workers' transitions reach the replay actor: 2 workers x 4 prompts x <= 8 tokens.
    assert 16 <= records[0]["replay/size"] <= 64
    assert last["replay/size"] > records[0]["replay/size"]
    assert last["learner/updates"] == 8 and "eval/reward" in records[1]
    step_4 = run_dir / "checkpoints" / "step_4"
    assert (step_4 / "replay.parquet").is_file() and is_dqn_checkpoint(run_dir / "final")
    policy, _ = load_q_policy(run_dir / "final")
    assert policy.top_k == 8
    final = str(run_dir / "final")
    report = validate(run_config_for(final, None), examples=4, checkpoint=final)
    assert report["validate/examples"] == 4 and "validate/reward_total" in report
    assert "validate/ref_perplexity" not in report  # Q-values are not a distribution

    resumed = train(tiny_dqn(tmp_path, iterations=6), resume=True)
    records = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    # The replay buffer came back from step 4's snapshot: nothing was lost.
    assert records[4]["replay/added"] > records[3]["replay/added"]
    assert records[-1]["learner/updates"] == 12


def test_replay_actor_snapshot_restores_exactly(ray_session, tmp_path):
    options = actors.actor_options(0.0)
    a = actors.make_actor(PrioritizedReplay, options, capacity=50, seed=3)
    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(0, 100, (80, 6)).astype(np.int32),
        "reward": rng.random(80).astype(np.float32),
    }
    actors.get(a.add.remote(batch, rng.random(80)))  # overflows: the last 50 are kept
    _, ids, _ = actors.get(a.sample.remote(10))
    actors.get(a.update_priorities.remote(ids, rng.random(10)))
    path = str(tmp_path / "replay.parquet")
    actors.get(a.save_parquet.remote(path))
    b = actors.make_actor(PrioritizedReplay, options, capacity=50, seed=99)
    actors.get(b.load_parquet.remote(path))
    sa, sb = actors.get([a.sample.remote(16), b.sample.remote(16)])
    for x, y in zip(sa[0].values(), sb[0].values()):
        assert np.array_equal(x, y)
    assert np.array_equal(sa[1], sb[1]) and np.array_equal(sa[2], sb[2])
    assert actors.get(a.stats.remote()) == actors.get(b.stats.remote())


def test_resuming_dqn_from_a_checkpoint_without_replay_is_refused(tmp_path):
    from distrl.errors import DistrlError
    from distrl.loop.plugins import DQN

    with pytest.raises(DistrlError, match="has no replay.parquet: not a DQN checkpoint"):
        DQN.restore(None, tmp_path)  # the check comes before any actor is touched


def test_dqn_says_when_no_reward_fired_and_actions_are_restricted():
    from distrl.loop.plugins import NO_SIGNAL_ITERATIONS, no_signal_warning

    n = NO_SIGNAL_ITERATIONS
    message = no_signal_warning({0.0}, 16, n)
    assert message and "dqn.action_top_k" in message and "top 16" in message
    assert "was 0:" in message
    assert no_signal_warning(set(), 16, n) and "dropped" in no_signal_warning(set(), 16, n)
    assert no_signal_warning({0.0, 1.0}, 16, n) is None  # the reward fired
    assert no_signal_warning({0.0}, 0, n) is None  # the whole vocabulary: nothing excluded
    assert no_signal_warning({0.0}, 16, n - 1) is None  # said once, after n iterations
    assert no_signal_warning({0.0}, 16, n + 1) is None


# ---- the policy-gradient plug-in's bookkeeping, without Ray ----------------------------------


def no_actors():
    """A crew whose every call fails: these tests must not reach an actor."""
    from distrl.runtime.crew import Crew

    def fail(*_):
        raise AssertionError("a bookkeeping test called an actor")

    return Crew(fail, fail, fail, fail, fail, fail)


def rounds_of(scores: list[list[float]], dropped=None, n: int = 2) -> list:
    """Rounds of the given scores, ``n`` rows per group, numbered as the loop numbers them."""
    from distrl.loop.plugins import Round
    from distrl.rewards import ScoreResult

    out, offset = [], 0
    for i, row in enumerate(scores):
        drop = np.zeros(len(row), bool) if dropped is None else np.array(dropped[i])
        total = np.where(drop, np.nan, np.array(row, dtype=np.float64))  # as the pool reports
        groups = offset + np.arange(len(row)) // n
        offset = int(groups.max()) + 1
        out.append(Round([], None, ScoreResult(total, {}, drop), groups))
    return out


def policy_gradient(tmp_path, **overrides):
    from distrl.loop.plugins import PolicyGradient

    base = {"algo": "grpo", "rollout.samples_per_prompt": 2, "rollout.batch_size": 1}
    config = load_config("tiny", {**base, "ppo.minibatch_size": 2, **overrides})
    return PolicyGradient(config, no_actors(), run_dir=tmp_path, references=[])


def test_group_rows_number_every_prompts_samples_in_order():
    from distrl.loop.plugins import group_rows
    from distrl.pg.rollout import Trajectories

    def part(rows):
        z = np.zeros((rows, 1))
        return Trajectories(z, z, z, z, z, np.array([""] * rows), np.arange(rows), 0, 0.0)

    groups = group_rows([part(4), part(6)], 2)
    assert groups.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_dynamic_sampling_keeps_the_oldest_whole_groups_with_signal(tmp_path):
    # 2 workers x 1 prompt x 2 samples: a batch is 2 groups (4 rows). Round 1's group 0 tied
    # (no signal), group 1 did not: one more round. Round 2 has two groups with signal; the
    # batch takes groups 1 and 2, the oldest that fill it.
    algo = policy_gradient(tmp_path, **{"ppo.dynamic_sampling": True})
    rounds = rounds_of([[1.0, 1.0, 0.0, 1.0]])
    assert algo.target() == 4 and algo.wants_more(rounds)
    rounds = rounds_of([[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    assert not algo.wants_more(rounds)
    assert algo.keep(rounds).tolist() == [False, False, True, True, True, True, True, True]
    assert algo.rows(rounds).tolist() == [2, 3, 4, 5]


def test_dynamic_sampling_stops_at_its_round_limit_and_learns_from_the_last_round(tmp_path):
    algo = policy_gradient(tmp_path, **{"ppo.dynamic_sampling": True, "ppo.max_sampling_rounds": 2})
    ties = rounds_of([[1.0] * 4, [0.5] * 4])
    assert not algo.wants_more(ties)  # two rounds, the limit
    assert algo.rows(ties).tolist() == [4, 5, 6, 7]  # the last round, at zero advantage


def test_dropped_samples_never_reach_the_learner(tmp_path):
    dropped = [[False, True, False, False]]
    plain = policy_gradient(tmp_path)
    assert plain.rows(rounds_of([[1.0, 0.0, 0.0, 1.0]], dropped)).tolist() == [0, 2, 3]
    dynamic = policy_gradient(tmp_path, **{"ppo.dynamic_sampling": True})
    # Group 0 lost a sample; the one left has no other to compare with: no signal.
    assert dynamic.rows(rounds_of([[1.0, 0.0, 0.0, 1.0]], dropped)).tolist() == [2, 3]
