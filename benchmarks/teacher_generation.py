"""Teacher generation through the ``teacher-outputs`` stage vs a bare PyTorch loop.

Compared, on MNIST-1D rows (``load-mnist1d``) and a ConvNet1D teacher (``fit-classifier``,
depth 3), with the stage's defaults (``actors: auto``, batch size 256, float32 logits):

- pipeline: ``pipelines.run(..., force=["signal"])`` in this process, the embedded Ray
  already started (its start-up is recorded once as ``ray_start_s``): the stage reads the
  data with Ray Data, maps it through a pool of ``TeacherActor`` s and writes parquet, and
  the runner commits the artifact and tracks it in MLflow. Timed: the whole ``run()``
  call (``run_s``; the runner's own figure for the stage is ``stage_s``);
- bare loop: one process, ``pyarrow.parquet.read_table`` of the same input files into
  numpy, the teacher loaded with the same ``load_classifier``, logits computed batch by
  batch (same batch size) into a numpy array in memory; torch at one thread per core of
  the machine (``torch_threads``): the bare loop uses every core, as a user's script
  would.

The figure is rows/s of the pipeline over rows/s of the bare loop (= bare seconds /
pipeline seconds), both sides run alternately in every repetition (order swapped every
other one), median and spread over the repetitions. The bare logits are checked against
the stage's parquet output (``max_abs_diff``). Sizes: ``BENCH_ROWS`` rows (default
300000) and a teacher of width ``BENCH_TEACHER_WIDTH`` (default 256), so that the bare loop
takes about a minute or more on 2 cores; the example size (``example`` in the JSON and its
own README row) is that of the MNIST-1D example (examples/kd_mnist1d.yaml's data and
teacher): 5000 rows and a width-32 teacher, where the fixed start-up costs show. ``BENCH_TINY=1``: 2000 rows, width 32.

Also (``parquet_write`` in the JSON and a README row): parquet write throughput, MB/s of the
in-memory Arrow bytes, of the stage's writer (``ctx.write_dataset`` of a materialized
Dataset holding the stage's output arrays, as many blocks as the stage wrote files:
``pipelines._internal.writer``) against ``pyarrow.parquet.write_table`` of the same
arrays as one table with pyarrow's defaults, alternately.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from benchmarks import common

EXAMPLE_ROWS, EXAMPLE_WIDTH = 5000, 32
BATCH_SIZE = 256  # teacher-outputs' default batch_size


def sizes() -> dict:
    return {"main": (common.size("BENCH_ROWS", 300_000, 2_000),
                     common.size("BENCH_TEACHER_WIDTH", 256, 32)),
            "example": (EXAMPLE_ROWS, EXAMPLE_WIDTH)}


def bare_generation(data, model, threads: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds to read the input into memory and compute every row's logits; the ids and
    the logits."""
    import torch
    from stages.models.classifiers import load_classifier
    with common.torch_threads(threads):
        t0 = time.perf_counter()
        cols = common.load_columns(data.files(), ["id", "x"])
        teacher = load_classifier(model.path).eval()
        x = cols["x"]
        out = np.empty((len(x), teacher.num_classes), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(x), BATCH_SIZE):
                out[i:i + BATCH_SIZE] = teacher(torch.from_numpy(x[i:i + BATCH_SIZE])).numpy()
        seconds = time.perf_counter() - t0
    return seconds, cols["id"], out


def check_outputs(signal, ids: np.ndarray, logits: np.ndarray) -> float:
    """Largest |stage logit - bare logit| over all rows (matched by id)."""
    got = signal.to_numpy(["id", "logits"])
    order, ref = np.argsort(got["id"]), np.argsort(ids)
    assert np.array_equal(got["id"][order], ids[ref]), "the stage's ids differ from the input's"
    return float(np.abs(got["logits"][order] - logits[ref]).max())


def parquet_write(signal, repetitions: int) -> dict:
    """The stage's writer (``ctx.write_dataset`` of a Ray Dataset: ``write_parquet``) vs
    ``pyarrow.parquet.write_table``, both writing the arrays of the stage's last output
    (read back into memory first, not timed; in Ray's object store as many blocks as
    the stage wrote files)."""
    import pyarrow.parquet as pq
    import ray
    from pipelines.context import StageContext

    work = tempfile.mkdtemp(prefix="bench-write-")
    try:
        table = signal.to_arrow()
        files = len(signal.files())
        ds = ray.data.from_arrow(table).repartition(max(files, 1)).materialize()
        mb = table.nbytes / 1e6
        rows = []
        for i in range(repetitions):
            def ray_side():
                out = os.path.join(work, f"ray{i}")
                ctx2 = StageContext.for_testing(out, name="w", kind="teacher-outputs")
                t0 = time.perf_counter()
                written = ctx2.write_dataset("signal", ds)
                return time.perf_counter() - t0, written.files()

            def bare_side():
                os.makedirs(os.path.join(work, f"pq{i}"))
                path = os.path.join(work, f"pq{i}", "part-00000.parquet")
                t0 = time.perf_counter()
                pq.write_table(table, path)
                return time.perf_counter() - t0, [path]

            sides = [("bare", bare_side), ("ray", ray_side)]
            timed = dict((name, fn()) for name, fn in (sides if i % 2 == 0 else sides[::-1]))
            r_s, r_files = timed["ray"]
            b_s, b_files = timed["bare"]
            rows.append({"ray_s": round(r_s, 3), "bare_s": round(b_s, 3),
                         "ray_mb_s": round(mb / r_s, 2), "bare_mb_s": round(mb / b_s, 2),
                         "ratio": round(b_s / r_s, 4), "ray_files": len(r_files),
                         "ray_file_mb": round(sum(map(os.path.getsize, r_files)) / 1e6, 2),
                         "bare_file_mb": round(sum(map(os.path.getsize, b_files)) / 1e6, 2)})
            print(f"  parquet write {i + 1}/{repetitions}: ray {mb / r_s:.1f} MB/s "
                  f"({len(r_files)} files), pyarrow {mb / b_s:.1f} MB/s", flush=True)
        median, spread = common.summary([r["ratio"] for r in rows])
        return {"rows": table.num_rows, "arrow_mb": round(mb, 2), "blocks": ds.num_blocks(),
                "repetitions": rows, "median_ratio": median, "spread": spread,
                "median_ray_mb_s": common.summary([r["ray_mb_s"] for r in rows], 2)[0],
                "median_bare_mb_s": common.summary([r["bare_mb_s"] for r in rows], 2)[0]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(repetitions: int = 5) -> dict:
    store = common.store()
    ray_start = common.start_ray()
    try:
        threads = os.cpu_count() or 1
        setups = {}
        for label, (rows, width) in sizes().items():  # data, teacher, signal: not timed
            spec = common.mnist1d_spec(f"bench_teacher_{label}", rows, width)
            result, seconds = common.run_pipeline(spec, store)
            setups[label] = {"spec": spec, "rows": rows, "width": width,
                             "data": common.artifact(result, "data"),
                             "model": common.artifact(result, "teacher"),
                             "setup_s": round(seconds, 1)}
            print(f"  {label}: {rows} rows, teacher width {width}, set up in {seconds:.0f}s",
                  flush=True)
        ex = setups["example"]  # warm-up of the bare side (imports, torch kernels), not timed
        bare_generation(ex["data"], ex["model"], threads)
        reps = {label: [] for label in setups}
        for i in range(repetitions):
            for label, s in setups.items():
                def bare():
                    seconds, ids, logits = bare_generation(s["data"], s["model"], threads)
                    s["bare_out"] = (ids, logits)
                    return seconds, None

                def pipeline():
                    result, seconds = common.run_pipeline(s["spec"], store, force=["signal"])
                    assert result["signal"].status == "ran", result["signal"]
                    s["signal"] = common.artifact(result, "signal")
                    return seconds, result["signal"].seconds

                sides = [("bare", bare), ("pipeline", pipeline)]
                timed = dict((n, f()) for n, f in (sides if i % 2 == 0 else sides[::-1]))
                bare_s, run_s, stage_s = timed["bare"][0], *timed["pipeline"]
                n = s["rows"]
                reps[label].append({
                    "bare_s": round(bare_s, 2), "run_s": round(run_s, 2),
                    "stage_s": round(stage_s, 2), "bare_rows_s": round(n / bare_s),
                    "pipeline_rows_s": round(n / run_s), "ratio": round(bare_s / run_s, 4)})
                print(f"  {label} {i + 1}/{repetitions}: bare {bare_s:.1f}s "
                      f"({n / bare_s:.0f} rows/s), pipeline {run_s:.1f}s "
                      f"({n / run_s:.0f} rows/s; stage {stage_s:.1f}s), "
                      f"ratio {bare_s / run_s:.3f}", flush=True)
        figures = {}
        for label, s in setups.items():
            median, spread = common.summary([r["ratio"] for r in reps[label]])
            figures[label] = {
                "rows": s["rows"], "teacher_width": s["width"], "setup_s": s["setup_s"],
                "repetitions": reps[label], "median_ratio": median, "spread": spread,
                "median_bare_s": common.summary([r["bare_s"] for r in reps[label]], 2)[0],
                "median_run_s": common.summary([r["run_s"] for r in reps[label]], 2)[0],
                "median_stage_s": common.summary([r["stage_s"] for r in reps[label]], 2)[0],
                "median_over_bare_s": common.summary(
                    [r["run_s"] - r["bare_s"] for r in reps[label]], 2)[0],
                "spread_over_bare_s": common.summary(
                    [r["run_s"] - r["bare_s"] for r in reps[label]], 2)[1],
                "max_abs_diff": check_outputs(s["signal"], *s["bare_out"])}
        write = parquet_write(setups["main"]["signal"], repetitions)
    finally:
        common.stop_ray()
    main, example = figures["main"], figures["example"]
    command = f"python -m benchmarks --only teacher_generation --repetitions {repetitions}"
    return {
        "name": "teacher_generation",
        "what": f"teacher-outputs stage (actors auto, parquet written, run through "
                f"pipelines.run) vs a bare torch loop in memory at {threads} threads: "
                f"rows/s ratio; "
                f"{main['rows']} MNIST-1D rows, ConvNet1D teacher width {main['teacher_width']}",
        "command": command,
        "median_ratio": main["median_ratio"], "spread": main["spread"],
        "target": "ratio >= 0.95 (issue 26)",
        "met": main["median_ratio"] >= 0.95,
        "torch_threads": threads, "batch_size": BATCH_SIZE, "ray_start_s": round(ray_start, 2),
        "bare_at_least_60s": main["median_bare_s"] >= 60,
        "main": main, "example": example, "parquet_write": write,
        "more_rows": [
            {"name": "teacher_generation (example size)",
             "what": f"as above at the size of the MNIST-1D example: {example['rows']} "
                     f"rows, teacher width {example['teacher_width']}: seconds of the whole "
                     f"run() over the bare loop's (bare median {example['median_bare_s']} s; "
                     f"rows/s ratio {example['median_ratio']})",
             "median_ratio": example["median_over_bare_s"],
             "spread": example["spread_over_bare_s"],
             "target": "<= 1.5 s over bare (issue 26)", "command": command},
            {"name": "parquet write",
             "what": f"MB/s of the stage's writer (ctx.write_dataset: pyarrow per block in "
                     f"the stage's process, pipelines._internal.writer; the stage's output "
                     f"arrays, {write['arrow_mb']} MB in "
                     f"{write['blocks']} blocks) / pyarrow.parquet.write_table of the same "
                     f"arrays",
             "median_ratio": write["median_ratio"], "spread": write["spread"],
             "target": ">= 0.8 (issue 26)", "command": command}],
    }
