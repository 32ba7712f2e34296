"""Students are MLflow Models.

A stage lists in ``mlflow_outputs`` the Model outputs it makes that a user deploys (its
students), and ``Stage.mlflow_model(output, artifact)`` says how each one loads as an
MLflow ``pyfunc`` model: a ``PyFunc``. When the stage's outputs are committed, the core
writes into the output's own folder, next to the weights:

- ``MLmodel``: the ``python_function`` flavor with the ``loader_module`` (a module whose
  ``_load_pyfunc(path)`` rebuilds the model from the folder's safetensors files: no pickled
  object anywhere), the signature, and ``metadata`` (``library_name``, ``pipeline_tag``,
  the artifact's key: what ``export`` puts on the model card);
- ``input_example.json`` / ``serving_input_example.json``, ``requirements.txt``,
  ``python_env.yaml`` and ``conda.yaml`` (MLflow's own environment files).

These files are part of the artifact (hashed in its manifest), so
``mlflow.pyfunc.load_model(<artifact folder>)`` works on any committed student, and a
Model Registry version points at that folder: the weights exist once, in the store.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

MLMODEL = "MLmodel"


@dataclass(frozen=True)
class PyFunc:
    """How a student loads as an MLflow pyfunc model.

    ``loader_module``: an importable module with ``_load_pyfunc(path) -> object with
    .predict(data, params=None)``; ``signature``: an ``mlflow.models.ModelSignature``;
    ``input_example``: what ``predict`` takes (checked against the signature when
    written); ``library``: the library whose ``from_pretrained`` loads the folder
    (``diffusers``, ``transformers``, ``pytorch``); ``pipeline_tag``: the Hugging Face
    Hub task; ``requirements``: distributions needed besides distillery and torch;
    ``metadata``: anything else worth keeping in ``MLmodel`` (the method, ...)."""

    loader_module: str
    signature: Any
    input_example: Any
    library: str
    pipeline_tag: str
    requirements: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)


def requirement(dist: str) -> str:
    """``dist==<installed version>``, or the bare name if it is not installed."""
    try:
        return f"{dist}=={importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return dist


def write_mlmodel(path: str, spec: PyFunc, key: str) -> None:
    """Write the MLflow Model files of ``spec`` into the model folder ``path`` (its weights
    are already there). Deterministic apart from MLflow's own version string: the model's
    uuid is the artifact key and no creation time is kept."""
    import yaml
    from mlflow.pyfunc import save_model
    reqs = [requirement(d) for d in ("distillery", "torch", *spec.requirements)]
    meta = {"library_name": spec.library, "pipeline_tag": spec.pipeline_tag,
            "distillery.key": key, **spec.metadata}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model")
        save_model(out, loader_module=spec.loader_module, signature=spec.signature,
                   input_example=spec.input_example, pip_requirements=reqs, metadata=meta)
        with open(os.path.join(out, MLMODEL)) as f:
            doc = yaml.safe_load(f)
        for name in os.listdir(out):
            if name != MLMODEL:
                shutil.copyfile(os.path.join(out, name), os.path.join(path, name))
    doc["model_uuid"] = key[:32]
    doc.pop("utc_time_created", None)
    doc["model_size_bytes"] = folder_bytes(path)
    with open(os.path.join(path, MLMODEL), "w") as f:
        yaml.safe_dump(doc, f, sort_keys=True)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def read_metadata(path: str) -> dict | None:
    """The ``metadata`` of the ``MLmodel`` in folder ``path``; None if it has none."""
    import yaml
    try:
        with open(os.path.join(path, MLMODEL)) as f:
            return dict(yaml.safe_load(f).get("metadata") or {})
    except FileNotFoundError:
        return None
