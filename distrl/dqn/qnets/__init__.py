"""Token-level Q-networks for DQN, all behind one interface (see ``base.QNetwork``).

``forward(input_ids (B, L), attention_mask (B, L)) -> (B, V)`` gives the Q-value of every next
token for each state (the whole prefix, read at its last real token); ``aux_loss()`` is an
extra loss for the learner to add beside the TD loss. ``build_qnet`` picks one by
``DQNConfig.q_network``:

- ``lm_head``: ``LMHeadQNetwork``, the policy's backbone with a Q head copied from its LM head;
- ``performer``: ``PerformerQNetwork``, FAVOR+ linear-attention transformer from scratch;
- ``mlp``: ``StateQNetwork``, an MLP over a (pruned, frozen) policy-backbone state
  embedding, optionally compressed by a ``StateAutoencoder``.

Dtypes: what is copied from the policy (backbones, the ``lm_head`` Q head) keeps its dtype,
bfloat16 on a GPU; what is trained from scratch (the Performer, the MLP, the autoencoder, the
dueling state value) is float32 and reads the backbone's hidden states upcast. Q-values are
always float32.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from distrl.config import DQNConfig
from distrl.dqn.qnets.base import QNetwork, gather_last, last_positions, position_ids
from distrl.dqn.qnets.encoders import (
    MLPQNetwork,
    StateAutoencoder,
    StateEncoder,
    StateQNetwork,
    prune_linear_layers,
    sparsity,
)
from distrl.dqn.qnets.favor import (
    FavorAttention,
    TensorMemory,
    favor_attention,
    favor_features,
    orthogonal_gaussian,
    softmax_attention,
)
from distrl.dqn.qnets.lm_head import LMHeadQNetwork
from distrl.dqn.qnets.performer import PerformerQNetwork

__all__ = [
    "FavorAttention",
    "LMHeadQNetwork",
    "MLPQNetwork",
    "PerformerQNetwork",
    "QNetwork",
    "StateAutoencoder",
    "StateEncoder",
    "StateQNetwork",
    "TensorMemory",
    "build_qnet",
    "favor_attention",
    "favor_features",
    "gather_last",
    "last_positions",
    "orthogonal_gaussian",
    "position_ids",
    "prune_linear_layers",
    "softmax_attention",
    "sparsity",
]

# Sizes DQNConfig does not (yet) expose.
PERFORMER_SIZES = dict(dim=128, depth=2, heads=4, num_features=64)
PERFORMER_MAX_LEN = 2048
MLP_HIDDEN = 256


def build_qnet(
    dqn_config: DQNConfig, policy_model: PreTrainedModel, vocab_size: int, seed: int
) -> QNetwork:
    """Build the Q-network ``dqn_config.q_network`` names, on the policy's device.

    ``policy_model`` is never modified: ``lm_head`` and ``mlp`` work on a deep copy of it.
    ``prune_sparsity`` and ``autoencoder_dim`` apply to the ``mlp`` kind only (the config
    refuses them elsewhere).

    Args:
        dqn_config: the DQN section of the run config.
        policy_model: the policy causal LM (backbone and LM head to start from).
        vocab_size: V, the tokenizer's id space (the action space).
        seed: seeds the new layers' initialisation and the FAVOR+ features; the global RNG
            state is left untouched.
    """
    kind = dqn_config.q_network
    device = next(policy_model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "lm_head":
            qnet: QNetwork = LMHeadQNetwork(copy.deepcopy(policy_model), vocab_size=vocab_size)
        elif kind == "performer":
            # States never outgrow the policy's context, which generated them.
            max_len = getattr(policy_model.config, "max_position_embeddings", None)
            qnet = PerformerQNetwork(
                vocab_size, **PERFORMER_SIZES, max_len=max_len or PERFORMER_MAX_LEN, seed=seed
            )
        elif kind == "mlp":
            encoder = StateEncoder(
                copy.deepcopy(policy_model.base_model), prune_sparsity=dqn_config.prune_sparsity
            )
            autoencoder = None
            if dqn_config.autoencoder_dim:
                autoencoder = StateAutoencoder(encoder.out_dim, dqn_config.autoencoder_dim)
            state_dim = autoencoder.code_dim if autoencoder else encoder.out_dim
            q_mlp = MLPQNetwork(state_dim, vocab_size, MLP_HIDDEN)
            qnet = StateQNetwork(encoder, q_mlp, autoencoder)
        else:
            raise ValueError(f"unknown q_network {kind!r}")
    return qnet.to(device)
