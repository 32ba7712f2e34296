"""A Ray Train worker killed during student training: the run restarts its worker group
(``max_failures``), resumes from the last checkpoint and finishes."""

import glob
import os
import re
import signal as signals
import subprocess
import threading
import time

from pipelines.context import StageContext
from stages.train.kd_student import KDStudent
from tests.stages.conftest import KD_CONFIG


def pids(*pgrep_args: str) -> set[int]:
    out = subprocess.run(["pgrep", *pgrep_args], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def train_workers() -> set[int]:
    """The Ray Train worker processes of this test session's Ray (children of its raylet,
    whose command line names the session directory; the process title names the actor)."""
    import ray
    session = ray._private.worker._global_node.get_session_dir_path()
    return {w for r in pids("-f", f"raylet.*{session}")
            for w in pids("-P", str(r), "-f", "RayTrainWorker")}


def read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:  # replaced between the glob and the open
        return ""


def test_killed_worker_resumes_from_the_last_checkpoint(ray_session, signal, tmp_path):
    ctx = StageContext.for_testing(tmp_path, name="kd", kind="kd-student")
    stage = KDStudent({**KD_CONFIG, "epochs": 50, "max_failures": 1})
    result = {}
    runner = threading.Thread(target=lambda: result.update(stage.run(ctx, signal=signal)))
    runner.start()
    # kill once the controller's snapshot names a registered checkpoint (a checkpoint
    # written but not yet registered by the controller is not one a restart resumes from)
    snapshot = os.path.join(ctx.work_dir, "ray_train", "*", "checkpoint_manager_snapshot.json")
    deadline, killed = time.time() + 300, []
    while time.time() < deadline and runner.is_alive() and not killed:
        if any(re.search(r"checkpoint_\d{4}-", read(f)) for f in glob.glob(snapshot)):
            for pid in train_workers():
                os.kill(pid, signals.SIGKILL)
                killed.append(pid)
        time.sleep(0.05)
    runner.join(600)
    assert killed, "no Ray Train worker was found to kill"
    info = result["model"].info
    assert info["epochs"] == 50
    # the last report came from the restarted worker group, which began after a checkpoint
    assert 0 < info["start_epoch"] < 50
    assert not train_workers() & set(killed)
