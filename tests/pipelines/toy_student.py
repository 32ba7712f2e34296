"""A toy student for testing the core's MLflow Models, registry and exports: y = w * x,
its weight in safetensors; this module is also its pyfunc loader (``_load_pyfunc``)."""

import os

import numpy as np

from pipelines import Dataset, Model, Report, Resources, Stage, StageConfig
from pipelines.mlmodel import PyFunc


class ToyStudent(Stage):
    kind = "test-student"
    version = "1"

    class Config(StageConfig):
        w: float = 2.0

    inputs = {"numbers": Dataset}
    outputs = {"model": Model}
    mlflow_outputs = ("model",)
    resources = Resources(num_cpus=0.5)

    def run(self, ctx, numbers):
        from safetensors.numpy import save_file
        out = ctx.output_dir("model")
        save_file({"w": np.array([self.config.w], dtype=np.float32)},
                  os.path.join(out, "model.safetensors"))
        return {"model": Model(path=out, info={"w": self.config.w})}

    def mlflow_model(self, output, artifact):
        import pandas as pd
        from mlflow.models import infer_signature
        example = pd.DataFrame({"x": [1.0, 2.0]})
        return PyFunc(__name__, infer_signature(example, pd.DataFrame({"y": [2.0, 4.0]})),
                      example, "pytorch", "tabular-regression", (),
                      {"method": "toy", "paper": "nobody 2026"})


class ToyEvaluate(Stage):
    kind = "test-evaluate-student"
    version = "1"
    inputs = {"student": Model}
    outputs = {"report": Report}
    resources = Resources(num_cpus=0.5)

    def run(self, ctx, student):
        w = float(student.info["w"])
        return {"report": ctx.write_report("report", {"error": abs(w - 3.0),
                                                       "teacher_error": 0.0, "speedup": 2.0})}


class Weights:
    def __init__(self, path):
        from safetensors.numpy import load_file
        self.w = float(load_file(os.path.join(path, "model.safetensors"))["w"][0])

    def predict(self, data, params=None):
        import pandas as pd
        return pd.DataFrame({"y": np.asarray(data["x"], dtype=float) * self.w})


def _load_pyfunc(path):
    return Weights(path)
