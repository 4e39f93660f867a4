"""DQN's Q-network (``dqn.q_network: lm_head``) as a vLLM model, so DQN rollout workers can act
through a vLLM engine (``rollout.engine: vllm``).

``distrl.dqn.qnets.lm_head.LMHeadQNetwork`` computes ``Q(s, a) = V(s) + log_softmax(W h_s + b)[a]``
on a causal LM's backbone. ``LlamaQNetwork`` is vLLM's Llama with the same head: its "logits"
are those Q-values, so

- sampling at temperature T draws from ``softmax(Q / T)``: DQN's Boltzmann exploration over every
  token (``dqn.action_top_k: 0``); temperature 0 is the greedy Q policy;
- with ``logprobs_mode="raw_logits"`` vLLM returns, for each step, the sampled token's Q-value
  and the largest one: ``q_taken`` and ``q_max`` for the initial priorities.

Weights arrive by the learner's names (``backbone.*``, ``q_head.linear.*``, ``value.*``); the
engine's first load reads the reference model's folder, which is the Q-network before any update
(the head copies the LM head, ``b`` and ``V`` start at zero), exactly as the learner builds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader
from vllm.model_executor.utils import set_weight_attrs

ARCHITECTURE = "DistrlLlamaQNetwork"
TIED = "distrl_tied_head"  # hf_overrides key: the folder's LM head is its input embeddings


class LlamaQNetwork(LlamaForCausalLM):
    """vLLM's Llama whose output is DQN's dueling Q head (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # noqa: ANN001 (vLLM's)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hidden, vocab = self.config.hidden_size, self.config.vocab_size
        self.q_bias = nn.Parameter(torch.zeros(vocab, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(self.q_bias, {"weight_loader": default_weight_loader})
        self.q_value = ReplicatedLinear(
            hidden, 1, bias=True, params_dtype=torch.float32, prefix=f"{prefix}q_value"
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Q-values (N, V) float32: V(s) + log-softmax(W h + b)."""
        logits = self.logits_processor(self.lm_head, hidden_states)
        advantage = torch.log_softmax(logits.float() + self.q_bias, dim=-1)
        value, _ = self.q_value(hidden_states.float())
        return value + advantage

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the reference model's checkpoint (first load) or published Q-network tensors."""
        return AutoWeightsLoader(self).load_weights(self._renamed(weights))

    def _renamed(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator:
        first_load = False
        for name, tensor in weights:
            if name.startswith("backbone."):
                yield "model." + name.removeprefix("backbone."), tensor
            elif name == "q_head.linear.weight":
                yield "lm_head.weight", tensor
            elif name == "q_head.linear.bias":
                yield "q_bias", tensor
            elif name.startswith("value."):
                yield "q_value." + name.removeprefix("value."), tensor
            else:  # the reference model's own checkpoint
                first_load = True
                yield name, tensor
                if name == "model.embed_tokens.weight" and getattr(self.config, TIED, False):
                    yield "lm_head.weight", tensor
        if first_load:  # the head's bias and the state value start at zero
            yield "q_bias", torch.zeros_like(self.q_bias)
            yield "q_value.weight", torch.zeros_like(self.q_value.weight)
            yield "q_value.bias", torch.zeros_like(self.q_value.bias)
