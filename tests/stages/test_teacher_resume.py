"""A teacher killed mid-training resumes from its last epoch: ``fit-diffusion-teacher`` runs
through the training harness in the stage's process, which keeps a checkpoint (weights,
EMA, optimiser, generator, epoch, elapsed time, resolved config) in the stage's work files
on the store after every epoch. The driver is SIGKILLed once a checkpoint exists; the
re-run of the pipeline trains only the remaining epochs."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from pipelines import Pipeline, run
from pipelines._internal.store import Store
from tests.pipelines.test_cli import LAUNCH, ROOT
from tests.pipelines.test_kill import raylets

EPOCHS = 40
SPEC = f"""
name: teacher_resume
seed: 0
stages:
  data: {{kind: load-digits}}
  teacher:
    kind: fit-diffusion-teacher
    config: {{epochs: {EPOCHS}, batch_size: 256, block_out_channels: [16, 32],
              attention: false, max_minutes: 30}}
    inputs: {{data: data}}
"""


def saved_epoch(path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError):  # not there yet, or replaced
        return None


def launch_and_kill(path, store, work, err_file) -> tuple[int | None, str]:
    """``distill run`` in a process group of its own, SIGKILLed once the teacher's
    checkpoint holds an epoch >= 1; (that epoch, or None if the run ended first; stderr)."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: unix socket paths
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "run", str(path), "--store",
                                 str(store)], cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err,
                                env=os.environ | {"RAY_TMPDIR": ray_tmp})
    deadline, killed_at = time.time() + 300, None
    try:
        while time.time() < deadline and killed_at is None and proc.poll() is None:
            for ckpt in work.glob("*/harness/state.pt"):
                epoch = saved_epoch(ckpt)
                if epoch is not None and epoch >= 1:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = epoch
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        settle(ray_tmp, work)
    return killed_at, err_file.read_text()


def settle(ray_tmp: str, work, quiet: float = 3.0) -> None:
    """Wait until the killed run's embedded Ray is gone and its teacher's checkpoint has
    stopped changing (the stage's worker may outlive the driver by a moment)."""
    deadline = time.time() + 60
    while raylets(ray_tmp) and time.time() < deadline:
        time.sleep(0.5)
    last, still = None, time.time()
    while time.time() < deadline and time.time() - still < quiet:
        now = [(p, p.stat().st_mtime_ns) for p in work.glob("*/harness/state.pt")]
        if now != last:
            last, still = now, time.time()
        time.sleep(0.2)


@pytest.mark.timeout(1200)  # up to three launches on a loaded machine
def test_killed_teacher_resumes_from_its_saved_epoch(ray_session, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(SPEC)
    store = tmp_path / "store"
    work = store / "_work" / "fit-diffusion-teacher"
    killed_at = None
    for _ in range(3):  # a loaded machine can time out the embedded Ray's start: launch again
        killed_at, err = launch_and_kill(path, store, work, tmp_path / "stderr.txt")
        if killed_at is not None or "timed out during startup" not in err:
            break
    assert killed_at is not None, f"the run ended before it could be killed: {err[-3000:]}"
    (ckpt,) = work.glob("*/harness/state.pt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["epoch"] >= killed_at and saved["elapsed"] > 0
    with open(ckpt.parent / "config.json") as f:  # the resolved config beside it
        assert json.load(f)["epochs"] == EPOCHS
    committed = [m["kind"] for m in Store(str(store)).manifests()]
    assert committed == ["load-digits"]  # the killed teacher committed nothing

    result = run(Pipeline.from_yaml(str(path)), store=str(store), progress=False)
    assert [s.status for s in result.stages] == ["cached", "ran"]
    teacher = result["teacher"]
    info = Store(str(store)).manifest("fit-diffusion-teacher", teacher.key)["outputs"]["model"]["info"]
    assert info["epochs"] == EPOCHS
    # the re-run began after the last checkpoint it found, not at epoch 0
    history = teacher.metrics
    assert history["start_epoch"] == saved["epoch"] + 1 > 1
    # the time used before the kill counts against max_minutes: it is in train_seconds
    assert info["train_seconds"] >= round(saved["elapsed"], 1)
