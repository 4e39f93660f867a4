"""Policy-gradient learner: PPO with a value head, or a critic-free algorithm (GRPO, Dr. GRPO,
RLOO, REINFORCE++, GSPO, CISPO), with a frozen reference model, optimizer and KL control.

A plain class; ``distrl.runtime.actors`` makes it the learner actor (or, sharded, each of the
learner workers). ``train`` turns a scored batch of trajectories into minibatch updates and bumps
the policy version. The algorithm's registry entry (``distrl.algos.registry``) decides the
advantages (GAE from the value head, or its estimator), where the KL to the reference goes (the
reward, or a loss term), its policy loss and its defaults; ``distrl.pg.passes.plan_passes``
decides once, from the entry and the config, which forward passes an update runs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distrl.algos import pg, ppo, registry
from distrl.config import LearnerConfig, ModelConfig, PPOConfig, RunConfig, TokenizerConfig
from distrl.errors import DistrlError, ModelError
from distrl.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapters_disabled,
    add_lora,
    load_adapter,
    read_adapter,
    save_adapter,
    save_merged,
)
from distrl.models.policy import (
    PolicyWithValue,
    build_model,
    build_tokenizer,
    reference_metrics,
    with_responses,
)
from distrl.pg.passes import PPOBatch, plan_passes
from distrl.pg.rollout import Trajectories
from distrl.runtime.checkpoint import load_torch_state, load_weights, save_torch_state
from distrl.runtime.optimizer import LOW_PRECISION, OptimizerStep
from distrl.runtime.roles import LearnerRole
from distrl.runtime.shards import Shards, Share, decoder_layers
from distrl.weights.tensors import (
    VersionedWeights,
    non_finite,
    publish_state,
    publish_weights,
    set_weights,
)

STATE_FILE = "distrl_state.pt"


class Learner(LearnerRole):
    """Runs PPO updates on scored trajectories and publishes versioned weights.

    With ``learner.lora.rank > 0`` the policy's transformer carries LoRA adapters: only they
    (and the value head) are trained, only they are published, and the reference model is the
    policy with its adapters off, so the learner holds one copy of the base model.
    """

    def __init__(
        self,
        *,
        model: ModelConfig,
        tokenizer: TokenizerConfig,
        learner: LearnerConfig,
        ppo_config: PPOConfig,
        temperature: float,
        seed: int,
        algo: str = registry.DEFAULT,
        max_new_tokens: int | None = None,
        torch_threads: int | None = None,
    ) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.config, self.ppo, self.temperature = learner, ppo_config, temperature
        self.algo = registry.get(algo)
        self.critic = self.algo.critic
        self.max_new_tokens = max_new_tokens  # the constant length seq_mean_token_sum_norm uses
        self.loss_agg = ppo_config.loss_agg or self.algo.loss_agg
        low, high = self.algo.clip or (ppo_config.clip, ppo_config.clip)
        self.clip_low = low if ppo_config.clip_low is None else ppo_config.clip_low
        self.clip_high = high if ppo_config.clip_high is None else ppo_config.clip_high
        self.tokenizer_spec = tokenizer.name
        self.tokenizer = build_tokenizer(model, tokenizer)
        policy = build_model(model, self.tokenizer, seed=seed)
        if model.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        self.lora = learner.lora.rank > 0
        reference = None  # None: the policy with adapters off
        if model.reference:
            reference = build_model(model, self.tokenizer, seed=seed, name=model.reference)
        elif not self.lora:
            reference = copy.deepcopy(policy)
        self.reference = None if reference is None else PolicyWithValue(reference)
        if self.reference is not None:
            self.reference.eval().requires_grad_(False)
        if self.lora:
            add_lora(policy, learner.lora, seed=seed)
        self.net = PolicyWithValue(policy)
        self.device = next(policy.parameters()).device
        self.opt = OptimizerStep(self.trained_parameters(), learner)
        self.optimizer = self.opt.optimizer
        self.kl = ppo.KLController(ppo_config.kl_coef, ppo_config.kl_target, ppo_config.kl_horizon)
        self.version = 0
        self.dtype = next(policy.parameters()).dtype  # what the workers run and receive
        self.shards = Shards()  # one rank until join_learner_group

    def trained_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The parameters AdamW updates, by their names in ``net``: the policy's, and the value
        head's where there is a critic (frozen ones are left out by ``OptimizerStep``)."""
        return [
            (n, p) for n, p in self.net.named_parameters() if self.critic or n.startswith("model.")
        ]

    def shard(self) -> None:
        """Shard the policy (with its value head) and the reference over the learner group,
        each decoder layer and then the rest; rebuild the optimizer on the shards. A bfloat16
        run's trained weights become float32 masters that FSDP gathers in bfloat16; with LoRA
        they are float32 already (the adapters and value head) and every tensor is gathered in
        its own dtype, the frozen base in bfloat16, as one learner computes."""
        self.float32_masters = self.dtype in LOW_PRECISION and not self.lora
        if self.float32_masters:
            self.net.float()
        self.shards.shard(
            self.net,
            decoder_layers(self.net.model),
            compute_dtype=self.dtype if self.float32_masters else None,
            methods=("responses",),
            float32=(self.net.value_head,),
        )
        if self.reference is not None:
            self.shards.shard(
                self.reference,
                decoder_layers(self.reference.model),
                compute_dtype=None,
                methods=("responses",),
            )
        self.opt = OptimizerStep(self.trained_parameters(), self.config)
        self.optimizer = self.opt.optimizer

    @staticmethod
    def arguments(config: RunConfig) -> dict[str, Any]:
        """The keyword arguments that build a ``Learner`` for run ``config``."""
        return {
            "model": config.model,
            "tokenizer": config.tokenizer,
            "learner": config.learner,
            "ppo_config": config.ppo,
            "temperature": config.rollout.temperature,
            "seed": config.seed,
            "algo": config.algo,
            "max_new_tokens": config.rollout.max_new_tokens,
            "torch_threads": config.resources.torch_threads,
        }

    # ---- weights -------------------------------------------------------------------------

    def published_module(self) -> torch.nn.Module:
        """The network whose weights the rollout workers get: the policy."""
        return self.net.model

    def trained_root(self) -> torch.nn.Module:
        """The module the optimizer's parameter names are relative to: the policy with its
        value head."""
        return self.net

    def held_modules(self) -> list[torch.nn.Module]:
        """The policy with its value head, and the reference model where it is a copy."""
        return [self.net] + ([self.reference] if self.reference is not None else [])

    def weights(self) -> VersionedWeights | None:
        """The policy's current weights, stamped with its version (a sharded learner gathers
        them: every rank calls it, rank 0 returns them, the others None)."""
        if self.shards.sharded:
            state = self.published_state()
            if self.shards.rank:
                return None
            weights = publish_state(state, self.version)
        else:
            weights = publish_weights(self.published_module(), self.version)
        self.published_bytes = weights.nbytes
        return weights

    # ---- forward passes ------------------------------------------------------------------

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[PolicyWithValue]:
        """The frozen reference model for the KL: its own copy, or (LoRA) the policy with its
        adapters off for the duration of the block."""
        if self.reference is not None:
            yield self.reference
        else:
            with adapters_disabled(self.net.model):
                yield self.net

    def _forward(
        self,
        net: PolicyWithValue,
        ids: torch.Tensor,
        mask: torch.Tensor,
        start: int,
        with_values: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits / temperature (B, T, V) predicting ``ids[:, start:]``, and values (B, T)."""
        logits, values = net.responses(
            ids,
            mask,
            start,
            values=with_values,
            share_prompts=not self.shards.sharded,
            pack=self.config.packing,
        )
        if not torch.is_grad_enabled():
            self.shards.reshard(net)
        return logits.float() / self.temperature, values

    def _tensors(self, batch: Trajectories) -> tuple[torch.Tensor, ...]:
        ids = np.concatenate([batch.prompt_ids, batch.response_ids], axis=1)
        mask = np.concatenate([batch.prompt_mask, batch.attention()], axis=1)

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(a)).to(
                self.device
            )  # a copy: Ray's arrays are read-only

        return t(ids), t(mask), t(batch.response_ids), t(batch.response_mask).float()

    @torch.no_grad()
    def logprobs(self, batch: Trajectories) -> np.ndarray:
        """Log-probabilities (B, T) of the batch's response tokens under the current policy."""
        ids, mask, tokens, rmask = self._tensors(batch)
        logits, _ = self._forward(self.net, ids, mask, batch.prompt_ids.shape[1])
        return (ppo.logprobs_from_logits(logits, tokens) * rmask).cpu().numpy()

    # ---- the PPO update ------------------------------------------------------------------

    def train(
        self,
        batch: Trajectories,
        scores: np.ndarray,
        references: list[list[int]] | None = None,
        *,
        groups: np.ndarray | None = None,
    ) -> dict[str, float]:
        """One policy-gradient update on a scored batch; returns ``learner/*`` metrics.

        Args:
            batch: trajectories from the rollout workers.
            scores: (B,) total reward per sequence from the reward pool (of a multi-turn
                episode, with its environment rewards, which then arrive where their turns
                ended: ``Episodes.token_rewards``).
            references: token ids of reference responses per sequence, for the optional
                cross-entropy term (``ppo.ce_coef``); empty lists where there is none.
            groups: (B,) int group id per sequence (the samples of one prompt share one); the
                group algorithms need it, PPO and REINFORCE++ ignore it.
        """
        start_time = time.perf_counter()
        c = self.ppo
        ids, mask, tokens, rmask = self._tensors(batch)
        start = batch.prompt_ids.shape[1]
        old_logprobs = torch.tensor(batch.logprobs, device=self.device)
        n = ids.shape[0]
        passes = plan_passes(
            self.algo,
            c,
            batch_size=n,
            kl_coef=self.kl.value,
            deterministic=self._deterministic_forward(),
            split=self.shards.sharded or self.config.max_tokens_per_micro_batch is not None,
        )
        # This rank's rows of the no-grad passes; gather_rows puts the ranks' results together.
        whole = self.shards.share(rmask.sum(-1))
        rows = whole.rows.to(self.device)

        def gathered(local: torch.Tensor) -> torch.Tensor:
            return self.shards.gather_rows(local, whole, n)

        values, mismatch, is_weights = None, {}, None  # mismatch: metrics, without learner/
        with torch.no_grad():
            self.net.eval()
            if passes.old_pass:
                logits, values = self._forward(self.net, ids[rows], mask[rows], start, self.critic)
                values = None if values is None else gathered(values)
                if passes.recompute:
                    recomputed = gathered(
                        ppo.logprobs_from_logits(logits, tokens[rows]) * rmask[rows]
                    )
                    mismatch = self._mismatch(recomputed, old_logprobs, rmask)
                    if c.rollout_is == "truncated":
                        is_weights, is_stats = pg.truncated_is_weights(
                            learner_logprobs=recomputed,
                            rollout_logprobs=old_logprobs,
                            mask=rmask,
                            cap=c.rollout_is_cap,
                        )
                        mismatch["rollout_is_weight"] = float(is_stats["weight"])
                        mismatch["rollout_is_truncated"] = float(is_stats["truncated"])
                    old_logprobs = recomputed
                del logits
            ref_logprobs = old_logprobs
            if passes.reference:
                with self.reference_model() as reference:
                    ref_logits, _ = self._forward(reference, ids[rows], mask[rows], start)
                ref_logprobs = gathered(ppo.logprobs_from_logits(ref_logits, tokens[rows]))
                del ref_logits
            # An episode's environment rewards (part of its score) go where its turns ended.
            turn_rewards = getattr(batch, "token_rewards", None)
            final = np.array(scores, dtype=np.float64)
            if turn_rewards is not None:
                final = final - batch.env_rewards
                turn_rewards = torch.from_numpy(np.array(turn_rewards)).to(self.device)
            rewards, kl = ppo.kl_shaped_rewards(
                scores=torch.tensor(final, dtype=torch.float32, device=self.device),
                logprobs=old_logprobs,
                ref_logprobs=ref_logprobs,
                mask=rmask,
                kl_coef=self.kl.value if passes.kl_in_reward else 0.0,
                turn_rewards=turn_rewards,
            )
        data = PPOBatch(
            ids, mask, tokens, rmask, old_logprobs, rewards, references, is_weights=is_weights
        )
        if c.kl_loss_coef > 0:
            data = dataclasses.replace(data, ref_logprobs=ref_logprobs)
        if not self.critic:
            data = self._critic_free_advantages(data, scores, groups)
        elif not passes.values_in_update:
            data = self._with_advantages(data, values)
        self.net.train()
        stats: dict[str, list[float]] = {}
        skipped = 0
        stop = False
        probe = passes.probe
        # A row's forward cost: its real tokens when packed, else the padded width.
        costs = mask.sum(-1) if self.config.packing else mask.new_full((n,), mask.shape[1])
        update_start = time.perf_counter()
        for _ in range(c.epochs):
            for idx in self.shards.broadcast(torch.randperm(n)).split(c.minibatch_size):
                idx = idx.to(self.device)
                budget = self.config.max_tokens_per_micro_batch
                parts = self.shards.parts(rmask[idx].sum(-1), costs[idx], budget)
                out = self._minibatch(data, idx, parts, start, probe=probe)
                probe = False
                if out is None:
                    skipped += 1
                    continue
                for k in [k for k in out if k.startswith("logprob_mismatch")]:
                    mismatch[k] = out.pop(k)
                for k, v in out.items():
                    stats.setdefault(k, []).append(v)
                if c.target_kl is not None and out["approx_kl"] > c.target_kl:
                    stop = True
                    break
            if stop:
                break
        update_seconds = time.perf_counter() - update_start
        self.net.eval()
        seq_kl = float(kl.sum(-1).mean())
        self.kl.update(kl=seq_kl, n_samples=n)
        self.version += 1
        seconds = time.perf_counter() - start_time
        metrics = {f"learner/{k}": float(np.mean(v)) for k, v in stats.items()}
        if passes.reference:
            metrics["learner/kl"] = seq_kl
        metrics.update({f"learner/{k}": v for k, v in mismatch.items()})
        metrics.update(
            {
                "learner/kl_coef": self.kl.value,
                "learner/skipped_updates": float(skipped),
                "learner/early_stopped": float(stop),
                "learner/version": float(self.version),
                "learner/tokens_per_s": c.epochs * float(mask.sum()) / max(seconds, 1e-9),
                "time/learn_s": seconds,
                "time/update_s": update_seconds,
            }
        )
        return metrics

    @staticmethod
    def _mismatch(
        learner_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, float]:
        """Mean and largest |rollout - learner| log-probability over response tokens."""
        gap = (learner_logprobs.detach().float() - rollout_logprobs.float()).abs()
        gap = torch.where(mask > 0, gap, 0.0)  # padding may hold anything
        return {
            "logprob_mismatch": float(ppo.masked_mean(gap, mask)),
            "logprob_mismatch_max": float(gap.max()),
        }

    def _deterministic_forward(self) -> bool:
        """Whether a training-mode forward gives the logprobs an eval-mode one does (no
        adapter dropout; the models' own dropout is off)."""
        return not (self.lora and self.config.lora.dropout > 0)

    def _with_advantages(self, data: PPOBatch, values: torch.Tensor) -> PPOBatch:
        """``data`` with old values, GAE advantages (whitened if configured) and returns."""
        c = self.ppo
        with torch.no_grad():
            values = values.detach() * data.rmask
            advantages, returns = ppo.gae(
                rewards=data.rewards,
                values=values,
                mask=data.rmask,
                gamma=c.gamma,
                lam=c.gae_lambda,
            )
            if c.whiten_advantages:
                advantages = ppo.whiten(advantages, data.rmask, min_std=c.whiten_min_std)
        return dataclasses.replace(data, old_values=values, advantages=advantages, returns=returns)

    def _critic_free_advantages(
        self, data: PPOBatch, scores: np.ndarray, groups: np.ndarray | None
    ) -> PPOBatch:
        """``data`` with the advantages of a critic-free algorithm (its registry estimator)."""
        if self.algo.needs_groups and groups is None:
            raise DistrlError(f"algo {self.algo.name} needs the group id of every sample")
        with torch.no_grad():
            advantages = self.algo.estimator(
                scores=torch.tensor(np.array(scores), dtype=torch.float32, device=self.device),
                groups=None
                if groups is None
                else torch.as_tensor(np.array(groups), device=self.device),
                token_rewards=data.rewards,
                mask=data.rmask,
                gamma=self.ppo.gamma,
                min_std=self.ppo.whiten_min_std,
            )
        return dataclasses.replace(data, advantages=advantages)

    def _minibatch(
        self, data: PPOBatch, idx: torch.Tensor, parts: list[Share], start: int, probe: bool
    ) -> dict[str, float] | None:
        """One optimizer step on minibatch ``idx`` of ``data``: this rank's ``parts`` of it
        (micro-batches), their gradients accumulated; None when it was skipped as non-finite.
        With ``probe`` (a forward of the old weights) it also measures the gap to the rollout's
        log-probabilities. Metrics are the whole minibatch's."""
        self.opt.zero()
        totals: dict[str, float] = {}
        gap_max = 0.0
        for part in parts:
            mb = data.rows(idx[part.rows.to(idx.device)])
            loss, terms, gap = self._part_loss(mb, start, part, probe)
            self.opt.backward(loss * self.shards.world)  # FSDP averages over the ranks
            for name, (value, weight) in terms.items():
                totals[name] = totals.get(name, 0.0) + torch.as_tensor(value).item() * weight
            gap_max = max(gap_max, gap.get("logprob_mismatch_max", 0.0))
        grad_norm = self.opt.step()
        if grad_norm is None:
            return None
        summed = self.shards.sum(torch.tensor(list(totals.values()), dtype=torch.float64))
        out = dict(zip(totals, summed.tolist()))
        if probe and "logprob_mismatch" in out:
            out["logprob_mismatch_max"] = float(self.shards.max(torch.tensor([gap_max]))[0])
        out.update({"grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"]})
        return out

    def _part_loss(
        self, mb: PPOBatch, start: int, part: Share, probe: bool
    ) -> tuple[torch.Tensor, dict[str, tuple[Any, float]], dict[str, float]]:
        """The loss of one part of a minibatch, weighed as its share of the minibatch's global
        means (by tokens, or by sequences); its metrics as (value, weight) pairs whose weighted
        sum over the parts and ranks is the minibatch's; and, with ``probe``, the gap to the
        rollout's log-probabilities."""
        c = self.ppo
        m = mb.rmask
        logits, values = self._forward(self.net, mb.ids, mb.mask, start, self.critic)
        if mb.advantages is None:  # one part holding the whole batch: its values are the old
            mb = self._with_advantages(mb, values)
        logprobs = ppo.logprobs_from_logits(logits, mb.tokens)
        gap = self._mismatch(logprobs, mb.old_logprobs, m) if probe else {}
        pg_loss, pg_stats = self.algo.policy_loss(
            logprobs=logprobs,
            old_logprobs=mb.old_logprobs,
            advantages=mb.advantages,
            mask=m,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            loss_agg=self.loss_agg,
            max_length=self.max_new_tokens,
            weights=mb.is_weights,
        )
        v_loss, v_clipfrac = torch.zeros((), device=self.device), torch.zeros(())
        if self.critic:
            v_loss, v_clipfrac = ppo.value_loss(
                values=values,
                old_values=mb.old_values,
                returns=mb.returns,
                mask=m,
                clip=c.value_clip,
            )
        kl_loss = None
        if mb.ref_logprobs is not None:
            kl = pg.kl_penalty(
                logprobs=logprobs, ref_logprobs=mb.ref_logprobs, estimator=c.kl_estimator
            )
            kl_loss = pg.aggregate_loss(
                loss=kl, mask=m, mode=self.loss_agg, max_length=self.max_new_tokens
            )
        # Without an entropy bonus, entropy is only logged: keep it out of the backward pass.
        with torch.set_grad_enabled(c.ent_coef > 0):
            entropy = ppo.masked_mean(ppo.entropy_from_logits(logits), m)
        per_seq = self.loss_agg != "token_mean"
        w_agg, w_tok = (part.seqs if per_seq else part.tokens), part.tokens
        loss = w_agg * pg_loss + c.vf_coef * w_tok * v_loss - c.ent_coef * w_tok * entropy
        if kl_loss is not None:
            loss = loss + c.kl_loss_coef * w_agg * kl_loss
        terms: dict[str, tuple[Any, float]] = {
            "policy_loss": (pg_loss, w_agg),
            "entropy": (entropy, w_tok),
            "clipfrac": (pg_stats["clipfrac"], w_tok),
            "approx_kl": (pg_stats["approx_kl"], w_tok),
        }
        if self.critic:
            terms.update({"value_loss": (v_loss, w_tok), "value_clipfrac": (v_clipfrac, w_tok)})
        if kl_loss is not None:
            terms["kl_loss"] = (kl_loss, w_agg)
        if c.ce_coef > 0 and mb.references is not None:  # one part on one learner (config)
            ce = self._reference_nll(mb.references, mb.ids, mb.mask, start)
            if ce is not None:
                loss = loss + c.ce_coef * ce
                terms["ce_loss"] = (ce, 1.0)
        if gap:
            terms["logprob_mismatch"] = (gap["logprob_mismatch"], w_tok)
        return loss, terms, gap

    def _reference_nll(
        self, references: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, start: int
    ) -> torch.Tensor | None:
        """Mean NLL of reference responses after their prompts (rows without one are ignored)."""
        rows = [i for i, r in enumerate(references) if r]
        if not rows:
            return None
        full_ids, full_mask, r_ids, r_mask = (
            t.to(self.device)
            for t in with_responses(
                ids[rows, :start].cpu().numpy(),
                mask[rows, :start].cpu().numpy(),
                [references[i] for i in rows],
                self.tokenizer.pad_token_id,
            )
        )
        logits, _ = self.net.responses(full_ids, full_mask, start)
        nll = -ppo.logprobs_from_logits(logits, r_ids)
        return ppo.masked_mean(nll, r_mask)

    def reference_metrics(
        self, prompts: list[list[int]], references: list[list[int]]
    ) -> dict[str, float]:
        """Token accuracy and perplexity of reference responses under the policy."""
        metrics = reference_metrics(
            self.net,
            prompts,
            references,
            self.tokenizer.pad_token_id,
            share_prompts=not self.shards.sharded,
        )
        self.shards.reshard(self.net)
        return metrics

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self, folder: str, extra: dict | None = None) -> None:
        """Write the policy as a Hugging Face folder (with LoRA: its adapter in PEFT's format)
        plus ``distrl_state.pt`` into ``folder``. Sharded, every rank calls it: what is saved
        is gathered on rank 0, which writes the same files one learner does."""
        path = Path(folder)
        if not self.shards.sharded:
            if self.lora:
                save_adapter(self.net.model, path)
            else:
                self.net.model.save_pretrained(path)
            value_head = self.net.value_head.state_dict()
        elif self.lora:  # the adapters and the value head: all a resume needs
            state = self.net.state_dict()
            trained = {n: state[n] for n in self.opt.names}
            trained.update({n: v for n, v in state.items() if n.startswith("value_head.")})
            gathered = dict(self.shards.full_tensors(trained))
            value_head = {k[11:]: v for k, v in gathered.items() if k.startswith("value_head.")}
            if self.shards.rank == 0:
                adapter = {k[6:]: v for k, v in gathered.items() if k.startswith("model.")}
                save_adapter(self.net.model, path, adapter)
        else:  # the policy in the workers' dtype (its float32 masters go to the shards)
            state = self.net.state_dict()
            dtypes = {n: self.dtype for n in state if n.startswith("model.")}
            full = dict(self.shards.full_tensors(state, dtypes))
            policy = {k[6:]: v for k, v in full.items() if k.startswith("model.")}
            value_head = {k[11:]: v for k, v in full.items() if k.startswith("value_head.")}
            if self.shards.rank == 0:
                self.net.model.save_pretrained(path, state_dict=policy)
        role = self.role_state(extra, path)
        if self.shards.rank == 0:
            self.write_tokenizer_spec(path, self.tokenizer_spec)  # and the tokenizer's HF files
            state = {"value_head": value_head, "kl": self.kl.state_dict()}
            save_torch_state(path / STATE_FILE, {**state, **role})

    def load(self, folder: str) -> dict:
        """Restore policy, value head, optimizer, KL controller and RNG; return the extra dict.
        Sharded, every rank calls it: rank 0 reads the files and the ranks load their shards."""
        path = Path(folder)
        if self.shards.sharded:
            return self._load_shards(path)
        if self.lora:
            load_adapter(self.net.model, path)
        elif (path / ADAPTER_WEIGHTS).is_file():
            raise DistrlError(
                f"{path} holds a LoRA adapter: resume it with the run's learner.lora settings"
            )
        else:
            try:
                set_weights(self.net.model, load_weights(path))
            except ModelError as exc:
                raise ModelError(f"cannot resume from {path}: {exc}") from None
        state = load_torch_state(path / STATE_FILE)
        self.net.value_head.load_state_dict(state["value_head"])
        self.kl.load_state_dict(state["kl"])
        bad = non_finite(self.net)
        if bad:
            raise ModelError(f"cannot resume from {path}: {bad[0]} holds NaN or infinite values")
        return self.load_role_state(state, path)

    def _load_shards(self, path: Path) -> dict:
        """``load`` for a sharded learner: rank 0 reads the policy (with LoRA: its adapter),
        its value head and any float32 masters (which replace their bfloat16 rounding), every
        rank loads its shards."""
        full: dict[str, torch.Tensor] = {}
        state = None
        if self.shards.rank == 0:
            if self.lora:
                weights = read_adapter(self.net.model, path)
            elif (path / ADAPTER_WEIGHTS).is_file():
                raise DistrlError(
                    f"{path} holds a LoRA adapter: resume it with the run's learner.lora settings"
                )
            else:
                try:
                    weights = {k: v.float() for k, v in load_weights(path).items()}
                except ModelError as exc:
                    raise ModelError(f"cannot resume from {path}: {exc}") from None
            state = load_torch_state(path / STATE_FILE)
            full = {f"model.{k}": v for k, v in weights.items()}
            full.update({f"value_head.{k}": v for k, v in state["value_head"].items()})
            full.update(self.read_masters(path))
            bad = [k for k, v in full.items() if v.is_floating_point() and not v.isfinite().all()]
            if bad:
                raise ModelError(
                    f"cannot resume from {path}: {bad[0]} holds NaN or infinite values"
                )
        self.shards.load_full_state(self.net, full, strict=not self.lora)
        state = self.shards.broadcast_object(
            None if state is None else {k: v for k, v in state.items() if k != "value_head"}
        )
        self.kl.load_state_dict(state["kl"])
        return self.load_role_state(state, path)

    def export_merged(self, folder: str) -> None:
        """Make ``folder``, a copy of this learner's newest step checkpoint (``best/``,
        ``final/``), a plain Hugging Face folder: with LoRA, the policy with its adapter merged
        replaces the adapter files, so ``from_pretrained``, chat and validate load it without
        PEFT. With full fine-tuning the copy already is one and nothing is written. Sharded,
        every rank calls it: rank 0 gathers the policy and writes."""
        if not self.lora:
            return
        state = None
        if self.shards.sharded:
            state = dict(self.shards.full_tensors(self.net.model.state_dict()))
            if self.shards.rank:
                return
        path = Path(folder)
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            (path / name).unlink(missing_ok=True)
        save_merged(self.net.model, path, state)
