"""Shared fixtures: one real local Ray per test session (dashboard off, private temp dir,
more logical CPUs than cores, as RAY_NOTES.md recommends)."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray
    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        ray.init(address="local", num_cpus=4, include_dashboard=False, _temp_dir=tmp,
                 log_to_driver=False, configure_logging=False)
    yield ray
    # Ray is shut down at interpreter exit; tests never call `ray stop`.
