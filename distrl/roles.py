"""What every role shares, written once: the learner's optimizer step (AdamW, warm-up, clipping,
the non-finite guard), its version and checkpoint state, and the workers' weight loading.

``Learner`` and ``QLearner`` build on ``LearnerRole``; ``RolloutWorker`` and ``QRolloutWorker`` on
``WorkerRole``. Plain classes: ``distrl.actors`` makes them actors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distrl.checkpoint import (
    OPTIMIZER_FILE,
    load_torch_state,
    rng_state,
    save_torch_state,
    set_rng_state,
)
from distrl.config import LearnerConfig
from distrl.errors import DistrlError
from distrl.models import VersionedWeights, set_weights
from distrl.tokenizers import Tokenizer


class NonFiniteError(DistrlError, RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


class OptimizerStep:
    """AdamW with linear warm-up, gradient-norm clipping and the non-finite guard.

    A step whose loss or gradient norm is not finite is skipped (gradients dropped); after
    ``learner.max_nonfinite_updates`` such steps in a row it raises ``NonFiniteError``.
    """

    def __init__(self, params: Any, config: LearnerConfig) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.config = config
        # The fused kernel (one pass over all parameters) where torch has one: CPU and CUDA.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None
        )
        self.steps = 0  # optimizer steps taken
        self.nonfinite_in_a_row = 0

    def step(self, loss: torch.Tensor) -> float | None:
        """Backward, clip and step; returns the gradient norm, or None when skipped."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.config.max_nonfinite_updates:
                raise NonFiniteError(
                    f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or "
                    f"gradient (learner.max_nonfinite_updates); last loss {loss.item()}"
                )
            return None
        self.nonfinite_in_a_row = 0
        warm = self.config.warmup_steps
        for group in self.optimizer.param_groups:
            group["lr"] = (
                self.config.lr * min(1.0, (self.steps + 1) / warm) if warm else self.config.lr
            )
        self.optimizer.step()
        self.steps += 1
        return grad_norm.item()


class LearnerRole:
    """What every learner shares: the optimizer step, the version it publishes, the size of
    its last publication, and the common part of its checkpoint state."""

    opt: OptimizerStep
    tokenizer: Tokenizer
    version: int
    published_bytes: int = 0

    def published_module(self) -> nn.Module:
        """The network whose weights the rollout workers get."""
        raise NotImplementedError

    @property
    def steps(self) -> int:
        """Optimizer steps taken."""
        return self.opt.steps

    @staticmethod
    def sees(path: str) -> bool:
        """Whether ``path`` exists where the learner runs (checkpoints must reach the driver)."""
        return Path(path).exists()

    def publish_metrics(self) -> dict[str, float]:
        """``publish/bytes``: the size of the weights the last ``weights`` call published."""
        return {"publish/bytes": float(self.published_bytes)}

    def role_state(self, extra: dict | None, folder: Path) -> dict[str, Any]:
        """Version, step count, RNG and the driver's ``extra`` for a checkpoint; the optimizer
        state goes to its own file in ``folder`` (``OPTIMIZER_FILE``), which only the newest
        step checkpoint keeps (``distrl.checkpoint.drop_files``)."""
        save_torch_state(folder / OPTIMIZER_FILE, self.opt.optimizer.state_dict())
        return {
            "version": self.version,
            "steps": self.steps,
            "rng": rng_state(),
            "extra": extra or {},
        }

    def load_role_state(self, state: dict[str, Any], folder: Path) -> dict:
        """Restore what ``role_state`` saved; returns the driver's ``extra``.

        A checkpoint without optimizer state (an older step, or ``best``/``final``) resumes with
        fresh AdamW moments, with a warning: only the newest step checkpoint resumes exactly.
        """
        if "optimizer" in state:  # written before the optimizer had a file of its own
            self.opt.optimizer.load_state_dict(state["optimizer"])
        elif (folder / OPTIMIZER_FILE).is_file():
            self.opt.optimizer.load_state_dict(load_torch_state(folder / OPTIMIZER_FILE))
        else:
            warnings.warn(
                f"{folder} holds no optimizer state (only the newest step checkpoint keeps it): "
                "AdamW starts from fresh moments",
                stacklevel=2,
            )
        self.version, self.opt.steps = int(state["version"]), int(state["steps"])
        set_rng_state(state["rng"])
        return state["extra"]

    def write_tokenizer_spec(self, folder: Path, spec: str) -> None:
        """Name the tokenizer a checkpoint was trained with (chat and validate rebuild it), and
        save it as Hugging Face tokenizer files so transformers loads the folder too (a tiktoken
        encoding is converted: ``Tokenizer.save_pretrained``)."""
        (folder / "distrl_tokenizer.json").write_text(json.dumps({"spec": spec}))
        self.tokenizer.save_pretrained(folder)


class WorkerRole:
    """What every rollout worker shares: the version it holds and how published weights load
    into its ``trainable()`` network."""

    version: int = 0

    def trainable(self) -> nn.Module:
        """The network the learner trains and publishes (the policy, or the Q-network)."""
        raise NotImplementedError

    def set_weights(self, weights: VersionedWeights) -> int:
        """Load published weights; returns the version now held."""
        if weights.version != self.version:
            set_weights(self.trainable(), weights.tensors())
            self.version = weights.version
        return self.version
