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

Latent text-to-image teachers (``stages.models.families``; input ``embeddings``, the
``encode-prompts`` output): the same loss on latents, conditioned on the stored prompt
embeddings, in the family's own time (VP timesteps, or t = 1000 sigma for flow-matching
families, whose x0 is x_t - sigma v; the boundary scalings are the same functions of t).
In ``online`` mode the teacher's solver step is taken with guidance (LCM's augmented PF-ODE,
Luo et al. 2023, eq. 10: w per row, or the fixed w), one DDIM / flow-Euler step
x_lo = alpha_lo x0_hat + sigma_lo eps_hat. ``guidance``, ``guidance_scale`` and ``lora``:
``stages.train.latent_student``. Saved as a pipeline folder with ``LCMScheduler`` (VP) or
``FlowMatchLCMScheduler`` (flow), so ``DiffusionPipeline.from_pretrained`` samples it.

``segments`` (e.g. ``[8, 4, 2, 1]``, ``epochs`` per phase): Hyper-SD's trajectory-segmented
consistency distillation (TSCD; Ren et al. 2024, arXiv 2404.13686, Sec. 3.1). Phase i
splits the stored grid t_0 > ... > t_{K-1} (clean) into k_i equal segments whose
boundaries s_0 > s_1 > ... > s_k are stored timesteps; a pair (t_hi, t_lo) lies inside one
segment [s_{j+1}, s_j] and the consistency function maps to that segment's lower end:

    f_seg(x, t) = alpha_s x0_hat(x, t) + sigma_s eps_hat(x, t)   (a DDIM jump to s = s_{j+1})
    f_seg(x, s) = x                                                (the boundary condition)
    L = d( f_seg_theta(x_{t_hi}, t_hi), stopgrad f_seg_{theta-}(x_{t_lo}, t_lo) )

with the segment ending at clean using the LCM form above. Phases run in order in one
training run (k reduced phase by phase, each starting from the last phase's weights and
EMA); the last (k = 1) is ordinary consistency distillation, so the student samples like
any consistency student. Each earlier phase's student is its k-step model, as Hyper-SD
releases one model per step count: a pixel student keeps it in ``segment_unets/<k>/`` of
its folder and samples k steps with it by the segments' DDIM jumps s_0 -> s_1 -> ... -> s_k
(the map that phase fitted); other step counts use the last phase's student.

The student (the teacher's UNet, or a smaller ``architecture`` started from the teacher
weights it shares; fresh with ``init: scratch``) is saved as a diffusers folder with
``student.json``: multistep consistency sampling (Algorithm 1) in
1..K-1 steps over the trajectory's timesteps.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PositiveInt, field_validator

from pipelines.errors import bad_value
from stages.models.diffusion_sampling import (consistency_fn, consistency_scalings,
                                              ddim_step, segment_fn)
from stages.models.families.sampling import guidance_mode
from stages.train.diffusion_student import StudentConfig, StudentMethod, StudentStage
from stages.train.harness import Loss, TrainMethod
from stages.train.latent_student import LatentStudentMethod


def distance(pred, target, kind: str, huber_c: float | None) -> torch.Tensor:
    diff = (pred - target).flatten(1)
    if kind == "l2":
        return diff.pow(2).mean()
    c = huber_c if huber_c is not None else 0.00054 * math.sqrt(diff.shape[1])
    return ((diff.pow(2).sum(1) + c * c).sqrt() - c).mean()


def online_pair(x0: torch.Tensor, grid: list, gen):
    """``online`` mode's pair times and noise: per row a random adjacent pair (t_hi, t_lo)
    of the grid, and z ~ N(0, I) for x_{t_hi} = alpha x0 + sigma z."""
    i = torch.randint(0, len(grid) - 1, (len(x0),), generator=gen)
    g = torch.tensor(grid, dtype=torch.float32)
    return (g[i].to(x0.device), g[i + 1].to(x0.device),
            torch.randn(x0.shape, generator=gen).to(x0.device))


def segment_boundaries(grid: list, k: int) -> list:
    """The k + 1 boundaries of k equal segments of the stored grid (its first and last
    points included)."""
    return list(grid[::(len(grid) - 1) // k])


def segment_ends(t_lo: torch.Tensor, boundaries: list) -> torch.Tensor:
    """For each t_lo, the lower end s of its segment: the largest boundary <= t_lo."""
    b = torch.tensor(boundaries, dtype=torch.float32, device=t_lo.device)
    below = b.view(1, -1) <= t_lo.float().view(-1, 1) + 1e-4
    return torch.where(below, b.view(1, -1), torch.full_like(below, -1e9, dtype=b.dtype)
                       ).max(1).values


def save_phase_students(path: str, net, phase_nets: dict, grid: list) -> dict:
    """Each kept phase's student as a UNet folder ``segment_unets/<k>`` of the model
    folder; returns ``student.json``'s ``segment_unets``: for each k (a divisor of the
    stored intervals, so a step count the student covers) the k + 1 boundaries its k-step
    DDIM chain visits."""
    import copy
    import os
    saved = {}
    for k, weights in sorted(phase_nets.items()):
        phase = copy.deepcopy(net)
        phase.load_state_dict(weights)
        phase.save_pretrained(os.path.join(path, "segment_unets", str(k)))
        saved[str(k)] = {"boundaries": [int(t) for t in segment_boundaries(grid, k)]}
    return saved


class Segments:
    """Mixin of the phase schedule of ``segments`` (Hyper-SD's TSCD). With ``keep_phases``
    each phase's student (k > 1) is kept when its phase ends, in the method's state (so in
    every checkpoint after it): the k-step model, as Hyper-SD releases one per step count."""

    segments: list | None = None
    keep_phases = False

    def begin_epoch(self, epoch, nets):
        self.phase = min(epoch // self.epochs_per_phase, len(self.segments) - 1) \
            if self.segments else 0
        if self.keep_phases and epoch and epoch % self.epochs_per_phase == 0:
            ended = self.segments[epoch // self.epochs_per_phase - 1]  # the phase just ended
            self.phase_nets[ended] = {k: v.detach().cpu().clone()
                                      for k, v in nets["student"].state_dict().items()}

    def state_dict(self):
        return {"phase_nets": self.phase_nets} if self.keep_phases else {}

    def load_state_dict(self, state):
        self.phase_nets = dict(state.get("phase_nets", {}))

    def boundaries(self) -> list | None:
        """This phase's boundaries, or None when it is the ordinary (k = 1) loss."""
        if not self.segments or self.segments[self.phase] == 1:
            return None
        return segment_boundaries(self.grid, self.segments[self.phase])

    def epoch_metrics(self, nets):
        return {"segments": self.segments[self.phase]} if self.segments else {}


class ConsistencyLoss(Segments, StudentMethod):
    def __init__(self, cfg, teacher, columns: list[str], grid: list[int]):
        super().__init__(cfg, teacher, columns)
        self.distance, self.huber_c, self.mode, self.grid = (cfg.distance, cfg.huber_c,
                                                             cfg.mode, grid)
        self.segments, self.epochs_per_phase, self.phase = cfg.segments, cfg.epochs, 0
        self.keep_phases, self.phase_nets = bool(cfg.segments), {}

    def f(self, teacher, net, x, t, y, ends):
        """f(x, t), or f_seg(x, t) to the segment ends ``ends`` (None: to x0)."""
        if ends is None:
            return consistency_fn(teacher, net, x, t, y)
        return segment_fn(teacher, net, x, t, y, ends)

    def student_loss(self, model, ema, teacher, batch, gen):
        y = batch["label"]
        if self.mode == "trajectory":                                   # 1. the pair
            x_hi, t_hi, x_lo, t_lo = batch["x_hi"], batch["t_hi"], batch["x_lo"], batch["t_lo"]
        else:
            x0 = batch["sample"]
            t_hi, t_lo, z = online_pair(x0, self.grid, gen)
            a, s = teacher.alpha_sigma(t_hi, x0)
            x_hi = a * x0 + s * z
            with torch.no_grad():                                       # one solver step
                p0, eps = teacher.predict_x0(teacher.unet, x_hi, t_hi, y)
                x_lo = ddim_step(teacher, x_hi, p0, eps, t_hi, t_lo)
        bounds = self.boundaries()                                      # 2. the segment
        ends = None if bounds is None else segment_ends(t_lo, bounds)
        pred = self.f(teacher, model, x_hi, t_hi, y, ends)              # 3. f_theta
        with torch.no_grad():
            target = self.f(teacher, ema, x_lo, t_lo, y, ends)          # 4. f_theta-
        return distance(pred, target, self.distance, self.huber_c)   # 5. distance


class LatentConsistencyLoss(Segments, LatentStudentMethod, TrainMethod):
    """The same loss for a latent teacher (the module docstring)."""

    def __init__(self, cfg, teacher, embeddings, columns, w_fixed: float, grid: list[float]):
        super().__init__(cfg, teacher, embeddings, columns, w_fixed)
        self.grid, self.teacher_in_loop = grid, cfg.mode == "online"
        self.segments, self.epochs_per_phase, self.phase = cfg.segments, cfg.epochs, 0

    def f(self, net, x, t, cond, w, mode, ends=None):
        """f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t); with segment ends, the DDIM /
        flow-Euler jump to them (x itself at an end)."""
        out = self.model.predict(net, x, t, cond, w, mode)
        x0, eps = self.model.schedule.x0_eps(out, x, t)
        c_skip, c_out = consistency_scalings(t, x)
        full = c_skip * x + c_out * x0
        if ends is None:
            return full
        shape = (-1,) + (1,) * (x.ndim - 1)
        clean = self.model.schedule.clean
        jump = torch.where((ends <= clean + 1e-4).view(shape), full,
                           self.model.schedule.noised(x0, eps, ends))
        return torch.where((t <= ends + 1e-4).view(shape), x, jump)

    def loss(self, nets, emas, batch, gen):
        cond, w, mode = self.conditioning(batch)                        # 1. conditioning
        schedule = self.model.schedule
        if self.cfg.mode == "trajectory":                               # 2. the pair
            x_hi, t_hi, x_lo, t_lo = batch["x_hi"], batch["t_hi"], batch["x_lo"], batch["t_lo"]
        else:
            x0 = batch["sample"]
            t_hi, t_lo, z = online_pair(x0, self.grid, gen)
            x_hi = schedule.noised(x0, z, t_hi)
            teacher_w = batch["guidance_scale"] if self.cfg.guidance == "embedded" else w
            with torch.no_grad():                                       # one guided step
                out = self.model.predict(self.teacher, x_hi, t_hi, cond, teacher_w,
                                         guidance_mode(self.model, True))
                p0, eps = schedule.x0_eps(out, x_hi, t_hi)
                x_lo = schedule.noised(p0, eps, t_lo)
        bounds = self.boundaries()                                      # 3. the segment
        ends = None if bounds is None else segment_ends(t_lo, bounds)
        pred = self.f(nets["student"], x_hi, t_hi, cond, w, mode, ends)  # 4. f_theta
        with torch.no_grad():
            target = self.f(emas["student"], x_lo, t_lo, cond, w, mode, ends)  # 5. f_theta-
        loss = distance(pred, target, self.cfg.distance, self.cfg.huber_c)
        return Loss({"student": loss}, len(x_hi))


class ConsistencyDistill(StudentStage):
    kind = "consistency-distill"
    version = "6"  # 6: a segmented student keeps each phase's k-step model
    # 5: segments (phases)
    # 2: the training harness (held pairs, one global permutation per epoch)
    # 3: a last partial batch dropped, the same steps whatever the number of workers
    # 4: latent text-to-image teachers

    class Config(StudentConfig):
        distance: Literal["l2", "pseudo_huber"] = "pseudo_huber"
        huber_c: float | None = Field(None, gt=0)
        mode: Literal["trajectory", "online"] = "trajectory"
        segments: list[PositiveInt] | None = None  # Hyper-SD phases; epochs is per phase

        @field_validator("segments")
        @classmethod
        def _decreasing_to_one(cls, v):
            if v is not None and (any(a <= b for a, b in zip(v, v[1:])) or v[-1] != 1):
                raise ValueError(f"segments {v} must decrease phase by phase and end in 1 "
                                 "(e.g. [8, 4, 2, 1]): the last phase is ordinary "
                                 "consistency distillation")
            return v

    def check_segments(self, ctx, grid: list) -> None:
        """Every phase's k must divide the stored intervals: boundaries are stored states."""
        intervals = len(grid) - 1
        for k in self.config.segments or ():
            if intervals % k:
                fits = [d for d in range(1, intervals + 1) if intervals % d == 0]
                raise bad_value(f"stage '{ctx.name}' ({self.kind}) config", "segments", k,
                                f"a divisor of the {intervals} intervals between the stored "
                                f"timesteps {grid}: one of {fits}")

    def total(self, cfg):
        """The whole run's config: ``epochs`` per phase."""
        return cfg.model_copy(update={"epochs": cfg.epochs * len(cfg.segments or [1])})

    def run(self, ctx, pairs, teacher, embeddings=None):
        from stages.models.families import is_latent
        if is_latent(teacher.path):
            return self.run_latent(ctx, pairs, teacher, embeddings)
        self.check_pixel(ctx, self.config, embeddings)
        cfg = self.config
        teacher_model = self.load_inputs(ctx, pairs, teacher, "consistency")
        grid = pairs.info["timesteps"]
        self.check_segments(ctx, grid)
        columns = (["x_hi", "t_hi", "x_lo", "t_lo", "label"] if cfg.mode == "trajectory"
                   else ["sample", "label"])
        noisy = [t for t in grid if t >= 0]
        student = {"method": "consistency", "timesteps": noisy, "max_steps": len(noisy),
                   "distance": cfg.distance, "mode": cfg.mode, "segments": cfg.segments}
        method = ConsistencyLoss(cfg, teacher, columns, grid)

        def phases(path, net, state):  # each phase's k-step student (Hyper-SD's per-k models)
            student["segment_unets"] = save_phase_students(
                path, net, state["method"].get("phase_nets", {}), grid)

        model = self.train(ctx, self.total(cfg), pairs, teacher, method, student,
                           teacher_model.scheduler_config, finish=phases)
        return {"model": model}

    def run_latent(self, ctx, pairs, teacher, embeddings):
        cfg = self.config
        model, w = self.load_latent_inputs(ctx, pairs, teacher, embeddings, "consistency",
                                           online=cfg.mode == "online")
        grid = [float(t) for t in pairs.info["timesteps"]]
        self.check_segments(ctx, grid)
        columns = (["x_hi", "t_hi", "x_lo", "t_lo"] if cfg.mode == "trajectory"
                   else ["sample"]) + ["prompt_index", "guidance_scale"]
        noisy = [t for t in grid if t != model.schedule.clean]
        student = {"method": "consistency", "timesteps": noisy, "max_steps": len(noisy),
                   "distance": cfg.distance, "mode": cfg.mode, "segments": cfg.segments}
        method = LatentConsistencyLoss(cfg, teacher, embeddings, columns, w, grid)
        scheduler = model.family.student_scheduler(model, noisy)
        return {"model": self.train_latent(ctx, self.total(cfg), pairs, model, method,
                                           student, scheduler)}
