"""A teacher-training stage (``fit-classifier``, trained in the stage's own Ray task) vs
the same loop in a bare process using every core.

The stage is examples/kd_mnist1d.yaml's teacher: a ConvNet1D of width 128, depth 3,
30 epochs, AdamW at lr 1e-3, batch 64, on MNIST-1D rows (80% train, of which 10% are
held out and scored every epoch): ``BENCH_ROWS`` rows (default 20000, so that the bare
loop takes about a minute on 2 cores, as every benchmark's main size) and the example's
5000 rows (``example`` in the JSON and its own README row, where fixed costs weigh more).

- pipeline: ``pipelines.run(..., force=["teacher"])`` in this process, the embedded Ray
  already started: the stage's Ray task reads the train rows, trains through the harness
  in its own process (torch at ``train_threads``: the CPUs it holds plus those free, at
  most the cores: ``stages.models.device.loop_threads``), checkpoints every epoch, saves
  the model; the runner commits and tracks it. Timed: the whole ``run()`` call.
- bare loop: one process at one torch thread per core, the train rows read with pyarrow,
  the same network (``cfg.build``), optimiser (``cfg.adamw``), validation split, batches
  of one permutation per epoch (last partial batch dropped, as the harness does) and the
  validation accuracy every epoch; no checkpoints.

The figure: bare seconds / pipeline seconds (the pipeline's speed as a share of the bare
loop's), both sides alternately in every repetition, median and spread. Before issue 26
the stage's task ran torch at Ray's one thread per reserved CPU: about 0.5 on 2 cores.
``BENCH_TINY=1``: 3 epochs, width 16.
"""

from __future__ import annotations

import os
import time

from benchmarks import common


def config() -> dict:
    return {"arch": "convnet1d", "width": common.size("BENCH_TEACHER_WIDTH", 128, 16),
            "depth": 3, "epochs": common.size("BENCH_EPOCHS", 30, 3), "lr": 1e-3}


def sizes() -> dict:
    return {"main": common.size("BENCH_ROWS", 20_000, 2_000), "example": 5000}


def spec(rows: int) -> dict:
    return {"name": f"bench_teacher_training_{rows}", "seed": 0, "stages": {
        "data": {"kind": "load-mnist1d", "config": {"num_samples": rows}},
        "teacher": {"kind": "fit-classifier", "inputs": {"data": "data"}, "config": config()}}}


def bare_training(data, threads: int, seed: int = 0, epochs: int | None = None) -> dict:
    """fit-classifier's loop, written out: read, split, train, validate every epoch."""
    import torch
    import torch.nn.functional as F
    from stages.models.classifiers import predict_logits
    from stages.teacher.fit_classifier import FitClassifier

    cfg = FitClassifier.Config(**{**config(), **({"epochs": epochs} if epochs else {})})
    with common.torch_threads(threads):
        t0 = time.perf_counter()
        cols = common.load_columns(data.files(), ["x", "label"], train_only=True)
        x = torch.tensor(cols["x"], dtype=torch.float32)
        y = torch.tensor(cols["label"], dtype=torch.int64)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_val = int(len(y) * cfg.val_fraction)
        val, train = order[:n_val], order[n_val:]
        x_train, y_train = x[train], y[train]
        torch.manual_seed(seed)
        model = cfg.build(x.shape[1:], 10, "bench")
        opt = cfg.adamw(model)
        steps = len(y_train) // cfg.batch_size
        accuracy = 0.0
        for epoch in range(cfg.epochs):
            model.train()
            perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(seed + epoch))
            for idx in perm.split(cfg.batch_size)[:steps]:
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            accuracy = (predict_logits(model, x[val]).argmax(1) == y[val]).float().mean().item()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "val_accuracy": accuracy}


def run(repetitions: int = 5) -> dict:
    store = common.store()
    ray_start = common.start_ray()
    threads = os.cpu_count() or 1
    figures = {}
    try:
        for label, rows in sizes().items():
            result, setup_s = common.run_pipeline(spec(rows), store)
            data = common.artifact(result, "data")
            bare_training(data, threads, epochs=1)  # warm-up (imports, kernels), not timed
            reps = []
            for i in range(repetitions):
                def bare():
                    return bare_training(data, threads)

                def pipeline():
                    result, seconds = common.run_pipeline(spec(rows), store, force=["teacher"])
                    st = result["teacher"]
                    assert st.status == "ran", st
                    info = common.artifact(result, "teacher").info  # the trained metrics
                    return {"seconds": seconds, "stage_s": st.seconds,
                            "train_threads": info.get("train_threads"),
                            "val_accuracy": info.get("val_accuracy")}

                sides = [("bare", bare), ("pipeline", pipeline)]
                out = dict((n, f()) for n, f in (sides if i % 2 == 0 else sides[::-1]))
                b, p = out["bare"], out["pipeline"]
                reps.append({"bare_s": round(b["seconds"], 2), "run_s": round(p["seconds"], 2),
                             "stage_s": round(p["stage_s"], 2),
                             "ratio": round(b["seconds"] / p["seconds"], 4),
                             "train_threads": p["train_threads"],
                             "bare_val_accuracy": round(b["val_accuracy"], 4),
                             "stage_val_accuracy": p["val_accuracy"]})
                print(f"  {label} {i + 1}/{repetitions}: bare {b['seconds']:.1f}s, stage run "
                      f"{p['seconds']:.1f}s (train_threads {p['train_threads']}), "
                      f"ratio {reps[-1]['ratio']:.3f}", flush=True)
            median, spread = common.summary([r["ratio"] for r in reps])
            figures[label] = {"rows": rows, "setup_s": round(setup_s, 1), "repetitions": reps,
                              "median_ratio": median, "spread": spread,
                              "median_bare_s": common.summary([r["bare_s"] for r in reps], 2)[0],
                              "median_run_s": common.summary([r["run_s"] for r in reps], 2)[0]}
    finally:
        common.stop_ray()
    cfg, main, example = config(), figures["main"], figures["example"]
    command = f"python -m benchmarks --only teacher_training --repetitions {repetitions}"
    what = (f"fit-classifier (examples/kd_mnist1d.yaml's teacher: ConvNet1D width "
            f"{cfg['width']}, {cfg['epochs']} epochs) trained in its stage's task, whole "
            f"run(), vs the same loop bare at {threads} torch threads: speed ratio (bare s / "
            f"pipeline s)")
    return {
        "name": "teacher_training", "what": f"{what}; {main['rows']} MNIST-1D rows",
        "command": command, "median_ratio": main["median_ratio"], "spread": main["spread"],
        "target": ">= 0.9 (issue 26)", "met": main["median_ratio"] >= 0.9,
        "bare_threads": threads, "ray_start_s": round(ray_start, 2), "config": cfg,
        "main": main, "example": example,
        "more_rows": [{"name": "teacher_training (example size)",
                       "what": f"as above on the example's {example['rows']} rows (bare median "
                               f"{example['median_bare_s']} s, stage run "
                               f"{example['median_run_s']} s)",
                       "median_ratio": example["median_ratio"], "spread": example["spread"],
                       "target": "- (fixed costs visible)", "command": command}],
    }
