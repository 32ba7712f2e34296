"""``diffusion-trajectories``: deterministic ODE trajectories of a diffusers teacher, the
expensive and embarrassingly parallel step of diffusion timestep distillation, by Ray Data
over row ids with a pool of actors (one teacher each, on a GPU when Ray reports one).

Row i: label y_i = i mod num_classes, x_T = z_i ~ N(0, I) from the row's own seed
(seed * 1000003 + i), then N steps of DDIM with eta = 0 (Song et al. 2021, "Denoising
Diffusion Implicit Models", eq. 12 with sigma_t = 0) or Euler on the probability-flow ODE
(Karras et al. 2022, Algorithm 1 without churn), the diffusers ``DDIMScheduler`` /
``EulerDiscreteScheduler`` classes. Stored per row: ``id``, ``label``, ``noise`` (x_T),
``states`` (K states chosen evenly among the N + 1, first and last included, in VP space
x_t = alpha_t x0 + sigma_t z), ``timesteps`` (theirs; -1 = clean) and ``sample`` (the
final sample). Rows are generated in shards of ``shard_size`` consecutive ids, each shard
one batch of the teacher: any shard regenerates exactly, whatever the number of actors.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import ray
import torch
from pydantic import Field, model_validator

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Resources, Stage, StageConfig
from stages.data.tables import parquet
from stages.models.diffusion import load_diffusion, row_labels, row_noise, where_of
from stages.models.diffusion_sampling import SAMPLERS, make_scheduler, sample_teacher
from stages.models.device import device as torch_device

DTYPES = {"float32": np.float32, "float16": np.float16}


def kept_indices(steps: int, keep_states: int | None) -> list[int]:
    """K state indices spread evenly over 0..N, first and last included."""
    if keep_states is None or keep_states >= steps + 1:
        return list(range(steps + 1))
    return sorted({int(round(i)) for i in np.linspace(0, steps, keep_states)})


class TrajectoryActor:
    """Ray Data actor: one teacher in memory; maps shard ids to trajectory rows."""

    def __init__(self, teacher: Model, cfg: dict, seed: int, threads: int, where: str):
        self.device = torch_device()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)  # an execution setting: equal within float tolerance
        # the artifact, never a path: ``.path`` is a verified copy on this actor's node
        self.model = load_diffusion(teacher.path, where).to(self.device)
        self.cfg = DiffusionTrajectories.Config(**cfg)
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, out = self.cfg, []
        for shard in np.asarray(batch["id"]):
            ids = np.arange(shard * cfg.shard_size, min((shard + 1) * cfg.shard_size, cfg.rows))
            out.append(self.shard(ids))
        return {k: np.concatenate([o[k] for o in out]) for k in out[0]}

    def shard(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        cfg, model = self.cfg, self.model
        noise = row_noise(self.seed, ids, model.shape)
        labels = row_labels(ids, model.num_classes)
        keep = kept_indices(cfg.steps, cfg.keep_states)
        final, states, timesteps = sample_teacher(model, noise, labels, cfg.sampler, cfg.steps,
                                                  keep)
        dtype = DTYPES[cfg.precision]
        return {"id": ids.astype(np.int64), "label": labels.astype(np.int64),
                "noise": noise.numpy().astype(dtype), "states": states.numpy().astype(dtype),
                "timesteps": np.tile(np.asarray(timesteps, np.int64), (len(ids), 1)),
                "sample": final.numpy().astype(dtype)}


class DiffusionTrajectories(Stage):
    kind = "diffusion-trajectories"
    version = "1"

    class Config(StageConfig):
        rows: int = Field(2000, ge=1)
        sampler: Literal[SAMPLERS] = "ddim"
        steps: int = Field(20, ge=1)
        keep_states: int | None = Field(None, ge=2)  # K; None keeps all N + 1
        precision: Literal[tuple(DTYPES)] = "float32"
        shard_size: int = Field(100, ge=1)            # rows per shard (one teacher batch)
        actors: int = Field(1, ge=1)
        threads: int = Field(1, ge=1)                 # torch threads per CPU actor
        # noise is drawn per row id: the pool and its threads change how, not what
        execution = ("actors", "threads")

        @model_validator(mode="after")
        def _k(self):
            if self.keep_states is not None and self.keep_states > self.steps + 1:
                raise ValueError(f"keep_states ({self.keep_states}) exceeds the "
                                 f"{self.steps + 1} states of a {self.steps}-step trajectory")
            return self

    inputs = {"teacher": Model}
    outputs = {"trajectories": Dataset}
    resources = Resources(num_cpus=0)  # only launches Ray Data work

    def run(self, ctx, teacher):
        cfg = self.config
        where = where_of(ctx, self.kind, "teacher")
        model = load_diffusion(teacher.path, where)          # 1. fail before any work
        make_scheduler(model, cfg.sampler, cfg.steps, f"{where_of(ctx, self.kind)} config")
        if model.student is not None:
            raise bad_value(where, "model", teacher.path, "a teacher (this folder is a "
                            f"{model.student.get('method')} student)")
        shards = -(-cfg.rows // cfg.shard_size)
        ds = ray.data.range(shards, override_num_blocks=min(shards, 4 * cfg.actors))
        ds = ds.map_batches(                                 # 2. shards -> rows, actor pool
            TrajectoryActor, batch_format="numpy", batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_gpus=1 if ctx.num_gpus_available > 0 else 0,
            fn_constructor_kwargs={"teacher": teacher, "cfg": cfg.model_dump(),
                                   "seed": ctx.seed, "threads": cfg.threads, "where": where})
        keep = kept_indices(cfg.steps, cfg.keep_states)
        sched = make_scheduler(model, cfg.sampler, cfg.steps)
        timesteps = [int(t) for t in sched.timesteps] + [-1]
        info = {"sampler": cfg.sampler, "steps": cfg.steps, "precision": cfg.precision,
                "num_classes": model.num_classes, "shape": list(model.shape),
                "timesteps": [timesteps[i] for i in keep], "seed": ctx.seed}
        out = ctx.write_dataset("trajectories", ds, info=info)   # 3. write, count
        rows = parquet(out).count_rows()
        ctx.progress(rows, rows, "rows", force=True)
        return {"trajectories": out}
