"""Helpers shared by the speed benchmarks that compare a pipeline stage with a bare
single-process PyTorch loop: sizes, the store, the embedded Ray, medians and spreads.

Sizes: every benchmark has a default sized so the bare work takes at least a minute on a
2-core machine, an example size (the size of the example pipelines, where fixed start-up
costs show), and ``BENCH_TINY=1``, a few seconds of work for checking the code.

Store: ``BENCH_STORE=<dir>`` keeps the generated data, teacher and teacher signal between
invocations (the pipeline cache makes them hits the next time); otherwise one temporary
store per process, shared by the benchmarks of one ``python -m benchmarks`` and removed at
exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STORE: list[str] = []


def tiny() -> bool:
    return os.environ.get("BENCH_TINY", "") not in ("", "0")


def size(name: str, default: int, tiny_default: int) -> int:
    """An integer size knob: the environment variable ``name``, else the tiny or full
    default."""
    value = os.environ.get(name)
    if value:
        return int(value)
    return tiny_default if tiny() else default


def json_document(stdout: str) -> dict:
    """The one JSON document ``distill ... --json`` prints, even when the raylet wrote a
    warning line onto the same stdout before or after it (the document starts at a line
    that is exactly ``{``; anything after its closing brace is ignored)."""
    import json
    start = 0 if stdout.startswith("{") else stdout.find("\n{\n") + 1
    if start == 0 and not stdout.startswith("{"):
        raise ValueError(f"no JSON document in: {stdout[:500]!r}")
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def summary(values: list[float], digits: int = 4) -> tuple[float, list[float]]:
    """Median and spread [min, max]."""
    return (round(statistics.median(values), digits),
            [round(min(values), digits), round(max(values), digits)])


def store() -> str:
    if os.environ.get("BENCH_STORE"):
        return os.path.abspath(os.environ["BENCH_STORE"])
    if not _STORE:
        path = tempfile.mkdtemp(prefix="bench-store-")
        atexit.register(shutil.rmtree, path, True)
        _STORE.append(path)
    return _STORE[0]


def run_pipeline(spec: dict, store_dir: str, force=()) -> tuple[object, float]:
    """``pipelines.run`` in this process (the embedded Ray it starts stays up for the next
    call); returns the result and the wall seconds of the call."""
    from pipelines import Pipeline, run
    pipeline = Pipeline.from_dict(spec)
    t0 = time.perf_counter()
    result = run(pipeline, store=store_dir, force=tuple(force), progress=False)
    seconds = time.perf_counter() - t0
    if not result.ok:
        raise RuntimeError(f"{spec['name']} failed: "
                           f"{[s for s in result.stages if s.status == 'failed']}")
    return result, seconds


def start_ray() -> float:
    """Start the runner's embedded Ray (as ``distill run`` does) if none is up; returns the
    seconds it took (0 when Ray was already up)."""
    import ray
    from pipelines._internal.runner import connect_ray
    if ray.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    connect_ray(None)
    return time.perf_counter() - t0


def example_ray() -> float:
    """For a benchmark that runs an example's stages in its own process: torch at 1 thread
    and an embedded local Ray (at least 4 CPUs, so the actor pools and Ray Train workers
    fit on 2 cores); the GPUs Ray reports."""
    import tempfile

    import ray
    import torch
    torch.set_num_threads(1)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    return ray.cluster_resources().get("GPU", 0.0)


def commit() -> str:
    """The checked-out commit, short."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=root).stdout.strip()


def stop_ray() -> None:
    import ray
    if ray.is_initialized():
        ray.shutdown()


def ray_torch_threads() -> int:
    """torch's intra-op thread count inside a 1-CPU Ray actor, which is what a Ray Data
    map actor and a Ray Train worker of the stages are (Ray sets OMP_NUM_THREADS to the
    actor's CPUs). The bare loops use the same count."""
    import ray

    @ray.remote(num_cpus=1)
    class Probe:
        def threads(self) -> int:
            import torch
            return torch.get_num_threads()

    actor = Probe.remote()
    try:
        return int(ray.get(actor.threads.remote()))
    finally:
        ray.kill(actor)


def mnist1d_spec(name: str, rows: int, teacher_width: int, seed: int = 0,
                 extra: dict | None = None) -> dict:
    """MNIST-1D generated at ``rows`` rows (``data``), a ConvNet1D teacher of width
    ``teacher_width`` (depth 3, as in examples/kd_mnist1d.yaml) trained for one epoch on
    the example's 5000 rows (``teacher``: the benchmarks time its outputs, not its
    quality), and its logits for every row of ``data`` by ``teacher-outputs`` with its
    defaults (one actor, batch size 256): ``signal``."""
    stages = {
        "teacher_data": {"kind": "load-mnist1d"},
        "teacher": {"kind": "fit-classifier", "inputs": {"data": "teacher_data"},
                    "config": {"arch": "convnet1d", "width": teacher_width, "depth": 3,
                               "epochs": 1}},
        "data": {"kind": "load-mnist1d", "config": {"num_samples": rows}},
        "signal": {"kind": "teacher-outputs", "inputs": {"model": "teacher", "data": "data"}},
        **(extra or {}),
    }
    return {"name": name, "seed": seed, "stages": stages}


def load_columns(files: list[str], columns: list[str], train_only: bool = False) -> dict:
    """``pyarrow.parquet.read_table`` of the files into numpy arrays (tensor columns as
    stacked ndarrays): the bare loops' reader."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  registers Ray's tensor extension type for read_table
    from pipelines.artifacts import column_to_numpy
    read = columns + (["split"] if train_only else [])
    table = pq.read_table(files, columns=read,
                          filters=(pc.field("split") == "train") if train_only else None)
    return {c: column_to_numpy(table.column(c)) for c in columns}


def artifact(result, stage: str, output: str | None = None):
    """The committed output artifact (``Dataset`` or ``Model``) of ``stage`` in a run."""
    import json
    from pipelines.artifacts import ARTIFACT_TYPES
    uri = result[stage].uri
    with open(os.path.join(uri, "manifest.json")) as f:
        outputs = json.load(f)["outputs"]
    entry = outputs[output] if output else next(iter(outputs.values()))
    return ARTIFACT_TYPES[entry["type"]].from_manifest(uri, entry)


class torch_threads:
    """``with torch_threads(n):`` torch's intra-op threads set to ``n``, restored after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self.old)
