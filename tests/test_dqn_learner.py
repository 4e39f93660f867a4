"""DQN learner: prefixes, TD steps, target syncs, checkpoints, and a learning test."""

import numpy as np
import pytest
import torch

from distrl.algos import dqn
from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.dqn.learner import QLearner, load_q_policy, prefixes
from distrl.dqn.replay import from_config
from distrl.dqn.rollout import QRolloutWorker, make_transitions
from distrl.models.policy import encode_prompts


def tiny_dqn(**over):
    base = {
        "algo": "dqn",
        "dqn.action_top_k": 4,
        "dqn.batch_size": 32,
        "dqn.n_step": 3,
        "rollout.max_new_tokens": 3,
        "learner.lr": 1e-3,
    }
    return load_config("tiny", {**base, **over})


def prompts_for(worker, config, n=4):
    examples = load_examples("default", limit=n)
    return encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)


def test_prefixes_left_pad_each_row():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    ids, mask = prefixes(tokens, torch.tensor([2, 3]), pad_id=0)
    assert ids.tolist() == [[0, 1, 2], [5, 6, 7]]
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1]]


def filled_replay(config, worker, prompts, rewards):
    replay = from_config(config.replay)
    out = worker.generate(prompts, list(range(len(prompts))), epsilon=0.5)
    cols, prio = make_transitions(
        out, rewards, gamma=config.dqn.gamma, n_step=config.dqn.n_step, width=worker.width
    )
    replay.add(cols, prio)
    return replay


def test_updates_fit_a_fixed_replay_and_sync_the_target():
    config = tiny_dqn(**{"dqn.target_update_interval": 5})
    learner = QLearner(**QLearner.arguments(config))
    worker = QRolloutWorker(**QRolloutWorker.arguments(config))
    prompts = prompts_for(worker, config)
    replay = filled_replay(config, worker, prompts, np.array([1.0, 0.0, 0.5, 0.0]))
    before = [p.clone() for p in learner.target.parameters()]
    losses = []
    for step in range(1, 31):
        ids, td, metrics = learner.update(replay.sample(32))
        replay.update_priorities(ids, td)
        losses.append(metrics["learner/td_loss"])
        same = all(torch.equal(a, b) for a, b in zip(learner.target.parameters(), before))
        if step < 5:
            assert same  # hard copies only every target_update_interval steps
        if step == 5:
            assert all(
                torch.equal(t, o)
                for t, o in zip(learner.target.parameters(), learner.qnet.parameters())
            )
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert learner.steps == 30 and metrics["learner/sample_age"] >= 0
    assert learner.weights().version == 1 and learner.weights().version == 1


def test_polyak_target_moves_a_little_every_step():
    config = tiny_dqn(**{"dqn.tau": 0.1})
    learner = QLearner(**QLearner.arguments(config))
    worker = QRolloutWorker(**QRolloutWorker.arguments(config))
    replay = filled_replay(config, worker, prompts_for(worker, config), np.ones(4))
    target0 = learner.target.q_head.linear.bias.clone()
    online0 = learner.qnet.q_head.linear.bias.clone()
    learner.update(replay.sample(32))
    online1 = learner.qnet.q_head.linear.bias
    assert torch.allclose(learner.target.q_head.linear.bias, 0.9 * target0 + 0.1 * online1)
    assert not torch.equal(online1, online0)


def test_checkpoint_round_trip_and_q_guided_decoding(tmp_path):
    config = tiny_dqn()
    learner = QLearner(**QLearner.arguments(config))
    worker = QRolloutWorker(**QRolloutWorker.arguments(config))
    prompts = prompts_for(worker, config)
    replay = filled_replay(config, worker, prompts, np.ones(4))
    for _ in range(3):
        learner.update(replay.sample(32))
    published = learner.weights()
    learner.save(str(tmp_path), {"step": 7})
    worker.set_weights(published)  # the worker holds what the checkpoint holds
    ids = np.array([prompts[0]])
    expected = worker.generate([prompts[0]], [0], greedy=True)
    fresh = QLearner(**QLearner.arguments(config))
    assert fresh.load(str(tmp_path)) == {"step": 7}
    assert fresh.steps == 3 and fresh.version == learner.version == 1
    for a, b in zip(fresh.qnet.state_dict().values(), learner.qnet.state_dict().values()):
        assert torch.equal(a, b)
    sample = replay.sample(32)
    assert np.allclose(fresh.update(sample)[1], learner.update(sample)[1], atol=1e-6)
    policy, tokenizer = load_q_policy(tmp_path)
    out = policy.decode(ids, np.ones_like(ids), config.rollout.max_new_tokens)
    # The checkpoint decodes exactly as the worker holding the same weights, Q-values included.
    assert np.array_equal(out.response_ids, expected.response_ids)
    np.testing.assert_allclose(out.q_taken, expected.q_taken, atol=1e-5)
    assert tokenizer.vocab_size == worker.tokenizer.vocab_size


# ---- learning: a synthetic task with a known optimum -------------------------------------


def target_tokens(worker, prompts):
    """Per prompt, the reference LM's third candidate for the first token: not what the
    untrained (reference-greedy) policy emits, but an allowed action."""
    out = worker.generate(prompts, list(range(len(prompts))), greedy=True)
    return out.candidates[:, 0, 2]


def train_synthetic(seed, iterations=30, updates=4):
    config = tiny_dqn(
        seed=seed,
        **{
            "dqn.epsilon_start": 0.5,
            "dqn.epsilon_end": 0.05,
            "dqn.epsilon_decay_steps": 80,
            "dqn.target_update_interval": 20,
            "replay.capacity": 4096,
        },
    )
    learner = QLearner(**QLearner.arguments(config))
    worker = QRolloutWorker(**QRolloutWorker.arguments(config))
    prompts = prompts_for(worker, config)
    targets = target_tokens(worker, prompts)
    replay = from_config(config.replay, seed=seed)
    untrained = worker.generate(prompts, list(range(4)), greedy=True).response_ids[:, 0]
    d = config.dqn
    for _ in range(iterations):
        eps = dqn.epsilon(
            step=learner.steps,
            start=d.epsilon_start,
            end=d.epsilon_end,
            decay_steps=d.epsilon_decay_steps,
        )
        out = worker.generate(prompts * 2, list(range(8)), epsilon=eps)
        rewards = (out.response_ids[:, 0] == np.tile(targets, 2)).astype(np.float32)
        cols, prio = make_transitions(out, rewards, gamma=d.gamma, n_step=d.n_step, width=40)
        replay.add(cols, prio)
        for _ in range(updates):
            ids, td, _ = learner.update(replay.sample(d.batch_size))
            replay.update_priorities(ids, td)
        worker.set_weights(learner.weights())
    greedy = worker.generate(prompts, list(range(4)), greedy=True).response_ids[:, 0]
    return untrained, greedy, targets, learner.steps


@pytest.mark.slow  # a learning test: three seeds of up to 120 TD updates
def test_dqn_learns_to_emit_the_rewarded_token_first():
    """Reward 1 for emitting the prompt's target token first, 0 otherwise. The untrained greedy
    policy never does (it takes the top candidate, the target is the third); after at most 120
    TD updates DQN's greedy policy does on every prompt, in at least 2 of 3 seeds."""
    solved = 0
    for seed in range(3):
        untrained, greedy, targets, steps = train_synthetic(seed)
        assert not (untrained == targets).any()
        assert steps <= 120
        solved += bool((greedy == targets).all())
        if solved == 2 or seed + 1 - solved == 2:
            break  # 2 of 3 is decided: a third seed cannot change the verdict
    assert solved >= 2
