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
4. Trained through the training harness (``stages.train.harness``; in the stage's
   process by default), resumed from its last epoch when killed. Saved with
   ``save_pretrained`` (model and tokenizer), so ``AutoModelForCausalLM`` and
   ``AutoTokenizer.from_pretrained(path)`` load it like any local checkpoint.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from pipelines.stage import Dataset, Model, Stage
from stages.data.tables import read_split
from stages.models.text import lm_loss, tokenize
from stages.train.harness import AdamWConfig, Loss, TrainMethod, fit
from stages.train.rows import Rows

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
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        loss, n = lm_loss(model, ids[i:i + batch_size].to(device),
                          mask[i:i + batch_size].to(device))
        total, count = total + loss.item() * n, count + n
    return math.exp(total / max(count, 1))


class NextToken(TrainMethod):
    """A GPT-2 from its config, fitted to the next token; ``val_perplexity`` per epoch."""

    columns = {"input_ids": torch.int64, "attention_mask": torch.int64}

    def __init__(self, cfg, gpt2_config: dict, val_ids, val_mask):
        self.cfg, self.gpt2_config = cfg, gpt2_config
        self.val_ids, self.val_mask = val_ids, val_mask

    def setup(self, device):
        from transformers import GPT2Config, GPT2LMHeadModel
        return {"model": GPT2LMHeadModel(GPT2Config(**self.gpt2_config)).to(device)}

    def optimizers(self, nets):
        return {"model": self.cfg.adamw(nets["model"])}

    def loss(self, nets, emas, batch, gen):
        loss, _ = lm_loss(nets["model"], batch["input_ids"], batch["attention_mask"])
        return Loss({"model": loss}, len(batch["input_ids"]))

    def epoch_metrics(self, nets):
        if not len(self.val_ids):
            return {}
        return {"val_perplexity": perplexity(nets["model"], self.val_ids, self.val_mask)}


class FitCausalLM(Stage):
    kind = "fit-causal-lm"
    version = "3"  # 2: the training harness (one global permutation per epoch, resume)
    # 3: a last partial batch dropped, the same steps whatever the number of workers

    class Config(AdamWConfig):
        vocab_size: int = Field(2048, ge=300)
        max_length: int = Field(48, ge=4)
        n_layer: int = Field(4, ge=1)
        n_embd: int = Field(128, ge=8)
        n_head: int = Field(4, ge=1)
        epochs: int = Field(8, ge=1)
        batch_size: int = Field(32, ge=1)
        lr: float = Field(2e-3, gt=0)
        val_fraction: float = Field(0.05, ge=0, lt=1)
        num_workers: int = Field(0, ge=0)  # 0: in the stage's process; N: Ray Train workers

        def keyed_execution(self) -> dict[str, str]:
            return {**super().keyed_execution(),
                    "num_workers": "GPT-2's dropout draws its masks on each worker"}

    inputs = {"data": Dataset}
    outputs = {"model": Model}
    metrics = ("train_loss", "val_perplexity", "start_epoch")  # per epoch

    def run(self, ctx, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind}) input 'data'"
        texts = read_split(data, "train", ["text"], where)["text"]
        torch.manual_seed(ctx.seed)

        # 1. tokenizer, 2. token ids padded to max_length
        tokenizer = train_bpe_tokenizer(texts, cfg.vocab_size)
        enc = tokenize(tokenizer, with_eos(texts), cfg.max_length)
        ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
        mask = torch.tensor(enc["attention_mask"], dtype=torch.int64)
        gen = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(len(ids), generator=gen)
        n_val = int(len(ids) * cfg.val_fraction)
        val, train = order[:n_val], order[n_val:]

        # 3. the model, trained by the harness, one line of metrics per epoch
        gpt2 = dict(vocab_size=len(tokenizer), n_positions=cfg.max_length, n_embd=cfg.n_embd,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tokenizer.eos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        method = NextToken(cfg, gpt2, ids[val], mask[val])
        rows = Rows(method.columns,
                    tensors={"input_ids": ids[train], "attention_mask": mask[train]})
        trained = fit(ctx, method, rows, cfg)

        # 4. saved with save_pretrained, model and tokenizer
        from transformers import GPT2Config, GPT2LMHeadModel
        model = GPT2LMHeadModel(GPT2Config(**gpt2))
        model.load_state_dict(trained.state["nets"]["model"])
        out = ctx.output_dir("model")
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        info = {"use": "causal-lm", "model_type": "gpt2", "num_layers": cfg.n_layer,
                "hidden_size": cfg.n_embd, "vocab_size": len(tokenizer),
                "max_length": cfg.max_length, "epochs": trained.state["epoch"] + 1,
                "params": sum(p.numel() for p in model.parameters()), **trained.metrics}
        return {"model": Model(path=out, info=info)}
