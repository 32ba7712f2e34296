"""What every text-to-image family adapter shares: the noise schedules (VP and flow
matching), classifier-free guidance, the guidance embedding, and ``LatentModel``, a
diffusers pipeline folder read component by component.

Notation. A noised latent is x_t = alpha_t x0 + sigma_t z. Every stored time is the
*model time* the pipeline itself passes to its denoiser's ``timestep`` argument:

- VP families (SD 1.x/2.x, SDXL, PixArt, DiT): the discrete timestep t in [0, T - 1],
  alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alpha_t^2 (Ho et al. 2020); -1 = clean.
  The network predicts epsilon, v = alpha z - sigma x0 (Salimans & Ho 2022) or x0.
- flow families (SD3, Flux, Sana): t = 1000 sigma, x_t = (1 - sigma) x0 + sigma z
  (rectified flow, Liu et al. 2022; Esser et al. 2024), the network predicts the velocity
  v = z - x0, so x0 = x_t - sigma v; 0 = clean.

Classifier-free guidance (Ho & Salimans 2022): out = out(uncond) + w (out(cond) -
out(uncond)), w the diffusers ``guidance_scale``. An embedded-guidance student (LCM, Luo et
al. 2023, eq. 9 and Sec. 4.2) takes w through the denoiser's guidance slot instead: the
sinusoidal embedding of (w - 1) in ``timestep_cond`` for ``UNet2DConditionModel`` (what
diffusers' pipelines pass when ``time_cond_proj_dim`` is set), the ``guidance`` input for
transformers with ``guidance_embeds``.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from pipelines.errors import UserError, bad_value
from stages.models.diffusion import vp_alpha_sigma

CLEAN = {"vp": -1.0, "flow": 0.0}


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The sinusoidal embedding of w scaled by 1000 (diffusers'
    ``get_guidance_scale_embedding``; the pipelines pass w = guidance_scale - 1)."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device)
                      * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class Schedule:
    """The noise schedule of a family, in model time (see the module docstring)."""

    def __init__(self, scheduler_config: dict, flow: bool):
        self.config, self.flow = dict(scheduler_config), flow
        self.kind = "flow" if flow else "vp"
        self.prediction = "flow" if flow else self.config.get("prediction_type", "epsilon")
        self.num_train_timesteps = int(self.config.get("num_train_timesteps", 1000))
        if not flow:
            from diffusers import DDPMScheduler
            keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                    "trained_betas", "rescale_betas_zero_snr")
            ddpm = DDPMScheduler(**{k: self.config[k] for k in keys if k in self.config})
            self.alphas_cumprod = ddpm.alphas_cumprod.double()

    @property
    def clean(self) -> float:
        return CLEAN[self.kind]

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor):
        """alpha_t, sigma_t broadcastable to ``like`` (a clean time gives 1, 0)."""
        t = t.to(torch.float64).cpu()
        shape = (-1,) + (1,) * (like.ndim - 1)
        if self.flow:
            s = (t / self.num_train_timesteps).clamp(0, 1)
            return (1 - s).to(like).view(shape), s.to(like).view(shape)
        return vp_alpha_sigma(self.alphas_cumprod, self.num_train_timesteps, t, like)

    def x0_eps(self, out, x, t):
        """(x0, eps) from the network output under the family's prediction."""
        a, s = self.alpha_sigma(t, x)
        if self.prediction == "flow":      # v = z - x0
            x0 = x - s * out
            return x0, x0 + out
        if self.prediction == "epsilon":
            return (x - s * out) / a.clamp(min=1e-4), out
        if self.prediction == "v_prediction":
            return a * x - s * out, s * x + a * out
        return out, (x - a * out) / s.clamp(min=1e-4)  # sample

    def noised(self, x0, z, t):
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * z


def cfg_combine(out: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``out`` holds [uncond; cond] along the batch: u + w (c - u), w per row."""
    u, c = out.chunk(2)
    return u + w.to(out).view((-1,) + (1,) * (out.ndim - 1)) * (c - u)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


class Bare:
    """A denoiser as the family adapters see it (``LatentModel.predict``): the bare
    network's attributes (``config`` and the like) whether or not it is DDP-wrapped, and
    its call through the wrapper (DDP's forward arms the gradient synchronisation of the
    backward; ``dmd_parts.Frozen``'s calls with detached parameters)."""

    def __init__(self, net):
        self.call, self.bare = net, getattr(net, "module", net)

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.bare, name)


class LatentModel:
    """A diffusers pipeline folder (``model_index.json``) and its family adapter. Components
    are loaded one at a time with their own ``from_pretrained``, so a stage that needs the
    denoiser never loads the text encoders and the reverse."""

    def __init__(self, path: str, family, index: dict, where: str):
        self.path, self.family, self.index, self.where = path, family, index, where
        self.pipeline_class = index["_class_name"]
        self.scheduler_config = read_json(os.path.join(path, "scheduler",
                                                       "scheduler_config.json"))
        self.schedule = Schedule(self.scheduler_config, family.flow)
        self.denoiser_config = read_json(os.path.join(path, family.denoiser, "config.json"))
        self.student = None
        student = os.path.join(path, "student.json")
        if os.path.isfile(student):
            self.student = read_json(student)

    def components(self) -> list[str]:
        return [k for k, v in self.index.items()
                if not k.startswith("_") and isinstance(v, list) and v[0] is not None]

    def load(self, name: str):
        """One component (``unet``, ``vae``, ``text_encoder`` ...) with its class's
        ``from_pretrained``; a broken one is a ``UserError`` naming the stage."""
        import importlib
        entry = self.index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            raise bad_value(self.where, "pipeline component", name,
                            f"one the folder has: {self.components()}")
        library, cls = entry
        try:
            module = importlib.import_module(library)
            return getattr(module, cls).from_pretrained(os.path.join(self.path, name))
        except (OSError, ValueError, AttributeError, ImportError, EnvironmentError) as e:
            raise UserError(f"{self.where}: cannot load component '{name}' ({library}."
                            f"{cls}) from {self.path}/{name}: {e}") from e

    def denoiser(self):
        return self.load(self.family.denoiser).eval()

    def pipeline(self, **parts):
        """The whole pipeline, or the parts asked for (the others passed as None)."""
        from diffusers import DiffusionPipeline
        try:
            return DiffusionPipeline.from_pretrained(self.path, **parts)
        except (OSError, ValueError, TypeError, EnvironmentError) as e:
            raise UserError(f"{self.where}: DiffusionPipeline.from_pretrained cannot load "
                            f"{self.path}: {e}") from e

    def vae_scale_factor(self) -> int:
        cfg = os.path.join(self.path, "vae", "config.json")
        if not os.path.isfile(cfg):
            return 8
        vae = read_json(cfg)  # AutoencoderKL: block_out_channels; AutoencoderDC: encoder_...
        blocks = vae.get("block_out_channels") or vae.get("encoder_block_out_channels") or [0] * 4
        return 2 ** (len(blocks) - 1)

    def latent_shape(self, height: int | None = None, width: int | None = None):
        """(channels, h, w) of the denoiser's latents at an image size (default: the
        denoiser's own ``sample_size`` times the VAE factor)."""
        return self.family.latent_shape(self, height, width)

    def image_size(self) -> tuple[int, int]:
        c, h, w = self.latent_shape()
        f = self.vae_scale_factor()
        return h * f, w * f

    # -- the denoiser in model time, with guidance -------------------------------------
    def guidance_slot(self) -> bool:
        return self.family.has_guidance_slot(self.denoiser_config)

    def predict(self, net, x, t, cond: dict, w: torch.Tensor | None, mode: str):
        """The denoiser's output at (x, t) for conditioning ``cond`` (a batch of the
        stored embedding columns, plus ``uncond`` the same for the unconditional prompt):
        ``mode`` ``cfg`` runs both branches and combines them with w per row,
        ``embedded`` passes w through the guidance slot, ``none`` the conditional branch."""
        t = t.to(x.device, torch.float32).expand(len(x)) if t.ndim == 0 else t.to(x.device)
        net = Bare(net)
        if mode == "cfg":
            both = {k: torch.cat([cond["uncond"][k], v]) for k, v in cond.items()
                    if k != "uncond"}
            out = self.family.denoise(self, net, torch.cat([x, x]), torch.cat([t, t]), both,
                                      None)
            return cfg_combine(out, w)
        plain = {k: v for k, v in cond.items() if k != "uncond"}
        return self.family.denoise(self, net, x, t, plain, w if mode == "embedded" else None)


def check_embeddings(model: LatentModel, info: dict, where: str) -> None:
    """Embeddings written for another pipeline family (or another text width) are an
    error before any work."""
    if info.get("pipeline_class") not in model.family.pipelines:
        raise bad_value(where, "embeddings of pipeline", info.get("pipeline_class"),
                        f"embeddings of the teacher's family {list(model.family.pipelines)} "
                        "(encode-prompts on the same pipeline)")


def as_numpy(t: torch.Tensor, dtype) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(dtype)


class Family:
    """One adapter per pipeline family (a file each under ``stages/models/families``):
    what differs between families, and nothing else. Subclasses set the class attributes
    and implement ``encode``, ``latent_shape`` and ``denoise``."""

    name = ""
    pipelines: tuple[str, ...] = ()   # diffusers pipeline class names it reads
    denoiser = "unet"                 # the denoiser's component name
    flow = False                      # flow matching (velocity) instead of VP
    guidance_slot: str | None = None  # the denoiser config key of an embedded-guidance slot
    teacher_guidance = "cfg"          # how the teacher applies w: "cfg" or "embedded"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    # components ``encode`` does not need: passed as None when the pipeline is loaded
    not_for_encoding: tuple[str, ...] = ("unet", "vae", "scheduler")

    def has_guidance_slot(self, denoiser_config: dict) -> bool:
        return bool(self.guidance_slot and denoiser_config.get(self.guidance_slot))

    def with_guidance_slot(self, model: LatentModel, net):
        """The denoiser rebuilt with an embedded-guidance slot, every teacher weight kept
        and the new weights zero (so it starts as the teacher at any w); families without
        a slot raise."""
        raise bad_value(model.where, "guidance", "embedded", "fixed (this family's denoiser "
                        f"has no guidance slot); families with one: {slot_families()}")

    def encode(self, model: LatentModel, pipe, prompts: list[str]) -> dict[str, np.ndarray]:
        """Per-prompt conditioning arrays (first axis = prompt), e.g. ``prompt_embeds``."""
        raise NotImplementedError

    def unconditional(self, model: LatentModel, pipe, encoded: dict) -> dict:
        """The unconditional branch's conditioning from the encoded empty prompt (SDXL
        uses zeros instead when its pipeline says ``force_zeros_for_empty_prompt``)."""
        return encoded

    def latent_shape(self, model: LatentModel, height, width) -> tuple[int, int, int]:
        c = int(model.denoiser_config["in_channels"])
        size = model.denoiser_config.get("sample_size", 64)
        h, w = (size, size) if isinstance(size, int) else size
        f = model.vae_scale_factor()
        return (c, (height // f) if height else h, (width // f) if width else w)

    def denoise(self, model: LatentModel, net, x, t, cond: dict, w):
        """The raw prediction (epsilon, v or velocity) at model time t; ``w`` given only
        for the guidance slot; ``net`` as ``Bare`` (a DDP wrapper's attributes unwrapped)."""
        raise NotImplementedError

    def student_scheduler(self, model: LatentModel, noisy_times: list[float]):
        """The diffusers scheduler that runs a consistency student in a plain pipeline:
        ``LCMScheduler`` on the teacher's betas with the trajectory grid as its
        ``original_inference_steps`` (VP), ``FlowMatchLCMScheduler`` (flow)."""
        from diffusers import FlowMatchLCMScheduler, LCMScheduler
        if self.flow:
            return FlowMatchLCMScheduler.from_config(model.scheduler_config)
        return LCMScheduler.from_config(model.scheduler_config,
                                        original_inference_steps=len(noisy_times),
                                        timestep_scaling=10.0, clip_sample=False)

    def set_timesteps(self, model: LatentModel, scheduler, steps: int, shape) -> None:
        scheduler.set_timesteps(steps)


def slot_families() -> list[str]:
    from stages.models.families import FAMILIES
    return sorted({f.name for f in FAMILIES.values() if f.guidance_slot})
