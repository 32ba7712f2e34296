"""Diffusion students as MLflow pyfunc models: one image per input row.

Columns: ``prompt`` (a latent text-to-image student; a ``DiTPipeline``'s class names) or
``label`` (a class-conditional pixel student), and optionally ``num_inference_steps``
(default: the fewest steps the student was trained for), ``guidance_scale`` (latent
students; default: the student's own) and ``seed`` (default 0; the same seed gives the same
image). Output: ``uint8`` images shaped (N, H, W, C). A latent student is run by its own
diffusers pipeline (``DiffusionPipeline.from_pretrained``), a pixel student by the sampler
it was trained for (``stages.models.diffusion_sampling``)."""

from __future__ import annotations

import json
import os

import numpy as np

from pipelines.mlmodel import PyFunc

STUDENT_FILE = "student.json"
PAPERS = {  # the method a student.json names -> the paper its model card cites
    "consistency": "consistency distillation: Song et al. 2023, Consistency Models; latent: "
                   "Luo et al. 2023, Latent Consistency Models; with segments: Ren et al. "
                   "2024, Hyper-SD",
    "progressive": "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of "
                   "Diffusion Models",
    "reflow": "Liu et al. 2023, Flow Straight and Fast: Learning to Generate and Transfer "
              "Data with Rectified Flow",
    "dmd": "Yin et al. 2024, Improved Distribution Matching Distillation for Fast Image "
           "Synthesis (DMD2)",
    "scm": "Lu & Song 2024, Simplifying, Stabilizing and Scaling Continuous-Time "
           "Consistency Models (sCM)",
}


def spec(latent: bool, metadata: dict) -> PyFunc:
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    first = ColSpec("string", "prompt") if latent else ColSpec("long", "label", required=False)
    inputs = Schema([first, ColSpec("long", "num_inference_steps", required=False),
                     ColSpec("double", "guidance_scale", required=False),
                     ColSpec("long", "seed", required=False)])
    outputs = Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, -1), "images")])
    metadata = {"paper": PAPERS.get(metadata.get("method"), ""), **metadata}
    steps = int(metadata.get("default_steps", 1))
    example = pd.DataFrame({"prompt" if latent else "label": ["a photo of the digit 3"]
                            if latent else [3],
                            "num_inference_steps": [steps], "seed": [0]})
    library, tag = ("diffusers", "text-to-image") if latent else ("diffusers",
                                                                   "unconditional-image-generation")
    return PyFunc(__name__, ModelSignature(inputs=inputs, outputs=outputs), example, library,
                  tag, ("diffusers", "transformers", "safetensors"), metadata)


def default_steps(student: dict) -> int:
    return int(min(student.get("covered_steps") or [1]))


class DiffusionStudent:
    def __init__(self, path: str):
        with open(os.path.join(path, STUDENT_FILE)) as f:
            self.student = json.load(f)
        with open(os.path.join(path, "model_index.json")) as f:
            self.latent = json.load(f)["_class_name"] != "DDPMPipeline"
        if self.latent:
            from diffusers import DiffusionPipeline
            self.pipe = DiffusionPipeline.from_pretrained(path)
        else:
            from stages.models.diffusion import load_diffusion
            self.model = load_diffusion(path, f"MLflow model {path}")

    def predict(self, data, params=None):
        import pandas as pd
        rows = pd.DataFrame(data).to_dict("records")
        images = [self.one(r) for r in rows]
        return np.stack(images)

    def one(self, row: dict) -> np.ndarray:
        import torch
        steps = int(_get(row, "num_inference_steps", default_steps(self.student)))
        seed = int(_get(row, "seed", 0))
        gen = torch.Generator().manual_seed(seed)
        if self.latent:
            w = _get(row, "guidance_scale", self.student.get("guidance_scale") or 1.0)
            prompt = str(row["prompt"])
            if hasattr(self.pipe, "get_label_ids"):  # DiT: class names
                out = self.pipe(class_labels=self.pipe.get_label_ids([prompt]), generator=gen,
                                num_inference_steps=steps, guidance_scale=float(w),
                                output_type="np")
            else:
                out = self.pipe(prompt, num_inference_steps=steps, guidance_scale=float(w),
                                generator=gen, output_type="np")
            return (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8)
        from stages.models.diffusion_sampling import sample_any
        noise = torch.randn((1, *self.model.shape), generator=gen)
        label = _get(row, "label", None)
        labels = None if self.model.num_classes is None else torch.tensor([int(label or 0)])
        x = sample_any(self.model, noise, labels, steps, "ddim", gen, "MLflow model")[0]
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _get(row: dict, name: str, default):
    value = row.get(name)
    return default if value is None or (isinstance(value, float) and np.isnan(value)) else value


def _load_pyfunc(path: str) -> DiffusionStudent:
    return DiffusionStudent(path)
