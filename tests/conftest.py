"""Shared test set-up: CPU DeepSpeed, one embedded Ray instance for the tests that need it."""

import os

# DeepSpeed reads its accelerator once, at the first get_accelerator(): CPU for the whole suite.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray instance for every test that needs it (starting Ray costs a minute on 2 cores)."""
    import ray

    from ercstudy.platform.ray_runtime import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()
