"""Where running stages send metrics and progress.

The driver owns the board; stage tasks (and the Ray Train workers they launch) write to
it; the driver reads it to draw progress and to log metrics to MLflow. Only the driver
talks to MLflow.
"""

from __future__ import annotations

import time
from typing import Protocol


class Board(Protocol):
    def log(self, stage: str, metrics: dict[str, float], step: int | None) -> None: ...
    def progress(self, stage: str, done: float, total: float | None, unit: str) -> None: ...
    def final_metrics(self, stage: str) -> dict[str, float]: ...


class LocalBoard:
    """In-process board: used by unit tests and inside the driver's actor."""

    def __init__(self):
        self.history: dict[str, list[tuple[str, float, int | None]]] = {}
        self.progress_: dict[str, dict] = {}
        self.gate_: tuple[bool, str] | None = None

    def open_gate(self, ok: bool, message: str = "") -> None:
        """A sweep's shared stages ended (``ok``, or failed with ``message``): its trials,
        started meanwhile, go on (``gate``)."""
        self.gate_ = (ok, message)

    def gate(self) -> tuple[bool, str] | None:
        """None while the sweep's shared stages run."""
        return self.gate_

    def log(self, stage, metrics, step):
        self.history.setdefault(stage, []).extend((k, v, step) for k, v in metrics.items())

    def progress(self, stage, done, total, unit):
        self.progress_[stage] = {"done": done, "total": total, "unit": unit, "time": time.time()}

    def final_metrics(self, stage):
        return {k: v for k, v, _ in self.history.get(stage, [])}

    def history_of(self, stage):
        return list(self.history.get(stage, []))

    def snapshot(self):
        return {"progress": dict(self.progress_)}

    def take_history(self, stage):
        """The stage's metric history, cleared: a retried attempt starts afresh."""
        self.progress_.pop(stage, None)
        return self.history.pop(stage, [])


class RayBoard:
    """A picklable handle on the driver's board actor. Metric logs wait for the actor
    (rare, and must not be lost); progress updates are fire-and-forget."""

    def __init__(self, actor):
        self.actor = actor

    def log(self, stage, metrics, step):
        import ray
        ray.get(self.actor.log.remote(stage, metrics, step))

    def progress(self, stage, done, total, unit):
        self.actor.progress.remote(stage, done, total, unit)

    def final_metrics(self, stage):
        import ray
        return ray.get(self.actor.final_metrics.remote(stage))

    def history(self, stage) -> list[tuple[str, float, int | None]]:
        """Every (metric, value, step) logged for ``stage`` (read without clearing)."""
        import ray
        return ray.get(self.actor.history_of.remote(stage))


def start_board_actor():
    """The run's board, on the driver's own node: it shares the driver's fate, so a worker
    node that dies mid-run (taking its stages' work with it, to be retried) never takes the
    board, and with it the run, down too."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    Actor = ray.remote(num_cpus=0, max_concurrency=4, scheduling_strategy=here)(LocalBoard)
    return Actor.remote()
