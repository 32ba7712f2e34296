"""``kd-student`` on a teacher's responses (the ``generate-responses`` output): a causal LM
student trained on the response tokens only (the prompt is context, never a target).

Per response token j of row i (prompt x, response y = y_1..y_n), with the student's
log-probabilities log q(. | x, y_<j) and the teacher's log p(. | x, y_<j):

- ``sft``: sequence-level KD (Kim & Rush 2016, arXiv 1606.07947), the cross-entropy of
  the teacher's tokens, -log q(y_j | x, y_<j);
- token-level KD on the stored top-k of each response token (the teacher's distribution
  rebuilt as in ``kd_tasks.dense_teacher_logprobs``: the rest mass spread over the other
  tokens, ``topk_rest: uniform``, or dropped, ``renormalize``), with D one of
  ``forward_kl`` KL(p || q), ``reverse_kl`` KL(q || p), ``tvd`` 1/2 sum |p - q| and
  ``jsd``, GKD's generalised Jensen-Shannon divergence (Agarwal et al. 2024, arXiv
  2306.13649, eq. 4) as TRL's GKDTrainer computes it:
  JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, with
  beta = 0 read as KL(p || q) and beta = 1 as KL(q || p); plus ``ce_weight`` times the
  cross-entropy;
- on-policy GKD (``lmbda`` > 0, Agarwal et al. 2024, Algorithm 1): with probability lmbda a
  batch's responses are written by the student itself inside the worker (sampling at
  ``student_temperature``, up to ``max_new_tokens``), and the teacher, loaded once in the
  worker from the ``teacher`` input, scores them with its full distribution; D is taken
  over the whole vocabulary on those tokens.

Losses are means over the batch's response tokens. Sequences longer than ``max_length``
keep the prompt's end and the response's start. Vocabularies: the student's and the
teacher's tokenizers must map the same tokens to the same ids; model vocabularies that
differ only by padded embedding rows (ids at or past the tokenizer's length) are aligned
by comparing the first min(V_s, V_t) logits.
"""

from __future__ import annotations

import math


from pipelines.errors import UserError
from stages.train.kd_tasks import NEG, TextTask, dense_teacher_logprobs
from stages.train.rows import RAGGED_PAD
from stages.lazy import lazy, no_grad

torch = lazy("torch")
F = lazy("torch.nn.functional")

TOKEN_LOSSES = ("forward_kl", "reverse_kl", "jsd", "tvd")


def divergence(kind: str, lt: torch.Tensor, ls: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token D(p_t, q_s) from log-probabilities [N, V] (teacher ``lt``, student ``ls``)."""
    pt, ps = lt.exp(), ls.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return (pt * (lt - ls)).sum(-1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return (ps * (ls - lt)).sum(-1)
    if kind == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
    return beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)


def lengths(padded: torch.Tensor) -> list[int]:
    return (padded != RAGGED_PAD).sum(1).tolist()


def packed(prompts: list, responses: list, max_length: int, pad_id: int):
    """Right-padded ``input_ids`` / ``attention_mask`` of prompt + response (the prompt's
    end and the response's start kept within ``max_length``) and, per row, (start of the
    response, response tokens kept)."""
    rows, spans = [], []
    for p, r in zip(prompts, responses):
        r = r[:max(max_length - 1, 1)]
        p = p[max(len(p) - (max_length - len(r)), 0):]
        rows.append(torch.cat([p, r]))
        spans.append((len(p), len(r)))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask, spans


def response_logits(logits: torch.Tensor, spans) -> torch.Tensor:
    """[sum of kept response tokens, V]: the logits that predict each response token."""
    return torch.cat([logits[i, max(s - 1, 0):s - 1 + n] for i, (s, n) in enumerate(spans)])


class ResponseTask(TextTask):
    """Teacher responses (with or without their top-k) -> a smaller causal LM."""

    losses = ("sft", *TOKEN_LOSSES)
    use = "causal-lm"

    def __init__(self, cfg, meta: dict, teacher=None):
        self.cfg, self.meta, self.teacher = cfg, meta, teacher
        self.columns = {"prompt_ids": torch.int64, "response_ids": torch.int64}
        if cfg.loss in TOKEN_LOSSES and meta.get("top_k"):  # none: build() says so
            self.columns.update(topk_ids=torch.int64, topk_logprobs=torch.float32)
        self._teacher_model, self._tokenizer = None, None

    def student(self, where: str = "student"):
        from transformers import AutoTokenizer
        model = self.cfg.build_text_student(self.teacher_dir(where), self.use, where)
        teacher_tok = AutoTokenizer.from_pretrained(self.teacher_dir(where))
        student_tok = (AutoTokenizer.from_pretrained(self.cfg.student_path)
                       if self.cfg.student_init == "folder" else teacher_tok)
        self.vocab = aligned_vocab(teacher_tok, student_tok, self.meta["vocab_size"],
                                   model.config.vocab_size, where)
        self._tokenizer = teacher_tok
        return model

    def build(self, where: str = "student"):
        if (self.cfg.loss in TOKEN_LOSSES and self.cfg.lmbda < 1
                and not self.meta.get("top_k")):
            raise UserError(f"{where} field 'loss': '{self.cfg.loss}' needs the teacher's "
                            f"top-k log-probabilities, and these responses have none; "
                            f"allowed: loss sft, lmbda 1 (every batch on-policy), or "
                            f"responses generated with top_k > 0")
        return self.student(where)

    def loss(self, model, batch, taid):
        cfg, k = self.cfg, int(self.meta.get("top_k") or 0)
        prompts = [row[:n] for row, n in zip(batch["prompt_ids"], lengths(batch["prompt_ids"]))]
        responses = [row[:n] for row, n in zip(batch["response_ids"],
                                                lengths(batch["response_ids"]))]
        on_policy = cfg.lmbda > 0 and torch.rand(1, generator=self.gen).item() < cfg.lmbda
        if on_policy:
            responses = self.student_responses(model, prompts)
        ids, mask, spans = packed(prompts, responses, cfg.max_length, self.pad_id)
        z_s = response_logits(model(input_ids=ids, attention_mask=mask).logits, spans)
        z_s = z_s[:, :self.vocab].float()
        y = torch.cat([r[:n] for r, (_, n) in zip(responses, spans)])
        ce = F.cross_entropy(z_s, y)
        if cfg.loss == "sft":
            return ce, z_s, y
        ls = z_s.log_softmax(-1)
        if on_policy:  # the teacher's full distribution on the student's tokens
            lt = self.teacher_logprobs(ids, mask, spans)
        else:
            top_ids = torch.cat([r[:n * k].view(n, k) for r, (_, n) in
                                 zip(batch["topk_ids"], spans)])
            top_lp = torch.cat([r[:n * k].view(n, k) for r, (_, n) in
                                zip(batch["topk_logprobs"], spans)])
            outside = top_ids >= self.vocab  # padded rows of the teacher's vocabulary
            top_ids, top_lp = top_ids.clamp(max=self.vocab - 1), top_lp.masked_fill(outside, NEG)
            rest = (1 - top_lp.exp().sum(-1)).clamp(min=0)
            lt = dense_teacher_logprobs(top_ids, top_lp, rest, self.vocab, cfg.topk_rest)
        loss = divergence(cfg.loss, lt, ls, cfg.beta).mean() + cfg.ce_weight * ce
        return loss, z_s, y

    @property
    def pad_id(self) -> int:
        from stages.models.lm_generate import pad_id
        return pad_id(self._tokenizer)

    def bind(self, gen: torch.Generator) -> None:
        """The worker's generator (on-policy draws and sampling)."""
        self.gen = gen

    def student_responses(self, model, prompts: list) -> list:
        from stages.models.lm_generate import generate_ids, left_padded
        from stages.train.sharding import sharded
        net = getattr(model, "module", model)  # under DDP: the wrapped model
        batch = left_padded([p.tolist() for p in prompts], self.pad_id)
        was = net.training
        net.eval()
        rows = generate_ids(net, self._tokenizer, batch["input_ids"], batch["attention_mask"],
                            max_new_tokens=self.cfg.max_new_tokens or
                            int(self.meta.get("max_new_tokens", 64)),
                            temperature=self.cfg.student_temperature,
                            seed=int(torch.randint(1 << 30, (1,), generator=self.gen)),
                            synced=sharded(net))  # FSDP: every worker steps as often
        net.train(was)
        device = prompts[0].device
        return [torch.as_tensor(r["response_ids"], dtype=torch.long, device=device)
                if len(r["response_ids"]) else torch.as_tensor([self.pad_id], device=device)
                for r in rows]

    @no_grad
    def teacher_logprobs(self, ids, mask, spans) -> torch.Tensor:
        if self._teacher_model is None:
            from transformers import AutoModelForCausalLM
            self._teacher_model = AutoModelForCausalLM.from_pretrained(
                self.teacher_dir("teacher")).eval().to(ids.device)
        logits = self._teacher_model(input_ids=ids, attention_mask=mask).logits
        return response_logits(logits, spans)[:, :self.vocab].float().log_softmax(-1)


def aligned_vocab(teacher_tok, student_tok, teacher_size: int, student_size: int,
                  where: str) -> int:
    """The number of leading vocabulary rows compared: min(V_t, V_s) when both tokenizers
    give the same ids to the same tokens and both models cover every token (sizes that
    differ only by padded rows); anything else is a clear error."""
    n = max(len(teacher_tok), len(student_tok))
    same = teacher_tok.get_vocab() == student_tok.get_vocab()
    if not same or min(teacher_size, student_size) < n:
        why = ("their tokenizers map tokens to different ids" if not same else
               f"a model vocabulary ({min(teacher_size, student_size)}) smaller than the "
               f"tokenizer's {n} tokens")
        raise UserError(f"{where}: the student's vocabulary does not match the teacher's "
                        f"(teacher {teacher_size} rows, student {student_size}; {why}); "
                        f"allowed: the same tokenizer, model vocabularies differing only "
                        f"by padded rows")
    return min(teacher_size, student_size)
