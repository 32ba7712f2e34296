"""``reflow``: rectified flow on teacher (noise, sample) pairs, for straight 1-step paths
(Liu, Gong & Liu 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data
with Rectified Flow", eq. 1 and Sec. 2.2 "reflow"; InstaFlow, Liu et al. 2024, Sec. 3),
trained through the training harness (Ray Train workers by default).

Pairs (z, x1 = ODE_teacher(z)) from ``diffusion-pairs`` output ``reflow``. With
s ~ U[0, 1] and x_s = s x1 + (1 - s) z:

    L = || v_theta(x_s, s, y) - (x1 - z) ||^2

The velocity field is the UNet evaluated at timestep (1 - s)(T - 1) with its output sign
flipped (``stages.models.diffusion_sampling.reflow_velocity``), initialised from the teacher unless
``init: scratch``. Sampling is Euler on dx/ds = v: x <- x + v(x, s) / k for k steps, so
1 step is x1 = z + v(z, 0). Saved as a diffusers folder with ``student.json``.

Latent text-to-image teachers (input ``embeddings``; ``stages.train.latent_student``): the
flow-matching convention of diffusers' ``FlowMatchEulerDiscreteScheduler``, so the student
runs in a plain pipeline (InstaFlow's 2-rectified flow on SD): with
sigma ~ U[0, 1] and x_sigma = (1 - sigma) x1 + sigma z,

    L = || v_theta(x_sigma, 1000 sigma, c, w) - (z - x1) ||^2

the denoiser at model time 1000 sigma, conditioned on the stored prompt embeddings (w
through the guidance slot, or the pairs' one fixed w). Sampling: x <- x + (sigma_next -
sigma) v from sigma = 1: the teacher's ``FlowMatchEulerDiscreteScheduler`` (with its shift)
for flow-matching families, ``DPMSolverMultistepScheduler`` of order 1 on flow sigmas
(``flow_prediction``), the same update, for the VP families' pipelines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.models.diffusion_sampling import reflow_velocity
from stages.train.diffusion_student import StudentConfig, StudentMethod, StudentStage
from stages.train.harness import Loss, TrainMethod
from stages.train.latent_student import LatentStudentMethod


class ReflowLoss(StudentMethod):
    def student_loss(self, model, ema, teacher, batch, gen):
        z, x1, y = batch["noise"], batch["sample"], batch["label"]
        s = torch.rand(len(z), generator=gen).to(z.device)             # 1. s ~ U[0, 1]
        sv = s.view(-1, 1, 1, 1)
        xs = sv * x1 + (1 - sv) * z                                    # 2. the straight path
        v = reflow_velocity(teacher, model, xs, s, y)                  # 3. v_theta(x_s, s)
        return F.mse_loss(v, x1 - z)                                   # 4. ||v - (x1 - z)||^2


class LatentReflowLoss(LatentStudentMethod, TrainMethod):
    def loss(self, nets, emas, batch, gen):
        cond, w, mode = self.conditioning(batch)                        # 1. conditioning
        z, x1 = batch["noise"], batch["sample"]
        sigma = torch.rand(len(z), generator=gen).to(z.device)         # 2. sigma ~ U[0, 1]
        sv = sigma.view(-1, 1, 1, 1)
        xs = (1 - sv) * x1 + sv * z                                    # 3. the straight path
        v = self.model.predict(nets["student"], xs, 1000 * sigma, cond, w, mode)
        return Loss({"student": F.mse_loss(v, z - x1)}, len(z))       # 4. ||v - (z - x1)||^2


class Reflow(StudentStage):
    kind = "reflow"
    version = "4"  # 4: latent text-to-image teachers
    # 2: the training harness (held pairs, one global permutation per epoch)
    # 3: a last partial batch dropped, the same steps whatever the number of workers

    class Config(StudentConfig):
        pass

    def run(self, ctx, pairs, teacher, embeddings=None):
        from stages.models.families import is_latent
        if is_latent(teacher.path):
            return self.run_latent(ctx, pairs, teacher, embeddings)
        self.check_pixel(ctx, self.config, embeddings)
        cfg = self.config
        teacher_model = self.load_inputs(ctx, pairs, teacher, "reflow")
        student = {"method": "reflow", "max_steps": teacher_model.num_train_timesteps}
        method = ReflowLoss(cfg, teacher, ["noise", "sample", "label"])
        model = self.train(ctx, cfg, pairs, teacher, method, student,
                           teacher_model.scheduler_config)
        return {"model": model}

    def run_latent(self, ctx, pairs, teacher, embeddings):
        from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
        cfg = self.config
        model, w = self.load_latent_inputs(ctx, pairs, teacher, embeddings, "reflow")
        method = LatentReflowLoss(cfg, teacher, embeddings,
                                  ["noise", "sample", "prompt_index", "guidance_scale"], w)
        if model.family.flow:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
        else:  # first-order DPM-Solver++ on flow sigmas is flow Euler exactly, and the VP
            # pipelines run it (they need init_noise_sigma and scale_model_input)
            scheduler = DPMSolverMultistepScheduler(
                use_flow_sigmas=True, flow_shift=1.0, prediction_type="flow_prediction",
                solver_order=1, algorithm_type="dpmsolver++", final_sigmas_type="zero")
        student = {"method": "reflow", "max_steps": 1000}
        return {"model": self.train_latent(ctx, cfg, pairs, model, method, student, scheduler)}
