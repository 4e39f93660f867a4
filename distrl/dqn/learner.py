"""DQN learner: online and target Q-networks, Double-DQN n-step TD updates on replay samples.

A plain class; ``distrl.runtime.actors`` makes it the one learner actor of a ``--algo dqn`` run.
Each ``update`` takes one sample from the replay buffer (transitions, ids, importance weights) and
returns the ids with new TD errors for ``update_priorities``, plus ``learner/*`` metrics.
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
import yaml
from safetensors.torch import save_file

from distrl.algos import dqn
from distrl.config import LoraConfig, RunConfig, dump_yaml, load_config
from distrl.dqn.policy import QPolicy
from distrl.dqn.qnets import LMHeadQNetwork, QNetwork, build_qnet
from distrl.errors import ConfigError, ModelError
from distrl.models.lora import add_lora, merged_weights
from distrl.models.policy import build_model, build_tokenizer
from distrl.models.tokenizers import Tokenizer
from distrl.runtime.checkpoint import load_torch_state, load_weights, save_torch_state
from distrl.runtime.optimizer import LOW_PRECISION, OptimizerStep
from distrl.runtime.roles import LearnerRole
from distrl.runtime.shards import decoder_layers, local
from distrl.weights.tensors import (
    VersionedWeights,
    get_weights,
    has_lora,
    non_finite,
    publish_state,
    publish_weights,
    published_names,
    set_weights,
)

STATE_FILE = "distrl_state.pt"
QNET_FILE = "q_network.safetensors"
RUN_FILE = "distrl_run.yaml"  # the run's config: what rebuilds the Q-network and its reference


def add_q_lora(qnet: QNetwork, lora: LoraConfig | None, seed: int) -> QNetwork:
    """With ``learner.lora.rank > 0``, LoRA adapters on the backbone of an ``lm_head``
    Q-network (its Q head and state value stay fully trained); returns ``qnet``.

    Raises:
        ConfigError: LoRA asked of a Q-network without a language-model backbone.
    """
    if lora is None or not lora.rank:
        return qnet
    if not isinstance(qnet, LMHeadQNetwork):
        raise ConfigError(
            "learner.lora.rank > 0 adapts the language model of dqn.q_network=lm_head; "
            f"{type(qnet).__name__} has none to adapt (set learner.lora.rank 0)"
        )
    add_lora(qnet.backbone, lora, seed=seed)
    return qnet


def build_q_parts(config: RunConfig) -> tuple[Tokenizer, QNetwork, Any]:
    """The tokenizer, a fresh Q-network (with LoRA adapters when configured) and the frozen
    reference LM of a DQN run."""
    tokenizer = build_tokenizer(config.model, config.tokenizer)
    reference = build_model(config.model, tokenizer, seed=config.seed)
    qnet = build_qnet(config.dqn, reference, tokenizer.vocab_size, config.seed)
    add_q_lora(qnet, config.learner.lora, config.seed)
    return tokenizer, qnet, reference.eval().requires_grad_(False)


def prefixes(tokens: torch.Tensor, lengths: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, ...]:
    """Left-padded prefixes ``tokens[b, :lengths[b]]``: ids (B, L) and mask (B, L), L = max."""
    width = int(lengths.max())
    col = torch.arange(width, device=tokens.device)
    src = col[None, :] - (width - lengths[:, None])  # index into each row; < 0 is padding
    mask = (src >= 0).long()
    ids = tokens[:, :width].gather(1, src.clamp(min=0)).masked_fill(mask == 0, pad_id)
    return ids, mask


def is_dqn_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a DQN learner checkpoint."""
    return (folder / QNET_FILE).is_file() and (folder / RUN_FILE).is_file()


def load_q_policy(folder: str | Path) -> tuple[QPolicy, Tokenizer]:
    """Q-guided decoding from a DQN checkpoint folder: its ``QPolicy`` and tokenizer."""
    folder = Path(folder)
    if not is_dqn_checkpoint(folder):
        raise ModelError(f"{folder} is not a DQN checkpoint (no {QNET_FILE} and {RUN_FILE})")
    config = load_config(str(folder / RUN_FILE))
    tokenizer, qnet, reference = build_q_parts(config)
    set_weights(qnet, load_weights(folder, (QNET_FILE,)))
    policy = QPolicy(
        qnet.eval(),
        reference,
        top_k=config.dqn.action_top_k,
        pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    return policy, tokenizer


class QLearner(LearnerRole):
    """Trains the online Q-network; a target copy follows by hard copies or Polyak averaging.

    With LoRA (``learner.lora.rank > 0``) the target is a copy of the trained tensors only
    (adapters, Q head, state value), run on the online network's frozen base through
    ``torch.func.functional_call``: the learner holds one copy of the base model.
    """

    def __init__(self, *, config: RunConfig, torch_threads: int | None = None) -> None:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        torch.manual_seed(config.seed)
        self.run_config, self.dqn = config, config.dqn
        self.tokenizer, self.qnet, _ = build_q_parts(config)
        self.target: QNetwork | None = None
        self.target_state: dict[str, torch.Tensor] | None = None  # the LoRA target
        if has_lora(self.qnet):
            state = self.qnet.state_dict()
            self.target_state = {n: state[n].detach().clone() for n in published_names(self.qnet)}
        else:
            self.target = copy.deepcopy(self.qnet).requires_grad_(False).eval()
        self.opt = OptimizerStep(self.qnet.named_parameters(), config.learner)
        # The target follows in float32: a Polyak step of tau 0.005 is below bfloat16's spacing
        # and would round away. Float32 tensors are their own; others get a float32 copy.
        self.target_float = {
            name: t.float() if t.is_floating_point() else t
            for name, t in self.target_tensors().items()
        }
        self.device = next(self.qnet.parameters()).device
        self.dtype = next(self.qnet.parameters()).dtype
        self.version = 0  # bumped by each publish after new updates
        self.published_steps = 0
        self.skipped = 0

    @staticmethod
    def arguments(config: RunConfig) -> dict[str, Any]:
        """The keyword arguments that build a ``QLearner`` for run ``config``."""
        return {"config": config, "torch_threads": config.resources.torch_threads}

    def published_module(self) -> torch.nn.Module:
        """The network whose weights the rollout workers get: the online Q-network."""
        return self.qnet

    def publish_version(self) -> int:
        """The version a publish stamps: one more than the last published when updates
        happened since (so versions count publishes, as in PPO)."""
        if self.steps != self.published_steps:
            self.version, self.published_steps = self.version + 1, self.steps
        return self.version

    def weights(self) -> VersionedWeights | None:
        """The online Q-network's weights, stamped with ``publish_version()`` (a sharded
        learner gathers them: every rank calls it, rank 0 returns them, the others None)."""
        if self.shards.sharded:
            state, version = self.published_state(), self.publish_version()
            if self.shards.rank:
                return None
            weights = publish_state(state, version)
        else:
            weights = publish_weights(self.published_module(), self.publish_version())
        self.published_bytes = weights.nbytes
        return weights

    def held_modules(self) -> list[torch.nn.Module]:
        """The online Q-network, and the target network where it is a copy."""
        return [self.qnet] + ([self.target] if self.target is not None else [])

    def shard(self) -> None:
        """Shard the online and target Q-networks (an ``lm_head`` one: its decoder layers,
        then the rest; the state value in float32) and rebuild the optimizer on the shards. A
        bfloat16 run's weights become float32 masters that FSDP gathers in bfloat16. With LoRA
        the online network alone is sharded, every tensor gathered in its own dtype (the
        adapters are float32 already), and the target's tensors are shards of the same."""
        lora = self.target is None
        low = self.float32_masters = self.dtype in LOW_PRECISION and not lora
        for net in (self.qnet,) if lora else (self.qnet, self.target):
            if low:
                net.float()
            self.shards.shard(
                net,
                decoder_layers(net.backbone),
                compute_dtype=self.dtype if low else None,
                methods=("state_and_next",),
                float32=(net.value,),
            )
        self.opt = OptimizerStep(self.qnet.named_parameters(), self.run_config.learner)
        if lora:
            state = self.qnet.state_dict()
            self.target_state = {n: state[n].detach().clone() for n in self.target_state}
        # Float32 tensors are their own masters (all of a full fine-tune's shards).
        self.target_float = {
            name: t.float() if t.is_floating_point() else t
            for name, t in self.target_tensors().items()
        }

    def update(
        self, sample: tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """One TD step on ``(transitions, ids, IS weights)`` from ``replay.sample``.

        Returns:
            ids (N,), |TD errors| (N,) for ``replay.update_priorities`` (zeros of an update
            skipped as non-finite leave priorities as they were), and ``learner/*`` metrics.
        """
        start = time.perf_counter()
        batch, ids, weights = sample
        d, pad = self.dqn, self.tokenizer.pad_token_id

        def t(name: str) -> torch.Tensor:
            return torch.tensor(np.asarray(batch[name]), device=self.device)

        n = len(ids)
        # This rank's transitions (all of them on one learner), balanced by tokens.
        share = self.shards.share(t("next_len").long())
        rows = share.rows.to(self.device)

        def mine(name: str) -> torch.Tensor:
            return t(name)[rows]

        tokens = mine("tokens").long()
        state_len, next_len = mine("state_len").long(), mine("next_len").long()
        n_ids, n_mask = prefixes(tokens, next_len, pad)  # each state is a prefix of its next
        discount = mine("discount").float()
        next_target = self.target_q(n_ids, n_mask)  # before train(): no adapter dropout
        self.qnet.train()
        q_state, next_online = self.qnet.state_and_next(n_ids, n_mask, next_len - state_len)
        q = q_state.gather(-1, mine("action").long()[:, None])[:, 0]
        with torch.no_grad():
            cand = mine("next_candidates").long()
            next_mask = None
            if cand.shape[-1]:
                next_mask = torch.zeros_like(next_target, dtype=torch.bool)
                next_mask.scatter_(-1, cand, True)
            targets = dqn.td_targets(
                rewards=mine("reward").float(),
                discounts=discount,
                next_q_online=next_online,
                next_q_target=next_target,
                next_action_mask=next_mask,
                double=d.double_q,
            )
        is_weights = torch.tensor(np.asarray(weights, dtype=np.float32), device=self.device)
        loss, td = dqn.td_loss(
            q=q, targets=targets, weights=is_weights[rows], kind=d.loss, delta=d.huber_delta
        )
        aux = self.qnet.aux_loss()
        # This rank's share of the batch mean; FSDP averages gradients over the ranks.
        grad_norm = self.opt.step(share.seqs * loss * self.shards.world + aux)
        self.qnet.eval()
        if grad_norm is None:
            self.skipped += 1
            return ids, np.zeros(n, dtype=np.float32), {"learner/skipped_updates": 1.0}
        td_abs = self.shards.gather_rows(td.abs(), share, n)
        # Whole-batch means: each rank's share of them, summed (the Q-networks with an
        # auxiliary loss, the MLP encoders', run on one learner).
        means = [loss, q.mean(), targets.mean(), td.abs().mean()]
        summed = self.shards.sum(
            torch.tensor(
                [float(v.detach()) * share.seqs for v in means] + [float(n_mask.sum())],
                dtype=torch.float64,
            )
        ).tolist()
        if d.tau < 1.0:
            self.update_target(d.tau)
        elif self.steps % d.target_update_interval == 0:
            self.update_target(1.0)
        metrics = {
            "learner/td_loss": summed[0],
            "learner/aux_loss": float(aux.detach()),
            "learner/q_mean": summed[1],
            "learner/target_q_mean": summed[2],
            "learner/td_abs_mean": summed[3],
            "learner/grad_norm": grad_norm,
            "learner/is_weight_mean": float(np.mean(weights)),
            "learner/sample_age": float(np.mean(self.version - batch["version"])),
            "learner/skipped_updates": 0.0,
            "learner/steps": float(self.steps),
            "learner/tokens_per_s": summed[4] / max(time.perf_counter() - start, 1e-9),
        }
        return ids, td_abs.cpu().numpy(), metrics

    @torch.no_grad()
    def target_q(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Q-values (B, V) of the target network for states ``input_ids`` (B, L)."""
        if self.target is not None:
            q = self.target(input_ids, attention_mask)
            self.shards.reshard(self.target)  # FSDP keeps a root gathered after a forward
            return q
        self.qnet.eval()
        with self.target_swapped_in():
            q = self.qnet(input_ids, attention_mask)
        self.shards.reshard(self.qnet)
        return q

    @contextlib.contextmanager
    def target_swapped_in(self) -> Iterator[None]:
        """With LoRA: the online network holds the target's tensors (adapters and heads; their
        shards, sharded) inside the block, and its own again after. In place, so FSDP gathers
        the target's; call before a forward whose graph autograd keeps."""
        assert self.target_state is not None
        own = self.qnet.state_dict()
        pairs = [(local(own[n]), local(t)) for n, t in self.target_state.items()]
        kept = [mine.clone() for mine, _ in pairs]
        for mine, theirs in pairs:
            mine.copy_(theirs)
        try:
            yield
        finally:
            for (mine, _), value in zip(pairs, kept):
                mine.copy_(value)

    def target_tensors(self) -> dict[str, torch.Tensor]:
        """The target network's tensors by name (sharing their storage)."""
        return self.target.state_dict() if self.target is not None else self.target_state

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """``target <- (1 - tau) target + tau online`` in float32 (toward the online network's
        float32 masters); tau=1 copies exactly."""
        dqn.polyak_update(target=self.target_float, online=self.opt.float32(self.qnet), tau=tau)
        self.round_target()

    @torch.no_grad()
    def round_target(self) -> None:
        """Give the target network its float32 values, rounded to its own dtypes."""
        for name, tensor in self.target_tensors().items():
            value = self.target_float[name]
            if tensor.data_ptr() != value.data_ptr():
                tensor.copy_(value)

    def reference_metrics(
        self, prompts: list[list[int]], references: list[list[int]]
    ) -> dict[str, float]:
        """None: Q-values are not a distribution over tokens, so there is no perplexity."""
        return {}

    # ---- checkpoints ---------------------------------------------------------------------

    def save(self, folder: str, extra: dict | None = None) -> None:
        """Write the Q-network (safetensors; with LoRA its trained tensors: adapters and
        heads), the run config and the learner state. Sharded, every rank calls it: the
        networks are gathered on rank 0, which writes what one learner writes."""
        path = Path(folder)
        if self.shards.sharded:
            target = dict(self.shards.full_tensors(self.target_float))
            qnet = self.published_state()
        else:
            qnet, target = get_weights(self.qnet), self.target_float
        role = self.role_state(extra, path)
        if self.shards.rank:
            return
        save_file(qnet, path / QNET_FILE)
        dump_yaml(self.run_config, path / RUN_FILE)
        self.write_tokenizer_spec(path, self.run_config.tokenizer.name)
        state = {"target": target, "published_steps": self.published_steps, "skipped": self.skipped}
        save_torch_state(path / STATE_FILE, {**state, **role})

    def check_saved_run(self, path: Path) -> None:
        """Refuse a checkpoint of another Q-network kind or LoRA rank than this run's."""
        saved = yaml.safe_load((path / RUN_FILE).read_text())
        if saved.get("dqn", {}).get("q_network") != self.dqn.q_network:
            raise ModelError(f"{path} holds a different dqn.q_network than this run's")
        rank = saved.get("learner", {}).get("lora", {}).get("rank", 0)
        if rank != self.run_config.learner.lora.rank:
            raise ModelError(
                f"{path} holds a Q-network of learner.lora.rank {rank}, this run's is "
                f"{self.run_config.learner.lora.rank}"
            )

    def load(self, folder: str) -> dict:
        """Restore both networks, the optimizer, counters and RNG; return the extra dict.
        Sharded, every rank calls it: rank 0 reads the files, the ranks load their shards."""
        path = Path(folder)
        if self.shards.sharded:
            return self._load_shards(path)
        self.check_saved_run(path)
        set_weights(self.qnet, load_weights(path, (QNET_FILE,)))
        state = load_torch_state(path / STATE_FILE)
        if state["target"].keys() != self.target_float.keys():
            raise ModelError(f"{path / STATE_FILE}: its target network does not fit")
        for name, tensor in state["target"].items():
            self.target_float[name].copy_(tensor)
        self.round_target()
        self.skipped = int(state["skipped"])
        self.published_steps = int(state["published_steps"])
        bad = non_finite(self.qnet) + [
            f"the target network's {k}"
            for k, t in self.target_float.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            raise ModelError(f"cannot resume from {path}: {bad[0]} holds NaN or infinite values")
        return self.load_role_state(state, path)

    def _load_shards(self, path: Path) -> dict:
        """``load`` for a sharded learner: rank 0 reads both networks (with any float32
        masters) and the state, every rank loads its shards."""
        full: dict[str, torch.Tensor] = {}
        target: dict[str, torch.Tensor] = {}
        state = None
        if self.shards.rank == 0:
            self.check_saved_run(path)
            state = load_torch_state(path / STATE_FILE)
            full = load_weights(path, (QNET_FILE,))
            full.update(self.read_masters(path))
            target = state.pop("target")
            if target.keys() != self.target_float.keys():
                raise ModelError(f"{path / STATE_FILE}: its target network does not fit")
            bad = [
                k
                for k, v in [*full.items(), *target.items()]
                if v.is_floating_point() and not v.isfinite().all()
            ]
            if bad:
                raise ModelError(
                    f"cannot resume from {path}: {bad[0]} holds NaN or infinite values"
                )
        self.shards.load_full_state(self.qnet, full, strict=self.target is not None)
        self.shards.load_tensors(self.target_float, target)
        self.round_target()
        state = self.shards.broadcast_object(state)
        self.skipped = int(state["skipped"])
        self.published_steps = int(state["published_steps"])
        return self.load_role_state(state, path)

    def export_merged(self, folder: str) -> None:
        """Make ``folder``, a copy of this learner's newest step checkpoint (``best/``,
        ``final/``), hold the whole Q-network: with LoRA, its adapters merged into the backbone
        and a run config of ``learner.lora.rank`` 0, which ``load_q_policy`` (chat, validate)
        loads as any DQN checkpoint. With full fine-tuning the copy already does."""
        if not has_lora(self.qnet):
            return
        state = None
        if self.shards.sharded:
            state = dict(self.shards.full_tensors(self.qnet.state_dict()))
            if self.shards.rank:
                return
        path = Path(folder)
        save_file(merged_weights(self.qnet, state), path / QNET_FILE)
        lora = dataclasses.replace(self.run_config.learner.lora, rank=0)
        learner = dataclasses.replace(self.run_config.learner, lora=lora)
        dump_yaml(dataclasses.replace(self.run_config, learner=learner), path / RUN_FILE)
