"""Random-weight model folders for the GPU rows (``benchmarks.gpu_perf``), built offline
with ``save_pretrained`` and loaded by the stages with their real ``from_pretrained``:

- ``sd15_pipeline``: a ``StableDiffusionPipeline`` folder whose ``UNet2DConditionModel``
  has Stable Diffusion 1.5's configuration (block widths 320/640/1280/1280, two layers per
  block, cross-attention to 768-wide text states at the first three levels, 8 heads, 64 x 64
  latents of 4 channels: about 860M parameters), a DDIM scheduler with SD 1.5's betas, a
  one-layer CLIP text encoder of SD 1.5's width (only ``encode-prompts`` runs it) and a
  small ``AutoencoderKL`` with SD's 8x downsampling (never run: no VAE decoding);
- ``causal_lm``: a ``LlamaForCausalLM`` of SmolLM2-135M's shape (30 layers, 576 wide, 9
  heads, 3 key-value heads, a 49,152-token output layer) with a word-level tokenizer.

``tiny=True`` gives the same architectures at a few thousand parameters, for checking the
script on a CPU (``tests/benchmarks``)."""

from __future__ import annotations


WORDS = ("a", "an", "the", "photo", "painting", "drawing", "of", "cat", "dog", "horse",
         "astronaut", "car", "house", "tree", "river", "mountain", "city", "red", "blue",
         "green", "small", "large", "old", "on", "in", "with", "at", "night", "sunset",
         "snow", "beach", "forest", "portrait", "close", "up", "wide", "angle", "oil",
         "watercolor", "sketch")


def sentences(n: int, seed: int = 0, length: tuple[int, int] = (6, 14)) -> list[str]:
    """``n`` distinct lines of ``WORDS`` drawn with a seeded generator."""
    import random
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*length)))
        if line not in seen:
            seen.add(line)
            out.append(line + f" {len(out)}")  # distinct after load-prompts' de-duplication
    return out


def sd15_pipeline(path: str, tiny: bool = False) -> str:
    import torch
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from stages.models.latent_teacher import (
        build,
        build_tokenizer,
        save_pipeline,
        text_config,
        unet_config,
        vae_config,
    )
    torch.manual_seed(0)
    tok_dir = path + ".tokenizer"
    words = list(WORDS) + [str(d) for d in range(10)]
    tok = build_tokenizer(tok_dir, words, 77)
    width = 32 if tiny else 768
    text = CLIPTextModel(CLIPTextConfig(**text_config(tok, width, 1, 4 if tiny else 12)))
    vae = build("vae", vae_config([8, 8, 8, 8], 4, 64 if tiny else 512))
    unet = build("unet", unet_config(
        8 if tiny else 64, 4, [32, 64] if tiny else [320, 640, 1280, 1280],
        [False, True] if tiny else [True, True, True, False], 1 if tiny else 2,
        width, 2 if tiny else 8))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    return save_pipeline(path, vae.eval(), text.eval(), tok_dir, unet.eval(), scheduler)


def causal_lm(path: str, tiny: bool = False) -> str:
    import torch
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    specials = ["<|endoftext|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(WORDS) + [str(d) for d in range(10)])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                     pre_tokenizers.Digits(individual_digits=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="<unk>",
                                  model_max_length=2048)
    shape = (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128) if tiny else
             dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152))
    model = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=2048,
                                         tie_word_embeddings=True, eos_token_id=0,
                                         pad_token_id=0, bos_token_id=0))
    model.eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path
