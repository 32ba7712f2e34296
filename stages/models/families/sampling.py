"""Sampling a latent text-to-image denoiser with diffusers schedulers, in the model-time
convention of ``stages.models.families.base``.

- Teacher: the folder's own scheduler (``sampler: default``), DDIM with eta 0 (Song et al.
  2021, eq. 12; VP families) or Euler (Karras et al. 2022, Algorithm 1 without churn, on
  VP; flow Euler x <- x + (sigma_next - sigma) v on flow families), every one with
  "trailing" timesteps where it has them, so the first step starts at the last training
  timestep. Guidance per row (``cfg``) or through the slot (``embedded``).
- States are recorded in "x_t = alpha x0 + sigma z" space (an Euler state on VP,
  x0 + s z, is divided by sqrt(1 + s^2)), with their model times; the clean end is
  recorded at the clean time (VP -1, flow 0).
- Students: the scheduler saved in their folder (``LCMScheduler`` /
  ``FlowMatchLCMScheduler``: multistep consistency sampling, Song et al. 2023,
  Algorithm 1), as the plain diffusers pipeline runs them.
"""

from __future__ import annotations

import math

import torch

from pipelines.errors import bad_value
from stages.models.families.base import LatentModel

SAMPLERS = ("default", "ddim", "euler")


def teacher_scheduler(model: LatentModel, sampler: str, steps: int, shape, where: str):
    import diffusers
    cfg = model.scheduler_config
    if sampler == "default":
        cls = getattr(diffusers, cfg["_class_name"])
    elif sampler == "euler":
        cls = (diffusers.FlowMatchEulerDiscreteScheduler if model.family.flow
               else diffusers.EulerDiscreteScheduler)
    elif sampler == "ddim" and not model.family.flow:
        cls = diffusers.DDIMScheduler
    else:
        raise bad_value(where, "sampler", sampler, "default or euler for a flow-matching "
                        f"family ({model.pipeline_class}); allowed: {list(SAMPLERS)}")
    extra = {} if model.family.flow else {"timestep_spacing": "trailing"}
    sched = cls.from_config(cfg, **extra)
    if steps > model.schedule.num_train_timesteps:
        raise bad_value(where, "steps", steps, f"at most {model.schedule.num_train_timesteps}")
    model.family.set_timesteps(model, sched, steps, shape)
    return sched


def guidance_mode(model: LatentModel, guided: bool) -> str:
    """How the teacher applies w: classifier-free guidance, its own embedded slot, or
    not at all (every w is 1)."""
    if model.family.teacher_guidance == "embedded":
        return "embedded"
    return "cfg" if guided else "none"


@torch.inference_mode()
def sample_teacher(model: LatentModel, net, noise, cond, w, sched, mode: str,
                   keep: list[int] | None = None):
    """Deterministic teacher sampling from x_T = noise with the prepared scheduler.
    Returns (final latent, the states at indices ``keep`` of the N + 1, their times)."""
    device = next(net.parameters()).device
    x = noise.to(device) * getattr(sched, "init_noise_sigma", 1.0)
    steps = len(sched.timesteps)
    keep = set(range(steps + 1) if keep is None else keep)
    karras = float(getattr(sched, "init_noise_sigma", 1.0)) != 1.0 and not model.family.flow
    times = [float(t) for t in sched.timesteps] + [model.schedule.clean]
    states = []
    for i, t in enumerate(sched.timesteps):
        if i in keep:
            s = float(sched.sigmas[i]) if karras else 0.0
            states.append((x / math.sqrt(1 + s * s)).float().cpu())
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = model.predict(net, inp, t.float().expand(len(x)), cond, w, mode)
        x = sched.step(out, t, x, return_dict=False)[0]
    if steps in keep:
        states.append(x.float().cpu())
    chosen = [times[i] for i in sorted(keep)]
    return x.float().cpu(), (torch.stack(states, 1) if states else None), chosen


@torch.inference_mode()
def sample_student(model: LatentModel, net, noise, cond, w, steps: int, generator=None):
    """A student folder's own scheduler in ``steps`` steps (its ``student.json`` says how
    it takes w)."""
    import diffusers
    info = model.student or {}
    sched = getattr(diffusers, model.scheduler_config["_class_name"]).from_config(
        model.scheduler_config)
    model.family.set_timesteps(model, sched, steps, tuple(noise.shape[1:]))
    device = next(net.parameters()).device
    x = noise.to(device) * getattr(sched, "init_noise_sigma", 1.0)
    mode = "embedded" if info.get("guidance") == "embedded" else "none"
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = model.predict(net, inp, t.float().expand(len(x)), cond, w, mode)
        x = sched.step(out, t, x, generator=generator, return_dict=False)[0]
    return x.float().cpu()


def row_guidance(seed: int, ids, scale) -> torch.Tensor:
    """w per row: the number, or U[low, high] from the row's own generator."""
    if not isinstance(scale, (list, tuple)):
        return torch.full((len(ids),), float(scale))
    low, high = scale
    out = torch.empty(len(ids))
    for i, row in enumerate(ids):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(row) + 7)
        out[i] = low + (high - low) * torch.rand((), generator=gen)
    return out
