"""``encode-prompts``: the text encoders of a diffusers text-to-image pipeline run once over
every prompt, so trajectories and students read stored conditioning and never load a text
encoder (the LCM scripts re-run them at every training step).

Steps:

1. check the pipeline folder (a supported family) and the prompts (an ``id`` and a
   ``prompt`` column) before any work;
2. the prompts, plus one row for the unconditional prompt (``""``, split ``uncond``,
   id -1: classifier-free guidance's other branch, encoded once), mapped by a Ray Data
   actor pool: each actor loads the pipeline without its denoiser and VAE and calls the
   family's own ``encode_prompt``, ``batch_size`` prompts at a time;
3. written as parquet: ``id``, ``prompt``, ``split`` and the family's conditioning columns
   (``prompt_embeds``; ``pooled_embeds`` for SDXL, SD3, Flux; ``attention_mask`` for
   PixArt and Sana; ``class_labels`` for DiT), in ``precision`` (float16 halves the
   size). A ``negative_prompt`` column is encoded into ``negative_<column>`` columns.

The encoders are deterministic: any number of actors writes the same rows.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import ray
import torch
from pydantic import Field

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Resources, Stage, StageConfig
from stages.data.tables import parquet, require_columns
from stages.models.device import device as torch_device
from stages.models.families import load_latent

DTYPES = {"float32": np.float32, "float16": np.float16}
UNCOND_ID, UNCOND_SPLIT = -1, "uncond"


class EncodeActor:
    """Ray Data actor: the pipeline's text parts in memory; prompts -> conditioning."""

    def __init__(self, pipeline: Model, precision: str, threads: int, where: str):
        if torch_device().type == "cpu":
            torch.set_num_threads(threads)
        self.model = load_latent(pipeline.path, where)   # a verified copy on this node
        self.pipe = self.model.pipeline(**{k: None for k in self.model.family.not_for_encoding
                                           if k in self.model.index})
        self.dtype = DTYPES[precision]

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        out = self.model.family.encode(self.model, self.pipe, prompts)
        return {k: v.astype(self.dtype) if v.dtype.kind == "f" else v for k, v in out.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = dict(batch)
        encoded = self.encode([str(p) for p in batch["prompt"]])
        uncond = np.flatnonzero(np.asarray(batch["id"]) == UNCOND_ID)
        if len(uncond):  # the unconditional row: the family's own rule for it
            row = {k: v[uncond] for k, v in encoded.items()}
            for k, v in self.model.family.unconditional(self.model, self.pipe, row).items():
                encoded[k][uncond] = v
        out.update(encoded)
        if "negative_prompt" in batch:
            negatives = self.encode([str(p) for p in batch["negative_prompt"]])
            out.update({f"negative_{k}": v for k, v in negatives.items()})
        return out


class EncodePrompts(Stage):
    kind = "encode-prompts"
    version = "1"

    class Config(StageConfig):
        precision: Literal[tuple(DTYPES)] = "float32"
        batch_size: int = Field(64, ge=1)   # prompts per encoder call
        actors: int = Field(1, ge=1)
        threads: int = Field(1, ge=1)       # torch threads per CPU actor
        # the encoders are deterministic per prompt: these change how, not what
        execution = ("batch_size", "actors", "threads")

    inputs = {"pipeline": Model, "prompts": Dataset}
    outputs = {"embeddings": Dataset}
    resources = Resources(num_cpus=0)  # only launches Ray Data work

    def run(self, ctx, pipeline, prompts):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        model = load_latent(pipeline.path, f"{where} input 'pipeline'")   # 1. checks
        table = require_columns(prompts, ["id", "prompt", "split"], f"{where} input 'prompts'")
        columns = ["id", "prompt", "split"]
        if "negative_prompt" in table.schema.names:
            columns.append("negative_prompt")
        n = table.count_rows()
        if n == 0:
            raise bad_value(f"{where} input 'prompts'", "number of prompts", 0, "at least one")
        uncond = {"id": [UNCOND_ID], "prompt": [""], "split": [UNCOND_SPLIT]}
        if "negative_prompt" in columns:
            uncond["negative_prompt"] = [""]
        schema = table.schema
        rows = pa.table({c: pa.array(v, type=schema.field(c).type) for c, v in uncond.items()})
        ds = prompts.read(columns=columns).union(ray.data.from_arrow(rows))  # 2. encode
        ds = ds.map_batches(
            EncodeActor, batch_format="numpy", batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_gpus=1 if ctx.num_gpus_available > 0 else 0,
            fn_constructor_kwargs={"pipeline": pipeline, "precision": cfg.precision,
                                   "threads": cfg.threads, "where": where})
        info = {"pipeline_class": model.pipeline_class, "family": model.family.name,
                "precision": cfg.precision, "prompts": n, "uncond_id": UNCOND_ID,
                "negative": "negative_prompt" in columns}
        out = ctx.write_dataset("embeddings", ds, info=info)              # 3. write
        info["columns"] = [c for c in parquet(out).schema.names if c not in columns]
        out.info.update(info)
        ctx.progress(n, n, "prompts", force=True)
        return {"embeddings": out}
