"""TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-time
Consistency Models", arXiv 2410.11081, the TrigFlow section and Algorithm 1): any
diffusers teacher, pixel (``stages.models.diffusion.Diffusion``) or latent
(``stages.models.families.base.LatentModel``), seen as a TrigFlow model without training,
and the forward-mode derivative the continuous-time consistency loss needs.

TrigFlow: x_t = cos t x0 + sin t sigma_d eps, t in [0, pi/2], eps ~ N(0, I), and
f(x_t, t) = cos t x_t - sin t sigma_d F(x_t, t). A model state of the teacher's own
schedule, x_m = alpha x0 + sigma eps, has the SNR of TrigFlow time t when
sigma / alpha = sigma_d tan t:

- VP (epsilon, v or x0 prediction): alpha = cos t / N, sigma = sigma_d sin t / N,
  N = sqrt(cos^2 t + sigma_d^2 sin^2 t), x_m = x_t / N; the model timestep tau(t) inverts
  the schedule's log-SNR table lambda_k = log(alpha_k / sigma_k), piecewise linearly (so
  differentiable in t), clamped to [0, T - 1];
- flow matching (velocity v = eps - x0): sigma_f = sigma_d sin t / D, alpha_f = 1 - sigma_f
  = cos t / D, D = cos t + sigma_d sin t, x_m = x_t / D, model time T sigma_f.

The network's (x0_hat, eps_hat) at (x_m, tau) then give
F = (cos t sigma_d eps_hat - sin t x0_hat) / sigma_d, so that f(x_t, t) = x0_hat exactly (the
network's own x0 prediction) and the teacher's probability-flow velocity is
dx_t/dt = sigma_d F = cos t sigma_d eps_hat - sin t x0_hat. A stored state x_m at model time
tau maps back with t = atan2(sigma, sigma_d alpha), x_t = (cos t / alpha) x_m.

``jvp`` gives (F, cos t sin t dF/dt), dF/dt the total derivative along the teacher's flow
(tangents (cos t sin t dx_t/dt, cos t sin t)), by ``torch.func.jvp`` inside the MATH
attention backend (the fused CPU / flash kernels have no forward-mode derivative).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipelines.errors import bad_value

# the prediction types the conversion handles (a pixel Diffusion's prediction_type, or a
# latent Schedule's prediction: "flow" for flow-matching families)
CONVERTIBLE = ("epsilon", "v_prediction", "sample", "flow")


def check_prediction(prediction: str, where: str) -> None:
    if prediction not in CONVERTIBLE:
        raise bad_value(where, "teacher prediction type (to convert to TrigFlow)",
                        prediction, CONVERTIBLE)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view((-1,) + (1,) * (like.ndim - 1))


class TrigFlow:
    """A teacher's (or its student's) schedule in TrigFlow time (the module docstring)."""

    def __init__(self, prediction: str, sigma_d: float = 0.5, alphas_cumprod=None,
                 num_train_timesteps: int = 1000, where: str = "teacher"):
        check_prediction(prediction, where)
        self.prediction, self.sigma_d = prediction, float(sigma_d)
        self.flow = prediction == "flow"
        self.T = int(num_train_timesteps)
        if not self.flow:
            ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).clamp(1e-20, 1 - 1e-16)
            self.abar = ab
            self.neg_lam = -0.5 * torch.log(ab / (1 - ab))  # increasing in the timestep
        self._tables = {}

    @classmethod
    def of(cls, model, sigma_d: float, where: str) -> "TrigFlow":
        """From a pixel ``Diffusion`` or a latent ``LatentModel``."""
        schedule = getattr(model, "schedule", None)
        if schedule is not None:  # latent
            return cls(schedule.prediction, sigma_d, getattr(schedule, "alphas_cumprod", None),
                       schedule.num_train_timesteps, where)
        return cls(model.prediction_type, sigma_d, model.alphas_cumprod,
                   model.num_train_timesteps, where)

    # -- times ----------------------------------------------------------------------------
    def t_of(self, tau: torch.Tensor) -> torch.Tensor:
        """TrigFlow time of model times ``tau`` (VP -1 / flow 0: clean, t = 0); on VP the
        log-SNR table interpolated linearly, so ``t_of`` inverts ``model_time``."""
        device, tau = tau.device, tau.double().cpu()
        if self.flow:
            s = (tau / self.T).clamp(0, 1)
            t = torch.atan2(s, self.sigma_d * (1 - s))
        else:
            tc = tau.clamp(0, self.T - 1)
            lo = tc.floor().long()
            hi, w = (lo + 1).clamp(max=self.T - 1), tc - lo
            t = torch.atan((self.neg_lam[lo] * (1 - w) + self.neg_lam[hi] * w).exp()
                           / self.sigma_d)
            t = torch.where(tau < 0, torch.zeros_like(t), t)
        return t.to(device, torch.float32)

    def t_range(self) -> tuple[float, float]:
        """The TrigFlow times the teacher's schedule covers (its first and last timestep)."""
        if self.flow:
            return 0.0, math.pi / 2
        ends = self.t_of(torch.tensor([0.0, self.T - 1.0]))
        return float(ends[0]), float(ends[1])

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """tau(t), differentiable in t: T sigma_f (flow) or the log-SNR table inverted."""
        c, s = t.cos().clamp(min=0), t.sin()
        if self.flow:
            return self.T * self.sigma_d * s / (c + self.sigma_d * s)
        table = self._table(t.device)
        neg_lam = torch.log(self.sigma_d * s.double().clamp(min=1e-12)) \
            - torch.log(c.double().clamp(min=1e-12))
        x = neg_lam.clamp(float(table[0]), float(table[-1]))
        k = (torch.searchsorted(table, x.detach()) - 1).clamp(0, self.T - 2)
        lo, hi = table[k], table[k + 1]
        return (k + (x - lo) / (hi - lo).clamp(min=1e-12)).to(t.dtype)

    def _table(self, device):
        if device not in self._tables:
            self._tables[device] = self.neg_lam.to(device)
        return self._tables[device]

    # -- states ---------------------------------------------------------------------------
    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """x_t / x_m at TrigFlow time t: N (VP) or D (flow)."""
        c, s = t.cos().clamp(min=0), t.sin()
        if self.flow:
            return c + self.sigma_d * s
        return (c * c + (self.sigma_d * s) ** 2).sqrt()

    def from_model(self, x_m: torch.Tensor, tau: torch.Tensor):
        """A stored model state (x_m at model time tau) as TrigFlow (x_t, t)."""
        t = self.t_of(tau).to(x_m.device)
        return x_m * _col(self.scale(t), x_m), t

    def denoise(self, call, x_t: torch.Tensor, t: torch.Tensor):
        """(x0_hat, eps_hat) of the network ``call(x_m, tau) -> raw output`` at (x_t, t)."""
        n = _col(self.scale(t), x_t)
        c, s = _col(t.cos().clamp(min=0), x_t), _col(t.sin(), x_t)
        alpha, sigma = c / n, self.sigma_d * s / n
        x_m = x_t / n
        out = call(x_m, self.model_time(t))
        p = self.prediction
        if p == "flow":                      # v = eps - x0
            return x_m - sigma * out, x_m + alpha * out
        if p == "epsilon":
            return (x_m - sigma * out) / alpha.clamp(min=1e-4), out
        if p == "v_prediction":
            return alpha * x_m - sigma * out, sigma * x_m + alpha * out
        return out, (x_m - alpha * out) / sigma.clamp(min=1e-4)  # sample

    def F(self, call, x_t, t):
        """F(x_t, t) = (cos t sigma_d eps_hat - sin t x0_hat) / sigma_d."""
        x0, eps = self.denoise(call, x_t, t)
        c, s = _col(t.cos(), x_t), _col(t.sin(), x_t)
        return (c * self.sigma_d * eps - s * x0) / self.sigma_d

    def f(self, call, x_t, t):
        """The consistency function f = cos t x_t - sin t sigma_d F (= x0_hat)."""
        c, s = _col(t.cos(), x_t), _col(t.sin(), x_t)
        return c * x_t - s * self.sigma_d * self.F(call, x_t, t)

    def velocity(self, call, x_t, t):
        """The teacher's probability-flow velocity dx_t/dt = sigma_d F."""
        return self.sigma_d * self.F(call, x_t, t)

    @staticmethod
    def step(x_t, t, s, v):
        """One DDIM step of the probability-flow ODE from t to s, given v = dx_t/dt at
        (x_t, t): x_s = cos(t - s) x_t - sin(t - s) v (exact when x0_hat stays fixed)."""
        d = t - s
        return _col(d.cos(), x_t) * x_t - _col(d.sin(), x_t) * v

    @torch.no_grad()
    def rollout(self, call, z: torch.Tensor, steps: int) -> torch.Tensor:
        """The teacher's deterministic sample from pure noise z ~ N(0, I): DDIM in
        TrigFlow time (x_s = cos s x0_hat + sin s sigma_d eps_hat) over ``steps`` steps
        evenly spaced from the schedule's last time (x = (x_t / x_m) z there) to 0."""
        t_max = self.t_range()[1]
        grid = [t_max * (1 - k / steps) for k in range(steps + 1)]
        full = lambda v: torch.full((len(z),), v, device=z.device)  # noqa: E731
        x = z * self.scale(full(t_max)).view(-1, *[1] * (z.ndim - 1))
        for t, s in zip(grid[:-1], grid[1:]):
            x0, eps = self.denoise(call, x, full(t))
            x = math.cos(s) * x0 + math.sin(s) * self.sigma_d * eps
        return x


def jvp(fn, x_t: torch.Tensor, t: torch.Tensor, dxdt: torch.Tensor, net: nn.Module,
        time_delta: float | None = None, t_range: tuple[float, float] | None = None):
    """(F, cos t sin t dF/dt) of ``fn(x_t, t) -> F`` (which runs ``net``), the total
    derivative along dx_t/dt, by forward-mode AD; no gradient to the parameters (the
    stop-gradient F-). GroupNorm inputs are made contiguous on the way: the forward-mode
    group_norm views its tangent, which attention blocks leave non-contiguous.

    With ``time_delta`` the partial derivative in t is a central difference instead,
    (F(x_t, t + d) - F(x_t, t - d)) / 2d (both ends kept in ``t_range``), and forward mode
    gives the part along dx_t/dt: a network whose time embedding was trained only at the
    integer timesteps of a discrete schedule (every DDPM UNet) has an exact time derivative
    dominated by the embedding's high frequencies between those timesteps. Measured on the
    digits benchmark's teacher at its stored DDIM states: the exact cos t sin t dF/dt was
    2-3x the difference over d = 0.01-0.1 and pointed elsewhere (relative error 0.6-1.0),
    the forward-mode part in x matching finite differences; TBCM's 1-step RMS to the
    teacher's own sample went 0.38 -> 0.74 in 150 steps with the exact derivative and
    0.38 -> 0.26 with d = 0.02, but diverged with both once the tangent warm-up reached
    r = 1 (lr 1e-4), which is why ``scm-distill`` keeps the exact one by default."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cs = t.cos() * t.sin()
    hooks = [m.register_forward_pre_hook(_contiguous) for m in net.modules()
             if isinstance(m, nn.GroupNorm)]
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            if time_delta is None:
                return torch.func.jvp(fn, (x_t, t), (_col(cs, x_t) * dxdt, cs))
            F, along_x = torch.func.jvp(lambda x: fn(x, t), (x_t,), (_col(cs, x_t) * dxdt,))
    finally:
        for h in hooks:
            h.remove()
    lo, hi = t_range if t_range is not None else (0.0, math.pi / 2)
    up, down = (t + time_delta).clamp(lo, hi), (t - time_delta).clamp(lo, hi)
    with torch.no_grad():
        d_t = (fn(x_t, up) - fn(x_t, down)) / _col(up - down, x_t)
    return F, along_x + _col(cs, x_t) * d_t


def _contiguous(module, args):
    return (args[0].clone(memory_format=torch.contiguous_format),) + tuple(args[1:])


class LogVar(nn.Module):
    """sCM's learned log-variance u(t) of the adaptive weighting: a linear layer on a
    sinusoidal (Fourier) embedding of t, zero-initialised (u = 0 at the start)."""

    def __init__(self, channels: int = 128):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000.0),
                                                               channels // 2)))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t.float().view(-1, 1) * self.freqs.view(1, -1)
        return self.linear(torch.cat([arg.cos(), arg.sin()], 1)).view(-1)
