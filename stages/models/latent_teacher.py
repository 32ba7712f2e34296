"""The parts of a small latent text-to-image model (Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models"), all plain diffusers / transformers classes
so the folder loads with ``StableDiffusionPipeline.from_pretrained``: an ``AutoencoderKL``
for 1-channel images, a word-level ``CLIPTokenizer`` made here from the training prompts
(no download), a small ``CLIPTextModel`` and a ``UNet2DConditionModel`` with
cross-attention. Also how one stage runs two training phases through the one harness
(``phase_context``).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SUFFIX = "</w>"  # CLIP's end-of-word mark


# -- tokenizer ------------------------------------------------------------------------------
def _bootstrap():
    from transformers import CLIPTokenizer
    return CLIPTokenizer(vocab={BOS: 0, EOS: 1}, merges=[])


def prompt_words(prompts, limit: int) -> list[str]:
    """The words (CLIP's pre-tokenizer pieces: letter runs, single digits, punctuation
    runs; lowercased, byte-level) of ``prompts``, the ``limit`` most frequent, sorted."""
    from collections import Counter
    backend = _bootstrap().backend_tokenizer
    counts = Counter(piece for p in prompts for piece, _ in
                     backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(p)))
    return sorted(w for w, _ in counts.most_common(limit))


def _pieces(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + SUFFIX]


def _bpe(pieces: list[str], ranks: dict) -> list[str]:
    """Byte-pair merging as ``tokenizers`` does it: the ranked pair of lowest rank first
    (leftmost on ties), until no adjacent pair is ranked."""
    pieces = list(pieces)
    while len(pieces) > 1:
        found = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:])) if p in ranks]
        if not found:
            break
        _, i = min(found)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which each of ``words`` is one token: for each word in turn, while it
    still ends in several pieces, the merge of its first two (appended last, it never
    changes how an earlier word merges: a lower-ranked pair always comes first)."""
    merges: list[tuple[str, str]] = []
    ranks: dict = {}
    for w in words:
        pieces = _bpe(_pieces(w), ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append((pieces[0], pieces[1]))
            pieces = _bpe(_pieces(w), ranks)
    return merges


def build_tokenizer(folder: str, words: list[str], max_length: int):
    """A CLIP BPE tokenizer in ``folder`` (``vocab.json``, ``merges.txt``, and what
    ``save_pretrained`` writes): the 256 byte-level symbols and their end-of-word forms (so
    any text tokenizes), the merges that make each of ``words`` one token, ``BOS`` and
    ``EOS`` (also the padding). Checked: each word is one token."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = word_merges(words)
    vocab: dict[str, int] = {}
    for token in alphabet + [a + SUFFIX for a in alphabet] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)
    tok.save_pretrained(folder)
    check_tokenizer(CLIPTokenizer.from_pretrained(folder), words)
    return tok


def check_tokenizer(tok, words: list[str]) -> None:
    """Each of ``words`` is one token between ``BOS`` and ``EOS``."""
    for w in words:
        ids = tok(w).input_ids
        if len(ids) != 3 or tok.convert_ids_to_tokens(ids[1]) != w + SUFFIX:
            raise RuntimeError(f"the tokenizer splits {w!r} into "
                               f"{tok.convert_ids_to_tokens(ids)}")


def token_ids(tok, prompts) -> torch.Tensor:
    """Prompt token ids as ``StableDiffusionPipeline.encode_prompt`` makes them: padded to
    ``model_max_length`` with ``EOS``, cut there."""
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="pt").input_ids


# -- networks -------------------------------------------------------------------------------
def vae_config(channels: list[int], latent_channels: int, image_size: int) -> dict:
    """An ``AutoencoderKL`` for 1-channel images, ``len(channels) - 1`` halvings."""
    import math
    return dict(in_channels=1, out_channels=1, latent_channels=latent_channels,
                down_block_types=["DownEncoderBlock2D"] * len(channels),
                up_block_types=["UpDecoderBlock2D"] * len(channels),
                block_out_channels=list(channels), layers_per_block=1,
                norm_num_groups=math.gcd(*channels, 32), sample_size=image_size)


def text_config(tok, width: int, layers: int, heads: int) -> dict:
    return dict(vocab_size=len(tok), hidden_size=width, intermediate_size=4 * width,
                num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=tok.model_max_length,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def unet_config(sample_size: int, channels: int, widths: list[int], cross: list[bool],
                layers_per_block: int, context_width: int, heads: int) -> dict:
    """A ``UNet2DConditionModel``; ``cross[i]``: cross-attention to the text at level i
    (the middle block always has it). ``heads`` is diffusers' ``attention_head_dim``, which
    this class reads as the number of heads."""
    import math
    down = ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross]
    up = ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)]
    return dict(sample_size=sample_size, in_channels=channels, out_channels=channels,
                block_out_channels=list(widths), down_block_types=down, up_block_types=up,
                layers_per_block=layers_per_block, cross_attention_dim=context_width,
                attention_head_dim=heads, norm_num_groups=math.gcd(*widths, 32))


def build(kind: str, config: dict):
    """``vae`` / ``text`` / ``unet`` from its config dict (in a worker: picklable)."""
    if kind == "text":
        from transformers import CLIPTextConfig, CLIPTextModel
        return CLIPTextModel(CLIPTextConfig(**config))
    from diffusers import AutoencoderKL, UNet2DConditionModel
    return (AutoencoderKL if kind == "vae" else UNet2DConditionModel)(**config)


def save_pipeline(path: str, vae, text_encoder, tokenizer_dir: str, unet, scheduler) -> str:
    """A ``StableDiffusionPipeline`` folder (no safety checker, no feature extractor); the
    tokenizer's ``vocab.json`` and ``merges.txt`` kept beside its ``tokenizer.json``."""
    import shutil
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, unet=unet,
                                   tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(path, "tokenizer", name))
    return path


def pad_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Images in [-1, 1] padded with -1 (background) to ``size`` pixels, centred."""
    ph, pw = max(size - x.shape[-2], 0), max(size - x.shape[-1], 0)
    return torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2),
                                   value=-1.0)


# -- two training phases in one stage -------------------------------------------------------
class PrefixedBoard:
    """A board that names each metric ``prefix + name``."""

    def __init__(self, board, prefix: str):
        self.board, self.prefix = board, prefix

    def log(self, stage, metrics, step):
        self.board.log(stage, {self.prefix + k: v for k, v in metrics.items()}, step)

    def progress(self, stage, done, total, unit):
        self.board.progress(stage, done, total, unit)

    def final_metrics(self, stage):
        return self.board.final_metrics(stage)


def phase_context(ctx, phase: str):
    """The stage's context for a training phase before its last: checkpoints in work
    files of their own (``<phase>/``), a Ray Train run of its own, metrics named
    ``<phase>_<metric>``; a re-run resumes each phase, a finished one is not trained again."""
    sep = "/" if "://" in ctx.work_uri else os.sep
    return replace(ctx, kind=f"{ctx.kind}-{phase}", board=PrefixedBoard(ctx.board, phase + "_"),
                   work_dir=os.path.join(ctx.work_dir, phase),
                   work_uri=ctx.work_uri.rstrip("/") + sep + phase)
