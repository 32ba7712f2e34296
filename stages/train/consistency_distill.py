"""``consistency-distill``: consistency distillation of a diffusers teacher into a 1-4 step
student (Song et al. 2023, "Consistency Models", Sec. 4, eq. 7 and Algorithm 2; the
discrete-time epsilon/v-prediction form of Luo et al. 2023, "Latent Consistency Models",
eq. 9), trained through the training harness (Ray Train workers by default).

Consistency function f_theta(x, t) = c_skip(t) x + c_out(t) x0_theta(x, t), with the LCM
boundary scalings c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2),
s_d = 0.5, so f(x, 0) = x. On adjacent points t_hi > t_lo of one teacher ODE trajectory:

    L = d( f_theta(x_{t_hi}, t_hi), stopgrad f_{theta-}(x_{t_lo}, t_lo) )

theta- an EMA of theta (decay ``ema_decay``; Song et al. use mu = 0.95 for CD in pixel
space), d = L2 (mean squared error) or pseudo-Huber sqrt(||a - b||^2 + c^2) - c (Song &
Dhariwal 2023, "Improved Techniques for Training Consistency Models", eq. 9, with
c = 0.00054 sqrt(dim) when ``huber_c`` is left unset).

- ``mode: trajectory`` (default, TBCM / BOOT-style data-free): both points are read from the
  stored teacher trajectories (``diffusion-pairs`` output ``consistency``); no teacher in
  the loop.
- ``mode: online``: x_{t_hi} = alpha x0 + sigma z from the trajectories' final samples
  (teacher samples as data) and fresh noise, x_{t_lo} by one teacher DDIM solver step
  (Algorithm 2's Phi), the teacher in the loop.

The student (the teacher's UNet, or a smaller ``architecture`` started from the teacher
weights it shares; fresh with ``init: scratch``) is saved as a diffusers folder with
``student.json``: multistep consistency sampling (Algorithm 1) in
1..K-1 steps over the trajectory's timesteps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from stages.models.diffusion_sampling import consistency_fn, ddim_step
from stages.train.diffusion_student import StudentConfig, StudentMethod, StudentStage


class ConsistencyLoss(StudentMethod):
    def __init__(self, cfg, teacher, columns: list[str], grid: list[int]):
        super().__init__(cfg, teacher, columns)
        self.distance, self.huber_c, self.mode, self.grid = (cfg.distance, cfg.huber_c,
                                                             cfg.mode, grid)

    def student_loss(self, model, ema, teacher, batch, gen):
        y = batch["label"]
        if self.mode == "trajectory":                                   # 1. the pair
            x_hi, t_hi, x_lo, t_lo = batch["x_hi"], batch["t_hi"], batch["x_lo"], batch["t_lo"]
        else:
            x0 = batch["sample"]
            i = torch.randint(0, len(self.grid) - 1, (len(x0),), generator=gen)
            grid = torch.tensor(self.grid, dtype=torch.float32)
            t_hi, t_lo = grid[i].to(x0.device), grid[i + 1].to(x0.device)
            a, s = teacher.alpha_sigma(t_hi, x0)
            x_hi = a * x0 + s * torch.randn(x0.shape, generator=gen).to(x0.device)
            with torch.no_grad():                                       # one solver step
                p0, eps = teacher.predict_x0(teacher.unet, x_hi, t_hi, y)
                x_lo = ddim_step(teacher, x_hi, p0, eps, t_hi, t_lo)
        pred = consistency_fn(teacher, model, x_hi, t_hi, y)            # 2. f_theta
        with torch.no_grad():
            target = consistency_fn(teacher, ema, x_lo, t_lo, y)        # 3. f_theta-
        diff = (pred - target).flatten(1)
        if self.distance == "l2":                                       # 4. distance
            return diff.pow(2).mean()
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(diff.shape[1])
        return ((diff.pow(2).sum(1) + c * c).sqrt() - c).mean()


class ConsistencyDistill(StudentStage):
    kind = "consistency-distill"
    version = "3"  # 2: the training harness (held pairs, one global permutation per epoch)
    # 3: a last partial batch dropped, the same steps whatever the number of workers

    class Config(StudentConfig):
        distance: Literal["l2", "pseudo_huber"] = "pseudo_huber"
        huber_c: float | None = Field(None, gt=0)
        mode: Literal["trajectory", "online"] = "trajectory"

    def run(self, ctx, pairs, teacher):
        cfg = self.config
        teacher_model = self.load_inputs(ctx, pairs, teacher, "consistency")
        grid = pairs.info["timesteps"]
        columns = (["x_hi", "t_hi", "x_lo", "t_lo", "label"] if cfg.mode == "trajectory"
                   else ["sample", "label"])
        noisy = [t for t in grid if t >= 0]
        student = {"method": "consistency", "timesteps": noisy, "max_steps": len(noisy),
                   "distance": cfg.distance, "mode": cfg.mode}
        method = ConsistencyLoss(cfg, teacher, columns, grid)
        model = self.train(ctx, cfg, pairs, teacher, method, student,
                           teacher_model.scheduler_config)
        return {"model": model}
