"""DQN rollout worker: transitions (worked example), and the worker's batches."""

import numpy as np
import pytest

from distrl.config import load_config
from distrl.data.examples import load_examples
from distrl.dqn.rollout import QRolloutWorker, QTrajectories, make_transitions
from distrl.errors import DistrlError
from distrl.models.policy import encode_prompts


def batch(**over):
    fields = dict(
        prompt_ids=np.array([[0, 7], [5, 6]]),
        prompt_mask=np.array([[0, 1], [1, 1]]),
        response_ids=np.array([[10, 11, 0], [20, 21, 22]]),
        response_mask=np.array([[1, 1, 0], [1, 1, 1]], dtype=np.float32),
        logprobs=np.zeros((2, 3), np.float32),
        texts=np.array(["a", "b"]),
        example_ids=np.array([0, 1]),
        version=3,
        seconds=0.0,
        q_taken=np.array([[0.1, 0.2, 0.0], [0.5, 0.6, 0.7]], np.float32),
        q_max=np.array([[0.3, 0.4, 0.0], [1.0, 2.0, 4.0]], np.float32),
        candidates=np.arange(12, dtype=np.int32).reshape(2, 3, 2),
    )
    return QTrajectories(**{**fields, **over})


def test_two_step_transitions_worked_example():
    cols, prio = make_transitions(batch(), np.array([1.0, 2.0]), gamma=0.5, n_step=2, width=6)
    # Row 0 (2 tokens, reward 1 on the last): G = [0.5, 1], both windows end the episode.
    # Row 1 (3 tokens, reward 2): G = [0, 1, 2]; step 0 bootstraps from step 2 with 0.5^2.
    assert cols["reward"].tolist() == [0.5, 1.0, 0.0, 1.0, 2.0]
    assert cols["discount"].tolist() == [0.0, 0.0, 0.25, 0.0, 0.0]
    assert cols["state_len"].tolist() == [1, 2, 2, 3, 4]
    assert cols["next_len"].tolist()[2] == 4
    assert cols["action"].tolist() == [10, 11, 20, 21, 22]
    assert cols["tokens"][0].tolist() == [7, 10, 11, 0, 0, 0]
    assert cols["tokens"][2].tolist() == [5, 6, 20, 21, 22, 0]
    assert cols["next_candidates"][2].tolist() == [10, 11]  # candidates of row 1, step 2
    assert cols["version"].tolist() == [3] * 5
    assert cols["tokens"].dtype == np.int32 and cols["reward"].dtype == np.float32
    # Priorities: |G + discount * q_max(bootstrap) - q_taken| with the actor's Q-values.
    assert np.allclose(prio, [0.4, 0.8, abs(0 + 0.25 * 4.0 - 0.5), 0.4, 1.3])


def test_joined_batches_keep_their_q_columns_and_give_the_same_transitions():
    # Two workers' batches of different widths: joined, every Q column is kept and padded,
    # and the transitions of the joined batch are those of each batch, in order.
    a = batch()
    b = batch(
        prompt_ids=np.array([[4, 5, 6]]),
        prompt_mask=np.array([[1, 1, 1]]),
        response_ids=np.array([[30, 31]]),
        response_mask=np.array([[1, 1]], dtype=np.float32),
        logprobs=np.zeros((1, 2), np.float32),
        texts=np.array(["c"]),
        example_ids=np.array([2]),
        version=2,
        q_taken=np.array([[0.9, 0.8]], np.float32),
        q_max=np.array([[1.5, 2.5]], np.float32),
        candidates=np.arange(4, dtype=np.int32).reshape(1, 2, 2),
        ucb_bonus=1.0,
    )
    joined = QTrajectories.concat([a, b])
    assert isinstance(joined, QTrajectories) and joined.version == 2
    assert joined.q_max.shape == (3, 3) and joined.candidates.shape == (3, 3, 2)
    assert joined.q_max[2].tolist() == [1.5, 2.5, 0.0] and joined.ucb_bonus == 0.5
    rewards = np.array([1.0, 2.0, 3.0])
    together = make_transitions(joined, rewards, gamma=0.5, n_step=2, width=6)
    parts = [
        make_transitions(a, rewards[:2], gamma=0.5, n_step=2, width=6),
        make_transitions(b, rewards[2:], gamma=0.5, n_step=2, width=6),
    ]
    for key, column in together[0].items():
        assert np.array_equal(column, np.concatenate([p[0][key] for p in parts])), key
    assert np.allclose(together[1], np.concatenate([p[1] for p in parts]))


def test_an_environment_turn_is_part_of_the_transition_and_its_reward_lands_on_the_turn_end():
    from distrl.dqn.rollout import QEpisodes

    # Prompt [7]; the model says 10, 11 (EOS 11), the environment 90, 91, the model 12, 11.
    response = np.array([[10, 11, 90, 91, 12, 11, 0]])
    model = np.array([[1, 1, 0, 0, 1, 1, 0]], np.float32)
    episode = QEpisodes(
        prompt_ids=np.array([[7]]),
        prompt_mask=np.array([[1]]),
        response_ids=response,
        response_mask=model,
        logprobs=np.zeros((1, 7), np.float32),
        texts=np.array(["b"]),
        example_ids=np.array([0]),
        version=1,
        seconds=0.0,
        q_taken=np.array([[0.1, 0.2, 0, 0, 0.3, 0.4, 0]], np.float32),
        q_max=np.array([[1.0, 2.0, 0, 0, 3.0, 4.0, 0]], np.float32),
        candidates=np.arange(14, dtype=np.int32).reshape(1, 7, 2),
        response_attention=np.array([[1, 1, 1, 1, 1, 1, 0]]),
        env_rewards=np.array([0.25], np.float32),
        token_rewards=np.array([[0, 0.25, 0, 0, 0, 0, 0]], np.float32),
        turns=np.array([2]),
        transcripts=np.array(["[]"]),
        failed=np.array([False]),
        tool_calls=np.array([0]),
        tool_errors=np.array([0]),
        env_restarts=1,
    )
    joined = QEpisodes.concat([episode, episode])  # as the driver joins the workers' batches
    assert joined.env_restarts == 2 and joined.candidates.shape == (2, 7, 2)
    # The total (the environment's 0.25 and 1.0 more from the reward pool) at gamma 0.5, 1 step.
    cols, prio = make_transitions(episode, np.array([1.25]), gamma=0.5, n_step=1, width=8)
    assert cols["action"].tolist() == [10, 11, 12, 11]  # the model's tokens only
    assert cols["state_len"].tolist() == [1, 2, 5, 6]  # 12 acts after the environment's turn
    assert cols["next_len"].tolist() == [2, 5, 6, 7]  # ... so 11's next state includes it
    assert cols["reward"].tolist() == [0.0, 0.25, 0.0, 1.0]  # the turn's reward at its end
    assert cols["discount"].tolist() == [0.5, 0.5, 0.5, 0.0]
    assert cols["tokens"][0].tolist() == [7, 10, 11, 90, 91, 12, 11, 0]
    assert cols["next_candidates"][1].tolist() == [8, 9]  # the candidates where 12 was chosen
    assert np.allclose(prio, [abs(0.5 * 2.0 - 0.1), abs(0.25 + 0.5 * 3.0 - 0.2), 1.7, 0.6])


def test_spread_shaping_and_dropped_rows():
    cols, _ = make_transitions(
        batch(), np.array([np.nan, 3.0]), gamma=1.0, n_step=1, width=6, shaping="spread"
    )
    assert cols["reward"].tolist() == [1.0, 1.0, 1.0]  # row 0 dropped; 3 spread over 3 tokens
    assert cols["discount"].tolist() == [1.0, 1.0, 0.0]
    assert cols["next_len"].tolist() == [3, 4, 5]


def test_a_state_wider_than_the_replay_width_is_named():
    with pytest.raises(DistrlError, match="replay width 4"):
        make_transitions(batch(), np.array([1.0, 1.0]), gamma=1.0, n_step=1, width=4)


def test_worker_generates_within_candidates_and_loads_weights():
    config = load_config("tiny", {"algo": "dqn", "dqn.action_top_k": 4})
    worker = QRolloutWorker(**QRolloutWorker.arguments(config))
    examples = load_examples("default", limit=3)
    prompts = encode_prompts(examples, worker.tokenizer, config.tokenizer, config.data)
    out = worker.generate(prompts, [0, 1, 2], epsilon=1.0)
    assert out.response_ids.shape[0] == 3 and len(out.texts) == 3
    assert out.candidates.shape[-1] == 4
    live = out.response_mask > 0
    assert (out.candidates == out.response_ids[..., None]).any(-1)[live].all()
    selected = out.select(np.array([2, 0]))
    assert selected.q_taken.shape[0] == 2 and np.array_equal(selected.q_max[1], out.q_max[0])
    cols, prio = make_transitions(out, np.ones(3), gamma=0.99, n_step=3, width=worker.width)
    assert len(prio) == int(out.response_mask.sum()) and np.isfinite(prio).all()
