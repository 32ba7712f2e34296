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

Latent text-to-image teachers (a ``pretrained-diffusion`` pipeline folder of a supported
family, with the ``encode-prompts`` output as input ``embeddings``): row i is sample
i mod ``samples_per_prompt`` of train prompt i // ``samples_per_prompt`` (prompts sorted
by id), x_T from the row's seed in the teacher's latent shape, w = ``guidance_scale`` or
drawn per row from U[low, high] (classifier-free guidance, Ho & Salimans 2022, or the
teacher's embedded guidance), the family's own scheduler or DDIM / Euler (flow Euler on
flow-matching families; ``stages.models.families.sampling``). Stored: ``id``,
``prompt_id``, ``prompt_index``, ``guidance_scale``, ``noise``, ``states`` (K latents,
TBCM's trajectory-sampled points), ``timesteps`` (model times) and ``sample`` (the final
latent). The text encoders are never loaded.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import ray
import torch
from pydantic import Field, model_validator

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Resources, Stage, StageConfig
from stages.models.families import is_latent, load_latent
from stages.models.families.base import check_embeddings
from stages.models.families.conditioning import Conditioning
from stages.models.families.sampling import SAMPLERS as LATENT_SAMPLERS
from stages.models.families.sampling import (guidance_mode, row_guidance,
                                              teacher_scheduler)
from stages.models.families.sampling import sample_teacher as sample_latent
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


class LatentTrajectoryActor:
    """Ray Data actor: a latent teacher's denoiser and the train prompts' conditioning in
    memory (no text encoder, no VAE); maps shard ids to trajectory rows."""

    def __init__(self, teacher: Model, embeddings: Dataset, cfg: dict, seed: int,
                 threads: int, where: str):
        self.device = torch_device()
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.model = load_latent(teacher.path, where)
        self.net = self.model.denoiser().to(self.device)
        self.cond = Conditioning(embeddings, "train", where).to(self.device)
        self.cfg, self.seed = DiffusionTrajectories.Config(**cfg), seed

    __call__ = TrajectoryActor.__call__

    def shard(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        cfg, model = self.cfg, self.model
        shape = model.latent_shape(cfg.height, cfg.width)
        noise = row_noise(self.seed, ids, shape)
        index = torch.as_tensor(ids // cfg.samples_per_prompt)
        w = row_guidance(self.seed, ids, cfg.guidance_scale)
        keep = kept_indices(cfg.steps, cfg.keep_states)
        sched = teacher_scheduler(model, cfg.sampler, cfg.steps, shape, "sampler")
        mode = guidance_mode(model, cfg.guided)
        final, states, times = sample_latent(model, self.net, noise, self.cond.batch(index),
                                             w.to(self.device), sched, mode, keep)
        dtype = DTYPES[cfg.precision]
        return {"id": ids.astype(np.int64), "prompt_id": self.cond.ids[index.numpy()],
                "prompt_index": index.numpy().astype(np.int64),
                "guidance_scale": w.numpy().astype(np.float32),
                "noise": noise.numpy().astype(dtype), "states": states.numpy().astype(dtype),
                "timesteps": np.tile(np.asarray(times, np.float32), (len(ids), 1)),
                "sample": final.numpy().astype(dtype)}


class DiffusionTrajectories(Stage):
    kind = "diffusion-trajectories"
    version = "2"  # 2: latent text-to-image teachers

    class Config(StageConfig):
        rows: int | None = Field(None, ge=1)  # pixel: default 2000; latent: at most this
        # None: DDIM, or flow Euler for flow-matching families; "default": the folder's own
        sampler: Literal[tuple(dict.fromkeys(SAMPLERS + LATENT_SAMPLERS))] | None = None
        steps: int = Field(20, ge=1)
        keep_states: int | None = Field(None, ge=2)  # K; None keeps all N + 1
        precision: Literal[tuple(DTYPES)] = "float32"
        shard_size: int = Field(100, ge=1)            # rows per shard (one teacher batch)
        # latent teachers: rows per prompt, w (a number or [low, high]), image size
        samples_per_prompt: int = Field(1, ge=1)
        guidance_scale: float | tuple[float, float] = 1.0
        height: int | None = Field(None, ge=8)
        width: int | None = Field(None, ge=8)
        actors: int = Field(1, ge=1)
        threads: int = Field(1, ge=1)                 # torch threads per CPU actor
        # noise is drawn per row id: the pool and its threads change how, not what
        execution = ("actors", "threads")

        @model_validator(mode="after")
        def _k(self):
            if self.keep_states is not None and self.keep_states > self.steps + 1:
                raise ValueError(f"keep_states ({self.keep_states}) exceeds the "
                                 f"{self.steps + 1} states of a {self.steps}-step trajectory")
            w = self.guidance_scale
            low, high = (w, w) if isinstance(w, (int, float)) else w
            if low < 0 or high < 0 or low > high:
                raise ValueError(f"guidance_scale {w!r}: a number >= 0 or a range [low, "
                                 "high] with 0 <= low <= high")
            return self

        @property
        def guided(self) -> bool:
            w = self.guidance_scale
            return not (isinstance(w, (int, float)) and w == 1.0)

    inputs = {"teacher": Model}
    optional_inputs = {"embeddings": Dataset}  # latent text-to-image teachers
    outputs = {"trajectories": Dataset}
    resources = Resources(num_cpus=0)  # only launches Ray Data work

    def run(self, ctx, teacher, embeddings=None):
        if is_latent(teacher.path):
            return self.run_latent(ctx, teacher, embeddings)
        cfg = self.config
        where = where_of(ctx, self.kind, "teacher")
        if embeddings is not None or cfg.guided or cfg.samples_per_prompt != 1:
            raise bad_value(where_of(ctx, self.kind), "embeddings / guidance_scale / "
                            "samples_per_prompt", "set", "unset for a pixel-space UNet2DModel "
                            "teacher (they are for latent text-to-image pipelines)")
        rows = cfg.rows or 2000
        cfg = cfg.model_copy(update={"sampler": cfg.sampler or "ddim"})
        model = load_diffusion(teacher.path, where)          # 1. fail before any work
        if cfg.sampler not in SAMPLERS:
            raise bad_value(f"{where_of(ctx, self.kind)} config", "sampler", cfg.sampler,
                            SAMPLERS)
        make_scheduler(model, cfg.sampler, cfg.steps, f"{where_of(ctx, self.kind)} config")
        if model.student is not None:
            raise bad_value(where, "model", teacher.path, "a teacher (this folder is a "
                            f"{model.student.get('method')} student)")
        cfg = cfg.model_copy(update={"rows": rows})
        ds = self.shards(rows, cfg, TrajectoryActor, ctx,
                         {"teacher": teacher, "cfg": cfg.model_dump(), "seed": ctx.seed,
                          "threads": cfg.threads, "where": where})
        keep = kept_indices(cfg.steps, cfg.keep_states)
        sched = make_scheduler(model, cfg.sampler, cfg.steps)
        timesteps = [int(t) for t in sched.timesteps] + [-1]
        info = {"sampler": cfg.sampler, "steps": cfg.steps, "precision": cfg.precision,
                "num_classes": model.num_classes, "shape": list(model.shape),
                "timesteps": [timesteps[i] for i in keep], "seed": ctx.seed}
        return self.write(ctx, ds, info)

    def shards(self, rows: int, cfg, actor, ctx, kwargs):
        shards = -(-rows // cfg.shard_size)
        ds = ray.data.range(shards, override_num_blocks=min(shards, 4 * cfg.actors))
        return ds.map_batches(                               # shards -> rows, actor pool
            actor, batch_format="numpy", batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_gpus=1 if ctx.num_gpus_available > 0 else 0, fn_constructor_kwargs=kwargs)

    def write(self, ctx, ds, info):
        out = ctx.write_dataset("trajectories", ds, info=info)
        rows = parquet(out).count_rows()
        ctx.progress(rows, rows, "rows", force=True)
        return {"trajectories": out}

    def run_latent(self, ctx, teacher, embeddings):
        cfg, stage = self.config, where_of(ctx, self.kind)
        where = where_of(ctx, self.kind, "teacher")
        model = load_latent(teacher.path, where)             # 1. fail before any work
        cfg = cfg.model_copy(update={"sampler": cfg.sampler or (
            "euler" if model.family.flow else "ddim")})
        if model.student is not None:
            raise bad_value(where, "model", teacher.path, "a teacher (this folder is a "
                            f"{model.student.get('method')} student)")
        if embeddings is None:
            raise bad_value(stage, "input 'embeddings'", None, "the encode-prompts output of "
                            f"this pipeline (a {model.pipeline_class} teacher needs prompts)")
        check_embeddings(model, embeddings.info, where_of(ctx, self.kind, "embeddings"))
        prompts = Conditioning(embeddings, "train", where_of(ctx, self.kind, "embeddings"))
        shape = model.latent_shape(cfg.height, cfg.width)
        sched = teacher_scheduler(model, cfg.sampler, cfg.steps, shape, f"{stage} config")
        rows = len(prompts) * cfg.samples_per_prompt
        rows = min(rows, cfg.rows) if cfg.rows else rows
        cfg = cfg.model_copy(update={"rows": rows})
        ds = self.shards(rows, cfg, LatentTrajectoryActor, ctx,   # 2. rows, actor pool
                         {"teacher": teacher, "embeddings": embeddings,
                          "cfg": cfg.model_dump(), "seed": ctx.seed, "threads": cfg.threads,
                          "where": where})
        keep = kept_indices(cfg.steps, cfg.keep_states)
        times = [float(t) for t in sched.timesteps] + [model.schedule.clean]
        w = cfg.guidance_scale
        info = {"sampler": cfg.sampler, "steps": cfg.steps, "precision": cfg.precision,
                "pipeline_class": model.pipeline_class, "family": model.family.name,
                "time": model.schedule.kind, "shape": list(shape),
                "guidance_scale": list(w) if isinstance(w, tuple) else w,
                "guidance": guidance_mode(model, cfg.guided),
                "samples_per_prompt": cfg.samples_per_prompt, "prompts": len(prompts),
                "timesteps": [times[i] for i in keep], "seed": ctx.seed}
        return self.write(ctx, ds, info)                     # 3. write, count
