"""Tiny random instruct language models of real architectures, built in the test: a
``transformers`` folder (Llama, Qwen2, GPT-2) with a byte-level BPE tokenizer and a chat
template, and the same Llama written as a GGUF file (llama.cpp's tensor names and its
q/k permutation), so the GGUF path is tested against logits it must reproduce."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map: 256 printable symbols, one per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]


def vocabulary() -> list[str]:
    merged = ["".join(m.split()) for m in MERGES]
    return SPECIAL + byte_alphabet() + merged


def tokenizer(path: str):
    """A byte-level BPE tokenizer (GPT-2's alphabet, a few merges) with the chat template;
    eos and pad: <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(vocabulary())}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split()) for m in MERGES])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def config(arch: str, layers: int = 4, vocab_pad: int = 0):
    import transformers
    n = len(vocabulary()) + vocab_pad
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=n, n_embd=32, n_layer=layers, n_head=4,
                                       n_positions=256, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=2)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    return cls(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)


def build(arch: str, path: str, layers: int = 4, seed: int = 0, vocab_pad: int = 0,
          sharpness: float = 1.0) -> str:
    """A tiny random causal LM folder of ``arch`` (llama, qwen2, gpt2) at ``path``; its
    output head scaled by ``sharpness`` (a random model's next-token distribution is
    nearly uniform; a teacher worth distilling has peaked ones)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(arch, layers, vocab_pad))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpness)
    model.generation_config.pad_token_id = 2
    model.save_pretrained(path)
    tokenizer(path)
    return path


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion of a q/k projection (rotary halves interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(model, file: str) -> str:
    """``model`` (a LlamaForCausalLM of this module's vocabulary) as a float32 GGUF file."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(file, "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([3 if t in SPECIAL else 1 for t in vocab])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return file


def messages(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}])


def gguf_package(root: str, model) -> str:
    """A folder holding one GGUF file, as an installed model package's root would."""
    os.makedirs(root, exist_ok=True)
    return write_gguf(model, os.path.join(root, "tiny.Q.gguf"))
