"""Shared test setup: offline everything, one preset cache, one private Ray cluster."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from s3server import configure_env, s3_server  # noqa: F401 - fixture

# Nothing in the tests may reach a model hub; Ray's token auth is off for the private cluster.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# One preset cache for the whole session (set before Ray starts so actors inherit it).
os.environ.setdefault("CATBATCH_CACHE", str(Path(tempfile.gettempdir()) / "catbatch-test-cache"))
# S3 clients (here and in Ray actors) talk to the loopback SeaweedFS of `s3_server`.
configure_env()


@pytest.fixture(scope="session")
def tiny_cache() -> Path:
    """Directory where built tiny presets are cached for the session."""
    path = Path(os.environ["CATBATCH_CACHE"])
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """A private local Ray cluster shared by the end-to-end tests."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=128 * 1024 * 1024,
        include_dashboard=False,
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()
