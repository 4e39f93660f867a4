"""How a run meets faults it cannot simply retry: calls that hang, stateful actors that are lost,
and stop signals.

- ``Hung``: a remote call passed its ``faults.*_timeout_s``. The driver replaces the actor and
  retries a bounded number of times, then stops with this error's one line.
- ``Lost``: the learner or the replay buffer died or hung. Their state cannot be rebuilt from a
  constructor, so the driver restores both from the newest checkpoint and redoes the steps since.
- A broadcast weight group (``rollout.weight_sync: broadcast``) cannot take a new member: a
  replaced or restarted worker, a restored learner or a failed broadcast makes the driver form
  it again (``faults/weight_group_rebuilds``).
- ``StopSignals``: SIGINT/SIGTERM stop the run at the next safe point (within ``actors.POLL_S``
  while it only waits for rollouts, rewards or an evaluation), after which the driver
  checkpoints and raises ``Stopped``.
- ``loss_jump``: a loss or gradient norm orders of magnitude above its recent history (a
  corrupted state, a diverging run) stops the run before that step is saved (``LossJump``).
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from distrl.errors import DistrlError

# Fault counters logged every iteration (each survived fault is counted here, never silent).
FAULT_KEYS = (
    "faults/stale_batches",
    "faults/dropped_samples",
    "faults/reward_actor_restarts",
    "faults/reward_timeouts",
    "faults/reward_memory_replacements",
    "faults/rollout_timeouts",
    "faults/rollout_restarts",
    "faults/learner_restarts",
    "faults/replay_restarts",
    "faults/weight_group_rebuilds",
    "faults/weight_mismatch",
    "faults/env_errors",
    "faults/env_restarts",
)


class Hung(DistrlError):
    """A remote call did not return within its timeout, on every try."""


class Lost(Exception):
    """A stateful actor (``role``: learner or replay) died or hung; ``why`` says how."""

    def __init__(self, role: str, why: str) -> None:
        super().__init__(f"the {role} actor {why}")
        self.role, self.why = role, why


class Stopped(DistrlError):
    """The run stopped on a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class LossJump(DistrlError):
    """A step's loss or gradient norm jumped far above its recent history (``loss_jump``)."""


class Interrupt(BaseException):
    """Raised inside a stretch that a signal may abandon (``StopSignals.abandonable``), by the
    wait that sees the signal (``actors.wait_all``) or at the stretch's end."""


# The StopSignals whose abandonable() stretch is open: waits in it look for their signal.
_OPEN: list[StopSignals] = []


def abandoning() -> bool:
    """Whether an ``abandonable()`` stretch is open, so a wait should look for a signal."""
    return bool(_OPEN)


def interrupted() -> bool:
    """Whether a signal has asked to abandon the open ``abandonable()`` stretch."""
    return any(s.signum is not None for s in _OPEN)


class StopSignals:
    """Catch SIGINT and SIGTERM while a run trains (only in the main thread: Tune trials run in
    threads and are stopped by Tune).

    The first signal is remembered (``signum``); inside ``abandonable()`` the wait under way
    sees it within ``actors.POLL_S`` and raises ``Interrupt``; elsewhere the current step
    finishes first. The handler itself never raises on the first signal: an exception raised
    from a handler can land inside Ray's C code and surface as a ``SystemError`` traceback. A
    second signal stops at once with ``KeyboardInterrupt``.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.doing = "the current step"  # what a signal waits for, as the loop says
        self._abandonable = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        name = signal.Signals(signum).name
        if self._abandonable:
            what = f"abandoning {self.doing} (nothing learned is lost) and stopping now"
        else:
            what = f"stopping after {self.doing} and a checkpoint; send it again to stop at once"
        print(f"\ndistrl: {name} received: {what}", file=sys.stderr, flush=True)

    @contextmanager
    def abandonable(self, doing: str) -> Iterator[None]:
        """A stretch (waiting for rollouts, rewards or an evaluation) that a signal cuts short
        with ``Interrupt``: nothing the learner or replay buffer holds changes in it."""
        if self.signum is not None:
            raise Interrupt
        self._abandonable, self.doing = True, doing
        _OPEN.append(self)
        try:
            yield
        finally:
            self._abandonable = False
            _OPEN.remove(self)
        if self.signum is not None:  # came during a wait that does not look (a round trip)
            raise Interrupt


# What a loss jump is read from (positive scales; the policy loss changes sign), and the
# smallest median it is measured against (a loss fitted to near 0 may rise without a fault).
JUMP_KEYS = ("learner/grad_norm", "learner/value_loss", "learner/td_loss")
JUMP_WINDOW, JUMP_FLOOR = 10, 1e-2


def loss_jump(history: list[dict[str, Any]], metrics: dict[str, Any], factor: float) -> str | None:
    """Why ``metrics`` look like a fault against the logged ``history``: a key of
    ``JUMP_KEYS`` above ``factor`` times its median over the last ``JUMP_WINDOW`` steps (at
    least 2 of them); None when nothing jumped or ``factor`` is 0."""
    if not factor:
        return None
    for key in JUMP_KEYS:
        now = metrics.get(key)
        past = [abs(r[key]) for r in history[-JUMP_WINDOW:] if _finite(r.get(key))]
        if not _finite(now) or len(past) < 2:
            continue
        typical = max(statistics.median(past), JUMP_FLOOR)
        if abs(now) > factor * typical:
            return (
                f"{key} jumped to {now:.4g}, {abs(now) / typical:.3g} times its median "
                f"{typical:.3g} over the last {len(past)} steps (faults.max_loss_jump={factor:g})"
            )
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
