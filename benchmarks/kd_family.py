"""The knowledge-distillation family's acceptance figures, each measured by running the
example pipelines through the real runner (embedded Ray, parquet store, MLflow):

1. mnist1d (examples/kd_mnist1d.yaml): test accuracy of the KD student and of the
   CE-only student, the same MLP trained on the same teacher-labelled views (the
   ``reinforce`` stage) for the same steps, for max(3, repetitions) pipeline seeds
   (seed 0, 1, ...); mean ± std and the mean difference (target: KD beats CE by >= 2
   points).
2. embeddings (examples/kd_embeddings.yaml): the 2-layer student's cosine to the
   all-MiniLM-L6-v2 teacher, top-10 neighbour overlap and speed-up on held-out sentences
   (targets: >= 0.90, >= 0.6, >= 2.5x).
3. language model (examples/kd_lm.yaml): held-out perplexity of the KD student vs the
   CE-only student (target: KD lower).
4. The teacher signal is produced once: in every run above the signal stage
   (``reinforce`` for mnist1d, ``teacher_outputs`` otherwise) ran once; then a third
   student is added to the mnist1d pipeline and the re-run finds the teacher and its
   signal cached.

``KD_BENCH_STORE=<dir>`` reuses a store, so stages already run there are cache hits.
Plots (training curves of the students, the evaluation figures) are copied from the
store's reports and the MLflow metric history into benchmarks/results/kd_family/.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
PLOTS = os.path.join(ROOT, "benchmarks", "results", "kd_family")


def run_example(name: str, store: str, seed: int | None = None, extra: dict | None = None,
                overrides=()):
    from pipelines import Pipeline, run
    with open(os.path.join(EXAMPLES, name)) as f:
        spec = yaml.safe_load(f)
    if seed is not None:
        spec["seed"] = seed
    spec["stages"].update(extra or {})
    result = run(Pipeline.from_dict(spec, overrides), store=store, progress=False)
    if not result.ok:
        raise RuntimeError(f"{name} failed: {[s for s in result.stages if s.status == 'failed']}")
    return result


def statuses(result) -> dict:
    return {s.name: s.status for s in result.stages}


def training_curves(result, names: list[str], title: str, filename: str) -> None:
    """train_loss per epoch of the named stages, from their MLflow runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{os.path.join(result.store, 'mlflow', 'mlflow.db')}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    by_name = {r.data.tags.get("mlflow.runName"): r.info.run_id for r in runs}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in names:
        if name in by_name:
            hist = client.get_metric_history(by_name[name], "train_loss")
            ax.plot([m.step + 1 for m in hist], [m.value for m in hist], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    fig.savefig(os.path.join(PLOTS, filename), dpi=100, bbox_inches="tight")
    plt.close(fig)


def copy_figures(result, stage: str, prefix: str) -> None:
    report = os.path.join(result[stage].uri, "report")
    for f in os.listdir(report):
        if f.endswith(".png"):
            shutil.copy(os.path.join(report, f), os.path.join(PLOTS, f"{prefix}_{f}"))


def run(repetitions: int = 3) -> dict:
    os.makedirs(PLOTS, exist_ok=True)
    seeds = list(range(max(repetitions, 3)))
    out: dict = {"name": "kd_family", "signal_once": {}}
    # KD_BENCH_STORE: a store to reuse (stages already there are cache hits, with the
    # metrics they were measured with); by default a fresh temporary store
    with tempfile.TemporaryDirectory(prefix="bench-kd-") as tmp:
        store = os.environ.get("KD_BENCH_STORE", tmp)
        # 1 + 4. mnist1d over seeds; then a third student on the same signal
        rows = []
        for seed in seeds:
            r = run_example("kd_mnist1d.yaml", store, seed=seed)
            rows.append({"seed": seed, "kd": r["eval_kd"].metrics["accuracy"],
                         "ce": r["eval_ce"].metrics["accuracy"],
                         "teacher": r["eval_kd"].metrics["teacher_accuracy"]})
            out["signal_once"][f"mnist1d_seed{seed}"] = statuses(r)["reinforce"]
            print(f"  mnist1d seed {seed}: {rows[-1]}", flush=True)
        training_curves(r, ["student_kd", "student_ce"], "mnist1d students", "mnist1d_curves.png")
        copy_figures(r, "eval_kd", "mnist1d_kd")
        third = {"student_taid": {"kind": "kd-student", "inputs": {"signal": "reinforce"},
                                  "config": {"arch": "mlp", "hidden": [256, 256], "epochs": 8,
                                             "lr": 1e-3, "loss": "taid"}}}
        r = run_example("kd_mnist1d.yaml", store, seed=seeds[-1], extra=third)
        out["second_student"] = {k: v for k, v in statuses(r).items()
                                 if k in ("teacher", "reinforce", "student_taid")}
        kd, ce = [x["kd"] for x in rows], [x["ce"] for x in rows]
        out["mnist1d"] = {"seeds": rows, "kd_mean": statistics.mean(kd),
                          "kd_std": statistics.stdev(kd), "ce_mean": statistics.mean(ce),
                          "ce_std": statistics.stdev(ce),
                          "gain_points": 100 * (statistics.mean(kd) - statistics.mean(ce))}

        # 2. embeddings
        r = run_example("kd_embeddings.yaml", store)
        out["signal_once"]["embeddings"] = statuses(r)["teacher_outputs"]
        out["embeddings"] = {k: r["eval"].metrics[k] for k in
                             ("cosine", "neighbor_overlap", "speedup", "param_ratio",
                              "student_ms_per_sample", "teacher_ms_per_sample")}
        print(f"  embeddings: {out['embeddings']}", flush=True)
        training_curves(r, ["student"], "embedding student (cosine loss)", "embeddings_curve.png")
        copy_figures(r, "eval", "embeddings")

        # 3. language model
        r = run_example("kd_lm.yaml", store)
        out["signal_once"]["lm"] = statuses(r)["teacher_outputs"]
        out["lm"] = {f"{which}_{k}": r[f"eval_{which}"].metrics[k] for which in ("kd", "ce")
                     for k in ("perplexity", "kl_to_teacher", "speedup")}
        out["lm"]["teacher_perplexity"] = r["eval_kd"].metrics["teacher_perplexity"]
        print(f"  lm: {out['lm']}", flush=True)
        training_curves(r, ["student_kd", "student_ce"], "LM students", "lm_curves.png")
        copy_figures(r, "eval_kd", "lm_kd")

    m, e, lm = out["mnist1d"], out["embeddings"], out["lm"]
    out["figures"] = [
        {"figure": f"mnist1d KD - CE test accuracy (same MLP, views, steps), "
                   f"mean of {len(seeds)} seeds (points)",
         "value": round(m["gain_points"], 2), "target": ">= 2", "met": m["gain_points"] >= 2},
        {"figure": "embeddings: cosine to teacher", "value": round(e["cosine"], 4),
         "target": ">= 0.90", "met": e["cosine"] >= 0.90},
        {"figure": "embeddings: top-10 neighbour overlap", "value": round(e["neighbor_overlap"], 4),
         "target": ">= 0.6", "met": e["neighbor_overlap"] >= 0.6},
        {"figure": "embeddings: speed-up vs teacher", "value": round(e["speedup"], 2),
         "target": ">= 2.5", "met": e["speedup"] >= 2.5},
        {"figure": "LM: KD perplexity vs CE perplexity",
         "value": f"{lm['kd_perplexity']:.2f} vs {lm['ce_perplexity']:.2f}",
         "target": "KD lower", "met": lm["kd_perplexity"] < lm["ce_perplexity"]},
        {"figure": "teacher signal produced once",
         "value": f"second student run: {out['second_student']}",
         "target": "teacher, reinforce (the signal) cached",
         "met": out["second_student"].get("reinforce") == "cached"
         and out["second_student"].get("teacher") == "cached"},
    ]
    out["what"] = "knowledge-distillation family acceptance (issue 3)"
    out["command"] = "python -m benchmarks --only kd_family"
    return out
