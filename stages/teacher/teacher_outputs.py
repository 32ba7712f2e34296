"""``teacher-outputs``: the teacher's logits for every row, by Ray Data batch inference
(the stored "soft targets" of Hinton et al. 2015, arXiv 1503.02531, computed once and
reused by every student; cf. dataset reinforcement, Faghri et al. 2023).

For each row i the output holds the input columns plus z_t(x_i) = teacher(x_i), the raw
logits (shape (num_classes,)) in ``precision``; students apply their own temperature T:
p_t = softmax(z_t / T). A pool of ``actors`` Ray actors each loads the teacher once with
its real ``from_pretrained`` and runs on a GPU when the cluster has one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import ray
from pydantic import Field

from pipelines.stage import Dataset, Model, Resources, Stage, StageConfig
from stages.data.tables import parquet, require_columns
from stages.models.classifiers import load_classifier

DTYPES = {"float32": np.float32, "float16": np.float16}


class TeacherActor:
    """Ray Data actor: holds one teacher in memory, maps a batch to its logits."""

    def __init__(self, model_path: str, precision: str, where: str):
        import torch
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_classifier(model_path, where).to(self.device).eval()
        self.dtype = DTYPES[precision]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self.torch.tensor(np.asarray(batch["x"]), dtype=self.torch.float32,
                              device=self.device)  # a copy: batches are read-only views
        with self.torch.inference_mode():
            logits = self.model(x).float().cpu().numpy()
        return {**batch, "logits": logits.astype(self.dtype)}


class InferenceConfig(StageConfig):
    """Settings of a teacher pass over a dataset, shared by the stages that make one."""

    precision: Literal[tuple(DTYPES)] = "float32"
    actors: int = Field(1, ge=1)
    batch_size: int = Field(256, ge=1)


def with_teacher_logits(ds, model_path: str, cfg: InferenceConfig, ctx, where: str):
    """``ds`` plus a ``logits`` column: a pool of ``cfg.actors`` TeacherActors (on GPUs
    when the cluster has them)."""
    return ds.map_batches(
        TeacherActor, batch_format="numpy", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=1 if ctx.num_gpus_available > 0 else 0,
        fn_constructor_kwargs={"model_path": model_path, "precision": cfg.precision,
                               "where": where})


def write_signal(ctx, ds, cfg: InferenceConfig, num_classes: int, data, **extra_info):
    """Write the signal kd-student reads, with the info it checks; report its rows."""
    info = {"signal": "logits", "precision": cfg.precision, "num_classes": num_classes,
            **extra_info}
    if "input_shape" in data.info:
        info["input_shape"] = data.info["input_shape"]
    signal = ctx.write_dataset("signal", ds, info=info)
    rows = parquet(signal).count_rows()
    ctx.progress(rows, rows, "rows", force=True)
    return signal


class TeacherOutputs(Stage):
    kind = "teacher-outputs"
    version = "1"

    class Config(InferenceConfig):
        pass

    inputs = {"model": Model, "data": Dataset}
    outputs = {"signal": Dataset}
    resources = Resources(num_cpus=0)  # only launches Ray Data work

    def run(self, ctx, model, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind}) input 'model'"
        num_classes = load_classifier(model.path, where).num_classes  # fail before any work
        require_columns(data, ["x"], f"stage '{ctx.name}' ({self.kind}) input 'data'")
        ds = with_teacher_logits(data.read(), model.path, cfg, ctx, where)
        return {"signal": write_signal(ctx, ds, cfg, num_classes, data)}
