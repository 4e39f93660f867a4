"""Acting with a Q-network: token-by-token decoding over the reference LM's top-k candidates.

At each step the frozen reference LM (the initial policy, run with its KV cache) proposes its
``top_k`` next tokens; the Q-network scores the state and an action is picked among those
candidates greedily, epsilon-greedily, by Boltzmann sampling over Q, or by UCB. Rollout workers
explore with it; ``distrl.chat`` decodes greedily (or by Boltzmann) from a DQN checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import PreTrainedModel

from distrl.algos import dqn
from distrl.dqn.qnets import QNetwork
from distrl.models.policy import cache_kwargs, output_cache, position_ids

Explore = Literal["greedy", "epsilon", "boltzmann", "ucb"]


@dataclass
class QDecoded:
    """Responses (B, T) and what the Q-network saw while acting.

    Attributes:
        response_ids: (B, T) int64, right-padded. response_mask: (B, T) float32, 1 up to and
            including the first EOS.
        q_taken: (B, T) float32 Q(s_t, a_t). q_max: (B, T) float32 max over the candidates
            of Q(s_t, .), the bootstrap value of s_t for initial priorities.
        candidates: (B, T, k) int32 the allowed actions at each state (k = 0: all tokens).
        ucb_bonus: mean UCB bonus of the chosen actions (0 unless exploring by UCB).
    """

    response_ids: np.ndarray
    response_mask: np.ndarray
    q_taken: np.ndarray
    q_max: np.ndarray
    candidates: np.ndarray
    ucb_bonus: float = 0.0  # mean UCB bonus of the chosen actions (exploring by UCB)


class UCBCounts:
    """Visit counts for UCB: per (hash of the state's last ``context`` tokens, token).

    A context is the tuple of the last ``context`` tokens of the state (0: one shared
    context); ``lookup`` gives (B, V) counts and (B,) context totals for ``ucb_actions``.
    """

    def __init__(self, context: int) -> None:
        self.context = context
        self.counts: dict[int, dict[int, int]] = {}
        self.totals: dict[int, int] = {}

    def key(self, tokens: list[int]) -> int:
        """The context of a state (its token list)."""
        return hash(tuple(tokens[-self.context :])) if self.context else 0

    def lookup(self, keys: list[int], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Counts (B, V) and totals (B,) of the contexts ``keys``."""
        counts = torch.zeros(len(keys), vocab)
        for row, key in enumerate(keys):
            seen = self.counts.get(key)
            if seen:
                counts[row, list(seen)] = torch.tensor(list(seen.values()), dtype=torch.float32)
        totals = torch.tensor([float(self.totals.get(k, 0)) for k in keys])
        return counts, totals

    def visit(self, key: int, token: int) -> None:
        """Count one choice of ``token`` in context ``key``."""
        seen = self.counts.setdefault(key, {})
        seen[token] = seen.get(token, 0) + 1
        self.totals[key] = self.totals.get(key, 0) + 1


def on_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` if it lives on ``device``, else a new generator there seeded from it (its
    state advances, so successive calls still draw different streams)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


class QPolicy:
    """A Q-network acting over a frozen reference LM's candidates.

    Args:
        qnet: scores states: (B, L) ids -> (B, V) Q-values.
        reference: causal LM proposing candidates (its logits past V are ignored).
        top_k: candidates per state; 0 = the whole vocabulary.
        pad_id, eos_id: the tokenizer's padding and end-of-sequence ids.
    """

    def __init__(
        self,
        qnet: QNetwork,
        reference: PreTrainedModel,
        *,
        top_k: int,
        pad_id: int,
        eos_id: int | None,
    ) -> None:
        self.qnet, self.top_k, self.pad_id, self.eos_id = qnet, top_k, pad_id, eos_id
        self.reference = reference.eval().requires_grad_(False)
        self.device = next(qnet.parameters()).device

    @torch.no_grad()
    def decode(
        self,
        prompt_ids: np.ndarray,
        prompt_mask: np.ndarray,
        max_new_tokens: int,
        *,
        explore: Explore = "greedy",
        epsilon: float = 0.0,
        temperature: float = 1.0,
        ucb_c: float = 1.0,
        counts: UCBCounts | None = None,
        generator: torch.Generator | None = None,
    ) -> QDecoded:
        """Decode up to ``max_new_tokens`` tokens for left-padded prompts (B, P).

        Args:
            prompt_ids, prompt_mask: (B, P) int64 left-padded prompts and their mask.
            explore: how to pick among the candidates ("greedy": argmax Q).
            epsilon: random-candidate probability for "epsilon".
            temperature: softmax temperature over Q for "boltzmann".
            ucb_c, counts: constant and visit counts for "ucb" (updated in place).
            generator: RNG for exploration, on any device: a CPU generator seeds one on the
                policy's device for this call, so callers need not know where it runs.
        """
        self.qnet.eval()
        generator = on_device(generator, self.device)
        self.bonuses: list[torch.Tensor] = []  # UCB bonus of each step's chosen actions
        ids = torch.from_numpy(prompt_ids).to(self.device)
        mask = torch.from_numpy(prompt_mask).to(self.device)
        states = [row[m.astype(bool)].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        # Only the last position's logits: a prefill's (B, P, V) logits would dwarf the model.
        out = self.reference(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids(mask),
            use_cache=True,
            logits_to_keep=1,
        )
        past, ref_logits = output_cache(out), out.logits[:, -1].float()
        q, q_cache = self.qnet.start(ids, mask)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        steps: list[tuple[torch.Tensor, ...]] = []
        for _ in range(max_new_tokens):
            vocab = q.shape[-1]
            allowed = dqn.top_k_action_mask(logits=ref_logits[:, :vocab], k=self.top_k)
            action = self._act(
                q, allowed, explore, epsilon, temperature, ucb_c, counts, states, generator
            )
            action = torch.where(finished, torch.full_like(action, self.pad_id), action)
            q_masked = q.masked_fill(~allowed, torch.finfo(q.dtype).min)
            cand = (
                ref_logits[:, :vocab].topk(self.top_k, dim=-1).indices
                if 0 < self.top_k < vocab
                else torch.zeros(q.shape[0], 0, dtype=torch.long, device=self.device)
            )
            live = ~finished
            steps.append(
                (
                    action,
                    live.float(),
                    q.gather(-1, action[:, None])[:, 0],
                    q_masked.max(-1).values,
                    cand,
                )
            )
            tokens = action.tolist()  # one device-to-host copy per step, not one per row
            for row in torch.nonzero(live).flatten().tolist():
                token = tokens[row]
                if explore == "ucb" and counts is not None:
                    counts.visit(counts.key(states[row]), token)
                states[row].append(token)
            if self.eos_id is not None:
                finished = finished | (action == self.eos_id)
            ids = torch.cat([ids, action[:, None]], dim=1)
            mask = torch.cat([mask, live.long()[:, None]], dim=1)
            if bool(finished.all()) or len(steps) == max_new_tokens:
                break
            out = self.reference(
                input_ids=action[:, None],
                attention_mask=mask,
                position_ids=position_ids(mask)[:, -1:],
                use_cache=True,
                **cache_kwargs(self.reference, past),
                logits_to_keep=1,
            )
            past, ref_logits = output_cache(out), out.logits[:, -1].float()
            q, q_cache = self.qnet.step(ids, mask, q_cache)
        action, live, q_taken, q_max, cand = (torch.stack(x, dim=1) for x in zip(*steps))
        return QDecoded(
            response_ids=action.cpu().numpy(),
            response_mask=live.cpu().numpy().astype(np.float32),
            q_taken=(q_taken * live).cpu().numpy().astype(np.float32),
            q_max=(q_max * live).cpu().numpy().astype(np.float32),
            candidates=cand.cpu().numpy().astype(np.int32),
            ucb_bonus=float((torch.stack(self.bonuses, 1) * live).sum() / live.sum().clamp(min=1))
            if self.bonuses
            else 0.0,
        )

    def _act(
        self,
        q: torch.Tensor,
        allowed: torch.Tensor,
        explore: Explore,
        epsilon: float,
        temperature: float,
        ucb_c: float,
        counts: UCBCounts | None,
        states: list[list[int]],
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        if explore == "greedy":
            return q.masked_fill(~allowed, torch.finfo(q.dtype).min).argmax(-1)
        if explore == "epsilon":
            return dqn.epsilon_greedy(q=q, mask=allowed, epsilon=epsilon, generator=generator)
        if explore == "boltzmann":
            return dqn.boltzmann_actions(
                q=q, mask=allowed, temperature=temperature, generator=generator
            )
        if explore == "ucb":
            counts = counts if counts is not None else UCBCounts(0)
            n, total = counts.lookup([counts.key(s) for s in states], q.shape[-1])
            n, total = n.to(q.device), total.to(q.device)
            action = dqn.ucb_actions(q=q, counts=n, total=total, c=ucb_c, mask=allowed)
            bonus = dqn.ucb_bonus(counts=n, total=total, c=ucb_c)
            self.bonuses.append(bonus.gather(-1, action[:, None])[:, 0])
            return action
        raise ValueError(f"unknown exploration {explore!r}")
