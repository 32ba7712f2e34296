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
``pad_to`` pixels when a deeper UNet needs a larger input.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.stage import Dataset, Model, Stage
from stages.data.tables import read_split
from stages.models.diffusion import UNetArch, save_diffusion, to_images, where_of
from stages.models.device import device as torch_device


class FitDiffusionTeacher(Stage):
    kind = "fit-diffusion-teacher"
    version = "1"

    class Config(UNetArch):
        prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
        beta_schedule: Literal["squaredcos_cap_v2", "linear"] = "squaredcos_cap_v2"
        num_train_timesteps: int = Field(1000, ge=2)
        conditional: bool = True
        epochs: int = Field(200, ge=1)
        max_minutes: float | None = Field(None, gt=0)  # stop early after this wall time
        batch_size: int = Field(128, ge=1)
        lr: float = Field(1e-3, gt=0)
        ema_decay: float = Field(0.999, ge=0, lt=1)
        pad_to: int | None = Field(None, ge=1)
        threads: int | None = Field(None, ge=1)  # torch CPU threads; None: torch's default

    inputs = {"data": Dataset}
    outputs = {"model": Model}

    def run(self, ctx, data):
        from diffusers import DDIMScheduler

        cfg = self.config
        where = where_of(ctx, self.kind, "data")
        cols = read_split(data, "train", ["x", "label"], where)
        x = to_images(cols["x"])                                              # 1. data
        if x.ndim != 4:
            from pipelines.errors import bad_value
            raise bad_value(where, "x shape", list(x.shape[1:]), "(channels, height, width)")
        if cfg.pad_to:
            ph, pw = max(cfg.pad_to - x.shape[2], 0), max(cfg.pad_to - x.shape[3], 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-1.0)
        y = torch.tensor(cols["label"], dtype=torch.long)
        num_classes = int(data.info.get("num_classes", int(y.max()) + 1))
        device = torch_device()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)

        scheduler = DDIMScheduler(num_train_timesteps=cfg.num_train_timesteps,  # 2. model
                                  beta_schedule=cfg.beta_schedule,
                                  prediction_type=cfg.prediction_type,
                                  timestep_spacing="trailing", clip_sample=True)
        ab = scheduler.alphas_cumprod.float().to(device)
        torch.manual_seed(ctx.seed)
        unet = cfg.build(x.shape[2], x.shape[1], num_classes if cfg.conditional else None)
        unet.to(device).train()
        ema = copy.deepcopy(unet).eval().requires_grad_(False)
        opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr)
        total_steps, step = cfg.epochs * math.ceil(len(x) / cfg.batch_size), 0
        x, y = x.to(device), y.to(device)
        gen = torch.Generator(device=device).manual_seed(ctx.seed)
        start, epoch = time.monotonic(), 0

        for epoch in range(cfg.epochs):                                      # 3. train
            perm = torch.randperm(len(x), generator=gen, device=device)
            total = 0.0
            for idx in perm.split(cfg.batch_size):
                x0, labels = x[idx], y[idx]
                t = torch.randint(0, cfg.num_train_timesteps, (len(idx),), generator=gen,
                                  device=device)
                z = torch.randn(x0.shape, generator=gen, device=device)
                a = ab[t].sqrt().view(-1, 1, 1, 1)
                s = (1 - ab[t]).sqrt().view(-1, 1, 1, 1)
                xt = a * x0 + s * z
                target = z if cfg.prediction_type == "epsilon" else a * z - s * x0
                kwargs = {"class_labels": labels} if cfg.conditional else {}
                loss = F.mse_loss(unet(xt, t, **kwargs).sample, target)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"training loss is {loss.item()} at epoch "
                                             f"{epoch}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
                for group in opt.param_groups:  # warm-up, then cosine decay over the
                    group["lr"] = cfg.lr * _lr_factor(step / total_steps, start, cfg)  # budget
                opt.step()
                step += 1
                with torch.no_grad():                                        # 4. EMA
                    for pe, p in zip(ema.parameters(), unet.parameters()):
                        pe.lerp_(p, 1 - cfg.ema_decay)
                total += loss.item() * len(idx)
            ctx.log_metrics({"train_loss": total / len(x)}, step=epoch)
            ctx.progress(epoch + 1, cfg.epochs, "epochs")
            if cfg.max_minutes and time.monotonic() - start > 60 * cfg.max_minutes:
                break

        path = save_diffusion(ema.cpu(), dict(scheduler.config), ctx.output_dir("model"))
        info = {"num_classes": num_classes if cfg.conditional else None,     # 5. save
                "shape": list(x.shape[1:]), "epochs": epoch + 1,
                "params": sum(p.numel() for p in unet.parameters()),
                "train_seconds": round(time.monotonic() - start, 1),
                "prediction_type": cfg.prediction_type}
        return {"model": Model(path=path, info=info)}


def _lr_factor(done: float, start: float, cfg) -> float:
    """5% linear warm-up, then cosine to zero; progress is the larger of the step fraction
    and the fraction of ``max_minutes`` used."""
    if cfg.max_minutes:
        done = max(done, (time.monotonic() - start) / (60 * cfg.max_minutes))
    done = min(done, 1.0)
    if done < 0.05:
        return max(done / 0.05, 0.01)
    return 0.5 * (1 + math.cos(math.pi * (done - 0.05) / 0.95))
