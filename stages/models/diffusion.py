"""Diffusion models of the diffusion timestep distillation family: a diffusers
``UNet2DModel`` (class-conditional through class embeddings, or unconditional) with its
scheduler config and noise schedule, and the model folders the family reads and writes.
Samplers are in ``stages.models.diffusion_sampling``.

Notation (DDPM / diffusers convention, Ho et al. 2020): a noised sample
x_t = alpha_t x0 + sigma_t z with alpha_t^2 = alphas_cumprod[t], sigma_t^2 = 1 - alpha_t^2.
Every stored state is in this "VP" space; t = -1 means clean (alpha 1, sigma 0).

- Model folder: ``unet/`` and ``scheduler/`` written by ``save_pretrained`` and a
  ``model_index.json`` (the layout of a diffusers ``DDPMPipeline``); students add
  ``student.json`` (method, the step counts their training covered, parameterisation); a
  segmented consistency student adds ``segment_unets/<k>/``, its k-step UNets.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from pydantic import PositiveInt

from pipelines.errors import UserError, bad_value
from pipelines.stage import StageConfig

STUDENT_FILE = "student.json"
# scheduler classes whose config (beta schedule, prediction type) the samplers can run
SUPPORTED_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler")
PREDICTIONS = ("epsilon", "v_prediction", "sample")



def vp_alpha_sigma(alphas_cumprod: torch.Tensor, num_train_timesteps: int, t: torch.Tensor,
                   like: torch.Tensor):
    """A variance-preserving schedule's alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)
    at (float) timesteps t, abar interpolated linearly between table entries; t < 0 is
    clean (1, 0); shaped to broadcast against ``like``."""
    t = t.to(torch.float64).cpu()
    tc = t.clamp(0, num_train_timesteps - 1)
    lo = tc.floor().long()
    hi = (lo + 1).clamp(max=num_train_timesteps - 1)
    w = tc - lo
    ab = alphas_cumprod[lo] * (1 - w) + alphas_cumprod[hi] * w
    ab = torch.where(t < 0, torch.ones_like(ab), ab)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return ab.sqrt().to(like).view(shape), (1 - ab).clamp(min=0).sqrt().to(like).view(shape)

class UNetArch(StageConfig):
    """The ``UNet2DModel`` fields of a stage that builds one."""

    block_out_channels: list[PositiveInt] = [32, 64]
    layers_per_block: PositiveInt = 1
    attention: bool = True  # self-attention in the lowest-resolution block

    def build(self, sample_size: int, channels: int, num_classes: int | None):
        from diffusers import UNet2DModel
        levels = len(self.block_out_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if self.attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        groups = math.gcd(*self.block_out_channels, 32)
        return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels,
                           block_out_channels=tuple(self.block_out_channels),
                           layers_per_block=self.layers_per_block, down_block_types=tuple(down),
                           up_block_types=tuple(up), norm_num_groups=groups,
                           attention_head_dim=min(self.block_out_channels[-1], 32),
                           num_class_embeds=num_classes)


class Diffusion:
    """A loaded model folder: the UNet, its scheduler config and the noise schedule."""

    def __init__(self, unet, scheduler_config: dict, student: dict | None = None):
        from diffusers import DDPMScheduler
        self.unet, self.scheduler_config, self.student = unet, dict(scheduler_config), student
        self.segment_unets: dict[int, object] = {}  # a segmented student's k-step UNets
        self.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        ddpm = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = ddpm.alphas_cumprod.double()
        self.num_train_timesteps = int(ddpm.config.num_train_timesteps)

    @property
    def num_classes(self) -> int | None:
        return self.unet.config.num_class_embeds

    @property
    def shape(self) -> tuple[int, int, int]:
        c, s = self.unet.config.in_channels, self.unet.config.sample_size
        return (c, s, s) if isinstance(s, int) else (c, *s)

    def to(self, device):
        for unet in (self.unet, *self.segment_unets.values()):
            unet.to(device)
        return self

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor):
        """alpha_t, sigma_t broadcastable to ``like``; t = -1 is clean; float t (reflow)
        interpolates the table linearly."""
        return vp_alpha_sigma(self.alphas_cumprod, self.num_train_timesteps, t, like)

    def model_out(self, unet, x, t, labels):
        t_in = t.clamp(min=0).to(x.device)
        kwargs = {"class_labels": labels.to(x.device)} if self.num_classes else {}
        return unet(x, t_in, **kwargs).sample

    def x0_eps(self, out, x, t):
        """(x0, eps) from the network output under the model's prediction type."""
        a, s = self.alpha_sigma(t, x)
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - s * eps) / a.clamp(min=1e-4)
        elif self.prediction_type == "v_prediction":
            x0, eps = a * x - s * out, s * x + a * out
        else:  # sample
            x0 = out
            eps = (x - a * x0) / s.clamp(min=1e-4)
        return x0, eps

    def predict_x0(self, unet, x, t, labels, clip: bool = False):
        x0, eps = self.x0_eps(self.model_out(unet, x, t, labels), x, t)
        return (x0.clamp(-1, 1) if clip else x0), eps


def where_of(ctx, kind: str, field: str | None = None) -> str:
    return f"stage '{ctx.name}' ({kind})" + (f" input '{field}'" if field else "")


# -- folders -----------------------------------------------------------------------------
def save_diffusion(unet, scheduler_config: dict, path: str, student: dict | None = None) -> str:
    """``save_pretrained`` of the UNet and its scheduler, in a diffusers pipeline layout."""
    unet = getattr(unet, "module", unet)
    cls = _scheduler_class(scheduler_config)
    unet.save_pretrained(os.path.join(path, "unet"))
    cls.from_config(scheduler_config).save_pretrained(os.path.join(path, "scheduler"))
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", cls.__name__]}
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    if student is not None:
        with open(os.path.join(path, STUDENT_FILE), "w") as f:
            json.dump(student, f, indent=2)
    return path


def _scheduler_class(config: dict):
    import diffusers
    name = config.get("_class_name", "DDIMScheduler")
    return getattr(diffusers, name)


def load_diffusion(path: str, where: str) -> Diffusion:
    """A folder written by ``save_diffusion`` (or any diffusers ``UNet2DModel`` folder
    with ``unet/`` and ``scheduler/``), with the real ``from_pretrained``; anything else is
    one ``UserError`` naming ``where``."""
    from diffusers import UNet2DModel
    expected = ("a diffusers model folder with unet/ (UNet2DModel) and scheduler/ "
                "(saved with save_pretrained)")
    if not os.path.isdir(path):
        raise bad_value(where, "model folder", path, f"{expected}; it does not exist")
    unet_cfg = os.path.join(path, "unet", "config.json")
    sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    if not (os.path.isfile(unet_cfg) and os.path.isfile(sched_cfg)):
        raise bad_value(where, "model folder", path, f"{expected}; it has no unet/config.json "
                                                     "or scheduler/scheduler_config.json")
    with open(unet_cfg) as f:
        unet_class = json.load(f).get("_class_name")
    if unet_class != "UNet2DModel":
        raise bad_value(where, "unet class", unet_class, ["UNet2DModel"])
    with open(sched_cfg) as f:
        scheduler_config = json.load(f)
    name = scheduler_config.get("_class_name")
    if name not in SUPPORTED_SCHEDULERS:
        raise bad_value(where, "scheduler", name, SUPPORTED_SCHEDULERS)
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise bad_value(where, "scheduler prediction_type", prediction, PREDICTIONS)
    student = None
    if os.path.isfile(os.path.join(path, STUDENT_FILE)):
        with open(os.path.join(path, STUDENT_FILE)) as f:
            student = json.load(f)
    try:
        unet = UNet2DModel.from_pretrained(os.path.join(path, "unet"))
        model = Diffusion(unet.eval(), scheduler_config, student)
        for k in (student or {}).get("segment_unets") or {}:
            sub = os.path.join(path, "segment_unets", k)
            model.segment_unets[int(k)] = UNet2DModel.from_pretrained(sub).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise UserError(f"{where}: cannot load the UNet from {path}: {e}") from e
    return model


def check_shape(model: Diffusion, shape, where: str, what: str) -> None:
    """A data shape (channels, height, width) that differs from the model's is an error."""
    shape = tuple(int(s) for s in shape)
    if shape != model.shape:
        raise bad_value(where, f"{what} shape (channels, height, width)", list(shape),
                        f"the teacher's {list(model.shape)}")


def to_images(x01: np.ndarray) -> torch.Tensor:
    """Data in [0, 1] to the model's range [-1, 1]."""
    return torch.tensor(x01, dtype=torch.float32) * 2 - 1


def row_noise(seed: int, ids, shape) -> torch.Tensor:
    """x_T for every row id: N(0, I) drawn from the row's own generator, so any row (and
    any shard) regenerates exactly, whatever the batching or the worker."""
    out = torch.empty((len(ids), *shape))
    for i, row in enumerate(ids):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(row))
        out[i] = torch.randn(shape, generator=gen)
    return out


def row_labels(ids, num_classes: int | None) -> np.ndarray:
    """Balanced class labels: row id modulo the number of classes (0 when unconditional)."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids % num_classes if num_classes else np.zeros_like(ids)
