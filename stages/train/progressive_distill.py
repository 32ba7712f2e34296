"""``progressive-distill``: progressive distillation (Salimans & Ho 2022, "Progressive
Distillation for Fast Sampling of Diffusion Models", Algorithm 2 and eq. 9-10), trained
through the training harness (Ray Train workers by default): rounds that halve the number
of DDIM steps, each round's student teaching the next.

Round r: the teacher samples in 2N steps, the student in N = start_steps / 2^(r+1)
("trailing" timestep grids, so every student point is a teacher point). Data x0: the
teacher's own samples (``diffusion-pairs`` output ``reflow``, column ``sample``), so no real
images are needed. For a student step t -> t'' (teacher steps t -> t' -> t''):

    x_t = alpha_t x0 + sigma_t z,   x_{t''} = DDIM_teacher(DDIM_teacher(x_t, t -> t'), t' -> t'')
    x0_target = (x_{t''} - (sigma_{t''}/sigma_t) x_t) / (alpha_{t''} - (sigma_{t''}/sigma_t) alpha_t)
    L = max(SNR(t), 1) ||x0_student(x_t) - x0_target||^2        (truncated SNR weighting)

When t'' is clean the target is x_{t''} itself. The student is initialised from the teacher
(the v-prediction parameterisation keeps x0 well defined at t = T - 1); at the start of
every round after the first, a frozen copy of the student becomes the round's teacher.
``epochs`` is per round. The saved student samples with DDIM in any step count its rounds
covered (start_steps / 2, ..., final_steps).

Latent text-to-image teachers (input ``embeddings``; ``stages.train.latent_student``): the
same rounds on latents conditioned on the stored prompt embeddings, the first round's
teacher guided (CFG at the row's w for ``guidance: embedded``, or at the fixed w), later
rounds' teachers the previous student taking w as it does. A student step t -> t'' is
split at the midpoint t' = (t + t'') / 2 of the model times (on "trailing" VP grids that is
exactly the 2N-step teacher grid), every step a DDIM / flow-Euler step
x' = alpha' x0_hat + sigma' eps_hat. The student's grid is that of the scheduler it is
saved with: ``DDIMScheduler`` with trailing timesteps (VP) or the teacher's
``FlowMatchEulerDiscreteScheduler`` (flow), so a plain pipeline samples it.
"""

from __future__ import annotations

import copy
import math

import torch
from pydantic import Field, model_validator

from stages.models.diffusion import Diffusion
from stages.models.diffusion_sampling import ddim_step, trailing_grid
from stages.models.families.sampling import guidance_mode
from stages.train.diffusion_student import StudentConfig, StudentMethod, StudentStage
from stages.train.harness import Loss
from stages.train.latent_student import LatentStudentMethod


class ProgressiveLoss(StudentMethod):
    def __init__(self, cfg, teacher, epochs_per_round: int):
        super().__init__(cfg, teacher, ["sample", "label"])
        self.start_steps, self.epochs_per_round = cfg.start_steps, epochs_per_round
        self.round, self.round_teacher, self._pending = -1, None, None

    def steps(self) -> int:
        return self.start_steps // 2 ** (self.round + 1)

    def begin_epoch(self, epoch, nets):
        student = nets["student"]
        r = epoch // self.epochs_per_round
        if r == self.round and self._pending is None:
            return
        if r > 0 and (self._pending is not None or r != self.round):
            self.round_teacher = copy.deepcopy(student).eval().requires_grad_(False)
            if self._pending is not None and self.round == r:  # resumed mid-round
                self.round_teacher.load_state_dict(self._pending)
        self.round, self._pending = r, None

    def student_loss(self, model, ema, teacher: Diffusion, batch, gen):
        x0, y = batch["sample"], batch["label"]
        unet_t = teacher.unet if self.round == 0 else self.round_teacher
        n = self.steps()
        grid_s = trailing_grid(n, teacher.num_train_timesteps)
        grid_t = trailing_grid(2 * n, teacher.num_train_timesteps)
        i = torch.randint(0, n, (len(x0),), generator=gen)              # 1. a student step
        pick = lambda g, j: torch.tensor(g, dtype=torch.float32)[j].to(x0.device)  # noqa: E731
        t, t_mid, t_end = pick(grid_s, i), pick(grid_t, 2 * i + 1), pick(grid_s, i + 1)
        a, s = teacher.alpha_sigma(t, x0)
        xt = a * x0 + s * torch.randn(x0.shape, generator=gen).to(x0.device)
        with torch.no_grad():                                           # 2. two teacher steps
            p0, eps = teacher.predict_x0(unet_t, xt, t, y, clip=True)
            x_mid = ddim_step(teacher, xt, p0, eps, t, t_mid)
            p0, eps = teacher.predict_x0(unet_t, x_mid, t_mid, y, clip=True)
            x_end = ddim_step(teacher, x_mid, p0, eps, t_mid, t_end)
            a2, s2 = teacher.alpha_sigma(t_end, x0)                     # 3. x0 target
            ratio = s2 / s
            target = (x_end - ratio * xt) / (a2 - ratio * a)
        pred, _ = teacher.predict_x0(model, xt, t, y)                   # 4. the student
        weight = (a ** 2 / s.clamp(min=1e-8) ** 2).clamp(min=1.0, max=1e4)  # max(SNR, 1)
        return (weight * (pred - target) ** 2).mean()

    def epoch_metrics(self, nets):
        return {"round": self.round, "student_steps": self.steps()}

    def state_dict(self):
        state = {"round": torch.tensor(self.round)}
        if self.round_teacher is not None:
            state["teacher"] = self.round_teacher.state_dict()
        return state

    def load_state_dict(self, state):
        self.round = int(state["round"])
        self._pending = state.get("teacher")


class LatentProgressiveLoss(LatentStudentMethod, ProgressiveLoss):
    """The rounds of ``ProgressiveLoss`` on a latent teacher (the module docstring)."""

    teacher_in_loop = True

    def __init__(self, cfg, teacher, embeddings, w_fixed, epochs_per_round, grids: dict):
        LatentStudentMethod.__init__(self, cfg, teacher, embeddings,
                                     ["sample", "prompt_index", "guidance_scale"], w_fixed)
        self.start_steps, self.epochs_per_round, self.grids = (cfg.start_steps,
                                                                epochs_per_round, grids)
        self.round, self.round_teacher, self._pending = -1, None, None

    def loss(self, nets, emas, batch, gen):
        cond, w, mode = self.conditioning(batch)                        # 1. conditioning
        schedule, x0 = self.model.schedule, batch["sample"]
        grid = torch.tensor(self.grids[self.steps()], dtype=torch.float32)
        i = torch.randint(0, len(grid) - 1, (len(x0),), generator=gen)  # 2. a student step
        t, t_end = grid[i].to(x0.device), grid[i + 1].to(x0.device)
        t_mid = (t + t_end) / 2
        xt = schedule.noised(x0, torch.randn(x0.shape, generator=gen).to(x0.device), t)
        if self.round == 0:  # the guided teacher
            net_t, w_t, mode_t = self.teacher, (batch["guidance_scale"] if mode == "embedded"
                                                else w), guidance_mode(self.model, True)
        else:                # the previous round's student, taking w as the student does
            net_t, w_t, mode_t = self.round_teacher, w, mode
        with torch.no_grad():                                           # 3. two teacher steps
            x = xt
            for a_t, b_t in ((t, t_mid), (t_mid, t_end)):
                p0, eps = schedule.x0_eps(self.model.predict(net_t, x, a_t, cond, w_t, mode_t),
                                          x, a_t)
                x = schedule.noised(p0, eps, b_t)
            a, s = schedule.alpha_sigma(t, x0)                          # 4. x0 target
            a2, s2 = schedule.alpha_sigma(t_end, x0)
            ratio = s2 / s
            target = (x - ratio * xt) / (a2 - ratio * a)
        out = self.model.predict(nets["student"], xt, t, cond, w, mode)  # 5. the student
        pred, _ = schedule.x0_eps(out, xt, t)
        weight = (a ** 2 / s.clamp(min=1e-8) ** 2).clamp(min=1.0, max=1e4)  # max(SNR, 1)
        return Loss({"student": (weight * (pred - target) ** 2).mean()}, len(x0))


class ProgressiveDistill(StudentStage):
    kind = "progressive-distill"
    version = "4"  # 4: latent text-to-image teachers
    # 2: the training harness (held pairs, one global permutation per epoch)
    # 3: a last partial batch dropped, the same steps whatever the number of workers

    class Config(StudentConfig):
        start_steps: int = Field(16, ge=2)   # the first round's teacher steps
        final_steps: int = Field(1, ge=1)
        epochs: int = Field(4, ge=1)         # per round

        @model_validator(mode="after")
        def _halving(self):
            ratio = self.start_steps / self.final_steps
            if ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
                raise ValueError(f"start_steps ({self.start_steps}) must be final_steps "
                                 f"({self.final_steps}) times a power of two (at least 2): "
                                 "each round halves the steps")
            return self

    def run(self, ctx, pairs, teacher, embeddings=None):
        from stages.models.families import is_latent
        if is_latent(teacher.path):
            return self.run_latent(ctx, pairs, teacher, embeddings)
        self.check_pixel(ctx, self.config, embeddings)
        cfg = self.config
        teacher_model = self.load_inputs(ctx, pairs, teacher, "reflow")  # teacher samples
        rounds = round(math.log2(cfg.start_steps / cfg.final_steps))
        covered = [cfg.start_steps // 2 ** (r + 1) for r in range(rounds)]
        student = {"method": "progressive", "covered_steps": covered,
                   "max_steps": max(covered), "rounds": rounds}
        total = cfg.model_copy(update={"epochs": cfg.epochs * rounds})
        method = ProgressiveLoss(total, teacher, cfg.epochs)
        model = self.train(ctx, total, pairs, teacher, method, student,
                           teacher_model.scheduler_config)
        return {"model": model}

    def run_latent(self, ctx, pairs, teacher, embeddings):
        from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
        cfg = self.config
        model, w = self.load_latent_inputs(ctx, pairs, teacher, embeddings, "reflow",
                                           online=True)  # the teacher in the loop
        rounds = round(math.log2(cfg.start_steps / cfg.final_steps))
        covered = [cfg.start_steps // 2 ** (r + 1) for r in range(rounds)]
        if model.family.flow:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
        else:
            scheduler = DDIMScheduler.from_config(model.scheduler_config,
                                                  timestep_spacing="trailing",
                                                  set_alpha_to_one=True, clip_sample=False)
        grids = {}
        for n in covered:  # the student's grid is its scheduler's, then clean
            model.family.set_timesteps(model, scheduler, n, tuple(pairs.info["shape"]))
            grids[n] = [float(t) for t in scheduler.timesteps] + [model.schedule.clean]
        student = {"method": "progressive", "covered_steps": covered,
                   "max_steps": max(covered), "rounds": rounds}
        total = cfg.model_copy(update={"epochs": cfg.epochs * rounds})
        method = LatentProgressiveLoss(total, teacher, embeddings, w, cfg.epochs, grids)
        return {"model": self.train_latent(ctx, total, pairs, model, method, student,
                                           scheduler)}
