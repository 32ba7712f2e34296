"""``scm-distill``: continuous-time consistency distillation, sCM (Lu & Song 2024, arXiv
2410.11081, Algorithm 1), image-free as TBCM (Tang et al. 2025, arXiv 2511.20410: the
teacher's own routes from noise, no VAE, no images), through the training harness.

TrigFlow (``stages.models.trigflow``): x_t = cos t x0 + sin t sigma_d eps, t in [0, pi/2];
the teacher (epsilon, v, x0 or flow prediction, pixel or latent) and its student are
converted without training: F(x_t, t) = (cos t sigma_d eps_hat - sin t x0_hat) / sigma_d
from the network's own (x0_hat, eps_hat) at the VP / flow state of the same SNR, so the
consistency function f(x_t, t) = cos t x_t - sin t sigma_d F(x_t, t) is the network's x0
prediction, and the teacher's velocity is dx_t/dt = sigma_d F_teacher (classifier-free
guided at w for latent teachers; the pixel teacher is unguided). Per example:

    F- = stopgrad F_theta  (theta- = stopgrad(theta): no EMA target)
    cos t sin t dF-/dt = jvp(F-, (x_t, t), (cos t sin t dx_t/dt, cos t sin t))
    g = -cos^2 t (sigma_d F- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF-/dt)
    g <- g / (||g|| + c)                              tangent normalisation, c = tangent_norm_c
    L = w(t) / exp(u(t)) ||F_theta - F- - g||^2 / D + u(t)

``time_derivative``: the exact ``jvp``, or a central difference in t over +-``time_delta``
(``stages.models.trigflow.jvp``: why, and what was measured).

r = min(1, step / tangent_warmup_steps) (tangent warm-up; the step counter is kept in the
checkpoint, so a resumed run goes on with it), D the dimension, u(t) the learned
log-variance (``stages.models.trigflow.LogVar``, trained with the student; 0 without
``logvar``), w(t) = 1 / (sigma_d tan t) the prior weighting of SANA-Sprint's sCM loss
(Chen et al. 2025, arXiv 2503.09641; 1 without ``prior_weighting``). The JVP runs in the
MATH attention backend. AdamW, betas (0.9, 0.99) as sCM's Adam. The saved student is an
EMA of the trained weights at ``ema_decay`` (sCM samples with EMA weights; 0: the last
weights); the target F- takes the live weights, never the EMA. ``lr_schedule: cosine``
decays the learning rate as 0.5 (1 + cos(pi progress)) to 0 at the run's end (default:
constant).

Data (no images either way):

- ``data: trajectories`` (TBCM): the ``diffusion-trajectories`` output; every stored noisy
  state of a trajectory (clean excluded) is an example, so a step sees ``batch_size``
  trajectories times their K - 1 states: x_t = x_m N(t) at t = atan(sigma / (sigma_d alpha))
  of its stored timestep, dx_t/dt by one teacher forward (latent: at the row's w or the fixed w).
  ``jitter``: each stored state first moved along the teacher's ODE by one DDIM step,
  x_s = cos(t - s) x_t - sin(t - s) dx_t/dt, to s ~ U[t_next, t] (t_next: the next stored
  state's time, 0 after the last), and dx_s/ds by a second teacher forward. Without it the
  loss sees only the K - 1 stored times and the student, free between them, drifts: on the
  digits teacher 1000 steps collapsed (FID 66.6 at 1 step; tangent norm 0.75 -> 11.5);
  with it the same run is stable (8.37 / 2.02 / 1.47 at 1 / 2 / 4 steps,
  ``benchmarks/results/tbcm_time_derivative.md``).
- ``data: samples``: the same output's clean ends, the teacher's own samples made once by
  that stage, are Algorithm 1's data: x_t = cos t x0 + sin t sigma_d eps at sCM's proposal
  t (below), dx_t/dt by one teacher forward. ``data: noise`` without its rollout inside
  training: on the digits teacher a step took 0.36 s against 0.66 s with 8 rollout steps
  (batch 64, one thread, two runs side by side). The example's ``scm`` (96 epochs, lr 3e-5
  decayed by a cosine, ``P_mean: 0.5``) reached 1.30x / 1.11x the teacher's best FID at 1 / 2
  steps over 3 seeds (``benchmarks/results/tbcm_time_derivative.md``).
- ``data: noise``: the teacher rolls out from pure noise inside training: per batch,
  ``rollout_steps`` DDIM steps in TrigFlow time from the schedule's last time to 0 give
  x0_teacher; then x_t = cos t x0_teacher + sin t sigma_d eps with sCM's proposal
  t = atan(exp(tau) / sigma_d), tau ~ N(P_mean, P_std^2) (sCM's pixel-space -1.0, 1.4),
  clamped to the teacher's times: Algorithm 1 with the teacher's samples for data. An
  epoch is ``rows`` rows (pixel: label = id mod classes; latent: a train prompt each, w
  fixed or drawn from ``guidance_range`` for ``guidance: embedded``).

Saved (the student starts from the teacher, ``init`` / ``architecture`` as the other
students; latent: ``guidance`` / ``guidance_scale`` / ``lora`` as
``stages.train.latent_student``): pixel, a diffusers folder whose ``student.json`` holds
sCM's multistep x0 chains from T - 1 (2 steps through t = 1.1; 4 through 1.3, 1.1, 0.8, each
time's nearest VP timestep); latent, a pipeline folder with the family's consistency
scheduler, whose own 4-point grid (and its half) are the chains.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt, model_validator

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model
from stages.data.tables import parquet, require_columns
from stages.models.diffusion import check_shape, load_diffusion, where_of
from stages.models.families.sampling import guidance_mode, row_guidance
from stages.models.trigflow import TrigFlow
from stages.train.diffusion_student import StudentConfig, StudentMethod, StudentStage
from stages.train.harness import TrainMethod
from stages.train.latent_student import (LatentStudentMethod, build_student,
                                         check_latent_student)
from stages.train.rows import Rows
from stages.train.scm_parts import CHAINS, SCM, chains

KEYS = {"pixel": ["label"], "latent": ["prompt_index", "guidance_scale"]}


class PixelSCM(SCM, StudentMethod):
    def __init__(self, cfg, teacher, columns, shape):
        super().__init__(cfg, teacher, columns)
        self.shape = shape
        self.keep_ema(cfg)

    def setup(self, device):
        nets = super().setup(device)
        self.tf = TrigFlow.of(self.teacher, self.cfg.sigma_d, "student")
        return self.with_logvar(nets, device)

    def call(self, net, y):
        kwargs = {"class_labels": y} if self.teacher.num_classes else {}
        return lambda x_m, tau: net(x_m, tau, **kwargs).sample

    def loss(self, nets, emas, batch, gen):
        y, x_t, t_next = batch["label"], None, None                     # 1. the states
        if self.cfg.data != "noise":
            x_t, t, t_next, rep = self.from_stored(batch, ["label"], gen)
            y = rep["label"]
        teacher = self.call(self.teacher.unet, y)
        if x_t is None:
            x_t, t = self.from_noise(teacher, self.shape, len(y), gen, y.device)
        x_t, t, v = self.teacher_velocity(teacher, x_t, t, t_next, gen)  # 2. dx_t/dt
        return self.scm_loss(nets, x_t, t, v, lambda net: self.call(net, y))


class LatentSCM(SCM, LatentStudentMethod, TrainMethod):
    teacher_in_loop = True

    def __init__(self, cfg, teacher, embeddings, columns, w_fixed, shape):
        super().__init__(cfg, teacher, embeddings, columns, w_fixed)
        self.shape = shape
        self.keep_ema(cfg)

    def setup(self, device):
        nets = super().setup(device)
        self.tf = TrigFlow.of(self.model, self.cfg.sigma_d, "student")
        return self.with_logvar(nets, device)

    def loss(self, nets, emas, batch, gen):
        x_t = t_next = None                                             # 1. the states
        if self.cfg.data != "noise":
            x_t, t, t_next, batch = self.from_stored(batch, KEYS["latent"], gen)
        cond, w, mode = self.conditioning(batch)
        teacher_w = batch["guidance_scale"] if self.cfg.guidance == "embedded" else w
        guided = guidance_mode(self.model, True)
        teacher = lambda x, tau: self.model.predict(  # noqa: E731
            self.teacher, x, tau, cond, teacher_w, guided)
        if x_t is None:
            x_t, t = self.from_noise(teacher, self.shape, len(w), gen, w.device)
        x_t, t, v = self.teacher_velocity(teacher, x_t, t, t_next, gen)  # 2. dx_t/dt
        return self.scm_loss(nets, x_t, t, v, lambda net: (
            lambda x, tau: self.model.predict(net, x, tau, cond, w, mode)))


class SCMDistill(StudentStage):
    kind = "scm-distill"
    version = "2"  # 2: the saved student is the EMA of its weights (ema_decay); data: samples

    class Config(StudentConfig):
        # fields added later: out of the key at their defaults
        added = ("time_derivative", "time_delta", "jitter", "logvar_lr", "lr_schedule")
        data: Literal["trajectories", "samples", "noise"] = "trajectories"
        sigma_d: float = Field(0.5, gt=0)
        P_mean: float = -1.0                     # noise / samples: tau ~ N(P_mean, P_std^2)
        P_std: float = Field(1.4, gt=0)
        tangent_warmup_steps: int = Field(1000, ge=0)  # r from 0 to 1 over these steps
        tangent_norm_c: float = Field(0.1, gt=0)
        time_derivative: Literal["jvp", "central-difference"] = "jvp"
        time_delta: float = Field(0.02, gt=0, le=0.2)  # d of the central difference
        jitter: bool = False                     # trajectories: states moved to any time
        logvar: bool = True                      # adaptive weighting u(t)
        logvar_lr: float | None = Field(None, gt=0)  # u(t)'s learning rate (None: lr)
        prior_weighting: bool = True             # w(t) = 1 / (sigma_d tan t)
        rollout_steps: PositiveInt = 8           # data: noise: teacher steps per batch
        rows: PositiveInt | None = None          # data: noise: rows per epoch (1024)
        guidance_range: tuple[float, float] | None = None  # data: noise, embedded: w range
        batch_size: int = Field(32, ge=1)        # trajectories (x their states) or rows
        lr: float = Field(1e-4, gt=0)
        ema_decay: float = Field(0.99, ge=0, lt=1)  # the saved (sampled) student's EMA
        lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: to 0 at the end

        @model_validator(mode="after")
        def _noise_fields(self):
            if self.rows is not None and self.data != "noise":
                raise ValueError("rows is for data: noise (trajectories bring their own)")
            if self.jitter and self.data != "trajectories":
                raise ValueError("jitter is for data: trajectories (data: noise draws "
                                 "its times from sCM's proposal, every time already)")
            if self.guidance_range is not None and (self.data != "noise"
                                                    or self.guidance != "embedded"):
                raise ValueError("guidance_range is for data: noise with guidance: embedded "
                                 "(the w each row's teacher rollout and student take)")
            return self

    inputs = {"teacher": Model}
    optional_inputs = {"trajectories": Dataset, "embeddings": Dataset}

    def rows(self, cfg, data, method):
        return data if isinstance(data, Rows) else super().rows(cfg, data, method)

    def check_data(self, ctx, trajectories, latent: bool):
        """The input ``data`` asks for, of the right kind."""
        where, cfg = where_of(ctx, self.kind), self.config
        if cfg.data == "noise":
            if trajectories is not None:
                raise bad_value(where, "input 'trajectories'", "wired", "unwired for data: "
                                "noise (the teacher rolls out from noise); or data: "
                                "trajectories or samples")
            return
        if trajectories is None:
            raise bad_value(where, "input 'trajectories'", None, "the diffusion-trajectories "
                            f"output (data: {cfg.data} trains on its stored states); or "
                            "data: noise")
        tw = where_of(ctx, self.kind, "trajectories")
        names = parquet(trajectories).schema.names
        if "pairs" in trajectories.info or "states" not in names:
            raise bad_value(tw, "dataset", f"info.pairs={trajectories.info.get('pairs')!r}, "
                            f"columns {names}", "the diffusion-trajectories output (column "
                            "'states', info.timesteps), not a diffusion-pairs output")
        require_columns(trajectories, ["states", "timesteps"]
                        + KEYS["latent" if latent else "pixel"], tw)

    def method_with_states(self, ctx, method, trajectories, clean: float):
        """``method`` told which stored states its data takes: ``trajectories`` the noisy
        ones, ``samples`` the clean end (one clear error where none is stored)."""
        if trajectories is None:
            return method
        stored = trajectories.info["timesteps"]
        if self.config.data == "trajectories":
            method.noisy = [i for i, t in enumerate(stored) if t != clean]
        elif clean not in stored:
            raise bad_value(where_of(ctx, self.kind, "trajectories"), "info.timesteps",
                            stored, f"a clean end ({clean:g}) for data: samples: a "
                            "diffusion-trajectories output whose keep_states keeps the last "
                            "state; or data: trajectories")
        else:
            method.clean = stored.index(clean)
        return method

    def run(self, ctx, teacher, trajectories=None, embeddings=None):
        from stages.models.families import is_latent
        if is_latent(teacher.path):
            return self.run_latent(ctx, teacher, trajectories, embeddings)
        cfg = self.config
        self.check_pixel(ctx, cfg, embeddings)
        model = load_diffusion(teacher.path, where_of(ctx, self.kind, "teacher"))
        tf = TrigFlow.of(model, cfg.sigma_d, where_of(ctx, self.kind, "teacher"))
        self.check_data(ctx, trajectories, latent=False)
        if trajectories is not None and trajectories.info.get("shape") is not None:
            check_shape(model, trajectories.info["shape"],
                        where_of(ctx, self.kind, "trajectories"), "trajectories")
        data = trajectories
        columns = ["states", "timesteps", "label"] if data is not None else ["label"]
        method = self.method_with_states(ctx, PixelSCM(cfg, teacher, columns, model.shape),
                                         trajectories, -1)
        if data is None:
            ids = torch.arange(cfg.rows or 1024)
            data = Rows(method.columns, tensors={"label": ids % (model.num_classes or 1)})
        student = {"method": "scm", "data": cfg.data, "sigma_d": cfg.sigma_d,
                   "timesteps": chains(tf), "covered_steps": sorted(CHAINS),
                   "max_steps": max(CHAINS)}
        out = self.train(ctx, cfg, data, teacher, method, student, model.scheduler_config)
        out.info["data"] = cfg.data
        return {"model": out}

    def run_latent(self, ctx, teacher, trajectories, embeddings):
        from stages.models.families import load_latent
        from stages.models.families.base import check_embeddings
        cfg, where = self.config, where_of(ctx, self.kind)
        model = load_latent(teacher.path, where_of(ctx, self.kind, "teacher"))
        tf = TrigFlow.of(model, cfg.sigma_d, where_of(ctx, self.kind, "teacher"))
        self.check_data(ctx, trajectories, latent=True)
        if embeddings is None:
            raise bad_value(where, "input 'embeddings'", None, "the encode-prompts output "
                            f"of the teacher's prompts (a {model.pipeline_class} teacher)")
        check_embeddings(model, embeddings.info, where_of(ctx, self.kind, "embeddings"))
        if cfg.architecture is not None or cfg.init != "teacher":
            raise bad_value(f"{where} config", "architecture / init", "set", "unset for a "
                            "latent teacher (its student starts from the teacher's denoiser)")
        shape = model.latent_shape()
        info = {"guidance_scale": 1.0}
        if trajectories is not None:
            info, shape = trajectories.info, tuple(trajectories.info.get("shape") or shape)
            if int(shape[0]) != model.latent_shape()[0]:
                raise bad_value(where_of(ctx, self.kind, "trajectories"), "latent shape "
                                "(channels, height, width)", list(shape),
                                f"{model.latent_shape()[0]} channels, the teacher's latents")
        elif cfg.guidance == "embedded" and cfg.guidance_range is None:
            raise bad_value(f"{where} config", "guidance_range", None, "[low, high], the w "
                            "range of data: noise with guidance: embedded")
        w = check_latent_student(model, cfg, info, f"{where} config", online=True)
        build_student(model, cfg, f"{where} config")  # slot and LoRA targets
        columns = (["states", "timesteps"] if trajectories is not None else []) \
            + KEYS["latent"]
        method = self.method_with_states(ctx, LatentSCM(
            cfg, teacher, embeddings, columns, w, tuple(shape)), trajectories,
            model.schedule.clean)
        data = trajectories
        if data is None:
            import pyarrow.compute as pc
            prompts = parquet(embeddings).count_rows(filter=pc.field("split") == "train")
            ids = torch.arange(cfg.rows or 1024)
            scale = tuple(cfg.guidance_range) if cfg.guidance == "embedded" else w
            data = Rows(method.columns, tensors={"prompt_index": ids % max(prompts, 1),
                                                 "guidance_scale": row_guidance(
                                                     ctx.seed, ids.numpy(), scale)})
        four = chains(tf)["4"]
        student = {"method": "scm", "data": cfg.data, "sigma_d": cfg.sigma_d,
                   "timesteps": four, "max_steps": len(four)}
        scheduler = model.family.student_scheduler(model, four)
        out = self.train_latent(ctx, cfg, data, model, method, student, scheduler)
        out.info["data"] = cfg.data
        return {"model": out}

