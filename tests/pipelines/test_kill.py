"""Killing a run mid-stage leaves nothing that looks committed; re-running completes it."""

import os
import signal
import subprocess
import sys
import tempfile
import time

from pipelines import Pipeline, plan, run
from pipelines._internal.gc import garbage
from pipelines._internal.store import Store
from tests.pipelines import toy_stages  # noqa: F401
from tests.pipelines.test_cli import LAUNCH, ROOT

SPEC = """
name: killme
seed: 0
stages:
  nums: {kind: test-numbers, config: {n: 30, sleep: 6}}
  double: {kind: test-scale, inputs: {numbers: nums}}
"""


def raylets(temp_dir: str) -> set[int]:
    """The raylets of the Ray whose temp dir is ``temp_dir`` (not other Ray sessions')."""
    out = subprocess.run(["pgrep", "-f", f"raylet.*{temp_dir}"], capture_output=True,
                         text=True).stdout
    return {int(p) for p in out.split()}


def test_kill_mid_stage_then_rerun_completes(ray_session, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(SPEC)
    store = tmp_path / "store"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: unix socket paths
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "run", str(path), "--store", str(store)],
                            cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=os.environ | {"RAY_TMPDIR": ray_tmp})
    staging = store / "_staging" / "test-numbers"
    deadline = time.time() + 300  # the run starts its own Ray: slow on a loaded machine
    while time.time() < deadline and not (staging.exists() and any(staging.iterdir())):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    assert staging.exists(), "stage never started"
    assert raylets(ray_tmp), "the run's own embedded Ray is not where RAY_TMPDIR says"
    time.sleep(1.0)  # mid-stage: it sleeps 6 s before writing
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    st = Store(str(store))
    assert st.manifests() == [], "a killed stage must not look committed"
    p = Pipeline.from_yaml(str(path))
    assert [d.status for d in plan(p, store=str(store)).decisions.values()] == ["run", "run"]
    deadline = time.time() + 30  # the stage's worker dies with the killed driver's Ray
    while not any(str(staging) in g for g in garbage(st)) and time.time() < deadline:
        time.sleep(0.5)
    assert any(str(staging) in g for g in garbage(st)), "the dead run's staging is debris"

    result = run(p, store=str(store), progress=False)
    assert [s.status for s in result.stages] == ["ran", "ran"]
    assert st.manifest("test-numbers", result["nums"].key)["outputs"]["numbers"]["rows"] == 30
    assert [s.status for s in run(p, store=str(store), progress=False).stages] == ["cached"] * 2

    deadline = time.time() + 30  # the killed driver's embedded Ray goes with it
    while raylets(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not raylets(ray_tmp), "the killed run left a raylet behind"
