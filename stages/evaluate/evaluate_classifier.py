"""``evaluate-classifier``: the honest scorecard of a distilled classifier against its
teacher on the held-out ``split == "test"`` rows (the usual KD report, e.g. Hinton et al.
2015; Beyer et al. 2022, "Knowledge distillation: A good teacher is patient and
consistent"):

- ``accuracy`` = mean[argmax z_s = y], ``teacher_accuracy`` = mean[argmax z_t = y]
- ``agreement`` = mean[argmax z_s = argmax z_t] (top-1 fidelity to the teacher)
- ``param_ratio`` = |theta_s| / |theta_t|
- ``speedup`` = latency_t / latency_s: the median over ``repeats`` timed forward passes of
  the same batch, both models in this process, same thread count, ``torch.inference_mode``,
  measurements interleaved so that machine noise hits both alike.
"""

from __future__ import annotations


import numpy as np
from pydantic import Field

from pipelines.stage import Dataset, Model, Report, Stage
from stages.data.tables import read_split
from stages.evaluate.timing import LatencyConfig, pyplot
from stages.models.classifiers import count_params, load_classifier, predict_logits
from stages.lazy import lazy

torch = lazy("torch")


class EvaluateClassifier(Stage):
    kind = "evaluate-classifier"
    version = "1"

    class Config(LatencyConfig):
        repeats: int = Field(20, ge=5)

    inputs = {"student": Model, "teacher": Model, "data": Dataset}
    outputs = {"report": Report}
    metrics = ("accuracy", "teacher_accuracy", "agreement", "param_ratio", "speedup",
               "student_latency_ms", "teacher_latency_ms", "student_params", "teacher_params")

    def run(self, ctx, student, teacher, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        s_model = load_classifier(student.path, f"{where} input 'student'")
        t_model = load_classifier(teacher.path, f"{where} input 'teacher'")
        test = read_split(data, "test", ["x", "label"], f"{where} input 'data'")
        x, y = torch.tensor(test["x"], dtype=torch.float32), test["label"]
        s_pred = predict_logits(s_model, x).argmax(1).numpy()
        t_pred = predict_logits(t_model, x).argmax(1).numpy()

        s_ms, t_ms = cfg.latencies([s_model, t_model], x[:cfg.latency_batch_size])
        s_params, t_params = count_params(s_model), count_params(t_model)
        metrics = {
            "accuracy": float((s_pred == y).mean()),
            "teacher_accuracy": float((t_pred == y).mean()),
            "agreement": float((s_pred == t_pred).mean()),
            "param_ratio": s_params / t_params,
            "speedup": t_ms / s_ms,
            "student_latency_ms": s_ms, "teacher_latency_ms": t_ms,
            "student_params": s_params, "teacher_params": t_params,
        }
        num_classes = max(s_model.num_classes, t_model.num_classes)
        figures = {"accuracy.png": _accuracy_plot(metrics),
                   "confusion.png": _confusion_plot(y, s_pred, num_classes)}
        info = {"test_rows": len(y), "latency_batch_size": min(cfg.latency_batch_size, len(y)),
                "threads": cfg.threads}
        report = ctx.write_report("report", metrics, figures=figures, info=info)
        for fig in figures.values():
            pyplot().close(fig)
        return {"report": report}


def _accuracy_plot(m: dict):
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    names = ["teacher accuracy", "student accuracy", "agreement"]
    values = [m["teacher_accuracy"], m["accuracy"], m["agreement"]]
    bars = ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:green"])
    ax.bar_label(bars, fmt="%.3f")
    ax.set_ylim(0, 1.1)
    ax.set_title(f"student: {m['param_ratio']:.2f}x params, {m['speedup']:.2f}x speed-up")
    return fig


def _confusion_plot(y: np.ndarray, pred: np.ndarray, num_classes: int):
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(conf, (y, pred), 1)
    fig, ax = pyplot().subplots(figsize=(4.5, 4))
    im = ax.imshow(conf, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xlabel("student prediction")
    ax.set_ylabel("true label")
    ax.set_title("student confusion matrix (test)")
    return fig
