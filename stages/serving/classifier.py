"""Torch classifiers (``fit-classifier`` architectures, ``kd-student`` on classifier
signals) as MLflow pyfunc models: images in, the predicted label and the class
probabilities out."""

from __future__ import annotations

import numpy as np

from pipelines.mlmodel import PyFunc


def spec(input_shape, num_classes: int, metadata: dict) -> PyFunc:
    """Input: float32 images shaped ``(N, *input_shape)`` in the training data's range;
    output: ``label`` and ``probabilities`` per image."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from mlflow.types.schema import Array
    shape = tuple(int(s) for s in input_shape)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, *shape), "images")]),
        outputs=Schema([ColSpec("long", "label"), ColSpec(Array("double"), "probabilities")]))
    example = np.zeros((2, *shape), dtype=np.float32)
    return PyFunc(__name__, signature, example, "pytorch", "image-classification",
                  ("huggingface_hub", "safetensors"),
                  {"num_classes": int(num_classes), "input_shape": list(shape), **metadata})


class Classifier:
    def __init__(self, path: str):
        from stages.models.classifiers import load_classifier
        self.model = load_classifier(path, f"MLflow model {path}")

    def predict(self, data, params=None):
        import pandas as pd
        import torch
        x = np.asarray(data["images"] if isinstance(data, dict) else data, dtype=np.float32)
        with torch.inference_mode():
            p = torch.softmax(self.model(torch.from_numpy(x)).double(), -1).numpy()
        return pd.DataFrame({"label": p.argmax(1).astype(np.int64), "probabilities": list(p)})


def _load_pyfunc(path: str) -> Classifier:
    return Classifier(path)
