"""Tiny *random* diffusers pipeline folders, one per text-to-image family, built offline
from configs (no hub access: every tokenizer is written by hand here). Each samples 2 steps
in well under a second on one CPU thread; weights are random (seeded with
``torch.manual_seed(0)``), so the images are noise: they are for plumbing tests only.

``build(family, path)`` writes the folder with ``save_pretrained`` and returns ``path``.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

FAMILIES_BUILT = ("sd15", "sd2v", "sdxl", "pixart", "dit", "sd3", "flux", "sana")

# a few whole words (reachable only as single characters by the merge-less CLIP BPE, but
# whole words for the WordLevel T5/Gemma-style tokenizers)
WORDS = ("a", "cat", "dog", "photo", "of", "an", "astronaut", "red", "blue", "car", "house",
         "tree", "the", "on", "in", "with", "painting", "horse")
DIT_LABELS = ("zero", "one", "two", "three", "cat")


# -- tokenizers ----------------------------------------------------------------------------
def clip_tokenizer(model_max_length: int = 77, pad: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` from a hand-written vocabulary: the letters, digits and a few
    punctuation marks with their ``</w>`` forms, some whole words, and the two special
    tokens last (as in CLIP, so the end token has the largest id); no merges."""
    from transformers import CLIPTokenizer
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789!,.-'")
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [w + "</w>" for w in WORDS if len(w) > 1]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                            pad_token=pad, model_max_length=model_max_length)
    return tok


def word_tokenizer(kind: str, model_max_length: int):
    """A T5-style (``</s>`` appended) or Gemma-style (``<bos>`` prepended) fast tokenizer
    over a ``tokenizers`` WordLevel model: whole lowercase words, anything else ``<unk>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    if kind == "t5":
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(specials + list(WORDS) + [c for c in letters
                                                                   if c not in WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                       eos_token="</s>", unk_token="<unk>",
                                       model_max_length=model_max_length)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>",
                                   model_max_length=model_max_length, padding_side="right")


# -- encoders ------------------------------------------------------------------------------
def clip_text(tok, projection: bool = False, hidden: int = 32, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tok.model_max_length,
        projection_dim=projection_dim, hidden_act="gelu", layer_norm_eps=1e-5,
        bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tok.pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def t5_text(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8,
                      relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id, is_encoder_decoder=False,
                      use_cache=False)
    return T5EncoderModel(config).eval()


def kl_vae(latent_channels: int = 4, blocks: int = 3, **extra):
    """A tiny ``AutoencoderKL``: scale factor 2 ** (blocks - 1)."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=(8,) * blocks, layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, sample_size=32, **extra).eval()


# -- families ------------------------------------------------------------------------------
def _sd(prediction_type: str):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=(2, 4), norm_num_groups=4)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    vae = kl_vae(4)
    tok = clip_tokenizer()
    text = clip_text(tok)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time_ids + pooled (text 2)
        cross_attention_dim=64, norm_num_groups=4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading",
                                       prediction_type="epsilon")
    vae = kl_vae(4)
    tok = clip_tokenizer()
    tok2 = clip_tokenizer(pad="!")
    text = clip_text(tok)
    text2 = clip_text(tok2, projection=True)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2,
                                     tokenizer=tok, tokenizer_2=tok2, unet=unet.eval(),
                                     scheduler=scheduler, force_zeros_for_empty_prompt=True)


def _pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
        num_attention_heads=3, caption_channels=32, in_channels=4, cross_attention_dim=24,
        out_channels=8,  # learned sigma, as the real one
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    vae = kl_vae(4)
    tok = word_tokenizer("t5", 120)
    text = t5_text(tok, 32)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear", prediction_type="epsilon")
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=vae,
                               transformer=transformer.eval(), scheduler=scheduler)


def _dit():
    """DiT over 1000 classes as the real one (``DiTPipeline`` hard-codes the null class
    1000); ``id2label`` names only the first few."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        in_channels=4, out_channels=8, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False)
    vae = kl_vae(4)
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, prediction_type="epsilon")
    id2label = {str(i): name for i, name in enumerate(DIT_LABELS)}
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=scheduler,
                       id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # written to model_index.json
    return pipe


def _sd3():
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
        joint_attention_dim=64, pooled_projection_dim=64, pos_embed_max_size=16)
    vae = kl_vae(16, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                 use_post_quant_conv=False)
    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(pad="!"), word_tokenizer("t5", 77)
    text, text2 = clip_text(tok, projection=True), clip_text(tok2, projection=True)
    text3 = t5_text(tok3, 64)  # >= the two CLIP widths concatenated, as in SD3
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=scheduler, vae=vae, text_encoder=text,
        tokenizer=tok, text_encoder_2=text2, tokenizer_2=tok2, text_encoder_3=text3,
        tokenizer_3=tok3)


def _flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = kl_vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                 use_post_quant_conv=False)
    tok, tok2 = clip_tokenizer(), word_tokenizer("t5", 64)
    text, text2 = clip_text(tok), t5_text(tok2, 32)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok,
                        text_encoder_2=text2, tokenizer_2=tok2, transformer=transformer.eval())


def _sana():
    from diffusers import (
        AutoencoderDC,
        FlowMatchEulerDiscreteScheduler,
        SanaPipeline,
        SanaTransformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4,
        num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
        cross_attention_dim=8, caption_channels=16, sample_size=8)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407).eval()
    tok = word_tokenizer("gemma", 1024)
    text = Gemma2Model(Gemma2Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return SanaPipeline(tokenizer=tok, text_encoder=text, vae=vae,
                        transformer=transformer.eval(), scheduler=scheduler)


BUILDERS = {
    "sd15": lambda: _sd("epsilon"),
    "sd2v": lambda: _sd("v_prediction"),
    "sdxl": _sdxl,
    "pixart": _pixart,
    "dit": _dit,
    "sd3": _sd3,
    "flux": _flux,
    "sana": _sana,
}

IMAGE_SIZE = 32  # every tiny folder: 32 x 32 images, 8 x 8 latents


def call_kwargs(family: str) -> dict:
    """What a plain pipeline call on the tiny folder needs besides the prompt: the image
    size (Flux and Sana default to 1024 px) and no resolution binning (PixArt and Sana bin
    only the real sample sizes)."""
    if family == "dit":  # DiTPipeline takes class labels and no size
        return {}
    out = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if family in ("pixart", "sana"):
        out["use_resolution_binning"] = False
    return out


def build(family: str, path: str) -> str:
    """Write the tiny random pipeline of ``family`` (one of ``FAMILIES_BUILT``) to
    ``path`` with ``save_pretrained``; returns ``path``."""
    if family not in BUILDERS:
        raise ValueError(f"unknown tiny family {family!r}; known: {sorted(BUILDERS)}")
    pipe = BUILDERS[family]()
    os.makedirs(path, exist_ok=True)
    pipe.save_pretrained(path)
    return path
