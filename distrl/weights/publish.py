"""How the learner's weights reach the rollout workers, by version, with every wait bounded.

Through Ray's object store (the default), the learner puts its weights there once and every
worker loads that object. By broadcast (``rollout.weight_sync: broadcast``), the learner and
every worker form a torch.distributed group of their own (``distrl.weights.sync``): formed at the
start, and again whenever its members change (a worker replaced or restarted by Ray, a learner
restored), each forming after the first counted under ``faults/weight_group_rebuilds``.

A worker that does not take the weights within ``faults.generate_timeout_s`` is replaced (its
batch in flight is gone); a learner that does not answer is ``Lost``. Every publication carries
the digest of its bytes; each worker checks what it received and, where it holds the network
itself, what it loaded (``distrl.weights.tensors.check_received``, ``check_loaded``). A mismatch
is counted under ``faults/weight_mismatch`` and the weights are sent again; through the object
store a second one in a row stops the run.
"""

from __future__ import annotations

import sys
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from distrl.config import FaultsConfig
from distrl.errors import DistrlError
from distrl.runtime import actors
from distrl.runtime.crew import Crew
from distrl.runtime.faults import Hung, Lost
from distrl.weights.sync import WeightSyncError
from distrl.weights.tensors import WeightMismatch

# Beyond faults.generate_timeout_s, how long the driver waits for a weight group's members:
# one blocked by a missing member gives up at the timeout and needs a moment to say so.
SYNC_GRACE_S = 10.0


class Publisher:
    """Publishes the weights of ``crew``'s learner to its rollout workers.

    Args:
        crew: the run's actors and waits.
        faults: the run's timeouts and retries.
        broadcasts: publish through a weight group (``rollout.weight_sync: broadcast``)
            instead of the object store.
    """

    def __init__(self, crew: Crew, faults: FaultsConfig, *, broadcasts: bool) -> None:
        self.crew, self.f = crew, faults
        self.broadcasts = broadcasts
        self.group_pids: list[int] | None = None  # workers' processes when the group formed
        self.groups_formed = 0

    def reset(self) -> None:
        """Form the weight group again before the next broadcast (a new learner or worker is
        in none)."""
        self.group_pids = None

    def publish(self) -> tuple[int, list[int]]:
        """Send the learner's weights to every worker.

        Returns:
            The version the workers hold, and the workers replaced on the way (their batches
            in flight are gone).
        """
        if self.broadcasts:
            return self.broadcast()
        crew, f = self.crew, self.f
        weights_ref = crew.learner().weights.remote()
        if not ray.wait([weights_ref], timeout=f.train_timeout_s)[0]:
            why = f"did not answer within faults.train_timeout_s={f.train_timeout_s:g} s"
            raise Lost("learner", why)
        refs = [w.set_weights.remote(weights_ref) for w in crew.workers()]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=f.generate_timeout_s)
        versions = []
        for i, ref in enumerate(refs):
            if ref not in done:
                continue
            try:
                versions.append(actors.get(ref))
            except RayActorError:  # the weights' owner died: the learner
                raise Lost(crew.dead_role() or "learner", "died") from None
            except WeightMismatch as err:
                self.mismatched(i, err)
                versions.append(self.send(i, again=True))
        renewed = [i for i, ref in enumerate(refs) if ref not in done]
        for i in renewed:  # hung
            crew.count_fault("faults/rollout_timeouts")
            crew.renew_worker(i)
            versions.append(self.send(i))
        return max(versions), renewed

    def post(self) -> tuple[int, list[ray.ObjectRef]]:
        """Queue the learner's weights on every worker behind the batches it holds, without
        waiting for them (``rollout.mode: async``): each worker loads them between two batches.

        Returns:
            The version posted, and each worker's ``set_weights`` call, to be checked once the
            worker is done with it (``checked``).
        """
        crew, f = self.crew, self.f
        learner = crew.learner()
        weights_ref = learner.weights.remote()
        version_ref = learner.publish_version.remote()
        done, _ = ray.wait([weights_ref, version_ref], num_returns=2, timeout=f.train_timeout_s)
        if len(done) < 2:
            why = f"did not answer within faults.train_timeout_s={f.train_timeout_s:g} s"
            raise Lost("learner", why)
        try:
            version = actors.get(version_ref)
        except RayActorError:
            raise Lost(crew.dead_role() or "learner", "died") from None
        return version, [w.set_weights.remote(weights_ref) for w in crew.workers()]

    def checked(self, i: int, ref: ray.ObjectRef) -> None:
        """Check worker ``i``'s posted delivery ``ref`` (done): one that failed its check is
        counted and sent again, now and waited for (``send``). A worker that died with it was
        restarted by Ray with its initial weights: its batches come back stale and are made
        again."""
        try:
            actors.get(ref)
        except RayActorError:
            pass
        except WeightMismatch as err:
            self.mismatched(i, err)
            self.send(i, again=True)

    def to_worker(self, i: int) -> tuple[int, list[int]]:
        """Send worker ``i`` the learner's current weights (by broadcast every worker takes
        them again); returns what ``publish`` does."""
        return self.broadcast() if self.broadcasts else (self.send(i), [])

    def mismatched(self, i: int, err: WeightMismatch) -> None:
        """Count and say that worker ``i``'s delivery failed its check."""
        self.crew.count_fault("faults/weight_mismatch")
        print(
            f"distrl: rollout worker {i}: {err}; sending the weights again",
            file=sys.stderr,
            flush=True,
        )

    def send(self, i: int, *, again: bool = False) -> int:
        """Worker ``i`` loads the learner's weights through the object store; its version.
        A delivery that fails its check is counted and sent once more, unless this is that
        second delivery (``again``).

        Raises:
            Lost: the learner died before its weights could be read (a restored learner
                publishes again).
            Hung: the worker did not load them within ``faults.generate_timeout_s``.
            DistrlError: two deliveries in a row failed their check.
        """
        weights_ref = self.crew.learner().weights.remote()
        worker = self.crew.workers()[i]
        timeout = self.f.generate_timeout_s
        try:
            return actors.get(worker.set_weights.remote(weights_ref), timeout=timeout)
        except RayActorError:  # the weights' owner died: the learner
            raise Lost(self.crew.dead_role() or "learner", "died") from None
        except WeightMismatch as err:
            if again:
                raise DistrlError(
                    f"rollout worker {i}: {err}, on two deliveries in a row: the weights do "
                    f"not reach it intact (memory or transport fault on its node?)"
                ) from None
            self.mismatched(i, err)
            return self.send(i, again=True)
        except GetTimeoutError:
            raise Hung(
                f"rollout worker {i} did not load the weights within "
                f"faults.generate_timeout_s={timeout:g} s"
            ) from None

    # ---- by broadcast -----------------------------------------------------------------

    def broadcast(self) -> tuple[int, list[int]]:
        """Publish through the weight group: the learner broadcasts, every worker receives.

        The group is formed first when it has none or its members changed. A worker that does
        not answer is replaced and the group formed again, at most ``faults.call_retries``
        times; then the run stops with ``Hung``.
        """
        crew, f = self.crew, self.f
        renewed: list[int] = []
        why = ""
        for _ in range(f.call_retries + 1):
            failed = ""  # why this try failed, if it did
            hung, pids = self.settle_workers()
            if not hung and self.group_pids is None:
                hung, failed = self.form_group(pids)
            if not hung and self.group_pids is not None:
                receive_refs = [w.receive_weights.remote() for w in crew.workers()]
                version, hung, failed = self.group_call(
                    crew.learner().broadcast_weights.remote(), receive_refs, "broadcast"
                )
                if version is not None:
                    return version, renewed
            if failed:
                why = failed
                print(
                    f"distrl: the weight broadcast failed ({why}); forming the group again",
                    file=sys.stderr,
                    flush=True,
                )
            for i in hung:
                crew.count_fault("faults/rollout_timeouts")
                crew.renew_worker(i)
                renewed.append(i)
        raise Hung(
            f"the weight broadcast (rollout.weight_sync) failed on {f.call_retries + 1} tries; "
            f"last: {why}"
        )

    def settle_workers(self) -> tuple[list[int], list[int]]:
        """Wait until every worker is done with its calls (a batch in flight), at most
        ``faults.generate_timeout_s``, so that all take part in the group's next step at once.

        Returns:
            The workers that were not done (hung), and each worker's process id (-1: hung).
            A worker in another process than when the group formed (Ray restarted it) is out
            of the group: it must form again.
        """
        pid_refs = actors.pid_refs(self.crew.workers())
        timeout = self.f.generate_timeout_s
        done, _ = ray.wait(pid_refs, num_returns=len(pid_refs), timeout=timeout)
        pids = []
        for ref in pid_refs:
            try:
                pids.append(actors.get(ref) if ref in done else -1)
            except RayActorError:
                pids.append(-1)
        if pids != self.group_pids:
            self.group_pids = None
        return [i for i, pid in enumerate(pids) if pid == -1], pids

    def form_group(self, pids: list[int]) -> tuple[list[int], str]:
        """Form a new weight group: the learner serves its store on its node at a new port,
        the learner and every worker join at once.

        Returns:
            The workers that did not answer, and why forming failed ("" if it did not).
        """
        crew, timeout = self.crew, self.f.generate_timeout_s
        learner, workers = crew.learner(), crew.workers()
        host = crew.wait("learner", actors.node_ip_ref(learner))
        address = crew.wait("learner", learner.weight_group_address.remote(host))
        world = len(workers) + 1
        join_refs = [
            w.join_weight_group.remote(address, i + 1, world, timeout_s=timeout)
            for i, w in enumerate(workers)
        ]
        learner_ref = learner.join_weight_group.remote(world, timeout_s=timeout)
        backend, hung, why = self.group_call(learner_ref, join_refs, "forming")
        if backend is None:
            return hung, why
        if self.groups_formed:
            crew.count_fault("faults/weight_group_rebuilds")
        self.groups_formed += 1
        self.group_pids = pids
        return [], ""

    def group_call(
        self, learner_ref: ray.ObjectRef, worker_refs: list[ray.ObjectRef], what: str
    ) -> tuple[Any, list[int], str]:
        """Wait for one step of the weight group (``what``) on the learner and every worker;
        a member blocked by a missing one gives up within ``faults.generate_timeout_s``.

        Returns:
            The learner's result (None if the step failed anywhere: the group is then spent),
            the workers that did not answer, and why it failed.

        Raises:
            Lost: the learner died or did not answer.
        """
        timeout = self.f.generate_timeout_s
        refs = [learner_ref, *worker_refs]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout + SYNC_GRACE_S)
        if learner_ref not in done:
            why = f"did not finish the weight group's {what} within faults.generate_timeout_s"
            raise Lost("learner", f"{why}={timeout:g} s")
        whys, result = [], None
        try:
            result = actors.get(learner_ref)
        except RayActorError:
            raise Lost(self.crew.dead_role() or "learner", "died") from None
        except WeightSyncError as err:
            whys.append(f"the learner: {err}")
        hung = [i for i, ref in enumerate(worker_refs) if ref not in done]
        whys += [f"rollout worker {i} did not answer within {timeout:g} s" for i in hung]
        for i, ref in enumerate(worker_refs):
            if ref in done:
                try:
                    actors.get(ref)
                except WeightMismatch as err:  # the group sends again on the next try
                    self.crew.count_fault("faults/weight_mismatch")
                    whys.append(f"rollout worker {i}: {err}")
                except (WeightSyncError, RayActorError) as err:
                    whys.append(f"rollout worker {i}: {err}")
        if whys:
            self.group_pids = None
            return None, hung, "; ".join(whys)
        return result, [], ""
