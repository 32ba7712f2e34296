"""``evaluate-lm``: a distilled causal language model against its teacher on held-out
sentences (``split == "test"``), both in this process, same tokens (the teacher's
tokenizer; each sentence ends with the end-of-text token, as in training):

- ``perplexity`` = exp(-1/N sum_i log q_s(w_{i+1} | w_{<=i})) over the N real next
  tokens; ``teacher_perplexity`` the same for the teacher;
- ``kl_to_teacher`` = 1/N sum_i KL(p_t(. | w_{<=i}) || q_s(. | w_{<=i})), full vocabulary,
  in nats per token;
- ``speedup`` = latency_t / latency_s of a forward pass over the same batch, same thread
  count, interleaved (``evaluate-classifier``'s protocol); ``param_ratio``.

With a ``generate-responses`` output as ``data`` (``info.signal == "responses"``), the
instruction-model evaluation of ``stages.evaluate.lm_responses`` instead: on the held-out
prompts, the student's perplexity on the teacher's responses, top-1 agreement and KL per
token under teacher forcing, ROUGE-L of the greedy answers (``max_new_tokens``) against
the teacher's and the reference, and generation tokens/s of both at
``generation_batch_size`` prompts (``max_length`` and ``latency_batch_size`` are the
sentence path's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Report, Stage
from stages.data.tables import read_split
from stages.evaluate.lm_responses import METRICS as RESPONSE_METRICS
from stages.evaluate.lm_responses import evaluate_responses
from stages.evaluate.timing import LatencyConfig, pyplot
from stages.models.text import load_text_model, tokenize


class Forward(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(input_ids=batch[0], attention_mask=batch[1]).logits


class EvaluateLM(Stage):
    kind = "evaluate-lm"
    version = "2"  # 2: responses data (generate-responses) -> the instruction-model evaluation

    class Config(LatencyConfig):
        max_length: int = Field(48, ge=2)
        text_column: str = "text"
        batch_size: int = Field(64, ge=1)
        repeats: int = Field(10, ge=3)
        latency_batch_size: int = Field(32, ge=1)
        # responses data only: greedy answers and the generation speed
        max_new_tokens: int = Field(64, ge=1)
        generation_batch_size: int = Field(8, ge=1)
        max_eval_prompts: int | None = Field(None, ge=1)  # the first N held-out rows by id

    inputs = {"student": Model, "teacher": Model, "data": Dataset}
    outputs = {"report": Report}
    metrics = tuple(dict.fromkeys((  # both paths' (responses data: RESPONSE_METRICS)
        "perplexity", "teacher_perplexity", "kl_to_teacher", "speedup", "param_ratio",
        "student_ms_per_sample", "teacher_ms_per_sample", "student_params", "teacher_params",
        *RESPONSE_METRICS)))

    def run(self, ctx, student, teacher, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        if data.info.get("signal") == "responses":
            return {"report": evaluate_responses(cfg, ctx, student, teacher, data, where)}
        s_model, _ = load_text_model(student.path, "causal-lm", f"{where} input 'student'")
        t_model, tokenizer = load_text_model(teacher.path, "causal-lm", f"{where} input 'teacher'")
        if s_model.config.vocab_size != t_model.config.vocab_size:
            raise bad_value(f"{where} input 'student'", "vocab_size", s_model.config.vocab_size,
                            f"the teacher's vocab_size {t_model.config.vocab_size}")
        texts = read_split(data, "test", [cfg.text_column], f"{where} input 'data'")[cfg.text_column]
        enc = tokenize(tokenizer, [str(t) + (tokenizer.eos_token or "") for t in texts],
                       cfg.max_length)
        ids = torch.tensor(enc["input_ids"]).long()
        mask = torch.tensor(enc["attention_mask"]).long()

        # 1. next-token log-likelihoods and KL, batch by batch
        s_nll = t_nll = kl = 0.0
        tokens = 0
        with torch.inference_mode():
            for i in range(0, len(ids), cfg.batch_size):
                b_ids, b_mask = ids[i:i + cfg.batch_size], mask[i:i + cfg.batch_size]
                keep = b_mask[:, 1:].bool()
                y = b_ids[:, 1:][keep]
                log_q = F.log_softmax(Forward(s_model)((b_ids, b_mask))[:, :-1][keep].float(), -1)
                log_p = F.log_softmax(Forward(t_model)((b_ids, b_mask))[:, :-1][keep].float(), -1)
                s_nll -= log_q.gather(1, y[:, None]).sum().item()
                t_nll -= log_p.gather(1, y[:, None]).sum().item()
                kl += (log_p.exp() * (log_p - log_q)).sum().item()
                tokens += len(y)

        # 2. cost, same batch and threads, interleaved
        batch = (ids[:cfg.latency_batch_size], mask[:cfg.latency_batch_size])
        s_ms, t_ms = cfg.latencies([Forward(s_model), Forward(t_model)], batch)
        s_params = sum(p.numel() for p in s_model.parameters())
        t_params = sum(p.numel() for p in t_model.parameters())
        n = len(batch[0])
        metrics = {"perplexity": math.exp(s_nll / tokens),
                   "teacher_perplexity": math.exp(t_nll / tokens),
                   "kl_to_teacher": kl / tokens, "speedup": t_ms / s_ms,
                   "param_ratio": s_params / t_params,
                   "student_ms_per_sample": s_ms / n, "teacher_ms_per_sample": t_ms / n,
                   "student_params": s_params, "teacher_params": t_params}
        fig = _plot(metrics)
        report = ctx.write_report("report", metrics, figures={"perplexity.png": fig},
                                  info={"test_rows": len(ids), "tokens": tokens,
                                        "threads": cfg.threads})
        pyplot().close(fig)
        return {"report": report}


def _plot(m: dict):
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    bars = ax.bar(["teacher", "student"], [m["teacher_perplexity"], m["perplexity"]],
                  color=["tab:gray", "tab:blue"])
    ax.bar_label(bars, fmt="%.1f")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"KL to teacher {m['kl_to_teacher']:.3f} nats/token; "
                 f"{m['speedup']:.2f}x faster")
    return fig
