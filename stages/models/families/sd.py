"""Stable Diffusion 1.x / 2.x (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models"): a ``UNet2DConditionModel`` over 4-channel KL latents,
conditioned by cross-attention on one CLIP text encoder's last hidden states; epsilon
(1.x, 2.x-base) or v prediction (2.x 768) on scaled-linear betas.

Embedded guidance: ``time_cond_proj_dim`` (LCM's w-embedding slot, added to the timestep
embedding through ``time_embedding.cond_proj``); a teacher without it gets one for a full
student, zero-initialised so the student starts as the teacher.
"""

from __future__ import annotations

import torch

from stages.models.families.base import Family, guidance_embedding

GUIDANCE_DIM = 256  # LCM's default w-embedding width


class StableDiffusion(Family):
    name = "stable-diffusion"
    pipelines = ("StableDiffusionPipeline",)
    guidance_slot = "time_cond_proj_dim"

    def encode(self, model, pipe, prompts):
        with torch.inference_mode():
            embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        return {"prompt_embeds": embeds.float().numpy()}

    def unet_kwargs(self, model, net, x, cond, w) -> dict:
        kwargs = {"encoder_hidden_states": cond["prompt_embeds"]}
        dim = net.config.time_cond_proj_dim
        if dim:  # the slot is fed whenever the denoiser has it (w = 1: no guidance)
            w = torch.ones(len(x), device=x.device) if w is None else w
            kwargs["timestep_cond"] = guidance_embedding(w.to(x.device) - 1, dim).to(x)
        return kwargs

    def denoise(self, model, net, x, t, cond, w):
        return net(x, t, **self.unet_kwargs(model, net, x, cond, w)).sample

    def with_guidance_slot(self, model, net):
        from diffusers import UNet2DConditionModel
        if net.config.time_cond_proj_dim:
            return net
        config = {**net.config, "time_cond_proj_dim": GUIDANCE_DIM}
        slot = UNet2DConditionModel.from_config(config)
        missing, unexpected = slot.load_state_dict(net.state_dict(), strict=False)
        assert not unexpected and all("cond_proj" in k for k in missing), missing
        torch.nn.init.zeros_(slot.time_embedding.cond_proj.weight)
        return slot


