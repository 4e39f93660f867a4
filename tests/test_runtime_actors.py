"""The reward pool on a real local Ray (the session-wide ``ray_session`` fixture)."""

import os
import textwrap

import numpy as np
import pytest

from distrl.config import ResourcesConfig, RewardComponent, RewardConfig
from distrl.errors import RewardError
from distrl.rewards import RewardBatch, RewardScorer
from distrl.runtime import actors
from distrl.runtime.actors import RewardPool, actor_options

RESOURCES = ResourcesConfig(reward_cpus=0.5, torch_threads=1)
REWARD = RewardConfig(
    components=(
        RewardComponent("diversity", 1.0),
        RewardComponent("length", 0.5, {"max_tokens": 6, "per_token": True}),
    ),
    num_actors=2,
    batch_size=4,
)


def responses(n):
    """Distinct texts of distinct lengths, so any reordering shows."""
    return [" ".join(f"w{i % (k + 1)}" for i in range(k + 1)) for k in range(n)]


@pytest.fixture(scope="module")
def pool(ray_session):
    pool = RewardPool(REWARD, RESOURCES, seed=0)
    yield pool
    pool.shutdown()


def test_actor_options_carry_resources_and_restarts():
    options = actor_options(0.5, 0.25, {"inference_node": 0.01})
    assert options == {
        "num_cpus": 0.5,
        "num_gpus": 0.25,
        "max_restarts": -1,
        "max_task_retries": -1,
        "resources": {"inference_node": 0.01},
    }


def test_pool_keeps_order_and_returns_components(pool):
    batch = RewardBatch(responses(11))  # three chunks of <= 4 over two actors
    result = pool.score(batch)
    expected = RewardScorer(REWARD).score(batch)
    assert len(pool.actors) == 2
    assert result.total.tolist() == expected.total.tolist()
    for name in ("diversity", "length"):
        assert result.components[name].tolist() == expected.components[name].tolist()
    assert not result.dropped.any()
    assert set(result.timing) == {"diversity", "length"}
    assert pool.score(RewardBatch([])).total.shape == (0,)


def actor_pid(ray, actor):
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_killed_scorer_is_restarted_and_scoring_goes_on(pool, ray_session):
    before = actor_pid(ray_session, pool.actors[0])
    ray_session.kill(pool.actors[0], no_restart=False)
    result = pool.score(RewardBatch(responses(9)))
    assert np.isfinite(result.total).all() and len(result.total) == 9
    assert actor_pid(ray_session, pool.actors[0]) != before  # a new process took over


def test_raising_user_component_reaches_the_driver_as_reward_error(ray_session, tmp_path):
    (tmp_path / "pool_rewards.py").write_text(
        textwrap.dedent(
            """
            def picky(completions, **kwargs):
                if "poison" in " ".join(completions):
                    raise ValueError("cannot score poison")
                return [1.0] * len(completions)
            """
        )
    )
    reward = RewardConfig(
        components=(RewardComponent("pool_rewards:picky"),), num_actors=1, batch_size=4
    )
    # The actors import the user's module, so its folder goes on their PYTHONPATH.
    runtime_env = {"env_vars": {"PYTHONPATH": str(tmp_path)}}
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))  # the driver checks the config too
        pool = RewardPool(reward, RESOURCES, runtime_env=runtime_env)
    texts = ["fine"] * 6 + ["some poison here"] + ["fine"]
    try:
        # Sample 6 is the third of the second chunk: the error names its index in the batch.
        with pytest.raises(RewardError, match=r"'pool_rewards:picky' failed on sample 6") as err:
            pool.score(RewardBatch(texts))
        assert type(err.value) is RewardError  # unwrapped, not Ray's RayTaskError
        assert "ValueError: cannot score poison" in str(err.value)
    finally:
        pool.shutdown()


@pytest.mark.slow  # two reward actors start, one after the other
def test_a_reward_actor_that_leaks_is_replaced_between_batches_and_counted(ray_session, tmp_path):
    """A user function that keeps 40 MiB of every call: past ``memory_mb`` its actor is
    replaced with a warning, and scoring goes on."""
    (tmp_path / "leaky_rewards.py").write_text(
        textwrap.dedent(
            """
            KEPT = []

            def leaky(completions):
                KEPT.append(bytearray(b"\\x01") * (40 * 2**20))  # touched: resident
                return [1.0] * len(completions)
            """
        )
    )
    reward = RewardConfig(components=(RewardComponent("leaky_rewards:leaky"),), num_actors=1)
    runtime_env = {"env_vars": {"PYTHONPATH": str(tmp_path)}}
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        pool = RewardPool(reward, RESOURCES, runtime_env=runtime_env)
    try:
        (start,) = actors.rss_mb(pool.actors)
        pool.memory_mb = start + 100  # three calls' worth
        pid = pool.pids[0]
        for _ in range(2):
            assert list(pool.score(RewardBatch(["a", "b"])).total) == [1.0, 1.0]
        assert pool.memory_replacements == 0 and pool.pids[0] == pid
        with pytest.warns(UserWarning, match=r"reward actor 0 holds \d+ MiB, past faults\."):
            pool.score(RewardBatch(["a", "b"]))
        assert pool.memory_replacements == 1 and pool.pids[0] != pid
        assert pool.timeouts == 0 and pool.restarts == 0  # a replacement, counted as such
        assert actors.rss_mb(pool.actors)[0] < start + 40  # the new actor starts small
        assert list(pool.score(RewardBatch(["a", "b"])).total) == [1.0, 1.0]
    finally:
        pool.shutdown()


def test_an_actors_full_disk_reaches_the_driver_as_the_oserror_itself(ray_session):
    import errno

    class FullDisk:  # defined here so Ray ships it by value to the worker
        """A role whose save meets a full disk (the kernel's ENOSPC from /dev/full)."""

        def save(self) -> None:
            with open("/dev/full", "wb") as full:
                full.write(b"\0" * 4096)
                full.flush()

    actor = actors.make_actor(FullDisk, actor_options(0.25, 0, None))
    with pytest.raises(OSError) as caught:  # not a RayTaskError: write_checkpoint can name it
        actors.get(actor.save.remote(), timeout=60)
    assert caught.value.errno == errno.ENOSPC


def test_a_stop_signal_ends_an_abandonable_wait_before_its_result_is_ready(ray_session):
    """The handler only records the signal; the wait sees it and raises ``Interrupt`` (a
    handler that raised inside ``ray.get`` could surface as a SystemError traceback)."""
    import os
    import signal
    import threading

    from distrl.runtime.faults import Interrupt, StopSignals

    class Slow:  # defined here so Ray ships it by value to the worker
        def generate(self, seconds: float) -> str:
            import time

            time.sleep(seconds)
            return "done"

    actor = actors.make_actor(Slow, actor_options(0.25, 0, None))
    ref = actor.generate.remote(60)
    try:
        with StopSignals() as signals:
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
            with pytest.raises(Interrupt), signals.abandonable("step 1's rollouts"):
                actors.get(ref, timeout=120)
        assert signals.signum == signal.SIGINT
        assert not ray_session.wait([ref], timeout=0)[0]  # abandoned, not waited out
    finally:
        actors.kill(actor)


def test_killing_a_worker_mid_call_cancels_the_call_instead_of_retrying_it(ray_session, capfd):
    """Rollout workers retry an interrupted call (``max_task_retries=-1``); at shutdown the
    call a signal abandoned is cancelled, so Ray prints no "will be retried" line after the
    run's last one."""
    import time

    class Slow:  # defined here so Ray ships it by value to the worker
        def generate(self, seconds: float) -> str:
            time.sleep(seconds)
            return "done"

    actor = actors.make_actor(Slow, actor_options(0.25, 0, None))
    actors.get(actor.__ray_ready__.remote(), timeout=60)
    ref = actor.generate.remote(60)
    time.sleep(1)  # running, not queued
    actors.kill(actor, [ref])
    with pytest.raises(ray_session.exceptions.TaskCancelledError):
        ray_session.get(ref, timeout=30)
    time.sleep(3)  # Ray's log monitor forwards the actor's and raylet's lines within a second
    assert "retries remaining" not in capfd.readouterr().err
