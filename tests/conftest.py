import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init takes seconds; local_mode is gone)."""
    import ray

    from distrl.driver import loopback_only

    with loopback_only():  # as distrl.run's embedded Ray: nothing listens beyond this machine
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 1024**2,
        )
    yield ray
    ray.shutdown()
