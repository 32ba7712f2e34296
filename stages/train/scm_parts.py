"""The loss of ``scm-distill`` (sCM / TBCM; the equations are in that stage's docstring):
a mixin of its pixel and latent ``TrainMethod`` s, and the TrigFlow times of the saved
x0 chains."""

from __future__ import annotations

import math

import torch

from stages.models.trigflow import LogVar, TrigFlow, _col, jvp
from stages.train.harness import Loss

# TrigFlow times of the saved chains (None: the schedule's last time)
CHAINS = {1: (None,), 2: (None, 1.1), 4: (None, 1.3, 1.1, 0.8)}


def chains(tf: TrigFlow) -> dict[str, list[float]]:
    """Each chain's model times (rounded to the nearest timestep)."""
    t_max = tf.t_range()[1]
    return {str(k): [float(round(v)) for v in tf.model_time(torch.tensor(
        [t_max if t is None else t for t in ts], dtype=torch.float32)).tolist()]
            for k, ts in CHAINS.items()}


class SCM:
    """Mixin of a ``TrainMethod``: sCM's loss on TrigFlow states (the module docstring)."""

    noisy: list[int] | None = None  # trajectories: the indices of the noisy stored states
    clean: int | None = None        # samples: the index of the clean stored state
    step = 0

    def keep_ema(self, cfg) -> None:
        """An EMA of the student at ``ema_decay`` (none kept at 0)."""
        self.ema = {"student": cfg.ema_decay} if cfg.ema_decay else {}

    @property
    def save_ema(self) -> bool:
        """The saved student is the EMA when one is kept (``saved_weights``)."""
        return bool(self.ema)

    def with_logvar(self, nets, device):
        if self.cfg.logvar:
            nets["logvar"] = LogVar().to(device)
        return nets

    def optimizers(self, nets):
        """One AdamW; with ``logvar_lr``, u(t) in its own group at that rate."""
        own = self.cfg.logvar_lr is not None and "logvar" in nets
        params = [p for n, net in nets.items() if not (own and n == "logvar")
                  for p in net.parameters() if p.requires_grad]
        groups = [{"params": params}]
        if own:
            groups.append({"params": list(nets["logvar"].parameters()),
                           "lr": self.cfg.logvar_lr})
        return {"student": torch.optim.AdamW(groups, lr=self.cfg.lr, betas=(0.9, 0.99),
                                             weight_decay=0.0)}

    def from_stored(self, batch, keys, gen):
        """(x_t, t, t_next, the rows' ``keys`` per state) of the stored-trajectory data:
        ``data: samples`` the clean ends noised at sCM's proposal times (t_next None),
        ``data: trajectories`` as ``stored``."""
        if self.clean is not None:
            return (*self.noised(batch["states"][:, self.clean], gen), None,
                    {key: batch[key] for key in keys})
        return self.stored(batch, keys)

    def stored(self, batch, keys):
        """Every noisy stored state of the batch's trajectories, in TrigFlow; with
        ``jitter``, also the TrigFlow time of the stored state after each (0 after the last
        noisy one), else None."""
        states = batch["states"][:, self.noisy]
        k = states.shape[1]
        x_t, t = self.tf.from_model(states.flatten(0, 1), batch["timesteps"][:, self.noisy]
                                    .flatten().float())
        t_next = None
        if self.cfg.jitter:
            after = [i + 1 for i in self.noisy]
            t_next = self.tf.t_of(batch["timesteps"][:, after].flatten().float()).to(t.device)
        return x_t, t, t_next, {key: batch[key].repeat_interleave(k, 0) for key in keys}

    def teacher_velocity(self, teacher, x_t, t, t_next, gen):
        """(x_t, t, dx_t/dt) by the teacher; given ``t_next`` (``jitter``), the states are
        first moved as ``jittered`` says."""
        with torch.no_grad():
            v = self.tf.velocity(teacher, x_t, t)
        return (x_t, t, v) if t_next is None else self.jittered(teacher, x_t, t, v, t_next,
                                                                gen)

    def jittered(self, teacher, x_t, t, v, t_next, gen):
        """``jitter``: each stored state moved along the teacher's ODE (one DDIM step) to a
        time drawn uniformly between its own and the next stored state's (``t_next``),
        with the teacher's velocity there: the loss sees every time of the route."""
        u = torch.rand(len(t), generator=gen).to(t.device)
        s = (t_next + u * (t - t_next)).clamp(*self.tf.t_range())
        x_s = self.tf.step(x_t, t, s, v)
        with torch.no_grad():
            return x_s, s, self.tf.velocity(teacher, x_s, s)

    def from_noise(self, teacher, shape, n, gen, device):
        """x0 of the teacher's rollout from noise, ``noised``."""
        cfg, tf = self.cfg, self.tf
        z = torch.randn((n, *shape), generator=gen).to(device)
        return self.noised(tf.rollout(teacher, z, cfg.rollout_steps), gen)

    def noised(self, x0, gen):
        """x0 noised at t from sCM's proposal (clamped to the teacher's times)."""
        cfg, tf, device = self.cfg, self.tf, x0.device
        n = len(x0)
        tau = cfg.P_mean + cfg.P_std * torch.randn(n, generator=gen)
        t = torch.atan(tau.exp() / cfg.sigma_d).clamp(*tf.t_range()).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        return _col(t.cos(), x0) * x0 + _col(t.sin(), x0) * cfg.sigma_d * eps, t

    def scm_loss(self, nets, x_t, t, v, call) -> Loss:
        """``call(net)`` is the network as ``(x_m, tau) -> raw output``; v = dx_t/dt."""
        cfg, tf, sd = self.cfg, self.tf, self.cfg.sigma_d
        net = nets["student"]
        plain = getattr(net, "module", net)
        r, self.step = self.warmup(), self.step + 1
        minus, d_minus = jvp(lambda x, s: tf.F(call(plain), x, s), x_t, t, v, plain,  # 3.
                             cfg.time_delta if cfg.time_derivative != "jvp" else None,
                             tf.t_range())
        c, s = _col(t.cos(), x_t), _col(t.sin(), x_t)
        g = -c * c * (sd * minus - v) - r * (c * s * x_t + sd * d_minus)            # 4. g
        norm = g.flatten(1).norm(dim=1)
        g = g / _col(norm + cfg.tangent_norm_c, g)
        F = tf.F(call(net), x_t, t)                                                 # 5. F_theta
        dist = (F - minus - g).pow(2).flatten(1).mean(1)
        w = 1 / (sd * t.tan()) if cfg.prior_weighting else torch.ones_like(t)
        u = nets["logvar"](t) if cfg.logvar else torch.zeros_like(t)
        loss = (w * dist / u.exp() + u).mean()                                      # 6. L
        return Loss({"student": loss}, len(x_t), {
            "weighted_distance": (w * dist).sum().item(), "logvar": u.sum().item(),
            "tangent_norm": norm.sum().item()})

    def lr_factor(self, progress: float) -> float:
        """``lr_schedule: cosine``: 0.5 (1 + cos(pi progress)), to zero at the run's end."""
        if self.cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def warmup(self) -> float:
        steps = self.cfg.tangent_warmup_steps
        return min(1.0, self.step / steps) if steps else 1.0

    def epoch_metrics(self, nets):
        return {"tangent_warmup": self.warmup(), "steps": float(self.step)}

    def state_dict(self):
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state):
        self.step = int(state["step"])
