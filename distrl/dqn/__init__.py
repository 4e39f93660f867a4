"""DQN roles: the Q-learner, the acting worker, Q-guided decoding, the prioritized replay and
the Q-networks."""
