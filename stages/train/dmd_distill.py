"""``dmd-distill``: distribution matching distillation, DMD2 (Yin et al. 2024, "Improved
Distribution Matching Distillation for Fast Image Synthesis", arXiv 2405.14867) on the
loss of DMD (Yin et al. 2023, "One-step Diffusion with Distribution Matching
Distillation", arXiv 2311.18828), trained through the training harness.

A generator G (``steps`` 1-4; the teacher's network, or a smaller ``architecture``, as the
other students) maps noise to x0 in the teacher's parameterisation: x = x0_hat(G; z, T).
A fake score network (from the teacher) follows the generator's distribution; the real
score is the frozen teacher (classifier-free guided at ``guidance_scale`` for latent
text-to-image teachers; the pixel teachers here have no unconditional branch). Per step:

1. x = G(z) (backward simulation for ``steps`` > 1, DMD2 Sec. 4.4: the input at a random
   step of G's own chain, made by running the chain from pure noise without gradients);
2. t ~ U[t_min T, t_max T], x_t = alpha_t x + sigma_t eps; mu_real, mu_fake the x0
   predictions of teacher and fake network at x_t;
3. generator (once every ``fake_updates_per_step`` steps, DMD2's two time-scale rule):
   L_G = 0.5 ||x - stopgrad(x - (mu_fake - mu_real) / w)||^2, w = mean |x - mu_real| per
   sample (DMD eq. 7-8), + ``regression_weight`` ||G(z_pair) - x_teacher||^2 (DMD's
   regression loss on stored (noise, teacher sample) pairs, L2 in place of LPIPS),
   + ``gan_weight`` softplus(-D(x_t)) (DMD2's non-saturating GAN);
4. fake network (every step): the teacher's denoising loss on stopgrad(x) at fresh
   t' ~ U[0, T), + ``gan_weight`` (softplus(-D(real_t)) + softplus(D(x_t))), D a classifier
   head on the fake network's middle-block features, "real" the teacher's samples of the
   ``pairs`` (no dataset needed).

Inputs ``teacher`` and, optionally, ``pairs`` (``diffusion-pairs`` output ``reflow``; needed
by ``regression_weight`` and ``gan_weight``; without them an epoch is ``rows`` noise rows)
and ``embeddings`` (latent teachers). The checkpoint holds both networks, the head and both
optimisers. Saved: pixel, a diffusers folder whose ``student.json`` holds the x0 chains
(``stages.models.diffusion_sampling``; the k-step chain on the trailing grid serves every n
dividing k); latent, a pipeline folder whose consistency scheduler (``LCMScheduler`` /
``FlowMatchLCMScheduler``) runs exactly the chain it was trained on.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model
from stages.models.diffusion import load_diffusion, row_labels, where_of
from stages.models.diffusion_sampling import trailing_grid
from stages.models.families.sampling import guidance_mode
from stages.train import dmd_parts as dp
from stages.train.diffusion_student import StudentConfig, StudentMethod, StudentStage
from stages.train.harness import Loss, TrainMethod
from stages.train.latent_student import LatentStudentMethod, build_student
from stages.train.rows import Rows


class DMDMethod:
    """The step schedule and the networks both kinds of teacher share."""

    def init_dmd(self, chain: list[float], gan_channels: int | None):
        self.chain, self.gan_channels, self.step = chain, gan_channels, 0

    def dmd_nets(self, fake):
        nets = {"fake": fake.train().requires_grad_(True)}
        if self.gan_channels:
            nets["head"] = dp.GANHead(self.gan_channels).to(next(fake.parameters()).device)
        return nets

    def optimizers(self, nets):
        student = [p for p in nets["student"].parameters() if p.requires_grad]
        fake = list(nets["fake"].parameters()) + (list(nets["head"].parameters())
                                                  if "head" in nets else [])
        return {"student": torch.optim.AdamW(student, lr=self.cfg.lr),
                "fake": torch.optim.AdamW(fake, lr=self.cfg.fake_lr or self.cfg.lr)}

    def generator_turn(self) -> bool:
        turn = self.step % self.cfg.fake_updates_per_step == 0
        self.step += 1
        return turn

    def times(self, n, total: int, device, gen, low=None, high=None) -> torch.Tensor:
        low = self.cfg.t_min * total if low is None else low
        high = self.cfg.t_max * total if high is None else high
        return (low + (high - low) * torch.rand(n, generator=gen)).round().to(device)

    def state_dict(self):
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state):
        self.step = int(state["step"])

    def discriminator(self, nets, frozen: bool):
        """(fake network, head); ``frozen`` for the generator's GAN term (``dp.Frozen``)."""
        if frozen:
            return dp.Frozen(nets["fake"]), dp.Frozen(nets["head"])
        return nets["fake"], nets["head"]

    def combine(self, turn, x, mu_real, mu_fake, fake_loss, extra_g, gan) -> Loss:
        """The losses of this step (the generator's only on its turn); the generator's
        reaches the discriminator only through its input (``dp.Frozen``)."""
        sums = {"fake_denoising": float(fake_loss.detach()) * len(x)}
        losses = {}
        if turn:
            dmd = dp.dmd_loss(x, mu_real, mu_fake)
            g = dmd + extra_g + (self.cfg.gan_weight * gan[1] if gan else 0.0)
            losses["student"] = g
            sums["dmd"] = float(dmd.detach()) * len(x)
        losses["fake"] = fake_loss + (self.cfg.gan_weight * gan[0] if gan else 0.0)
        return Loss(losses, len(x), sums)


class PixelDMD(DMDMethod, StudentMethod):
    def __init__(self, cfg, teacher, columns, chain, gan_channels, shape):
        super().__init__(cfg, teacher, columns)
        self.init_dmd(chain, gan_channels)
        self.shape, self.ema = shape, {}

    def setup(self, device):
        nets = super().setup(device)
        return {**nets, **self.dmd_nets(copy.deepcopy(self.teacher.unet))}

    def renoise(self, x0, t: float, gen) -> torch.Tensor:
        """x0 noised afresh to time t of the chain (backward simulation)."""
        a, s = self.teacher.alpha_sigma(torch.full((len(x0),), t), x0)
        return a * x0 + s * torch.randn(x0.shape, generator=gen).to(x0.device)

    def d(self, nets, x_t, t, y, frozen=False):
        fake, head = self.discriminator(nets, frozen)
        with dp.middle_features(fake) as found:
            self.teacher.model_out(fake, x_t, t, y)
        return head(found[-1])

    def loss(self, nets, emas, batch, gen):
        T, y = self.teacher.num_train_timesteps, batch["label"]
        dev, n = y.device, len(y)
        G = nets["student"]
        z = torch.randn((n, *self.shape), generator=gen).to(dev)
        gen_x0 = lambda x, t: self.teacher.predict_x0(G, x, torch.full((n,), t, device=dev), y)[0]  # noqa: E731
        renoise = lambda x0, t: self.renoise(x0, t, gen)  # noqa: E731
        turn = self.generator_turn()
        x_in, t_in = dp.backward_simulation(self.chain, z, gen_x0, renoise, gen)  # 1. x = G(z)
        with torch.set_grad_enabled(turn):
            x = gen_x0(x_in, t_in)
        t = self.times(n, T, dev, gen)                                  # 2. noised, scores
        a, s = self.teacher.alpha_sigma(t, x)
        eps0 = torch.randn(x.shape, generator=gen).to(dev)
        x_t = a * x.detach() + s * eps0
        with torch.no_grad():
            mu_real = self.teacher.predict_x0(self.teacher.unet, x_t, t, y)[0]
            mu_fake = self.teacher.predict_x0(nets["fake"], x_t, t, y)[0]
        extra = 0.0                                                     # 3. regression
        if turn and self.cfg.regression_weight:
            one = self.teacher.predict_x0(G, batch["noise"], torch.full((n,), self.chain[0], device=dev), y)[0]
            extra = self.cfg.regression_weight * F.mse_loss(one, batch["sample"])
        t2 = self.times(n, T, dev, gen, 0, T - 1)                       # 4. fake denoising
        a2, s2 = self.teacher.alpha_sigma(t2, x)
        eps = torch.randn(x.shape, generator=gen).to(dev)
        out = self.teacher.model_out(nets["fake"], a2 * x.detach() + s2 * eps, t2, y)
        target = dp.denoising_target(self.teacher.prediction_type, a2, s2, x.detach(), eps)
        fake_loss = F.mse_loss(out, target)
        gan = None
        if self.gan_channels:                                           # 5. GAN
            real_t = a * batch["sample"] + s * torch.randn(x.shape, generator=gen).to(dev)
            gan = dp.gan_losses(self.d(nets, real_t, t, y), self.d(nets, x_t, t, y),
                                self.d(nets, a * x + s * eps0, t, y, True) if turn
                                else torch.zeros(()))
        return self.combine(turn, x, mu_real, mu_fake, fake_loss, extra, gan)


class LatentDMD(DMDMethod, LatentStudentMethod, TrainMethod):
    teacher_in_loop = True

    def __init__(self, cfg, teacher, embeddings, columns, w, chain, gan_channels, shape):
        LatentStudentMethod.__init__(self, cfg, teacher, embeddings, columns, w)
        self.init_dmd(chain, gan_channels)
        self.shape, self.ema = shape, {}

    def setup(self, device):
        nets = LatentStudentMethod.setup(self, device)
        return {**nets, **self.dmd_nets(self.model.denoiser().to(device))}

    def x0(self, net, x, t, cond, w, mode):
        return self.model.schedule.x0_eps(self.model.predict(net, x, t, cond, w, mode), x, t)[0]

    def d(self, nets, x_t, t, cond, w, frozen=False):
        fake, head = self.discriminator(nets, frozen)
        with dp.middle_features(fake) as found:
            self.model.predict(fake, x_t, t, cond, w, "none")
        return head(found[-1])

    def loss(self, nets, emas, batch, gen):
        cond, w, mode = self.conditioning(batch)
        sched, n = self.model.schedule, len(w)
        dev, T = w.device, sched.num_train_timesteps if not sched.flow else 1000
        G = nets["student"]
        full = lambda t: torch.full((n,), float(t), device=dev)  # noqa: E731
        z = torch.randn((n, *self.shape), generator=gen).to(dev)
        gen_x0 = lambda x, t: self.x0(G, x, full(t), cond, w, mode)  # noqa: E731
        renoise = lambda x0, t: sched.noised(x0, torch.randn(x0.shape, generator=gen).to(dev), full(t))  # noqa: E731
        turn = self.generator_turn()
        x_in, t_in = dp.backward_simulation(self.chain, z, gen_x0, renoise, gen)  # 1.
        with torch.set_grad_enabled(turn):
            x = gen_x0(x_in, t_in)
        t = self.times(n, T, dev, gen).float()                          # 2.
        eps = torch.randn(x.shape, generator=gen).to(dev)
        x_t = sched.noised(x.detach(), eps, t)
        w_real = batch["guidance_scale"] if self.cfg.guidance == "embedded" else w
        with torch.no_grad():
            mu_real = self.x0(self.teacher, x_t, t, cond, w_real, guidance_mode(self.model, True))
            mu_fake = self.x0(nets["fake"], x_t, t, cond, w, "none")
        extra = 0.0                                                     # 3.
        if turn and self.cfg.regression_weight:
            one = gen_x0(batch["noise"], self.chain[0])
            extra = self.cfg.regression_weight * F.mse_loss(one, batch["sample"])
        t2 = self.times(n, T, dev, gen, 0, T - 1).float()               # 4.
        a2, s2 = sched.alpha_sigma(t2, x)
        eps2 = torch.randn(x.shape, generator=gen).to(dev)
        out = self.model.predict(nets["fake"], a2 * x.detach() + s2 * eps2, t2, cond, w, "none")
        fake_loss = F.mse_loss(out, dp.denoising_target(sched.prediction, a2, s2,
                                                        x.detach(), eps2))
        gan = None
        if self.gan_channels:                                           # 5.
            real_t = sched.noised(batch["sample"], torch.randn(x.shape, generator=gen).to(dev), t)
            gan = dp.gan_losses(self.d(nets, real_t, t, cond, w), self.d(nets, x_t, t, cond, w),
                                self.d(nets, sched.noised(x, eps, t), t, cond, w, True)
                                if turn else torch.zeros(()))
        return self.combine(turn, x, mu_real, mu_fake, fake_loss, extra, gan)


class DMDDistill(StudentStage):
    kind = "dmd-distill"
    version = "1"

    class Config(StudentConfig):
        steps: int = Field(1, ge=1, le=4)             # the generator's sampling steps
        fake_updates_per_step: int = Field(5, ge=1)   # fake updates per generator update
        fake_lr: float | None = Field(None, gt=0)     # None: lr
        regression_weight: float = Field(0.0, ge=0)   # needs pairs
        gan_weight: float = Field(0.0, ge=0)          # needs pairs (their samples: "real")
        t_min: float = Field(0.02, ge=0, lt=1)        # DMD's noise levels, fractions of T
        t_max: float = Field(0.98, gt=0, le=1)
        rows: PositiveInt = 4096                      # rows per epoch without pairs
        lr: float = Field(2e-5, gt=0)
        # ema_decay (StudentConfig's) is unused: no EMA is kept, the generator is saved

        @model_validator(mode="after")
        def _times(self):
            if self.t_min >= self.t_max:
                raise ValueError(f"t_min ({self.t_min}) must be below t_max ({self.t_max})")
            return self

    inputs = {"teacher": Model}
    optional_inputs = {"pairs": Dataset, "embeddings": Dataset}

    def check_needs(self, ctx, pairs) -> None:
        cfg, where = self.config, f"{where_of(ctx, self.kind)} config"
        for field in ("regression_weight", "gan_weight"):
            if getattr(cfg, field) > 0 and pairs is None:
                raise bad_value(where, field, getattr(cfg, field), "0 without the input "
                                "'pairs' (diffusion-pairs output 'reflow': the teacher's "
                                "noise and samples it needs); or wire pairs")

    def rows(self, cfg, pairs, method):
        return pairs if isinstance(pairs, Rows) else super().rows(cfg, pairs, method)

    def run(self, ctx, teacher, pairs=None, embeddings=None):
        from stages.models.families import is_latent
        self.check_needs(ctx, pairs)
        if is_latent(teacher.path):
            return self.run_latent(ctx, teacher, pairs, embeddings)
        self.check_pixel(ctx, self.config, embeddings)
        cfg = self.config
        model = (self.load_inputs(ctx, pairs, teacher, "reflow") if pairs is not None
                 else load_diffusion(teacher.path, where_of(ctx, self.kind, "teacher")))
        chain = [float(t) for t in trailing_grid(cfg.steps, model.num_train_timesteps)[:-1]]
        gan = (dp.gan_channels(model.unet, f"{where_of(ctx, self.kind)} config")
               if cfg.gan_weight else None)
        columns = ["noise", "sample", "label"] if pairs is not None else ["label"]
        data = pairs if pairs is not None else Rows(
            {"label": torch.int64},
            tensors={"label": torch.as_tensor(row_labels(range(cfg.rows), model.num_classes))})
        covers = dp.chain_covers(chain)
        student = {"method": "dmd", "timesteps": covers, "max_steps": cfg.steps,
                   "covered_steps": sorted(int(k) for k in covers)}
        method = PixelDMD(cfg, teacher, columns, chain, gan, list(model.shape))
        out = self.train(ctx, cfg, data, teacher, method, student, model.scheduler_config)
        return {"model": out}

    def run_latent(self, ctx, teacher, pairs, embeddings):
        from stages.models.families.conditioning import Conditioning
        cfg, where = self.config, where_of(ctx, self.kind)
        model, w = self.load_latent_inputs(ctx, pairs, teacher, embeddings, "reflow",
                                           online=True)  # the teacher in the loop
        if cfg.guidance == "embedded" and pairs is None:
            raise bad_value(f"{where} config", "guidance", "embedded", "fixed without "
                            "'pairs' (the w of each row comes from the pairs)")
        gan = (dp.gan_channels(build_student(model, cfg, f"{where} config"), f"{where} config")
               if cfg.gan_weight else None)
        shape = list(model.latent_shape())
        sched = model.family.student_scheduler(model, [0.0] * cfg.steps)
        model.family.set_timesteps(model, sched, cfg.steps, tuple(shape))
        chain = [float(t) for t in sched.timesteps]
        keys = ["prompt_index", "guidance_scale"]
        if pairs is not None:
            data, columns = pairs, ["noise", "sample"] + keys
        else:
            count = len(Conditioning(embeddings, "train", where))
            data, columns = Rows({"prompt_index": torch.int64, "guidance_scale": torch.float32},
                                 tensors={"prompt_index": torch.arange(cfg.rows) % count,
                                          "guidance_scale": torch.full((cfg.rows,), w)}), keys
        student = {"method": "dmd", "timesteps": dp.chain_covers(chain),
                   "max_steps": cfg.steps, "chain": chain}
        method = LatentDMD(cfg, teacher, embeddings, columns, w, chain, gan, shape)
        return {"model": self.train_latent(ctx, cfg, data, model, method, student, sched)}
