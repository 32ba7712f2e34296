"""What a running stage gets from the core: output locations, a metric logger, a progress
reporter, a seed. Stages use nothing else to talk to the outside world.

``StageContext.for_testing(tmp_path)`` builds one for calling a stage directly in a test.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .artifacts import Dataset, Model, Report
from ._internal.board import Board, LocalBoard


def alive_nodes() -> int:
    """The nodes of the Ray cluster this process is connected to (1 without Ray): how a
    stage or the core tells a laptop's one-node Ray from a cluster."""
    import ray
    return sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1


@dataclass
class StageContext:
    name: str                 # the stage's name in the pipeline
    kind: str
    key: str                  # the cache key of the artifact being produced
    seed: int
    staging_dir: str          # outputs are written here, then committed by the core
    work_dir: str             # this node's work directory (on a local store: work_uri)
    board: Board = field(default_factory=LocalBoard)
    num_gpus_available: float = 0.0  # GPUs Ray reports in the cluster
    train_storage: str = ""   # Ray Train's storage_path for checkpoints ("": in work_dir)
    work_uri: str = ""        # survives failed attempts, seen by every node: work_files, shards
    remote_dir: str | None = None  # remote stores: where Ray Data writes the datasets
    _last_progress: float = field(default=0.0, repr=False)

    @classmethod
    def for_testing(cls, root: str, name: str = "test", kind: str = "test", seed: int = 0,
                    num_gpus_available: float = 0.0, board: Board | None = None,
                    key: str = "test") -> "StageContext":
        """A context writing under ``root``. Metrics go to an in-process board, or to
        ``board`` (``pipelines.testing.ray_board()`` collects those logged from Ray
        workers too)."""
        root = str(root)
        return cls(name=name, kind=kind, key=key, seed=seed,
                   staging_dir=os.path.join(root, name, "staging"),
                   work_dir=os.path.join(root, name, "work"),
                   board=board or LocalBoard(), num_gpus_available=num_gpus_available)

    def __post_init__(self):
        if not self.train_storage:
            self.train_storage = os.path.abspath(os.path.join(self.work_dir, "ray_train"))
        if not self.work_uri:
            self.work_uri = os.path.abspath(self.work_dir)

    # -- where outputs go ---------------------------------------------------------
    def output_dir(self, name: str) -> str:
        path = os.path.join(self.staging_dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def write_dataset(self, name: str, data, info: dict | None = None) -> Dataset:
        """Write ``data`` (a ``ray.data.Dataset``, a ``pyarrow.Table`` or a dict of
        numpy arrays) as the parquet output ``name``, with a checksum on every page."""
        from ._internal.writer import write_blocks, write_table
        path = self.output_dir(name)
        if hasattr(data, "write_parquet") and self.remote_dir:  # ray.data.Dataset
            # on a remote store the files go there directly, from this process on one
            # node, from Ray Data's write tasks on whichever nodes of a cluster
            from ._internal.shards import _filesystem
            fs, target, scheme = _filesystem(f"{self.remote_dir}/{name}")
            write_blocks(data, target, fs, scheme=scheme)
            return Dataset(path=path, info=dict(info or {}), uri=f"{scheme}{target}")
        if hasattr(data, "write_parquet"):
            write_blocks(data, path)
        else:
            table = data if hasattr(data, "schema") else numpy_to_arrow(data)
            write_table(table, os.path.join(path, "part-00000.parquet"))
        return Dataset(path=path, info=dict(info or {}))

    def resumable_write(self, name: str, id_column: str = "id"):
        """A dataset output written in shards that survive a failed attempt, for a long
        Ray Data pass over rows with a unique ``id_column``::

            out = ctx.resumable_write("signal")
            ds = expensive(out.remaining(data.read()))   # only the rows not written yet
            return {"signal": out.write(ds, info)}

        See ``pipelines._internal.shards``."""
        from ._internal.shards import ResumableWrite
        return ResumableWrite(self, name, id_column)

    @property
    def work_files(self):
        """Files kept across attempts and nodes (checkpoints, finished pieces of work):
        ``new_file(rel)`` to write, ``put(rel, path)``, ``exists(rel)``, ``get(rel)`` →
        a local path or None. Picklable: hand it to the Ray tasks that produce them. See
        ``pipelines._internal.workfiles``."""
        from ._internal.workfiles import WorkFiles
        return WorkFiles(self.work_uri, self.work_dir)

    def save_model(self, name: str, model, info: dict | None = None, **save_kwargs) -> Model:
        """Save ``model`` with its library's own ``save_pretrained`` as output ``name``."""
        path = self.output_dir(name)
        model.save_pretrained(path, **save_kwargs)
        return Model(path=path, info=dict(info or {}))

    def write_report(self, name: str, metrics: dict[str, float], figures: dict | None = None,
                     info: dict | None = None) -> Report:
        """Metrics (also logged as the stage's metrics) and matplotlib figures."""
        path = self.output_dir(name)
        clean = {k: float(v) for k, v in metrics.items()}
        with open(os.path.join(path, "metrics.json"), "w") as f:
            json.dump(clean, f, indent=2, sort_keys=True)
        for filename, fig in (figures or {}).items():
            fig.savefig(os.path.join(path, filename), dpi=100, bbox_inches="tight")
        self.log_metrics(clean)
        return Report(path=path, info=dict(info or {}))

    def save_figure(self, fig, filename: str) -> str:
        """A plot for people: kept with the artifact and logged to MLflow."""
        path = os.path.join(self.output_dir("_plots"), filename)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        return path

    # -- metrics and progress --------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            v = float(v)
            if math.isnan(v) or math.isinf(v):
                raise FloatingPointError(f"metric '{k}' is {v}" +
                                         (f" at step {step}" if step is not None else ""))
        self.board.log(self.name, {k: float(v) for k, v in metrics.items()}, step)

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        self.log_metrics({name: value}, step)

    def progress(self, done: float, total: float | None = None, unit: str = "rows",
                 force: bool = False) -> None:
        """Report progress; throttled to a few updates per second."""
        now = time.monotonic()
        if not force and now - self._last_progress < 0.25 and (total is None or done < total):
            return
        self._last_progress = now
        self.board.progress(self.name, done, total, unit)

    @property
    def metrics(self) -> dict[str, float]:
        """The last value of every metric logged so far."""
        return self.board.final_metrics(self.name)


def numpy_to_arrow(columns: dict[str, Any]):
    """A pyarrow Table from numpy columns; arrays with more than one dimension become Ray
    Data tensor columns, so ``ray.data.read_parquet`` gives them back as ndarrays."""
    import numpy as np
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray
    arrays = {}
    for name, value in columns.items():
        value = np.asarray(value)
        arrays[name] = ArrowTensorArray.from_numpy(value) if value.ndim > 1 else pa.array(value)
    return pa.table(arrays)
