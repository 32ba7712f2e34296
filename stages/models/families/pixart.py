"""PixArt-alpha (Chen et al. 2023, "PixArt-alpha: Fast Training of Diffusion Transformer for
Photorealistic Text-to-Image Synthesis") and PixArt-Sigma (Chen et al. 2024): a
``PixArtTransformer2DModel`` (DiT blocks with adaLN-single) over 4-channel KL latents,
cross-attending to T5 encoder states (``prompt_embeds``) under the tokenizer's padding mask
(``attention_mask``, stored as int64); epsilon prediction on linear betas (VP, model time =
the discrete timestep) with a learned variance: the denoiser outputs 2 x in channels and
only the first half (epsilon) is kept, as the pipelines do.

Micro-conditioning: PixArt-alpha at 1024 px (``sample_size`` 128, ``use_additional_
conditions``) takes the image size and aspect ratio, as ``PixArtAlphaPipeline`` passes them;
every other checkpoint gets ``{"resolution": None, "aspect_ratio": None}``. No embedded
guidance slot (classifier-free guidance only).
"""

from __future__ import annotations

import torch

from stages.models.families.base import Family


def drop_learned_sigma(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The first half of the channels of a learned-variance output (epsilon), else out."""
    c = x.shape[1]
    return out[:, :c] if out.shape[1] == 2 * c else out


class PixArt(Family):
    name = "pixart"
    pipelines = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    denoiser = "transformer"
    not_for_encoding = ("transformer", "vae", "scheduler")

    def encode(self, model, pipe, prompts):
        with torch.inference_mode():
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                                    device="cpu", num_images_per_prompt=1)
        return {"prompt_embeds": embeds.float().numpy(),
                "attention_mask": mask.long().numpy()}

    def added_cond_kwargs(self, model, net, x) -> dict:
        if not getattr(net, "use_additional_conditions", False):
            return {"resolution": None, "aspect_ratio": None}
        f = model.vae_scale_factor()
        h, w = x.shape[-2] * f, x.shape[-1] * f
        resolution = torch.tensor([h, w], dtype=x.dtype, device=x.device).expand(len(x), 2)
        aspect = torch.full((len(x), 1), h / w, dtype=x.dtype, device=x.device)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def denoise(self, model, net, x, t, cond, w):
        out = net(x, encoder_hidden_states=cond["prompt_embeds"].to(x),
                  encoder_attention_mask=cond["attention_mask"].to(x.device),
                  timestep=t, added_cond_kwargs=self.added_cond_kwargs(model, net, x)).sample
        return drop_learned_sigma(out, x)
