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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.models.diffusion_sampling import reflow_velocity
from stages.train.diffusion_student import StudentConfig, StudentMethod, StudentStage


class ReflowLoss(StudentMethod):
    def student_loss(self, model, ema, teacher, batch, gen):
        z, x1, y = batch["noise"], batch["sample"], batch["label"]
        s = torch.rand(len(z), generator=gen).to(z.device)             # 1. s ~ U[0, 1]
        sv = s.view(-1, 1, 1, 1)
        xs = sv * x1 + (1 - sv) * z                                    # 2. the straight path
        v = reflow_velocity(teacher, model, xs, s, y)                  # 3. v_theta(x_s, s)
        return F.mse_loss(v, x1 - z)                                   # 4. ||v - (x1 - z)||^2


class Reflow(StudentStage):
    kind = "reflow"
    version = "3"  # 2: the training harness (held pairs, one global permutation per epoch)
    # 3: a last partial batch dropped, the same steps whatever the number of workers

    class Config(StudentConfig):
        pass

    def run(self, ctx, pairs, teacher, embeddings=None):
        self.pixel_only(ctx, teacher, embeddings)
        cfg = self.config
        teacher_model = self.load_inputs(ctx, pairs, teacher, "reflow")
        student = {"method": "reflow", "max_steps": teacher_model.num_train_timesteps}
        method = ReflowLoss(cfg, teacher, ["noise", "sample", "label"])
        model = self.train(ctx, cfg, pairs, teacher, method, student,
                           teacher_model.scheduler_config)
        return {"model": model}
