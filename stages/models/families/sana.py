"""Sana (Xie et al. 2024, "SANA: Efficient High-Resolution Image Synthesis with Linear
Diffusion Transformers"): a ``SanaTransformer2DModel`` (linear self-attention, Mix-FFN)
over a deep-compression autoencoder's latents (``AutoencoderDC``, 32 x downsampling, 32
channels), conditioned by cross-attention on a Gemma-2 decoder's last hidden states
(``prompt_embeds``) under the padding mask (``attention_mask``, int64); rectified flow.

Time: model time t = 1000 sigma, x_t = (1 - sigma) x0 + sigma z, velocity v = z - x0; the
transformer takes t times its ``timestep_scale`` (as ``SanaPipeline`` passes it).
Prompts: each prompt is encoded as ``SanaPipeline.__call__`` encodes it by default, after
its "complex human instruction" (the instruction's first token and the prompt's last
``max_sequence_length - 1`` tokens are kept, Sec. 3.1); the empty prompt (the
unconditional one) without it, as the pipeline encodes its default negative prompt ``""``.

Embedded guidance: ``guidance_embeds`` (SANA-Sprint, Chen et al. 2025): w times
``guidance_embeds_scale`` through the ``guidance`` input; a teacher without it gets one for
a full student, its output layer zero so the student starts as the teacher.
"""

from __future__ import annotations

import inspect

import torch

from stages.models.families.base import Family, read_json


def human_instruction(pipe) -> list[str] | None:
    """The pipeline's default ``complex_human_instruction`` (``__call__``'s default)."""
    param = inspect.signature(type(pipe).__call__).parameters.get("complex_human_instruction")
    return None if param is None or param.default is inspect.Parameter.empty else param.default


class Sana(Family):
    name = "sana"
    pipelines = ("SanaPipeline",)
    denoiser = "transformer"
    flow = True
    guidance_slot = "guidance_embeds"
    not_for_encoding = ("transformer", "vae", "scheduler")

    def encode(self, model, pipe, prompts):
        prompts = [str(p) for p in prompts]
        instruction = human_instruction(pipe)
        embeds, masks = [None] * len(prompts), [None] * len(prompts)
        with torch.inference_mode():
            for chi in (True, False):  # prompts after the instruction; "" without it
                rows = [i for i, p in enumerate(prompts) if bool(p) == chi]
                if not rows:
                    continue
                e, m, _, _ = pipe.encode_prompt(
                    [prompts[i] for i in rows], do_classifier_free_guidance=False,
                    device="cpu", num_images_per_prompt=1,
                    complex_human_instruction=instruction if chi else None)
                for j, i in enumerate(rows):
                    embeds[i], masks[i] = e[j], m[j]
        return {"prompt_embeds": torch.stack(embeds).float().numpy(),
                "attention_mask": torch.stack(masks).long().numpy()}

    def vae_scale_factor(self, model) -> int:
        """``SanaPipeline``: 2 ** (number of encoder blocks - 1) for ``AutoencoderDC``."""
        import os
        cfg = os.path.join(model.path, "vae", "config.json")
        if os.path.isfile(cfg):
            blocks = read_json(cfg).get("encoder_block_out_channels")
            if blocks:
                return 2 ** (len(blocks) - 1)
        return 32

    def latent_shape(self, model, height, width):
        c = int(model.denoiser_config["in_channels"])
        size = model.denoiser_config.get("sample_size", 32)
        h, w = (size, size) if isinstance(size, int) else size
        f = self.vae_scale_factor(model)
        return (c, (int(height) // f) if height else h, (int(width) // f) if width else w)

    def denoise(self, model, net, x, t, cond, w):
        kwargs = {}
        if net.config.get("guidance_embeds"):
            w = torch.ones(len(x), device=x.device) if w is None else w
            kwargs["guidance"] = (w.to(x.device, x.dtype).expand(len(x))
                                  * net.config.guidance_embeds_scale)
        scale = net.config.get("timestep_scale", 1.0)
        out = net(x, encoder_hidden_states=cond["prompt_embeds"].to(x),
                  encoder_attention_mask=cond["attention_mask"].to(x.device),
                  timestep=t.to(x) * scale, **kwargs).sample
        c = x.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out

    def with_guidance_slot(self, model, net):
        from diffusers import SanaTransformer2DModel
        if net.config.get("guidance_embeds"):
            return net
        slot = SanaTransformer2DModel.from_config({**net.config, "guidance_embeds": True})
        state = {k.replace("time_embed.emb.timestep_embedder.", "time_embed.timestep_embedder."):
                 v for k, v in net.state_dict().items()}
        missing, unexpected = slot.load_state_dict(state, strict=False)
        assert not unexpected and all("guidance_embedder" in k for k in missing), (
            missing, unexpected)
        torch.nn.init.zeros_(slot.time_embed.guidance_embedder.linear_2.weight)
        torch.nn.init.zeros_(slot.time_embed.guidance_embedder.linear_2.bias)
        return slot.to(next(net.parameters()).dtype)
