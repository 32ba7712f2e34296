"""Shared fixtures: one real local Ray per test session (dashboard off, private temp dir,
more logical CPUs than cores, as RAY_NOTES.md recommends), and an S3-compatible server
(moto's server mode) on loopback for the tests of remote stores."""

import os
import re
import socket
import tempfile

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The S3 endpoint and credentials come from the standard environment, as on a real node.
# They are set here, before Ray starts, so that Ray's workers inherit them; the server
# itself starts only if a test asks for it (``s3_server``). Never a real account's.
S3_ENDPOINT = f"http://127.0.0.1:{_free_port()}"
os.environ.update(AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ACCESS_KEY_ID="distill-test",
                  AWS_SECRET_ACCESS_KEY="distill-test-secret", AWS_DEFAULT_REGION="us-east-1",
                  AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
                  AWS_SHARED_CREDENTIALS_FILE=os.devnull)
S3_BUCKET = "distill-test"
# Remote stores' node-local caches of this session (workers inherit it too)
os.environ["DISTILL_CACHE_DIR"] = tempfile.mkdtemp(prefix="distill-cache-", dir="/tmp")

import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

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


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on loopback with the bucket ``S3_BUCKET``; yields its endpoint."""
    import boto3
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             S3_ENDPOINT.rsplit(":", 1)[1]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = boto3.client("s3")
        deadline = time.time() + 60
        while True:
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
        yield S3_ENDPOINT
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def s3_uri(s3_server, request):
    """A fresh ``s3://`` store URI (its own prefix) for one test."""
    import uuid
    name = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:40]
    return f"s3://{S3_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
