"""Policy-gradient roles: the learner (PPO, the group algorithms, REINFORCE++) and the rollout
worker."""
