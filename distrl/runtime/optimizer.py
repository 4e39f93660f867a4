"""The learner's optimizer step: AdamW with warm-up, gradient-norm clipping, the non-finite guard,
float32 master weights for low-precision parameters, and gradients gathered over micro-batches.

A plain class every learner holds (``distrl.runtime.roles.LearnerRole``); its state is saved by
parameter name, so a sharded learner's and a single one's load each other's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from distrl.config import LearnerConfig
from distrl.errors import DistrlError


class NonFiniteError(DistrlError, RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient."""


# Parameters stored in these dtypes train through float32 master copies.
LOW_PRECISION = (torch.bfloat16, torch.float16)


class OptimizerStep:
    """AdamW with linear warm-up, gradient-norm clipping and the non-finite guard.

    A step whose loss or gradient norm is not finite is skipped (gradients dropped); after
    ``learner.max_nonfinite_updates`` such steps in a row it raises ``NonFiniteError``.

    Mixed precision: a bfloat16 (or float16) parameter computes in its own dtype, but AdamW
    updates a float32 master copy and the parameter gets its rounding. An update smaller than
    bfloat16's spacing (about 0.4% of a weight) then accumulates in the master instead of being
    rounded away, as it would be if AdamW stepped the bfloat16 weights themselves. Gradients are
    made float32 before clipping, so the norm and the moments are float32 too: 16 bytes per
    parameter (2 weight, 2 gradient, 4 master, 8 moments), as FSDP's mixed precision holds.
    """

    def __init__(
        self, named_params: Iterable[tuple[str, nn.Parameter]], config: LearnerConfig
    ) -> None:
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.names = [n for n, _ in named]  # how checkpoints name the state, whatever the rank
        self.params = [p for _, p in named]
        self.config = config
        self.masters = {
            id(p): p.detach().float().clone() for p in self.params if p.dtype in LOW_PRECISION
        }
        self.trained = [self.masters.get(id(p), p) for p in self.params]
        # The fused kernel (one pass over all parameters) where torch has one: CPU and CUDA.
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params)
        self.optimizer = torch.optim.AdamW(
            self.trained, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None
        )
        self.steps = 0  # optimizer steps taken
        self.nonfinite_in_a_row = 0
        self.losses_finite, self.last_loss = True, 0.0  # of the step being gathered

    def zero(self) -> None:
        """Drop the gradients, before the first ``backward`` of a step."""
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.params:
            param.grad = None
        self.losses_finite, self.last_loss = True, 0.0

    def backward(self, loss: torch.Tensor) -> None:
        """Add ``loss``'s gradients to the step's (a micro-batch's part); a low-precision
        parameter's go to its float32 master at once, so they add up in float32."""
        loss.backward()
        self.last_loss = float(loss.detach())
        self.losses_finite = self.losses_finite and math.isfinite(self.last_loss)
        for param, master in self.pairs():
            if param.grad is not None:
                grad = param.grad.float()
                master.grad = grad if master.grad is None else master.grad.add_(grad)
                param.grad = None

    def step(self, loss: torch.Tensor | None = None) -> float | None:
        """Backward ``loss`` (None: the gradients ``zero`` and ``backward`` gathered), clip and
        step; returns the gradient norm, or None when skipped."""
        if loss is not None:
            self.zero()
            self.backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, self.config.max_grad_norm)
        if isinstance(grad_norm, DTensor):  # sharded: the norm over every rank's gradients
            grad_norm = grad_norm.full_tensor()
        if not (self.losses_finite and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.config.max_nonfinite_updates:
                raise NonFiniteError(
                    f"{self.nonfinite_in_a_row} updates in a row had a non-finite loss or "
                    f"gradient (learner.max_nonfinite_updates); last loss {self.last_loss}"
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
        self._round_masters()
        return grad_norm.item()

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, its float32 master) for every low-precision trained parameter."""
        return [(p, m) for p, m in zip(self.params, self.trained, strict=True) if m is not p]

    @torch.no_grad()
    def _round_masters(self) -> None:
        for param, master in self.pairs():
            param.copy_(master)

    def float32(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state with its trained low-precision parameters replaced by their
        float32 masters (the values a Polyak average should follow)."""
        state = module.state_dict(keep_vars=True)
        return {name: self.masters.get(id(t), t).detach() for name, t in state.items()}

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state by parameter name, as ``get_optimizer_state_dict`` gives a sharded
        learner's, so either loads the other's."""
        state = self.optimizer.state_dict()
        return {
            "state": {self.names[i]: v for i, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [self.names[i] for i in g["params"]]} for g in state["param_groups"]
            ],
        }

    def masters_by_name(self) -> dict[str, torch.Tensor]:
        """The float32 masters by parameter name (none in a float32 run)."""
        return {
            n: m
            for n, p, m in zip(self.names, self.params, self.trained, strict=True)
            if m is not p
        }

    def by_name(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` keyed by parameter name (AdamW's own is by position, in ``names`` order).

        Raises:
            DistrlError: the state names parameters this learner does not train.
        """
        groups = state["param_groups"]
        if not any(isinstance(p, int) for g in groups for p in g["params"]):
            unknown = sorted({p for g in groups for p in g["params"]} - set(self.names))
            if unknown or len(self.names) != sum(len(g["params"]) for g in groups):
                raise DistrlError(
                    "the optimizer state does not fit this learner's parameters "
                    f"({unknown[0] if unknown else 'a different number of them'})"
                )
            return state
        if len(self.names) != sum(len(g["params"]) for g in groups):
            raise DistrlError("the optimizer state holds a different number of parameters")
        return {
            **state,
            "state": {self.names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]} for g in groups],
        }

    @torch.no_grad()
    def load_state_dict(
        self, state: dict[str, Any] | None, masters: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Restore ``state_dict()``'s (AdamW's own, by position, loads too) and
        ``masters_by_name()``'s. Masters not given are taken from the parameters as they are
        now (just loaded), so ``load_state_dict(None)`` only re-takes them.

        Raises:
            DistrlError: the state names parameters this learner does not train.
        """
        masters = masters or {}
        if state is not None:
            state = self.by_name(state)
            index = {n: i for i, n in enumerate(self.names)}
            self.optimizer.load_state_dict(
                {
                    "state": {index[n]: v for n, v in state["state"].items()},
                    "param_groups": [
                        {**g, "params": [index[n] for n in g["params"]]}
                        for g in state["param_groups"]
                    ],
                }
            )
        for name, param, master in zip(self.names, self.params, self.trained, strict=True):
            if master is not param:
                master.copy_(masters.get(name, param))
        self._round_masters()
