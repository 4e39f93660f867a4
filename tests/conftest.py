from pathlib import Path
from typing import Any, NamedTuple

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init takes seconds; local_mode is gone)."""
    import ray

    from distrl.loop.driver import loopback_only

    with loopback_only():  # as distrl.run's embedded Ray: nothing listens beyond this machine
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            # Room for the packaged model's fp32 weights (about 540 MB) twice over, so a publish
            # never spills to disk (spilling fails once the disk is 95% full).
            object_store_memory=2 * 1024**3,
        )
    yield ray
    ray.shutdown()


class FinishedRun(NamedTuple):
    config: Any  # the RunConfig it was trained with
    run_dir: Path


@pytest.fixture(scope="session")
def finished_run(ray_session, tmp_path_factory) -> FinishedRun:
    """A finished two-iteration tiny run on Ray, checkpointed every step, shared by the tests that
    only read it (or copy it before they change anything): its config.yaml, its checkpoints, the
    resumes it refuses."""
    from distrl.config import load_config
    from distrl.loop.driver import train

    run_dir = tmp_path_factory.mktemp("finished") / "run"
    overrides = {
        "output.dir": str(run_dir),
        "iterations": 2,
        "learner.lr": "2e-3",  # a flag's string, as the command line gives it
        "output.progress": False,
        "output.plots": False,
        "output.tensorboard": False,
        "output.eval_every": 0,
        "output.checkpoint_every": 1,
    }
    config = load_config("tiny", overrides)
    train(config)
    return FinishedRun(config, run_dir)
