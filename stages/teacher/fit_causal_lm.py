"""``fit-causal-lm``: a small GPT-2 causal language model (Radford et al. 2019) and its
tokenizer, trained from scratch on the ``split == "train"`` sentences of a text dataset:
the teacher of the language-model KD example when no pretrained LM is available offline.

1. Tokenizer: byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level variant) with
   ``vocab_size`` entries learned on the training sentences with the ``tokenizers``
   library; ``<|endoftext|>`` marks the end of a sentence and pads.
2. Model: ``GPT2LMHeadModel`` built from a ``GPT2Config`` (``n_layer``, ``n_embd``,
   ``n_head``, context ``max_length``).
3. Loss: next-token cross-entropy over the real tokens,
   L = -1/N sum_{i: m_{i+1}=1} log p_theta(w_{i+1} | w_{<=i}), with AdamW.
4. Saved with ``save_pretrained`` (model and tokenizer), so ``AutoModelForCausalLM`` and
   ``AutoTokenizer.from_pretrained(path)`` load it like any local checkpoint.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from pipelines.stage import Dataset, Model, Stage
from stages.data.tables import read_split
from stages.models.text import lm_loss, tokenize
from stages.train.loop import OptimConfig, train_epoch
from stages.models.device import device as torch_device

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([str(t) for t in texts], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=EOS)


def with_eos(texts) -> list[str]:
    return [str(t) + EOS for t in texts]


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, mask: torch.Tensor, batch_size: int = 64) -> float:
    """exp of the mean next-token cross-entropy over the real tokens."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        loss, n = lm_loss(model, ids[i:i + batch_size], mask[i:i + batch_size])
        total, count = total + loss.item() * n, count + n
    return math.exp(total / max(count, 1))


class FitCausalLM(Stage):
    kind = "fit-causal-lm"
    version = "1"

    class Config(OptimConfig):
        vocab_size: int = Field(2048, ge=300)
        max_length: int = Field(48, ge=4)
        n_layer: int = Field(4, ge=1)
        n_embd: int = Field(128, ge=8)
        n_head: int = Field(4, ge=1)
        epochs: int = Field(8, ge=1)
        batch_size: int = Field(32, ge=1)
        lr: float = Field(2e-3, gt=0)
        val_fraction: float = Field(0.05, ge=0, lt=1)

    inputs = {"data": Dataset}
    outputs = {"model": Model}
    metrics = ("train_loss", "val_perplexity")  # per epoch

    def run(self, ctx, data):
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind}) input 'data'"
        texts = read_split(data, "train", ["text"], where)["text"]
        torch.manual_seed(ctx.seed)

        # 1. tokenizer, 2. token ids padded to max_length
        tokenizer = train_bpe_tokenizer(texts, cfg.vocab_size)
        enc = tokenize(tokenizer, with_eos(texts), cfg.max_length)
        device = torch_device()  # the GPU of resources.num_gpus
        ids = torch.tensor(enc["input_ids"], dtype=torch.int64, device=device)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.int64, device=device)
        gen = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(len(ids), generator=gen)
        n_val = int(len(ids) * cfg.val_fraction)
        val, train = order[:n_val], order[n_val:]

        # 3. the model
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=len(tokenizer), n_positions=cfg.max_length, n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).to(device)
        opt = cfg.optimizer(model)

        def loss_fn(model, idx):
            loss, n = lm_loss(model, ids[idx], mask[idx])
            return loss, None, idx

        # 4. training, one line of metrics per epoch
        for epoch in range(cfg.epochs):
            perm = train[torch.randperm(len(train), generator=gen)]
            metrics = train_epoch(model, perm.split(cfg.batch_size), opt, loss_fn, epoch)
            if n_val:
                metrics["val_perplexity"] = perplexity(model, ids[val], mask[val])
            ctx.log_metrics(metrics, step=epoch)
            ctx.progress(epoch + 1, cfg.epochs, "epochs")

        out = ctx.output_dir("model")
        model.cpu().save_pretrained(out)
        tokenizer.save_pretrained(out)
        info = {"use": "causal-lm", "model_type": "gpt2", "num_layers": cfg.n_layer,
                "hidden_size": cfg.n_embd, "vocab_size": len(tokenizer),
                "max_length": cfg.max_length,
                "params": sum(p.numel() for p in model.parameters()), **metrics}
        return {"model": Model(path=out, info=info)}
