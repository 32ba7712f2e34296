"""``evaluate-embeddings``: how well a distilled sentence encoder reproduces its teacher on
held-out sentences (``split == "test"``), and what it costs, measured in one process:

- ``cosine`` = mean_i cos(W e_s(x_i), e_t(x_i)), mean-pooled embeddings (Sentence-BERT
  pooling; W the student's saved projection, identity when the widths match);
- ``neighbor_overlap`` = mean_i |N_s(i) ∩ N_t(i)| / k: the overlap of each sentence's k
  nearest held-out neighbours (cosine, itself excluded) in student and teacher space, k =
  ``neighbors`` (10): whether the student preserves the teacher's retrieval ranking;
- ``speedup`` = latency_t / latency_s on the same tokenised batch, same thread count,
  interleaved timed passes (``evaluate-classifier``'s protocol); ``param_ratio``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Report, Stage
from stages.data.tables import read_split
from stages.evaluate.timing import LatencyConfig, pyplot
from stages.models.text import PROJECTION_FILE, load_text_model, mean_pool, tokenize


class Encoder(torch.nn.Module):
    """A model folder's encoder with mean pooling and its saved projection, if any."""

    def __init__(self, path: str, where: str):
        super().__init__()
        self.model, self.tokenizer = load_text_model(path, "encoder", where)
        self.proj = None
        if os.path.isfile(os.path.join(path, PROJECTION_FILE)):
            from safetensors.torch import load_file
            weights = load_file(os.path.join(path, PROJECTION_FILE))
            self.proj = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
            self.proj.load_state_dict(weights)

    def forward(self, batch):
        ids, mask = batch
        e = mean_pool(self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        return self.proj(e) if self.proj is not None else e

    @torch.inference_mode()
    def embed(self, texts, max_length: int, batch_size: int = 128) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenize(self.tokenizer, texts[i:i + batch_size], max_length)
            out.append(self((torch.tensor(enc["input_ids"]).long(),
                             torch.tensor(enc["attention_mask"]).long())))
        return torch.cat(out)


def neighbours(e: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of each row's k nearest other rows by cosine similarity."""
    e = F.normalize(e, dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def neighbour_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, the fraction of a's neighbours that are also b's."""
    return torch.tensor([len(set(x.tolist()) & set(y.tolist())) / a.shape[1]
                         for x, y in zip(a, b)])


class EvaluateEmbeddings(Stage):
    kind = "evaluate-embeddings"
    version = "1"

    class Config(LatencyConfig):
        neighbors: int = Field(10, ge=1)
        max_length: int = Field(64, ge=2)
        text_column: str = "text"
        repeats: int = Field(10, ge=3)
        latency_batch_size: int = Field(64, ge=1)

    inputs = {"student": Model, "teacher": Model, "data": Dataset}
    outputs = {"report": Report}
    metrics = ("cosine", "cosine_min", "neighbor_overlap", "speedup", "param_ratio",
               "student_ms_per_sample", "teacher_ms_per_sample", "student_params",
               "teacher_params")

    def run(self, ctx, student, teacher, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        s_enc = Encoder(student.path, f"{where} input 'student'").eval()
        t_enc = Encoder(teacher.path, f"{where} input 'teacher'").eval()
        texts = list(read_split(data, "test", [cfg.text_column], f"{where} input 'data'")
                     [cfg.text_column])
        if len(texts) <= cfg.neighbors:
            raise bad_value(f"{where} field 'neighbors'", "neighbors", cfg.neighbors,
                            f"fewer than the {len(texts)} held-out sentences")

        # 1. embeddings of the held-out sentences, 2. fidelity to the teacher
        e_s, e_t = s_enc.embed(texts, cfg.max_length), t_enc.embed(texts, cfg.max_length)
        if e_s.shape[1] != e_t.shape[1]:
            raise bad_value(f"{where} input 'student'", "embedding width", e_s.shape[1],
                            f"the teacher's {e_t.shape[1]} (or a saved {PROJECTION_FILE})")
        cos = F.cosine_similarity(e_s, e_t, dim=1)
        overlap = neighbour_overlap(neighbours(e_s, cfg.neighbors),
                                    neighbours(e_t, cfg.neighbors))

        # 3. cost, same batch and threads, interleaved
        enc = tokenize(t_enc.tokenizer, texts[:cfg.latency_batch_size], cfg.max_length)
        batch = (torch.tensor(enc["input_ids"]).long(), torch.tensor(enc["attention_mask"]).long())
        s_ms, t_ms = cfg.latencies([s_enc, t_enc], batch)
        s_params = sum(p.numel() for p in s_enc.parameters())
        t_params = sum(p.numel() for p in t_enc.parameters())
        n = len(batch[0])
        metrics = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                   "neighbor_overlap": float(overlap.mean()), "speedup": t_ms / s_ms,
                   "param_ratio": s_params / t_params,
                   "student_ms_per_sample": s_ms / n, "teacher_ms_per_sample": t_ms / n,
                   "student_params": s_params, "teacher_params": t_params}
        fig = _plot(cos.numpy(), overlap.numpy(), metrics)
        report = ctx.write_report("report", metrics, figures={"fidelity.png": fig},
                                  info={"test_rows": len(texts), "threads": cfg.threads,
                                        "latency_batch_size": n})
        pyplot().close(fig)
        return {"report": report}


def _plot(cos: np.ndarray, overlap: np.ndarray, m: dict):
    fig, (a, b) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    a.hist(cos, bins=30, color="tab:blue")
    a.set_xlabel("cosine(student, teacher) per held-out sentence")
    a.set_title(f"mean {m['cosine']:.3f}")
    b.hist(overlap, bins=np.linspace(0, 1, 12), color="tab:green")
    b.set_xlabel("top-k neighbour overlap per sentence")
    b.set_title(f"mean {m['neighbor_overlap']:.3f}; {m['speedup']:.2f}x faster, "
                f"{m['param_ratio']:.2f}x params")
    return fig
