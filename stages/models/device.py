"""Where a stage's torch work runs."""

from __future__ import annotations

import os
from contextlib import contextmanager

from pipelines.context import alive_nodes
from stages.lazy import lazy

torch = lazy("torch")


def device() -> torch.device:
    """The GPU Ray gave this process, else the CPU. Ray sets ``CUDA_VISIBLE_DEVICES`` for a
    task or actor that reserved a GPU (a stage's ``resources.num_gpus``, a GPU actor of Ray
    Data, a ``use_gpu`` Ray Train worker), so a process without one sees no CUDA device."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def loop_threads(held: float, free: float, cores: int) -> int:
    """torch threads for a loop in the stage's own Ray task: the CPUs the task holds plus
    those free on its (one-node) Ray when it starts, at most the node's cores. Ray starts a
    task with one thread per CPU it reserved (one for a stage, none for a coordinator),
    which left the other cores idle while a teacher trained."""
    return max(1, min(int(held + free), cores))


def task_threads() -> int | None:
    """``loop_threads`` inside a Ray task; None in a driver (a test, a benchmark), whose
    own setting stays. For any torch loop a stage runs in its own task (training, a
    small teacher pass)."""
    import ray
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray._private.worker.WORKER_MODE:
        return None
    held = context.get_assigned_resources().get("CPU", 0.0)
    free = ray.available_resources().get("CPU", 0.0) if alive_nodes() == 1 else 0.0
    return loop_threads(held, free, os.cpu_count() or 1)


@contextmanager
def task_torch_threads():
    """torch at ``task_threads()`` threads inside the block, restored after; yields the
    count in use (what a stage reports)."""
    threads, before = task_threads(), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield threads or before
    finally:
        torch.set_num_threads(before)
