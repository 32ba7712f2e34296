"""What the students of latent text-to-image teachers share (``stages.models.families``):
the student denoiser built from the teacher's (with an embedded-guidance slot, or a LoRA
adapter), the conditioning looked up from the stored ``encode-prompts`` output (the
student never loads a text encoder or the VAE), w per row, and the checks made before any
training.

- ``guidance: fixed`` distils one w (``guidance_scale``): the student runs without
  guidance (``guidance_scale=1`` in the pipeline);
- ``guidance: embedded`` (LCM, Luo et al. 2023, Sec. 4.2): the student takes w through its
  guidance slot, so one student serves the range of w its pairs cover;
- ``lora`` (LCM-LoRA, Luo et al. 2023, arXiv 2311.05556): the denoiser frozen, a LoRA
  adapter (Hu et al. 2022; rank r, alpha, the target modules) trained through ``peft``,
  with an EMA of it as the consistency target.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, PositiveInt

from pipelines.errors import bad_value
from pipelines.stage import StageConfig
from stages.models.families.base import LatentModel


class LoRA(StageConfig):
    """A LoRA adapter: W + (alpha / r) B A on the target modules (None: the family's
    attention projections)."""

    rank: PositiveInt = 16
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] | None = None


class LatentStudentFields(StageConfig):
    """The fields of a student of a latent text-to-image teacher."""

    guidance: Literal["fixed", "embedded"] = "fixed"
    guidance_scale: float | None = Field(None, ge=0)  # fixed w; None: the pairs' one w
    lora: LoRA | None = None


def lora_config(model: LatentModel, net, lora: LoRA, where: str):
    from peft import LoraConfig
    targets = lora.target_modules or list(model.family.lora_targets)
    names = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)
             or isinstance(m, torch.nn.Conv2d)]
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        some = sorted({n.split(".")[-1] if not n.split(".")[-1].isdigit()
                       else ".".join(n.split(".")[-2:]) for n in names})[:30]
        raise bad_value(where, "lora.target_modules", targets,
                        f"module names of the {type(net).__name__}, e.g. {some}")
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets,
                      init_lora_weights="gaussian")


def build_student(model: LatentModel, cfg, where: str):
    """The student denoiser before training: the teacher's, with a guidance slot
    (``guidance: embedded``) and/or a LoRA adapter (only its weights trainable)."""
    net = model.denoiser()
    if cfg.guidance == "embedded" and not model.guidance_slot():
        if cfg.lora is not None:
            raise bad_value(where, "guidance", "embedded", "fixed for a LoRA student of a "
                            f"{type(net).__name__} without a guidance slot (a LoRA trains no "
                            "new weights outside its adapter); or a full student")
        net = model.family.with_guidance_slot(model, net)
    if cfg.lora is None:
        return net.train().requires_grad_(True)
    net.requires_grad_(False)
    config = lora_config(model, net, cfg.lora, where)
    if hasattr(net, "add_adapter"):  # diffusers' PeftAdapterMixin
        net.add_adapter(config)
    else:  # denoisers without it (PixArt, DiT in diffusers 0.42): peft directly
        from peft import inject_adapter_in_model
        inject_adapter_in_model(config, net)
    return net.train()


def check_latent_student(model: LatentModel, cfg, pairs_info: dict, where: str,
                         online: bool) -> float:
    """Every check before training; returns the w of a fixed student. Without the
    teacher in the loop (``online`` False) a fixed w must be the one the pairs were made
    with."""
    if cfg.guidance == "embedded":
        if not model.family.guidance_slot:  # the base adapter's error lists the families
            model.family.with_guidance_slot(model, None)
        return 1.0
    stored = pairs_info.get("guidance_scale", 1.0)
    w = cfg.guidance_scale if cfg.guidance_scale is not None else stored
    if isinstance(w, list):
        raise bad_value(where, "guidance_scale", None, "a number for a fixed-guidance "
                        f"student of pairs whose w is drawn from {stored} (or guidance: "
                        "embedded, or mode: online)")
    if not online and stored != w:
        raise bad_value(where, "guidance_scale", w, f"{stored}, the w of the trajectories "
                        "the pairs came from (the pairs are the teacher's own states); or "
                        "consistency-distill's mode: online, where the teacher takes the "
                        "step at w")
    return float(w)


def trainable_params(net) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


class LatentStudentMethod:
    """Mixin of a ``TrainMethod`` for latent teachers: ``setup`` loads the teacher folder
    (a verified copy on the worker's node), the student and the conditioning table."""

    teacher_in_loop = False

    def __init__(self, cfg, teacher, embeddings, columns: list[str], w_fixed: float):
        self.cfg, self.teacher_artifact, self.embeddings = cfg, teacher, embeddings
        self.columns = {c: torch.int64 if c == "prompt_index" else torch.float32
                        for c in columns}
        self.ema = {"student": cfg.ema_decay}
        self.w_fixed = w_fixed

    def setup(self, device):
        from stages.models.families import load_latent
        from stages.models.families.conditioning import Conditioning
        self.model = load_latent(self.teacher_artifact.path, "student")
        self.cond = Conditioning(self.embeddings, "train", "student").to(device)
        if self.teacher_in_loop:
            self.teacher = self.model.denoiser().to(device).requires_grad_(False)
        return {"student": build_student(self.model, self.cfg, "student").to(device)}

    def optimizers(self, nets):
        params = [p for p in nets["student"].parameters() if p.requires_grad]
        return {"student": torch.optim.AdamW(params, lr=self.cfg.lr)}

    def conditioning(self, batch) -> tuple[dict, torch.Tensor, str]:
        """(cond, w per row, how the student takes w)."""
        cond = self.cond.batch(batch["prompt_index"])
        if self.cfg.guidance == "embedded":
            return cond, batch["guidance_scale"], "embedded"
        n = len(batch["prompt_index"])
        return cond, torch.full((n,), self.w_fixed, device=batch["prompt_index"].device), "none"
