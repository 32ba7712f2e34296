"""``fit-diffusion-teacher``: a class-conditional (or unconditional) diffusers
``UNet2DModel`` trained as a denoising diffusion model on the ``split == "train"`` rows of an
image dataset (scikit-learn digits by default), in the stage task itself; saved with
``save_pretrained`` together with its scheduler config (a ``DDIMScheduler`` with the
training noise schedule), so the whole diffusion family runs offline and a user's own
diffusers folder can replace it.

Training (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Algorithm 1):
x0 in [-1, 1], t ~ U{0..T-1}, z ~ N(0, I), x_t = alpha_t x0 + sigma_t z and
L = ||F_theta(x_t, t, y) - target||^2 with target z (``epsilon``, eq. 14) or
v = alpha_t z - sigma_t x0 (``v_prediction``, Salimans & Ho 2022, Sec. 4), the default:
it stays well-posed at t = T - 1, where few-step samplers start. Class labels enter through
the UNet's class embedding; with ``cond_drop`` > 0 nothing else changes (no guidance).
The noise schedule is the cosine one (Nichol & Dhariwal 2021, eq. 17). An EMA of the
weights (decay ``ema_decay``) is what gets saved. Images can be zero-padded to
``pad_to`` pixels when a deeper UNet needs a larger input. Trained through the training
harness (``stages.train.harness``; in the stage's process by default): a killed run resumes
from its last epoch, with the time it had used.

The run always trains ``epochs`` epochs, so the teacher (and every student of it) is the
same on any machine under one cache key. ``max_minutes`` is a time budget that fails the
run with a clear error once spent, never shortens it; it is an execution setting (not in
the key): the checkpoint is kept, and a re-run with a larger budget resumes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Stage
from stages.data.tables import read_split
from stages.models.diffusion import UNetArch, save_diffusion, to_images, where_of
from stages.train.harness import Loss, TrainConfig, TrainMethod, fit
from stages.train.rows import Rows

COLUMNS = {"x": torch.float32, "label": torch.int64}


class Denoising(TrainMethod):
    """DDPM's denoising loss on a UNet2DModel (epsilon or v target); EMA kept."""

    columns = COLUMNS

    def __init__(self, cfg, shape, num_classes: int | None, scheduler_config: dict):
        self.cfg, self.shape, self.num_classes = cfg, list(shape), num_classes
        self.scheduler_config = scheduler_config
        self.ema = {"unet": cfg.ema_decay}

    def setup(self, device):
        from diffusers import DDIMScheduler
        scheduler = DDIMScheduler.from_config(self.scheduler_config)
        self.ab = scheduler.alphas_cumprod.float().to(device)
        c, h = self.shape[0], self.shape[1]
        return {"unet": self.cfg.build(h, c, self.num_classes).to(device)}

    def optimizers(self, nets):
        return {"unet": torch.optim.AdamW(nets["unet"].parameters(), lr=self.cfg.lr)}

    def lr_factor(self, progress: float) -> float:
        """5% linear warm-up, then cosine to zero over the run's steps."""
        if progress < 0.05:
            return max(progress / 0.05, 0.01)
        return 0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95))

    def loss(self, nets, emas, batch, gen):
        x0, labels = batch["x"], batch["label"]
        t = torch.randint(0, len(self.ab), (len(x0),), generator=gen).to(x0.device)
        z = torch.randn(x0.shape, generator=gen).to(x0.device)
        a = self.ab[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - self.ab[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * z
        target = z if self.cfg.prediction_type == "epsilon" else a * z - s * x0
        kwargs = {"class_labels": labels} if self.num_classes else {}
        return Loss({"unet": F.mse_loss(nets["unet"](xt, t, **kwargs).sample, target)}, len(x0))


class FitDiffusionTeacher(Stage):
    kind = "fit-diffusion-teacher"
    version = "4"  # 2: the training harness (per-row noise from its generator, resume)
    # 3: a last partial batch dropped, the same steps whatever the number of workers
    # 4: a fixed number of epochs; max_minutes fails the run instead of shortening it

    class Config(UNetArch, TrainConfig):
        prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
        beta_schedule: Literal["squaredcos_cap_v2", "linear"] = "squaredcos_cap_v2"
        num_train_timesteps: int = Field(1000, ge=2)
        conditional: bool = True
        epochs: int = Field(200, ge=1)
        max_minutes: float | None = Field(None, gt=0)  # fail (never shorten) past this
        batch_size: int = Field(128, ge=1)
        lr: float = Field(1e-3, gt=0)
        ema_decay: float = Field(0.999, ge=0, lt=1)
        grad_clip: float = Field(1.0, gt=0)
        pad_to: int | None = Field(None, ge=1)
        threads: int | None = Field(None, ge=1)  # torch CPU threads; None: torch's default
        num_workers: int = Field(0, ge=0)  # 0: in the stage's process; N: Ray Train workers
        execution = ("threads", "max_minutes")

        def keyed_execution(self) -> dict[str, str]:
            return {**super().keyed_execution(),
                    "num_workers": "the loss draws noise and timesteps on each worker"}

    inputs = {"data": Dataset}
    outputs = {"model": Model}
    metrics = ("train_loss", "start_epoch")  # per epoch

    def run(self, ctx, data):
        from diffusers import DDIMScheduler

        cfg = self.config
        where = where_of(ctx, self.kind, "data")
        cols = read_split(data, "train", ["x", "label"], where)
        x = to_images(cols["x"])                                              # 1. data
        if x.ndim != 4:
            raise bad_value(where, "x shape", list(x.shape[1:]), "(channels, height, width)")
        if cfg.pad_to:
            ph, pw = max(cfg.pad_to - x.shape[2], 0), max(cfg.pad_to - x.shape[3], 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0)
        y = torch.tensor(cols["label"], dtype=torch.long)
        num_classes = int(data.info.get("num_classes", int(y.max()) + 1))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        scheduler = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps,  # 2. model
                                  beta_schedule=cfg.beta_schedule,
                                  prediction_type=cfg.prediction_type,
                                  timestep_spacing="trailing", clip_sample=True)
        classes = num_classes if cfg.conditional else None
        method = Denoising(cfg, x.shape[1:], classes, dict(scheduler.config))
        trained = fit(ctx, method, Rows(COLUMNS, tensors={"x": x, "label": y}), cfg,  # 3.
                      deadline_minutes=cfg.max_minutes)

        unet = cfg.build(x.shape[2], x.shape[1], classes)                      # 4. save EMA
        unet.load_state_dict(trained.state["emas"]["unet"])
        path = save_diffusion(unet, dict(scheduler.config), ctx.output_dir("model"))
        info = {"num_classes": classes, "shape": list(x.shape[1:]),
                "epochs": trained.state["epoch"] + 1,
                "params": sum(p.numel() for p in unet.parameters()),
                "train_seconds": round(trained.state["elapsed"], 1),
                "prediction_type": cfg.prediction_type}
        return {"model": Model(path=path, info=info)}
