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
