"""``TextGenerationEnv``: gymnasium's checker, episode semantics, and RLlib's own PPO and DQN
running an iteration on it (RLlib's tiny MLP over the token ids) on the session's Ray."""

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from distrl.envs.gym import TextGenerationEnv

TINY = {"config": "tiny", "overrides": {"rollout.max_new_tokens": 4}}


@pytest.fixture(scope="module")
def env():
    return TextGenerationEnv(TINY)


def test_passes_the_gymnasium_checker(env):
    check_env(env, skip_render_check=True)
    assert env.action_space.n == env.tokenizer.vocab_size


def test_an_episode_appends_tokens_and_scores_the_response_at_the_end(env):
    obs, info = env.reset(seed=0, options={"example": 3})
    prompt = env.prompts.ids[3]
    assert info["example"] == 3 and obs[-len(prompt) :].tolist() == prompt
    rewards = []
    for token in (11, 22, 33, 44):
        obs, reward, terminated, truncated, info = env.step(token)
        rewards.append(reward)
        assert obs[-1] == token and not truncated
    assert terminated and rewards[:3] == [0.0, 0.0, 0.0]
    # The composite reward of the tiny config (diversity) of the decoded response.
    assert rewards[-1] == pytest.approx(info["reward_components"]["diversity"])
    assert env.render() == env.tokenizer.decode([11, 22, 33, 44])


def test_eos_ends_the_episode_early(env):
    env.reset(seed=1)
    *_, terminated, _, _ = env.step(env.tokenizer.eos_token_id)
    assert terminated


def test_an_action_outside_the_vocabulary_is_refused(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not a token id"):
        env.step(env.action_space.n)


@pytest.mark.parametrize("algo", ["ppo", "dqn"])
@pytest.mark.slow  # a whole run on Ray
def test_rllib_runs_an_iteration(ray_session, algo):
    if algo == "ppo":
        from ray.rllib.algorithms.ppo import PPOConfig

        config = PPOConfig().training(
            train_batch_size_per_learner=32, minibatch_size=16, num_epochs=1
        )
    else:
        from ray.rllib.algorithms.dqn import DQNConfig

        config = DQNConfig().training(
            train_batch_size_per_learner=16, num_steps_sampled_before_learning_starts=16
        )
    config = (
        config.environment(TextGenerationEnv, env_config=TINY)
        .env_runners(num_env_runners=0, rollout_fragment_length=32)
        .learners(num_learners=0)
        .rl_module(model_config={"fcnet_hiddens": [16]})
        .debugging(seed=0)
    )
    algo_ = config.build_algo()
    try:
        result = algo_.train()
    finally:
        algo_.stop()
    assert result["num_env_steps_sampled_lifetime"] >= 16
    assert np.isfinite(result["env_runners"]["episode_return_mean"])
