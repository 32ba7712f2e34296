"""Samplers of the diffusion family: the deterministic teacher samplers, the consistency
function and the few-step student samplers (notation: ``stages.models.diffusion``).

- Teacher sampler: DDIM with eta 0 (Song et al. 2021, eq. 12) or Euler on the
  probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn), with the diffusers
  ``DDIMScheduler`` / ``EulerDiscreteScheduler`` and "trailing" timesteps (Lin et al. 2024,
  "Common Diffusion Noise Schedules and Sample Steps are Flawed", so the first step starts
  at t = T - 1). Euler states (x0 + s z) are mapped to VP space by x / sqrt(1 + s^2).
- Consistency function (LCM form, Luo et al. 2023 eq. 9; Song et al. 2023 eq. 7):
  f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t), c_skip = s_d^2 / ((k t)^2 + s_d^2),
  c_out = k t / sqrt((k t)^2 + s_d^2), s_d = 0.5, k = 10; f(x, 0) = x.
- Students: ``consistency`` (multistep consistency sampling, Song et al. 2023 Algorithm 1),
  ``progressive`` (DDIM on the student, Salimans & Ho 2022), ``reflow`` (Euler on the
  rectified flow dx/ds = v(x, s), Liu et al. 2022 eq. 1), and the x0 chains of ``dmd``
  (DMD2's few-step generator, Yin et al. 2024 Sec. 4.4) and ``scm`` (sCM's multistep
  sampling, Lu & Song 2024 Algorithm 1): at each of the step count's timesteps the
  network's x0 prediction, re-noised with fresh noise to the next timestep.
  Their ``student.json`` holds ``timesteps``: for each step count its training covered
  (a string key), the VP timesteps of that chain, e.g. ``{"1": [999], "2": [999, 499]}``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.errors import UserError, allowed_list, bad_value
from stages.models.diffusion import Diffusion

SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0


def _schedulers() -> dict:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    return {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


SAMPLERS = ("ddim", "euler")  # keys of _schedulers(); pydantic Literal choices


# -- teacher sampler (diffusers scheduler classes) ---------------------------------------
def make_scheduler(model: Diffusion, sampler: str, steps: int, where: str = "sampler"):
    schedulers = _schedulers()
    if sampler not in schedulers:
        raise bad_value(where, "sampler", sampler, schedulers)
    sched = schedulers[sampler].from_config(model.scheduler_config,
                                            timestep_spacing="trailing")
    if steps > model.num_train_timesteps:
        raise bad_value(where, "steps", steps, f"at most {model.num_train_timesteps}, the "
                        "teacher's training timesteps")
    sched.set_timesteps(steps)
    return sched


@torch.inference_mode()
def sample_teacher(model: Diffusion, noise: torch.Tensor, labels, sampler: str, steps: int,
                   keep: list[int] | None = None):
    """Deterministic teacher sampling from x_T = noise. Returns (final sample, states at
    the indices ``keep`` of the N + 1 states (VP space), their timesteps; -1 = clean)."""
    sched = make_scheduler(model, sampler, steps)
    device = next(model.unet.parameters()).device
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    x = noise.to(device) * sched.init_noise_sigma
    timesteps = [int(t) for t in sched.timesteps] + [-1]
    keep = set(range(steps + 1) if keep is None else keep)
    states = []

    def vp(i):  # the state before step i in VP space
        if sampler == "euler":
            return x / math.sqrt(1 + float(sched.sigmas[i]) ** 2)
        return x

    for i, t in enumerate(sched.timesteps):
        if i in keep:
            states.append(vp(i).float().cpu())
        inp = sched.scale_model_input(x, t)
        kwargs = {"class_labels": labels} if model.num_classes else {}
        out = model.unet(inp, t.to(device), **kwargs).sample
        x = sched.step(out, t, x).prev_sample
    if steps in keep:
        states.append(x.float().cpu())
    chosen = [timesteps[i] for i in sorted(keep)]
    return x.float().cpu(), (torch.stack(states, 1) if states else None), chosen


def ddim_step(model: Diffusion, x, x0, eps, t_from, t_to):
    """One DDIM (eta 0) step in VP space from t_from to t_to given the predictions."""
    a_to, s_to = model.alpha_sigma(t_to, x)
    return a_to * x0 + s_to * eps


def trailing_grid(steps: int, num_train_timesteps: int) -> list[int]:
    """The "trailing" timesteps of a k-step sampler, then -1 (clean)."""
    return [int(round(num_train_timesteps - i * num_train_timesteps / steps)) - 1
            for i in range(steps)] + [-1]


# -- consistency function ---------------------------------------------------------------
def consistency_scalings(t: torch.Tensor, like: torch.Tensor):
    """c_skip, c_out of the LCM boundary condition; t <= 0 gives (1, 0): f(x, 0) = x."""
    st = t.to(like).clamp(min=0).view((-1,) + (1,) * (like.ndim - 1)) * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2)
    c_out = st / (st ** 2 + SIGMA_DATA ** 2).sqrt()
    return c_skip, c_out


def consistency_fn(model: Diffusion, unet, x, t, labels):
    """f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)."""
    x0, _ = model.predict_x0(unet, x, t, labels)
    c_skip, c_out = consistency_scalings(t, x)
    return c_skip * x + c_out * x0


def segment_fn(model: Diffusion, unet, x, t, labels, ends):
    """Hyper-SD's segment consistency function: from (x, t) the DDIM jump to the segment's
    lower end ``ends`` (per row; -1, clean: f(x, t) above), x itself at the end; one
    network call."""
    x0, eps = model.predict_x0(unet, x, t, labels)
    c_skip, c_out = consistency_scalings(t, x)
    shape = (-1,) + (1,) * (x.ndim - 1)
    jump = torch.where((ends < 0).view(shape), c_skip * x + c_out * x0,
                       ddim_step(model, x, x0, eps, t, ends))
    return torch.where((t <= ends + 1e-4).view(shape), x, jump)


# -- student sampler ----------------------------------------------------------------------
def check_student_steps(model: Diffusion, steps: int, where: str) -> None:
    info = model.student or {}
    covered = info.get("covered_steps")
    if covered is not None and steps not in covered:
        raise bad_value(where, f"steps for the {info.get('method')} student", steps,
                        f"one its training covered: {covered}")
    if steps > info.get("max_steps", steps):
        raise bad_value(where, f"steps for the {info.get('method')} student", steps,
                        f"at most {info['max_steps']}, the steps its training covered")


X0_CHAINS = ("dmd", "scm")  # students sampled by chain_timesteps' x0 chain
STUDENT_METHODS = ("consistency", "progressive", "reflow") + X0_CHAINS


def chain_timesteps(student: dict, steps: int) -> list[float]:
    """The timesteps of an x0-chain student's ``steps``-step sampler."""
    return [float(t) for t in student["timesteps"][str(steps)]]


@torch.inference_mode()
def sample_student(model: Diffusion, noise: torch.Tensor, labels, steps: int,
                   generator: torch.Generator | None = None, where: str = "sampler"):
    """A student in ``steps`` steps; the method is read from its ``student.json``."""
    check_student_steps(model, steps, where)
    method = model.student["method"]
    device = next(model.unet.parameters()).device
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    x = noise.to(device)
    n = len(x)
    unet = model.unet
    if method == "reflow":  # Euler on dx/ds = v(x, s), s from 0 (noise) to 1 (data)
        for i in range(steps):
            s = torch.full((n,), i / steps, device=device)
            x = x + reflow_velocity(model, unet, x, s, labels) / steps
        return x.clamp(-1, 1).float().cpu()
    if method == "consistency" and steps in model.segment_unets:  # Hyper-SD's k-step model
        return segment_chain(model, x, labels, steps).clamp(-1, 1).float().cpu()
    if method == "consistency":  # multistep consistency sampling
        grid = model.student["timesteps"]
        ts = [grid[int(j)] for j in np.linspace(0, len(grid), steps, endpoint=False)]
        x0 = None
        for i, t in enumerate(ts):
            tt = torch.full((n,), t, device=device)
            if i:
                z = torch.randn(x.shape, generator=generator).to(device)
                a, s = model.alpha_sigma(tt, x)
                x = a * x0 + s * z
            x0 = consistency_fn(model, unet, x, tt, labels).clamp(-1, 1)
        return x0.float().cpu()
    if method == "progressive":  # DDIM on the student's own trailing grid
        grid = trailing_grid(steps, model.num_train_timesteps)
        for t, t_next in zip(grid[:-1], grid[1:]):
            tt = torch.full((n,), t, device=device)
            x0, eps = model.predict_x0(unet, x, tt, labels, clip=True)
            x = ddim_step(model, x, x0, eps, tt, torch.full((n,), t_next, device=device))
        return x.clamp(-1, 1).float().cpu()
    if method in X0_CHAINS:  # x0 at each timestep, re-noised to the next
        x0 = None
        for i, t in enumerate(chain_timesteps(model.student, steps)):
            tt = torch.full((n,), t, device=device)
            if i:
                z = torch.randn(x.shape, generator=generator).to(device)
                a, s = model.alpha_sigma(tt, x)
                x = a * x0 + s * z
            x0 = model.predict_x0(unet, x, tt, labels, clip=True)[0]
        return x0.float().cpu()
    raise UserError(f"{where}: unknown student method {method!r}; allowed: "
                    f"{allowed_list(STUDENT_METHODS)}")


def segment_chain(model: Diffusion, x, labels, steps: int):
    """A segmented consistency student's k-step model (``segment_unets``) from noise: at
    each segment's upper boundary, its DDIM jump to the lower one (the consistency function
    for the segment ending clean): the map its phase of training fitted."""
    unet = model.segment_unets[steps]
    bounds = model.student["segment_unets"][str(steps)]["boundaries"]
    full = lambda v: torch.full((len(x),), float(v), device=x.device)  # noqa: E731
    for t, end in zip(bounds[:-1], bounds[1:]):
        x = segment_fn(model, unet, x, full(t), labels, full(end))
    return x


def reflow_velocity(model: Diffusion, unet, x, s, labels):
    """v(x_s, s): the UNet at timestep (1 - s)(T - 1), output sign flipped so that a
    v-prediction teacher is a sensible initialisation (its v points from data to noise)."""
    t = (1 - s) * (model.num_train_timesteps - 1)
    kwargs = {"class_labels": labels} if model.num_classes else {}
    return -unet(x, t, **kwargs).sample


def sample_any(model: Diffusion, noise, labels, steps: int, sampler: str = "ddim",
               generator=None, where: str = "sampler"):
    """A teacher (no student.json) with its sampler, or a student with its own."""
    if model.student is None:
        return sample_teacher(model, noise, labels, sampler, steps, keep=[])[0].clamp(-1, 1)
    return sample_student(model, noise, labels, steps, generator, where)
