"""A stage run in a subprocess, SIGKILLed once its harness checkpoint holds an epoch >= 1:
the resume tests of the student stages."""

import os
import signal
import subprocess
import sys
import time

import torch

from stages.train.drivers import CHECKPOINT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def saved(path) -> dict | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, EOFError, RuntimeError, TypeError):
        return None


def stage_script(stage, name: str, config: dict) -> str:
    """The script ``kill_after_first_epoch`` runs: ``stage`` (a stage class) with
    ``config``, as stage ``name`` in the work dir ``sys.argv[1]``, on the teacher folder
    ``sys.argv[2]``, one torch thread, seed 0."""
    return f"""
import sys
import torch
torch.set_num_threads(1)
from pipelines.context import StageContext
from pipelines.stage import Model
from {stage.__module__} import {stage.__name__}
ctx = StageContext.for_testing(sys.argv[1], name={name!r}, kind={stage.kind!r}, seed=0)
{stage.__name__}({config!r}).run(ctx, teacher=Model(path=sys.argv[2], info={{}}))
"""


def kill_after_first_epoch(ctx, script: str, args: list[str], err_file, timeout=300) -> dict:
    """Run ``python -c script *args``; kill it once ``ctx``'s checkpoint holds epoch >= 1;
    returns the last checkpoint written before the kill."""
    with open(err_file, "w") as err:  # a file: a full pipe would block it
        proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)
    deadline, state = time.time() + timeout, None
    try:
        while time.time() < deadline and proc.poll() is None:
            path = ctx.work_files.get(CHECKPOINT)
            state = saved(path) if path else None
            if state is not None and state["epoch"] >= 1:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert state is not None and state["epoch"] >= 1, open(err_file).read()[-2000:]
    return saved(ctx.work_files.get(CHECKPOINT))
