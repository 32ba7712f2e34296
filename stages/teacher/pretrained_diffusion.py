"""``pretrained-diffusion``: a diffusers pipeline folder (``model_index.json``) as a
teacher, checked by loading it with the real ``DiffusionPipeline.from_pretrained`` and
copied into the store (keyed by its content, so an edited folder re-runs), so every later
stage reads the same immutable files. Nothing is downloaded.

The pipeline class picks the family adapter (``stages.models.families``: SD 1.x/2.x, SDXL,
PixArt, DiT, SD3, Flux, Sana, and the pixel-space ``DDPMPipeline`` of a ``UNet2DModel``);
an unsupported class is one error listing the supported ones. The artifact's info says
what the adapter read: the family, the denoiser's prediction (epsilon, v or flow velocity)
and time convention, the latent shape at the default image size, whether the denoiser has
an embedded-guidance slot, its parameter count.
"""

from __future__ import annotations

import os
import shutil

from pipelines.stage import Model, Stage, StageConfig
from stages.models.diffusion import load_diffusion
from stages.models.families import PIXEL_PIPELINES, load_latent, read_index


class PretrainedDiffusion(Stage):
    kind = "pretrained-diffusion"
    version = "1"

    class Config(StageConfig):
        path: str

    outputs = {"model": Model}

    def content_paths(self) -> dict[str, str]:
        return {"path": os.path.abspath(os.path.expanduser(self.config.path))}

    def run(self, ctx):
        src = os.path.abspath(os.path.expanduser(self.config.path))
        where = f"stage '{ctx.name}' ({self.kind}) field 'path'"
        index = read_index(src, where)                          # 1. which family
        if index.get("_class_name") in PIXEL_PIPELINES:
            model = load_diffusion(src, where)
            info = {"pipeline_class": index["_class_name"], "family": "pixel",
                    "prediction": model.prediction_type, "time": "vp",
                    "shape": list(model.shape), "num_classes": model.num_classes,
                    "params": sum(p.numel() for p in model.unet.parameters())}
        else:
            latent = load_latent(src, where)                    # unsupported: one error
            pipe = latent.pipeline()                            # 2. from_pretrained checks
            net = getattr(pipe, latent.family.denoiser)
            info = {"pipeline_class": latent.pipeline_class, "family": latent.family.name,
                    "prediction": latent.schedule.prediction, "time": latent.schedule.kind,
                    "shape": list(latent.latent_shape()), "image_size": list(latent.image_size()),
                    "guidance_slot": latent.guidance_slot(),
                    "components": latent.components(),
                    "params": sum(p.numel() for p in net.parameters())}
            del pipe
        out = ctx.output_dir("model")                           # 3. copied into the store
        shutil.copytree(src, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git*", "__pycache__"))
        return {"model": Model(path=out, info={**info, "source": src})}


