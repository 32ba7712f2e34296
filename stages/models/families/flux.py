"""FLUX.1 (Black Forest Labs 2024; rectified flow transformers as in Esser et al. 2024): a
``FluxTransformer2DModel`` (double- and single-stream MM-DiT blocks with RoPE) over
16-channel KL latents packed 2 x 2 into tokens of 64 channels; rectified flow with a
resolution-dependent ("dynamic") shift of the ``FlowMatchEulerDiscreteScheduler``.

Time: model time t = 1000 sigma, x_t = (1 - sigma) x0 + sigma z, velocity v = z - x0; the
transformer takes t / 1000 (as ``FluxPipeline`` divides the scheduler's timesteps).
Latents are stored and stepped UNPACKED, (16, h, w); ``denoise`` packs them and builds the
``img_ids`` (row, column of each 2 x 2 patch) and ``txt_ids`` (zeros) as the pipeline does,
and unpacks the prediction. Dynamic shifting: ``set_timesteps`` passes mu, linear in the
packed sequence length (h / 2) (w / 2) between ``base_shift`` at ``base_image_seq_len`` and
``max_shift`` at ``max_image_seq_len``, and the pipeline's sigmas linspace(1, 1/N, N) to a
``FlowMatchEulerDiscreteScheduler``.

Conditioning: T5 states (``prompt_embeds``) and CLIP's pooled output (``pooled_embeds``).
FLUX.1-dev is guidance-distilled (Meng et al. 2023): w enters through the ``guidance``
input (``guidance_embeds``), the teacher's own way of applying it (``teacher_guidance =
"embedded"``); w = 1 when none is given. A transformer without it (schnell) ignores w.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.models.families.base import Family
from stages.models.families.sd3 import JOINT_ATTENTION

DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: 1024 px at 8x


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, h, w), ``FluxPipeline._unpack_latents``."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """``FluxPipeline._prepare_latent_image_ids``: (h2 * w2, 3) = (0, row, column)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] += torch.arange(h2)[:, None]
    ids[..., 2] += torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def calculate_shift(seq_len: int, config: dict) -> float:
    """``diffusers.pipelines.flux.pipeline_flux.calculate_shift`` on a scheduler config."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


class Flux(Family):
    name = "flux"
    pipelines = ("FluxPipeline",)
    denoiser = "transformer"
    flow = True
    guidance_slot = "guidance_embeds"
    teacher_guidance = "embedded"
    lora_targets = JOINT_ATTENTION
    not_for_encoding = ("transformer", "vae", "scheduler", "image_encoder",
                        "feature_extractor")

    def encode(self, model, pipe, prompts):
        with torch.inference_mode():
            embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu",
                                                   num_images_per_prompt=1)
        return {"prompt_embeds": embeds.float().numpy(), "pooled_embeds": pooled.float().numpy()}

    def latent_shape(self, model, height, width):
        c = int(model.denoiser_config.get("in_channels", 64)) // 4
        f = model.vae_scale_factor()
        size = DEFAULT_SAMPLE_SIZE * f
        height, width = height or size, width or size
        return (c, 2 * (int(height) // (f * 2)), 2 * (int(width) // (f * 2)))

    def set_timesteps(self, model, scheduler, steps, shape):
        from diffusers import FlowMatchEulerDiscreteScheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            h, w = shape[-2], shape[-1]
            kwargs["mu"] = calculate_shift((h // 2) * (w // 2), scheduler.config)
        if (isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
                and not scheduler.config.get("use_flow_sigmas")):
            kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)  # as FluxPipeline
            scheduler.set_timesteps(sigmas=kwargs.pop("sigmas"), **kwargs)
            return
        scheduler.set_timesteps(steps, **kwargs)

    def denoise(self, model, net, x, t, cond, w):
        b, _, h, wd = x.shape
        embeds = cond["prompt_embeds"].to(x)
        guidance = None
        if net.config.guidance_embeds:  # the slot is fed whenever the denoiser has it
            w = torch.ones(b, device=x.device) if w is None else w
            guidance = w.to(x.device, x.dtype).expand(b)
        out = net(hidden_states=pack(x), timestep=(t.to(x) / 1000).expand(b),
                  guidance=guidance, pooled_projections=cond["pooled_embeds"].to(x),
                  encoder_hidden_states=embeds,
                  txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype),
                  img_ids=image_ids(h // 2, wd // 2, x.device, x.dtype)).sample
        return unpack(out, h, wd)

    def with_guidance_slot(self, model, net):
        """FLUX.1-schnell-like transformers get the dev ``guidance_embedder``, its output
        layer zero so the student starts as the teacher."""
        from diffusers import FluxTransformer2DModel
        if net.config.guidance_embeds:
            return net
        slot = FluxTransformer2DModel.from_config({**net.config, "guidance_embeds": True})
        missing, unexpected = slot.load_state_dict(net.state_dict(), strict=False)
        assert not unexpected and all("guidance_embedder" in k for k in missing), missing
        torch.nn.init.zeros_(slot.time_text_embed.guidance_embedder.linear_2.weight)
        torch.nn.init.zeros_(slot.time_text_embed.guidance_embedder.linear_2.bias)
        return slot.to(next(net.parameters()).dtype)
