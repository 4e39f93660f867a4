"""What a plug-in of the training loop may use of it: the run's current actors and its waits.

The loop (``distrl.loop.trainer.Trainer``) builds one ``Crew`` and hands it to the algorithm and the
publisher instead of itself, so they see the handles they call and the bounded waits they
need, and nothing else of the loop. Handles are callables because the loop replaces actors:
a restored learner and a renewed rollout worker are new handles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.actor import ActorHandle


@dataclass(frozen=True)
class Crew:
    """The loop's actors and waits, as a plug-in sees them.

    Attributes:
        learner: the current learner actor.
        workers: the current rollout workers, by index.
        wait: ``wait(role, refs)`` gets the results of calls on a stateful actor (``learner``
            or ``replay``) within its timeout, and raises ``distrl.runtime.faults.Lost``
            if it is lost.
        renew_worker: ``renew_worker(i)`` kills rollout worker ``i`` and waits for a new one.
        dead_role: the first stateful actor that no longer answers, or None.
        count_fault: ``count_fault(key)`` adds one to the run's ``faults/<key>`` counter.
    """

    learner: Callable[[], ActorHandle]
    workers: Callable[[], list[ActorHandle]]
    wait: Callable[[str, Any], Any]
    renew_worker: Callable[[int], None]
    dead_role: Callable[[], str | None]
    count_fault: Callable[[str], None]
