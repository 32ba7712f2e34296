"""Where the orchestration itself stops scaling: the rates of the core's own parts, for the
README's "Sizing a real run".

Measured in one process on the embedded Ray (the figures are per part, not ratios):

- ``sha256_mb_s``: ``fetch.sha256_of`` over a 512 MiB file. A commit hashes every byte a
  stage wrote once (``describe_output``, on the node that wrote it) and every node that
  reads a file verifies it once: a stage's output of B bytes costs B / this rate of one
  core at its commit;
- ``commit_s`` and ``manifests_s``: ``Store.commit`` of ``BENCH_ARTIFACTS`` (default 500)
  one-file datasets (staging written, described, manifest written last, renamed), and
  ``Store.manifests()`` over all of them afterwards (what ``distill ls`` and ``gc`` read);
- ``manifest_files_s``: ``describe_output`` of one dataset of ``BENCH_FILES`` (default
  2000) small parquet files (a pass written in many shards): the manifest's cost per file;
- ``board_log_ms`` / ``board_progress_per_s``: a Ray task's ``RayBoard.log`` round trip
  (a stage's metrics, once an epoch) and fire-and-forget ``progress`` calls per second
  reaching the driver's board actor;
- ``mlflow_metrics_per_s`` / ``mlflow_stage_run_s``: the tracker's ``log_metrics`` into a
  fresh sqlite store (batches of 900), and one stage run's create + params + end;
- ``writer_ms_per_block``: ``pipelines._internal.writer.write_blocks`` of a dataset of
  1000 small blocks (1000 rows each): the fixed cost per parquet file written.

``BENCH_TINY=1``: 64 MiB, 50 artifacts, 200 files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks import common


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def hashing(work: str) -> dict:
    from pipelines._internal.fetch import sha256_of
    mib = common.size("BENCH_HASH_MIB", 512, 64)
    path = os.path.join(work, "big.bin")
    with open(path, "wb") as f:
        block = np.random.default_rng(0).bytes(1 << 20)
        for _ in range(mib):
            f.write(block)
    sha256_of(path)  # warm the page cache: the figure is the hash, not the disk
    seconds, _ = timed(lambda: sha256_of(path))
    os.remove(path)
    return {"sha256_mb_s": round(mib * 1.048576 / seconds, 1), "hashed_mib": mib}


def commits(work: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pipelines._internal.store import Store, describe_output
    store = Store.open(os.path.join(work, "store"))
    n = common.size("BENCH_ARTIFACTS", 500, 50)
    table = pa.table({"id": np.arange(100), "v": np.ones(100, np.float32)})

    def commit_all():
        for i in range(n):
            key = f"{i:064x}"
            staging = store.new_staging_dir("bench", key)
            os.makedirs(os.path.join(staging, "data"))
            pq.write_table(table, os.path.join(staging, "data", "part-00000.parquet"))
            outputs = {"data": describe_output(os.path.join(staging, "data"), "dataset",
                                               staging, {})}
            store.commit(staging, {"kind": "bench", "key": key, "outputs": outputs})

    commit_s, _ = timed(commit_all)
    manifests_s, found = timed(store.manifests)
    assert len(found) == n
    files = common.size("BENCH_FILES", 2000, 200)
    many = os.path.join(work, "many")
    os.makedirs(many)
    for i in range(files):
        pq.write_table(table, os.path.join(many, f"part-{i:05d}.parquet"))
    describe_s, entry = timed(lambda: describe_output(many, "dataset", work, {}))
    assert entry["rows"] == 100 * files
    return {"artifacts": n, "commit_s": round(commit_s / n, 4),
            "manifests_s": round(manifests_s, 3), "files": files,
            "manifest_files_s": round(describe_s / files, 5)}


def board() -> dict:
    import ray
    from pipelines._internal.board import RayBoard, start_board_actor
    handle = RayBoard(start_board_actor())

    @ray.remote(num_cpus=0)
    def use(b, logs: int, updates: int):
        t0 = time.perf_counter()
        for i in range(logs):
            b.log("s", {"loss": float(i)}, i)
        log_s = (time.perf_counter() - t0) / logs
        t0 = time.perf_counter()
        for i in range(updates):
            b.progress("s", i, updates, "rows")
        b.final_metrics("s")  # waits until every update before it has arrived
        return log_s, updates / (time.perf_counter() - t0)

    ray.get(use.remote(handle, 10, 10))  # warm-up
    log_s, per_s = ray.get(use.remote(handle, 500, 5000))
    return {"board_log_ms": round(log_s * 1000, 3), "board_progress_per_s": round(per_s)}


def mlflow(work: str) -> dict:
    from pipelines._internal.tracking import Tracker
    tracker = Tracker(f"sqlite:///{work}/mlflow/mlflow.db", "bench", work)
    parent = tracker.start_parent("bench", {"a": 1}, {})
    config = {f"field_{i}": i for i in range(40)}
    runs = 20

    def stage_runs():
        for i in range(runs):
            run = tracker.start_stage(parent, f"s{i}", "bench", f"{i:064x}", config, "ran")
            tracker.end(run, "FINISHED")

    stage_s, _ = timed(stage_runs)
    run = tracker.start_stage(parent, "metrics", "bench", "0" * 64, config, "ran")
    history = [(f"m{i % 10}", float(i), i // 10) for i in range(20_000)]
    metrics_s, _ = timed(lambda: tracker.log_metrics(run, history))
    return {"mlflow_stage_run_s": round(stage_s / runs, 4),
            "mlflow_metrics_per_s": round(len(history) / metrics_s)}


def writer(work: str) -> dict:
    import pyarrow as pa
    import ray
    from pipelines._internal.writer import write_blocks
    blocks = 1000
    table = pa.table({"id": np.arange(blocks * 1000), "v": np.ones(blocks * 1000, np.float32)})
    ds = ray.data.from_arrow(table).repartition(blocks).materialize()
    seconds, _ = timed(lambda: write_blocks(ds, os.path.join(work, "written")))
    return {"writer_ms_per_block": round(seconds / blocks * 1000, 3), "blocks": blocks}


def run(repetitions: int = 1) -> dict:
    work = tempfile.mkdtemp(prefix="bench-orch-")
    common.start_ray()
    try:
        figures = {**hashing(work), **commits(work), **board(), **mlflow(work),
                   **writer(work)}
    finally:
        common.stop_ray()
        shutil.rmtree(work, ignore_errors=True)
    print("  " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)
    return {"name": "orchestration",
            "what": "rates of the core's own parts (hashing, commits, board, MLflow, writer)",
            "command": "python -m benchmarks --only orchestration", "commit": common.commit(),
            **figures}
