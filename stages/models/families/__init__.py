"""The text-to-image family adapters, one file each, and the registry that maps a
diffusers pipeline class (``model_index.json``'s ``_class_name``) to its adapter. A class
claimed twice is an error at import, never a silent overwrite."""

from __future__ import annotations

import json
import os

from pipelines.errors import bad_value
from stages.models.families.base import Family, LatentModel
from stages.models.families.dit import DiT
from stages.models.families.flux import Flux
from stages.models.families.pixart import PixArt
from stages.models.families.sana import Sana
from stages.models.families.sd import StableDiffusion
from stages.models.families.sd3 import StableDiffusion3
from stages.models.families.sdxl import StableDiffusionXL

ADAPTERS: tuple[type[Family], ...] = (StableDiffusion, StableDiffusionXL, PixArt, DiT,
                                      StableDiffusion3, Flux, Sana)


def _registry() -> dict[str, Family]:
    out: dict[str, Family] = {}
    for cls in ADAPTERS:
        for name in cls.pipelines:
            if name in out:
                raise RuntimeError(f"pipeline class {name} claimed by both "
                                   f"{type(out[name]).__name__} and {cls.__name__}")
            out[name] = cls()
    return out


FAMILIES = _registry()
# pixel-space pipelines of a ``UNet2DModel`` (``stages.models.diffusion``), read by the
# same stages through their pixel path
PIXEL_PIPELINES = ("DDPMPipeline",)


def read_index(path: str, where: str) -> dict:
    """``model_index.json`` of a diffusers pipeline folder; its absence is a UserError."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isdir(path):
        raise bad_value(where, "path", path, "a diffusers pipeline folder; it does not exist")
    if not os.path.isfile(index):
        raise bad_value(where, "path", path, "a diffusers pipeline folder with "
                        "model_index.json (written by save_pretrained); it has none")
    with open(index) as f:
        return json.load(f)


def load_latent(path: str, where: str) -> LatentModel:
    """A pipeline folder of a supported family (an unsupported class is one error listing
    the supported ones, taken from the registry)."""
    index = read_index(path, where)
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise bad_value(where, "pipeline class", name, sorted(FAMILIES) + list(PIXEL_PIPELINES))
    return LatentModel(path, FAMILIES[name], index, where)


def is_latent(path: str) -> bool:
    """Whether a model folder is a text-to-image pipeline of a registered family."""
    index = os.path.join(path, "model_index.json")
    if not os.path.isfile(index):
        return False
    with open(index) as f:
        return json.load(f).get("_class_name") in FAMILIES
