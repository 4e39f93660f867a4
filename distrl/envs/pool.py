"""Where a batch's environments run: in the rollout worker, or in a pool of Ray actors.

``run_episodes`` talks to a batch's environments through one of these, a turn at a time for
every live episode at once:

- ``LocalEnvironments`` (``env.num_actors: 0``, the default): one instance per episode in the
  rollout worker's process. A ``reset`` or ``step`` that raises ends that episode.
- ``RemoteEnvironments`` (``env.num_actors: N``): the episodes' instances live in N ``EnvHost``
  actors of the worker's own, episode ``i`` on host ``i % N``; every live episode's step runs at
  once, and one that does not answer within ``env.step_timeout_s`` or whose host dies has its
  host killed and replaced: the episodes on that host end (their state went with it), the
  count goes to ``faults/env_restarts``, and the batch and the run go on. A step that merely
  raises ends its episode, as in the worker.
"""

from __future__ import annotations

from typing import Any

from distrl.data.examples import Example
from distrl.envs.base import Environment, Step, load_environment

Outcome = Any  # what a reset or step returned, or the exception that ended its episode
START_TIMEOUT_S = 120.0  # an environment actor's start-up: a Python process importing distrl


class LocalEnvironments:
    """One environment per episode, in this process."""

    restarts = 0

    def __init__(self, environments: list[Environment]) -> None:
        self.environments = environments

    def tools(self) -> list:
        """The tools the environments offer the model."""
        return self.environments[0].tools() if self.environments else []

    def reset(self, examples: list[Example], seeds: list[int]) -> list[Outcome]:
        """Each episode's first messages, or the exception its ``reset`` raised."""
        return [_call(e.reset, x, s) for e, x, s in zip(self.environments, examples, seeds)]

    def step(self, episodes: list[int], messages: list[str]) -> list[Outcome]:
        """The ``Step`` of each of ``episodes`` for its message, or the exception it raised."""
        return [_call(self.environments[i].step, m) for i, m in zip(episodes, messages)]


def _call(method: Any, *args: Any) -> Outcome:
    try:
        return method(*args)
    except Exception as err:  # the user's code: its episode ends, the batch goes on
        return err


class EnvHost:
    """The environments of many episodes in one process: a pool actor's role."""

    def __init__(self, name: str, options: dict[str, Any]) -> None:
        self.cls, self.options = load_environment(name, options), options
        self.live: dict[int, Environment] = {}

    def ready(self) -> bool:
        """Whether the host has started (its environment class imported)."""
        return True

    def tools(self) -> list:
        """The tools an instance offers."""
        return self.cls(**self.options).tools()

    def reset(self, key: int, example: Example, seed: int) -> list[dict[str, str]]:
        """A fresh environment for episode ``key``; its first messages."""
        self.live[key] = self.cls(**self.options)
        return self.live[key].reset(example, seed)

    def step(self, key: int, message: str) -> Step:
        """Episode ``key``'s step."""
        return self.live[key].step(message)

    def close(self) -> None:
        """Forget every episode."""
        self.live.clear()


class RemoteEnvironments:
    """A batch's environments in ``hosts`` (``EnvHost`` actors), replaced where they hang or
    die (``make_host`` starts a new one).

    Args:
        hosts: the worker's pool, kept and updated in place across batches.
        make_host: starts a replacement host.
        timeout: seconds every live episode's reset or step may take together.
    """

    def __init__(self, hosts: list[Any], make_host: Any, timeout: float) -> None:
        self.hosts, self.make_host, self.timeout = hosts, make_host, timeout
        self.restarts = 0
        self.lost: set[int] = set()  # hosts replaced during this batch: their episodes ended
        for host in hosts:  # runs before this batch's calls (an actor's calls keep their order)
            host.close.remote()

    def tools(self) -> list:
        """The tools the environments offer the model."""
        from distrl.runtime import actors

        return actors.get(self.hosts[0].tools.remote(), timeout=self.timeout)

    def host(self, episode: int) -> int:
        """The host index episode ``episode`` lives on."""
        return episode % len(self.hosts)

    def reset(self, examples: list[Example], seeds: list[int]) -> list[Outcome]:
        """Start every episode on its host; first messages, or what ended the episode."""
        episodes = list(range(len(examples)))
        return self._run(
            episodes, lambda i: self.hosts[self.host(i)].reset.remote(i, examples[i], seeds[i])
        )

    def step(self, episodes: list[int], messages: list[str]) -> list[Outcome]:
        """Every live episode's step at once; a ``Step``, or what ended the episode."""
        text = dict(zip(episodes, messages))
        return self._run(episodes, lambda i: self.hosts[self.host(i)].step.remote(i, text[i]))

    def _run(self, episodes: list[int], call: Any) -> list[Outcome]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        from distrl.runtime import actors

        refs = {i: call(i) for i in episodes if self.host(i) not in self.lost}
        done = set(actors.wait_all(list(refs.values()), self.timeout))
        outcomes: dict[int, Outcome] = {}
        failed: dict[int, str] = {}
        for i, ref in refs.items():
            if ref not in done:
                failed.setdefault(self.host(i), f"did not answer within {self.timeout:g} s")
                continue
            try:
                outcomes[i] = ray.get(ref)
            except RayTaskError as err:  # the environment's own exception
                outcomes[i] = err.cause if isinstance(err.cause, Exception) else err
            except RayActorError:
                failed.setdefault(self.host(i), "died")
        for k in failed:
            actors.kill(self.hosts[k], [r for i, r in refs.items() if self.host(i) == k])
            self.hosts[k] = self.make_host()
            self.restarts += 1
            self.lost.add(k)
        lost = {k: failed.get(k, "was replaced earlier in this batch") for k in self.lost}
        return [
            outcomes.get(i)
            if self.host(i) not in self.lost
            else RuntimeError(f"environment actor {self.host(i)} {lost[self.host(i)]}")
            for i in episodes
        ]
