"""Stable Diffusion XL (Podell et al. 2023): a ``UNet2DConditionModel`` with
``addition_embed_type="text_time"``, conditioned on two CLIP text encoders' penultimate
states concatenated (``prompt_embeds``) and the second one's pooled projection
(``pooled_embeds``) plus the size micro-conditioning ``time_ids`` = (height, width, top,
left, target height, target width), here the generated size with no crop; epsilon
prediction. Embedded guidance as for SD 1.x (``time_cond_proj_dim``).
"""

from __future__ import annotations

import numpy as np
import torch

from stages.models.families.sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "stable-diffusion-xl"
    pipelines = ("StableDiffusionXLPipeline",)
    not_for_encoding = ("unet", "vae", "scheduler", "image_encoder", "feature_extractor")

    def encode(self, model, pipe, prompts):
        with torch.inference_mode():
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu",
                                                      num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.float().numpy(), "pooled_embeds": pooled.float().numpy()}

    def unconditional(self, model, pipe, encoded):
        if getattr(pipe.config, "force_zeros_for_empty_prompt", True):
            return {k: np.zeros_like(v) for k, v in encoded.items()}
        return encoded

    def unet_kwargs(self, model, net, x, cond, w):
        kwargs = super().unet_kwargs(model, net, x, cond, w)
        f = model.vae_scale_factor()
        h, wd = x.shape[-2] * f, x.shape[-1] * f
        time_ids = torch.tensor([h, wd, 0, 0, h, wd], dtype=x.dtype, device=x.device)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled_embeds"].to(x),
                                       "time_ids": time_ids.expand(len(x), 6)}
        return kwargs
