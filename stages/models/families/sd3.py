"""Stable Diffusion 3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"): an ``SD3Transformer2DModel`` (MM-DiT, joint attention
over text and image tokens) over 16-channel KL latents (``shift_factor`` and
``scaling_factor``), rectified flow with a shifted ``FlowMatchEulerDiscreteScheduler``.

Time: model time t = 1000 sigma, x_t = (1 - sigma) x0 + sigma z, the network predicts the
velocity v = z - x0 and takes t itself as its ``timestep`` (as the pipeline passes the
scheduler's timesteps). Conditioning: CLIP-L and CLIP-G penultimate states concatenated,
zero-padded to the T5 width and joined with the T5 states along the sequence
(``prompt_embeds``), and the two CLIPs' pooled projections concatenated
(``pooled_embeds``), all from the pipeline's own ``encode_prompt``. No embedded guidance
slot (classifier-free guidance).
"""

from __future__ import annotations

import torch

from stages.models.families.base import Family

# MM-DiT attention: the image stream (to_*) and the text stream (add_*_proj, to_add_out),
# as diffusers' SD3 LoRA scripts target
JOINT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0",
                   "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class StableDiffusion3(Family):
    name = "stable-diffusion-3"
    pipelines = ("StableDiffusion3Pipeline",)
    denoiser = "transformer"
    flow = True
    lora_targets = JOINT_ATTENTION
    not_for_encoding = ("transformer", "vae", "scheduler", "image_encoder",
                        "feature_extractor")

    def encode(self, model, pipe, prompts):
        with torch.inference_mode():
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, prompt_2=None, prompt_3=None, device="cpu", num_images_per_prompt=1,
                do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds.float().numpy(), "pooled_embeds": pooled.float().numpy()}

    def denoise(self, model, net, x, t, cond, w):
        return net(hidden_states=x, timestep=t, encoder_hidden_states=cond["prompt_embeds"].to(x),
                   pooled_projections=cond["pooled_embeds"].to(x)).sample
