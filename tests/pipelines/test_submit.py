"""``distill submit``: the job's entrypoint and upload as pure functions; bad input as one
message; and a real submission to a head started here with ``ray start --head`` on
loopback (its own temp dir and ports, stopped by the test, other Ray sessions untouched)."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from pipelines._internal.submit import (cluster_store, config_in_working_dir, exit_code,
                                        job_entrypoint, retry_submit)
from pipelines.errors import UserError
from tests.pipelines.test_cli import ROOT

PIPELINE = """
name: submitted
seed: 0
stages:
  data: {kind: load-digits}
  teacher: {kind: fit-classifier, config: {epochs: 1}, inputs: {data: data}}
"""


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ)


def test_entrypoint_runs_the_pipeline_on_the_head():
    entry = job_entrypoint("cfg/p.yaml", "/shared/store", ["teacher.epochs=3"], ["teacher"],
                           None)
    assert entry == ("distill run cfg/p.yaml --address auto --store /shared/store "
                     "--set teacher.epochs=3 --force teacher")
    assert job_entrypoint("p p.yaml", "s", [], [], "http://mlflow:5000").endswith(
        "'p p.yaml' --address auto --store s --tracking-uri http://mlflow:5000")
    assert exit_code("SUCCEEDED") == 0
    assert exit_code("FAILED") == exit_code("STOPPED") == 1
    assert retry_submit("Request failed with status code 500: No available agent to submit "
                        "job, please try again later..")
    assert not retry_submit("Request failed with status code 400: bad runtime_env")


def test_the_store_must_be_one_every_node_reaches():
    assert cluster_store("/mnt/shared/distill") == "/mnt/shared/distill"
    assert cluster_store("s3://bucket/distill") == "s3://bucket/distill"
    assert cluster_store("file:///mnt/shared") == "file:///mnt/shared"
    for bad in (None, ".distill", "store/x", "file://rel/x"):
        with pytest.raises(UserError, match=r"--store .* is not a store every node .*allowed: "
                                            r"an absolute path"):
            cluster_store(bad)


def test_config_must_travel_with_the_working_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.yaml").write_text(PIPELINE)
    assert config_in_working_dir(str(tmp_path / "sub" / "p.yaml"), str(tmp_path)) == \
        os.path.join("sub", "p.yaml")
    with pytest.raises(UserError, match="outside --working-dir"):
        config_in_working_dir(str(tmp_path / "sub" / "p.yaml"), str(tmp_path / "other"))


def test_bad_submissions_get_one_message(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(PIPELINE)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = cli("submit", str(cfg), "--working-dir", str(tmp_path), "--address",
            "http://127.0.0.1:9", env=env)
    assert r.returncode == 2 and "--store None is not a store every node" in r.stderr
    store = ["--store", str(tmp_path / "store")]
    r = cli("submit", str(cfg), "--working-dir", str(tmp_path), *store, env=env)
    assert r.returncode == 2 and "no --address" in r.stderr and "Traceback" not in r.stderr
    r = cli("submit", str(cfg), "--working-dir", str(tmp_path), "--address",
            "http://127.0.0.1:9", *store, env=env)
    assert r.returncode == 2 and "cannot reach the Ray Jobs server" in r.stderr
    assert "'http://127.0.0.1:9'" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(PIPELINE.replace("load-digits", "load-digit"))
    r = cli("submit", str(bad), "--working-dir", str(tmp_path), "--address",
            "http://127.0.0.1:9", env=env)  # the pipeline is checked before any connection
    assert r.returncode == 2 and "load-digit" in r.stderr and "did you mean" in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(tmp_path):
    """A Ray head with its dashboard (the Jobs server) on loopback, in its own session."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    port, dash = free_port(), free_port()
    # the agent's ports default to fixed numbers that another Ray on this machine (the test
    # session's own, a benchmark's) may hold: then no job agent ever comes up
    agent = ["--dashboard-agent-listen-port", str(free_port()),
             "--dashboard-agent-grpc-port", str(free_port()),
             "--metrics-export-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port())]
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: unix socket paths
    env = os.environ | {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", temp,
         "--disable-usage-stats", *agent], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient
    deadline, last = time.time() + 240, None
    while time.time() < deadline:
        assert proc.poll() is None, "ray start --head exited"
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception as e:  # not up yet
            last = e
            time.sleep(2)
    else:
        pytest.fail(f"the head's Jobs server never answered: {last}")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # a clean stop takes Ray about 30 s; the SIGKILLs below need no more than a few
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    try:  # whatever the head left in its session
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    out = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout
    for pid in map(int, out.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_submit_runs_the_pipeline_as_a_ray_job(head, tmp_path):
    address, env = head
    work = tmp_path / "work"
    work.mkdir()
    (work / "p.yaml").write_text(PIPELINE)
    store = tmp_path / "store"
    r = cli("submit", str(work / "p.yaml"), "--address", address, "--store", str(store),
            "--working-dir", str(work), "--follow", env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "submitted job" in r.stdout and "SUCCEEDED" in r.stdout
    assert "teacher" in r.stdout  # the job's own log lines came back
    from pipelines._internal.store import Store
    kinds = {m["kind"] for m in Store(str(store)).manifests()}
    assert kinds == {"load-digits", "fit-classifier"}
    # the same submission again: everything cached, the job still succeeds
    r = cli("submit", str(work / "p.yaml"), "--address", address, "--store", str(store),
            "--working-dir", str(work), "--follow", env=env)
    assert r.returncode == 0 and "cached" in r.stdout, r.stdout[-3000:]
