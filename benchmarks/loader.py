"""Reading teacher outputs for training: ``kd-student``'s loader vs pyarrow into numpy.

Compared, on the teacher signal of ``benchmarks.teacher_generation`` (the same store and
cache keys: MNIST-1D rows with a ConvNet1D teacher's logits, as the stage wrote them):

- the stage's loader, exactly as ``kd-student`` builds it. When the train rows fit
  ``in_memory_mib`` (``held``, the default): the worker reads them with the harness's
  ``Rows`` (``read_share``: pyarrow, only the columns it needs; ``hold_tables``) and draws
  its part of one global permutation per epoch (batches of 64). For a larger table
  (``streamed``): ``signal.read(columns)``, ``filter(split == "train")``,
  ``select_columns``, ``materialize()`` (the stage's ``cache: true``), a
  ``streaming_split(1, equal=True)`` iterator, ``iter_torch_batches(batch_size=64,
  local_shuffle_buffer_size=1024, dtypes=...)``. Every batch consumed (no training). Run
  in this process with the runner's embedded Ray already started. (Until stop 15 the held
  path read through Ray Data in the stage, then ``to_arrow_refs()`` and ``ray.get`` in the
  worker: 0.25 of the bare rows/s, the Ray Data read taking 2.5 s against 0.8 s);
- bare: ``pyarrow.parquet.read_table`` of the same files (same columns, same filter) into
  numpy arrays, then batches of 64 rows of a random permutation as torch tensors.

Figures (each side alternately in every repetition, order swapped every other one):
``median_ratio``: rows/s of one training pass including the read (loader / bare);
``cached_epoch`` (README row): rows/s of a second pass, the rows already in memory (the
held tensors / the numpy arrays); ``streamed_ratio`` (README row): the first figure for
the streamed path; ``example`` (README row): the first figure on the
example's 5000-row signal. Sizes: the signal of ``BENCH_ROWS`` rows (default 300000, 80%
train); reading it is well under a minute of bare work: a parquet read is too fast to
reach a minute without tens of GB on disk. ``BENCH_TINY=1``: 2000 rows.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks import common
from benchmarks.teacher_generation import sizes as teacher_sizes

BATCH_SIZE, SHUFFLE_BUFFER = 64, 1024  # kd-student's defaults
COLUMNS = ["x", "label", "logits"]


def stage_loader(signal, held: bool = True) -> dict:
    import torch
    from ray.data.expressions import col
    from stages.train.rows import Rows
    dtypes = {"x": torch.float32, "label": torch.int64, "logits": torch.float32}
    t0 = time.perf_counter()
    if held:  # one Ray Train worker's rows, as the harness gives them
        rows_in_memory = Rows(dtypes, files=signal.files()).for_worker(0, 1, BATCH_SIZE, "cpu")
    else:
        train = signal.read(columns=COLUMNS + ["split"]).filter(
            expr=col("split") == "train").select_columns(COLUMNS).materialize()
        shard = train.streaming_split(1, equal=True)[0]
    read_s = time.perf_counter() - t0
    passes = []
    for epoch in range(2):
        t = time.perf_counter()
        rows = 0
        batches = (rows_in_memory.batches(epoch) if held else
                   shard.iter_torch_batches(batch_size=BATCH_SIZE, dtypes=dtypes,
                                            local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                            local_shuffle_seed=epoch))
        for batch in batches:
            rows += len(batch["label"])
        passes.append(time.perf_counter() - t)
    return {"rows": rows, "read_s": read_s, "first_s": read_s + passes[0],
            "cached_s": passes[1]}


def bare_loader(signal) -> dict:
    import torch
    t0 = time.perf_counter()
    cols = common.load_columns(signal.files(), COLUMNS, train_only=True)
    read_s = time.perf_counter() - t0
    n = len(cols["label"])
    passes = []
    for epoch in range(2):
        t = time.perf_counter()
        rows = 0
        order = np.random.default_rng(epoch).permutation(n)
        for i in range(0, n, BATCH_SIZE):
            idx = order[i:i + BATCH_SIZE]
            batch = {k: torch.from_numpy(v[idx]) for k, v in cols.items()}
            rows += len(batch["label"])
        passes.append(time.perf_counter() - t)
    return {"rows": rows, "read_s": read_s, "first_s": read_s + passes[0],
            "cached_s": passes[1]}


def run(repetitions: int = 5) -> dict:
    store = common.store()
    ray_start = common.start_ray()
    try:
        signals = {}
        for label, (rows, width) in teacher_sizes().items():
            result, seconds = common.run_pipeline(
                common.mnist1d_spec(f"bench_loader_{label}", rows, width), store)
            signals[label] = common.artifact(result, "signal")
            print(f"  {label}: signal of {rows} rows ready in {seconds:.0f}s", flush=True)
        bare_loader(signals["example"])  # warm-up of the bare side (imports), not timed
        reps = {label: [] for label in signals}
        for i in range(repetitions):
            for label, signal in signals.items():
                sides = [("bare", bare_loader), ("loader", stage_loader),
                         ("streamed", lambda s: stage_loader(s, held=False))]
                k = i % len(sides)
                out = {n: f(signal) for n, f in sides[k:] + sides[:k]}
                b, r, st = out["bare"], out["loader"], out["streamed"]
                assert b["rows"] == r["rows"] == st["rows"], (b["rows"], r["rows"], st["rows"])
                rep = {"rows": b["rows"],
                       **{f"{side}_{k}": round(v, 3) for side, o in out.items()
                          for k, v in o.items() if k != "rows"},
                       "ratio": round(b["first_s"] / r["first_s"], 4),
                       "cached_ratio": round(b["cached_s"] / r["cached_s"], 4),
                       "streamed_ratio": round(b["first_s"] / st["first_s"], 4)}
                reps[label].append(rep)
                print(f"  {label} {i + 1}/{repetitions}: first pass bare {b['first_s']:.2f}s, "
                      f"loader {r['first_s']:.2f}s (read {r['read_s']:.2f}s), ratio "
                      f"{rep['ratio']:.3f}; cached pass bare {b['cached_s']:.2f}s, loader "
                      f"{r['cached_s']:.2f}s", flush=True)
    finally:
        common.stop_ray()
    figures = {}
    for label, r in reps.items():
        median, spread = common.summary([x["ratio"] for x in r])
        cached, cached_spread = common.summary([x["cached_ratio"] for x in r])
        streamed, streamed_spread = common.summary([x["streamed_ratio"] for x in r])
        n = r[0]["rows"]
        figures[label] = {
            "rows": n, "repetitions": r, "median_ratio": median, "spread": spread,
            "cached_ratio": cached, "cached_spread": cached_spread,
            "streamed_ratio": streamed, "streamed_spread": streamed_spread,
            "median_loader_rows_s": round(n / common.summary([x["loader_first_s"] for x in r])[0]),
            "median_bare_rows_s": round(n / common.summary([x["bare_first_s"] for x in r])[0])}
    main, example = figures["main"], figures["example"]
    command = f"python -m benchmarks --only loader --repetitions {repetitions}"
    return {
        "name": "loader",
        "what": f"kd-student's held-rows loader (the harness's Rows: read_share, pyarrow, "
                f"only its columns; hold_tables; global permutation, batches of 64) vs "
                f"pyarrow read_table into "
                f"numpy + batches: "
                f"rows/s of one pass with the read; teacher signal, {main['rows']} train rows",
        "command": command, "median_ratio": main["median_ratio"], "spread": main["spread"],
        "target": "-", "ray_start_s": round(ray_start, 2), "batch_size": BATCH_SIZE,
        "main": main, "example": example,
        "more_rows": [
            {"name": "loader (streamed)",
             "what": "the first row for a share above in_memory_mib: Ray Data read, filter, "
                     "materialize, streaming_split + iter_torch_batches 64 (shuffle buffer "
                     "1024) every epoch",
             "median_ratio": main["streamed_ratio"], "spread": main["streamed_spread"],
             "target": "-", "command": command},
            {"name": "loader (cached pass)",
             "what": "a second pass over the same rows in memory: permuted batches of the "
                     "held tensors / of the numpy arrays, rows/s ratio",
             "median_ratio": main["cached_ratio"], "spread": main["cached_spread"],
             "target": "-", "command": command},
            {"name": "loader (example size)",
             "what": f"the first row on the example's signal ({example['rows']} train rows)",
             "median_ratio": example["median_ratio"], "spread": example["spread"],
             "target": "-", "command": command}],
    }
