"""DQN rollout worker: acts with its Q-network copy and explores; ``make_transitions`` turns its
scored generations into n-step token transitions with initial priorities from the Q-values it
recorded while acting (Ape-X: priorities come from the actors, not the learner).

A plain class; ``distrl.runtime.actors`` makes it a Ray actor. A transition is one token choice:

- ``tokens`` (W,) int32: prompt + whole response, right-padded to the fixed width
  ``W = data.max_prompt_tokens + rollout.max_new_tokens`` (replay columns have fixed shapes);
- ``state_len``: the state is ``tokens[:state_len]``; ``action`` = ``tokens[state_len]``;
- ``reward``: the n-step return; ``discount``: gamma^m, or 0 when the window reached the end;
- ``next_len``: the bootstrap state is ``tokens[:next_len]``; ``next_candidates`` (k,) int32
  its allowed actions (the reference LM's top-k), for the max in the target;
- ``version``: the policy version that acted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distrl.algos import dqn
from distrl.config import (
    DQNConfig,
    EnvConfig,
    LoraConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    TokenizerConfig,
)
from distrl.data.examples import Example
from distrl.dqn.learner import add_q_lora
from distrl.dqn.policy import QPolicy, UCBCounts
from distrl.dqn.qnets import build_qnet
from distrl.envs.episodes import Episodes
from distrl.errors import DistrlError
from distrl.models.policy import build_model, build_tokenizer, left_pad
from distrl.pg.rollout import ARRAY_FIELDS, RolloutWorker, Trajectories, response_texts
from distrl.runtime.roles import WorkerRole, generating


@dataclass
class QTrajectories(Trajectories):
    """``Trajectories`` plus what the acting Q-network saw (see ``distrl.dqn.policy.QDecoded``)."""

    q_taken: np.ndarray
    q_max: np.ndarray
    candidates: np.ndarray
    ucb_bonus: float = 0.0

    array_fields = (*ARRAY_FIELDS, "q_taken", "q_max", "candidates")
    reducers = {**Trajectories.reducers, "ucb_bonus": lambda v: float(np.mean(v))}


@dataclass
class QEpisodes(Episodes, QTrajectories):
    """Multi-turn episodes (``distrl.envs.episodes.Episodes``) played by a DQN worker: the
    Q-values and candidates of the model's tokens (zeros on the environment's)."""

    array_fields = (*Episodes.array_fields, "q_taken", "q_max", "candidates")
    reducers = {**QTrajectories.reducers, **Episodes.reducers}


def replay_width(config: RunConfig) -> int:
    """W, the token width of a transition: the longest prompt and all that may follow it."""
    after = config.env.max_total_tokens if config.env.name else config.rollout.max_new_tokens
    return config.data.max_prompt_tokens + after


def make_transitions(
    batch: QTrajectories,
    rewards: np.ndarray,
    *,
    gamma: float,
    n_step: int,
    width: int,
    shaping: str = "terminal",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Token transitions of a scored batch and their initial priorities.

    Each response is one episode ending at its last token (EOS or the token limit). Its
    sequence reward goes on the last token ("terminal") or is split evenly over its tokens
    ("spread"). Rows whose reward is NaN (dropped by the reward pool) give no transitions.

    A multi-turn episode (``QEpisodes``) is one episode too, whose actions are the model's
    tokens only: an environment turn is part of the transition from the model's last token
    before it to its first after it (the state grows by the environment's tokens), and each
    turn's environment reward arrives on that turn's last token (``token_rewards``); the rest
    of the sequence reward is placed as above.

    Args:
        batch: generations with the actor's Q-values. rewards: (B,) sequence rewards.
        gamma, n_step: discount and window of the n-step returns.
        width: W, the fixed token width of a transition.
        shaping: "terminal" or "spread".

    Returns:
        columns (see the module docstring), each (N, ...), and priorities (N,)
        ``|G + discount * max_a Q(s', a) - Q(s, a)|`` under the actor's Q-network.
    """
    rewards = np.asarray(rewards, dtype=np.float32)
    chosen = batch.response_mask > 0
    lengths = chosen.sum(1).astype(np.int64)  # actions per row
    spans = batch.attention().sum(1).astype(np.int64)  # response tokens, the environment's too
    B = len(rewards)
    # Each row's actions, compacted: step t of row b is response position pos[b, t].
    steps = max(1, int(lengths.max(initial=0)))
    pos = np.zeros((B, steps), dtype=np.int64)
    for b in range(B):
        where = np.flatnonzero(chosen[b])
        pos[b, : len(where)] = where
        pos[b, len(where) :] = where[-1] + 1 if len(where) else 0
    rows = np.arange(B)[:, None]
    valid = np.arange(steps)[None, :] < lengths[:, None]
    keep = np.isfinite(rewards) & (lengths > 0)
    last = np.clip(lengths - 1, 0, None)
    finite = np.where(keep, rewards, 0.0)
    turn_rewards = np.zeros((B, steps), dtype=np.float32)
    token_rewards = getattr(batch, "token_rewards", None)
    if token_rewards is not None:  # the environment's, where each turn ended
        width_t = batch.response_ids.shape[1]
        turn_rewards = np.where(valid, token_rewards[rows, np.minimum(pos, width_t - 1)], 0.0)
        finite = finite - np.where(keep, turn_rewards.sum(1), 0.0)
    step_rewards = turn_rewards.astype(np.float32)
    if shaping == "spread":
        step_rewards += valid * (finite / np.maximum(lengths, 1))[:, None]
    else:
        step_rewards[np.arange(B), last] += finite
    dones = np.zeros((B, steps), dtype=bool)
    dones[np.arange(B), last] = True
    returns, discounts, boot = (
        t.numpy()
        for t in dqn.n_step_returns(
            rewards=torch.from_numpy(step_rewards.astype(np.float32)),
            dones=torch.from_numpy(dones),
            gamma=gamma,
            n=n_step,
        )
    )
    prompts = [row[m.astype(bool)] for row, m in zip(batch.prompt_ids, batch.prompt_mask)]
    too_long = [len(p) + int(n) for p, n in zip(prompts, spans) if len(p) + int(n) > width]
    if too_long:
        raise DistrlError(
            f"a state of {max(too_long)} tokens does not fit the replay width {width} "
            f"(data.max_prompt_tokens + rollout.max_new_tokens, or env.max_total_tokens)"
        )
    tokens = np.zeros((B, width), dtype=np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p) + spans[b]] = np.concatenate([p, batch.response_ids[b, : spans[b]]])
    b_idx, t_idx = np.nonzero(valid & keep[:, None])
    prompt_len = np.array([len(p) for p in prompts], dtype=np.int64)[b_idx]
    # An episode's end bootstraps from nothing (discount 0); its index stays on its own last
    # token, never on padding, so a batch's transitions do not depend on what it is joined to.
    boot_t = np.minimum(boot[b_idx, t_idx], last[b_idx])
    at = pos[b_idx, t_idx]  # response positions of the actions
    # The next state: before the action ``m`` steps on (an environment turn between them
    # included), or past the episode's last action where the window reached its end.
    ahead = boot[b_idx, t_idx]
    next_at = np.where(
        ahead < lengths[b_idx],
        pos[b_idx, np.minimum(ahead, steps - 1)],
        pos[b_idx, last[b_idx]] + 1,
    )
    bootstrap = np.where(discounts[b_idx, t_idx] > 0, batch.q_max[b_idx, pos[b_idx, boot_t]], 0.0)
    target = returns[b_idx, t_idx] + discounts[b_idx, t_idx] * bootstrap
    columns = {
        "tokens": tokens[b_idx],
        "state_len": (prompt_len + at).astype(np.int32),
        "action": batch.response_ids[b_idx, at].astype(np.int32),
        "reward": returns[b_idx, t_idx].astype(np.float32),
        "discount": discounts[b_idx, t_idx].astype(np.float32),
        "next_len": (prompt_len + next_at).astype(np.int32),
        "next_candidates": batch.candidates[b_idx, pos[b_idx, boot_t]].astype(np.int32),
        "version": batch.row_versions[b_idx].astype(np.int32),
    }
    priorities = np.abs(target - batch.q_taken[b_idx, at]).astype(np.float32)
    return columns, priorities


class QRolloutWorker(WorkerRole):
    """Generates with Q-guided decoding (exploring), keeping the Q-values that the driver turns
    into transitions and initial priorities (``make_transitions``)."""

    def __init__(
        self,
        *,
        model: ModelConfig,
        tokenizer: TokenizerConfig,
        rollout: RolloutConfig,
        dqn_config: DQNConfig,
        width: int,
        seed: int,
        worker_index: int = 0,
        torch_threads: int | None = None,
        lora: LoraConfig | None = None,
        env: EnvConfig | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.config, self.dqn, self.width = rollout, dqn_config, width
        self.env, self.system_prompt = env, system_prompt
        self.seed, self.episodes_started = seed * 1000 + worker_index, 0
        self.tokenizer = build_tokenizer(model, tokenizer)
        self.generator = torch.Generator().manual_seed(seed * 1000 + worker_index)
        self.version = 0
        self.engine = None
        if rollout.engine == "vllm":  # the Q-network runs in vLLM (distrl.engines.vllm_qnet)
            from distrl.engines.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(
                model=model,
                rollout=rollout,
                tokenizer=self.tokenizer,
                max_prompt_tokens=width - rollout.max_new_tokens,
                seed=seed * 1000 + worker_index,
                build_hf=lambda: build_model(model, self.tokenizer, seed=seed),
                q_network=True,
                temperature=dqn_config.boltzmann_temperature,
            )
            self.device = self.engine.device
            return
        reference = build_model(model, self.tokenizer, seed=seed)
        qnet = build_qnet(dqn_config, reference, self.tokenizer.vocab_size, seed)
        add_q_lora(qnet, lora, seed)  # the learner's adapters (learner.lora), B = 0 at first
        self.policy = QPolicy(
            qnet,
            reference,
            top_k=dqn_config.action_top_k,
            pad_id=self.tokenizer.pad_token_id,
            eos_id=self.tokenizer.eos_token_id,
        )
        self.counts = UCBCounts(dqn_config.ucb_context)
        self.device = next(qnet.parameters()).device

    @staticmethod
    def arguments(config: RunConfig, worker_index: int = 0) -> dict[str, Any]:
        """The keyword arguments that build DQN rollout worker ``worker_index`` of ``config``."""
        policy_worker = RolloutWorker.arguments(config, worker_index)
        del policy_worker["max_prompt_tokens"]  # a Q-worker's width covers it
        return {**policy_worker, "dqn_config": config.dqn, "width": replay_width(config)}

    @generating
    def generate_episodes(
        self,
        examples: list[Example],
        example_ids: list[int],
        *,
        greedy: bool = False,
        epsilon: float | None = None,
    ) -> QEpisodes:
        """Play one multi-turn episode per example with a fresh environment each (``env``),
        each model turn decoded as ``generate`` decodes (exploring with ``epsilon``)."""
        from distrl.envs.episodes import play

        k = 0 if self.engine is not None else self.dqn.action_top_k  # 0: every token
        columns = {
            "q_taken": ((), np.float32),
            "q_max": ((), np.float32),
            "candidates": ((k,), np.int32),
        }

        def turn(seqs: list[list[int]]) -> tuple[list[list[int]], dict[str, list[np.ndarray]]]:
            batch = self.generate(seqs, list(range(len(seqs))), greedy=greedy, epsilon=epsilon)
            n = batch.response_mask.sum(1).astype(int)
            rows = range(len(seqs))
            ids = [batch.response_ids[b, : n[b]].tolist() for b in rows]
            return ids, {c: [getattr(batch, c)[b, : n[b]] for b in rows] for c in columns}

        return play(self, examples, example_ids, turn=turn, columns=columns, cls=QEpisodes)

    def trainable(self) -> torch.nn.Module:
        """The Q-network (published weights load into it; the reference LM stays frozen)."""
        if self.engine is not None:
            raise NotImplementedError("the vllm engine holds the Q-network; see apply_weights")
        return self.policy.qnet

    def apply_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load published Q-network tensors, or put them into the running vLLM engine."""
        if self.engine is not None:
            self.engine.load_weights(tensors)
        else:
            super().apply_weights(tensors)

    @generating
    def generate(
        self,
        prompts: list[list[int]],
        example_ids: list[int],
        *,
        greedy: bool = False,
        epsilon: float | None = None,
    ) -> QTrajectories:
        """Decode one response per prompt, exploring as ``dqn.exploration`` says.

        Args:
            prompts: token ids of each prompt. example_ids: their indices in the prompt set.
            greedy: argmax Q over the candidates (evaluation).
            epsilon: the current epsilon (the driver follows the schedule); default start.
        """
        start = time.perf_counter()
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        if self.engine is not None:  # Boltzmann over every token, Q-values from the engine
            response, rmask, q_taken, q_max = self.engine.generate(prompts, greedy=greedy)
            return QTrajectories(
                prompt_ids=ids,
                prompt_mask=mask,
                response_ids=response,
                response_mask=rmask,
                logprobs=np.zeros_like(rmask),
                texts=response_texts(self.tokenizer, response, rmask),
                example_ids=np.asarray(example_ids, dtype=np.int64),
                version=self.version,
                seconds=time.perf_counter() - start,
                q_taken=q_taken,
                q_max=q_max,
                candidates=np.zeros((*response.shape, 0), dtype=np.int32),
            )
        d = self.dqn
        out = self.policy.decode(
            ids,
            mask,
            self.config.max_new_tokens,
            explore="greedy" if greedy else d.exploration,
            epsilon=d.epsilon_start if epsilon is None else epsilon,
            temperature=d.boltzmann_temperature,
            ucb_c=d.ucb_c,
            counts=self.counts,
            generator=self.generator,
        )
        return QTrajectories(
            prompt_ids=ids,
            prompt_mask=mask,
            response_ids=out.response_ids,
            response_mask=out.response_mask,
            logprobs=np.zeros_like(out.response_mask),
            texts=response_texts(self.tokenizer, out.response_ids, out.response_mask),
            example_ids=np.asarray(example_ids, dtype=np.int64),
            version=self.version,
            seconds=time.perf_counter() - start,
            q_taken=out.q_taken,
            q_max=out.q_max,
            candidates=out.candidates,
            ucb_bonus=out.ucb_bonus,
        )
