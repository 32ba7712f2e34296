"""``evaluate-lm`` for instruction models: a distilled student against its teacher on the
held-out prompts (``split == "test"``) of a ``generate-responses`` output, both models in
this process, on the CPU.

1. Teacher forcing on each row's ``prompt_ids`` + ``response_ids`` (the teacher's own
   response; packed as ``kd-student`` packs them, the prompt's end and the response's
   start kept within the models' context, at most ``MAX_TOKENS``), per response token
   y_j with the student's log q(. | x, y_<j) and the teacher's log p(. | x, y_<j):

   - ``response_perplexity`` = exp(-1/N sum_j log q(y_j | x, y_<j)) over the N response
     tokens, ``teacher_response_perplexity`` the same with p;
   - ``top1_agreement``: the fraction of the N positions where argmax q = argmax p;
   - ``kl_to_teacher`` = 1/N sum_j KL(p || q), full vocabulary (vocabularies that differ
     only by padded rows: the first min(V_s, V_t) logits), nats per token.

2. Greedy answers: the student and the teacher each continue every held-out prompt
   greedily for up to ``max_new_tokens`` tokens (``generation_batch_size`` prompts a
   batch), decoded without special tokens. ROUGE-L F1 (longest common subsequence of
   lowercased whitespace tokens, Lin 2004): ``rougeL_vs_teacher`` of the student's answer
   against the teacher's; with a ``reference`` column, ``rougeL_vs_reference`` and
   ``teacher_rougeL_vs_reference`` over the rows with a non-empty reference. Means over
   prompts.

3. Speed: ``student_tokens_per_s`` / ``teacher_tokens_per_s``, generated tokens per second
   of a batch of ``generation_batch_size`` held-out prompts (cycled when there are fewer),
   exactly ``max_new_tokens`` new tokens each (``min_new_tokens``), greedy, ``threads``
   torch threads for both, interleaved student / teacher over min(``repeats``, 3) timed
   rounds after one short warm-up, median per model; ``generation_speedup`` = student /
   teacher; ``student_params``, ``teacher_params``, ``param_ratio``.
"""

from __future__ import annotations

import math
import statistics
import time

import pyarrow.compute as pc
import torch

from pipelines.errors import bad_value
from stages.data.tables import require_columns
from stages.evaluate.timing import pyplot
from stages.models.lm_generate import generate_ids, left_padded, pad_id
from stages.models.text import load_text_model
from stages.train.kd_responses import aligned_vocab, divergence, packed, response_logits

MAX_TOKENS = 4096      # prompt + response tokens per teacher-forced row, at most
TOKEN_BUDGET = 8192    # tokens per teacher-forcing batch, at most (logits are rows x V)
EXAMPLES, EXAMPLE_CHARS = 3, 200

METRICS = ("response_perplexity", "teacher_response_perplexity", "top1_agreement",
           "kl_to_teacher", "rougeL_vs_teacher", "rougeL_vs_reference",
           "teacher_rougeL_vs_reference", "student_tokens_per_s", "teacher_tokens_per_s",
           "generation_speedup", "param_ratio", "student_params", "teacher_params")


def lcs(a: list, b: list) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j - 1] of the previous line
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased whitespace tokens; two empty texts agree (1.0)."""
    c, r = candidate.lower().split(), reference.lower().split()
    if not c or not r:
        return float(c == r)
    n = lcs(c, r)
    return 0.0 if n == 0 else 2 * n / (len(c) + len(r))  # F1 of P = n/|c|, R = n/|r|


def context_length(*models) -> int:
    sizes = [getattr(m.config, "max_position_embeddings", None)
             or getattr(m.config, "n_positions", None) for m in models]
    return min([MAX_TOKENS] + [int(s) for s in sizes if s])


def held_out_rows(data, cfg, where: str) -> list[dict]:
    """The held-out rows (by id, the first ``max_eval_prompts``) as dicts."""
    text = data.info.get("text_column") or "prompt"
    table = require_columns(data, ["id", "split", "prompt_ids", "response_ids"], where)
    columns = ["id", "prompt_ids", "response_ids"] + [
        c for c in (text, "reference") if c in table.schema.names and c != "id"]
    rows = data.to_arrow(columns, filter=pc.field("split") == "test").to_pylist()
    if not rows:
        raise bad_value(where, "number of held-out rows (split == 'test')", 0,
                        "at least one: prompts loaded with load-prompts' test_fraction > 0 "
                        "before generate-responses")
    rows.sort(key=lambda r: r["id"])
    rows = rows[:cfg.max_eval_prompts] if cfg.max_eval_prompts else rows
    for r in rows:
        r["prompt"] = r.get(text)
    return rows


@torch.inference_mode()
def teacher_forced(s_model, t_model, rows, vocab: int, pad_id: int, batch_size: int,
                   max_length: int) -> dict:
    """Sums over the response tokens: the student's and the teacher's NLL, argmax
    agreements, KL(teacher || student); and the token count."""
    out = {"s_nll": 0.0, "t_nll": 0.0, "agree": 0, "kl": 0.0, "tokens": 0}
    longest = max(min(len(r["prompt_ids"]) + len(r["response_ids"]), max_length) for r in rows)
    step = max(1, min(batch_size, TOKEN_BUDGET // longest))
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        prompts = [torch.as_tensor(r["prompt_ids"], dtype=torch.long) for r in chunk]
        responses = [torch.as_tensor(r["response_ids"], dtype=torch.long) for r in chunk]
        ids, mask, spans = packed(prompts, responses, max_length, pad_id)
        y = torch.cat([r[:n] for r, (_, n) in zip(responses, spans)])
        if not len(y):
            continue
        z_s, z_t = (response_logits(m(input_ids=ids, attention_mask=mask).logits, spans)
                    [:, :vocab].float() for m in (s_model, t_model))
        ls, lt = z_s.log_softmax(-1), z_t.log_softmax(-1)
        out["s_nll"] -= ls.gather(1, y[:, None]).sum().item()
        out["t_nll"] -= lt.gather(1, y[:, None]).sum().item()
        out["agree"] += int((z_s.argmax(-1) == z_t.argmax(-1)).sum())
        out["kl"] += divergence("forward_kl", lt, ls, 0.0).sum().item()
        out["tokens"] += len(y)
    return out


def greedy_answers(model, tokenizer, prompts: list, pad_id: int, max_new_tokens: int,
                   batch_size: int) -> list[str]:
    answers = []
    for i in range(0, len(prompts), batch_size):
        batch = left_padded(prompts[i:i + batch_size], pad_id)
        for r in generate_ids(model, tokenizer, batch["input_ids"], batch["attention_mask"],
                              max_new_tokens=max_new_tokens):
            answers.append(tokenizer.decode(r["response_ids"], skip_special_tokens=True).strip())
    return answers


@torch.inference_mode()
def tokens_per_s(models: list, prompts: list, pad_id: int, max_new_tokens: int,
                 rounds: int, threads: int) -> list[float]:
    """Median generated tokens/s of each model on the batch ``prompts``, exactly
    ``max_new_tokens`` new tokens a row, greedy, ``threads`` threads, interleaved."""
    batch = left_padded(prompts, pad_id)
    width = batch["input_ids"].shape[1]
    speeds = [[] for _ in models]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for i in range(rounds + 1):  # round 0: a short warm-up
            n = 2 if i == 0 else max_new_tokens
            for model, speed in zip(models, speeds):
                start = time.perf_counter()
                out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n,
                                     do_sample=False, num_beams=1, pad_token_id=pad_id,
                                     temperature=None, top_p=None, top_k=None)
                elapsed = time.perf_counter() - start
                if i:
                    speed.append((out.shape[1] - width) * len(prompts) / elapsed)
    finally:
        torch.set_num_threads(before)
    return [statistics.median(s) for s in speeds]


def evaluate_responses(cfg, ctx, student, teacher, data, where: str):
    """The instruction-model evaluation; returns the ``report`` artifact."""
    s_model, s_tok = load_text_model(student.path, "causal-lm", f"{where} input 'student'")
    t_model, t_tok = load_text_model(teacher.path, "causal-lm", f"{where} input 'teacher'")
    vocab = aligned_vocab(t_tok, s_tok, t_model.config.vocab_size, s_model.config.vocab_size,
                          f"{where} input 'student'")
    rows = held_out_rows(data, cfg, f"{where} input 'data'")
    top = max(max(r["prompt_ids"] + r["response_ids"], default=0) for r in rows)
    if top >= vocab:
        raise bad_value(f"{where} input 'data'", "largest token id", top,
                        f"below the models' vocabulary size {vocab} (responses written "
                        f"with the teacher's tokenizer)")
    pad = pad_id(t_tok)
    max_length = context_length(s_model, t_model)

    f = teacher_forced(s_model, t_model, rows, vocab, pad, cfg.batch_size, max_length)  # 1.
    if not f["tokens"]:
        raise bad_value(f"{where} input 'data'", "number of held-out response tokens", 0,
                        "at least one")
    n = f["tokens"]
    metrics = {"response_perplexity": math.exp(f["s_nll"] / n),
               "teacher_response_perplexity": math.exp(f["t_nll"] / n),
               "top1_agreement": f["agree"] / n, "kl_to_teacher": f["kl"] / n}

    prompts = [list(r["prompt_ids"]) for r in rows]                                      # 2.
    said = {name: greedy_answers(m, tok, prompts, pad, cfg.max_new_tokens,
                                 cfg.generation_batch_size)
            for name, m, tok in (("student", s_model, s_tok), ("teacher", t_model, t_tok))}
    metrics["rougeL_vs_teacher"] = statistics.fmean(
        rouge_l(s, t) for s, t in zip(said["student"], said["teacher"]))
    refs = [(i, str(r["reference"])) for i, r in enumerate(rows)
            if str(r.get("reference") or "").strip()]
    if refs:
        for name, key in (("student", "rougeL_vs_reference"),
                          ("teacher", "teacher_rougeL_vs_reference")):
            metrics[key] = statistics.fmean(rouge_l(said[name][i], ref) for i, ref in refs)

    batch = [prompts[i % len(prompts)] for i in range(cfg.generation_batch_size)]          # 3.
    s_speed, t_speed = tokens_per_s([s_model, t_model], batch, pad, cfg.max_new_tokens,
                                    min(cfg.repeats, 3), cfg.threads)
    s_params = sum(p.numel() for p in s_model.parameters())
    t_params = sum(p.numel() for p in t_model.parameters())
    metrics.update(student_tokens_per_s=s_speed, teacher_tokens_per_s=t_speed,
                   generation_speedup=s_speed / t_speed, param_ratio=s_params / t_params,
                   student_params=s_params, teacher_params=t_params)

    def cut(text) -> str:
        text = "" if text is None else str(text)
        return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 3] + "..."

    examples = [{"prompt": cut(r["prompt"] if r["prompt"] is not None
                               else t_tok.decode(r["prompt_ids"], skip_special_tokens=True)),
                 "teacher": cut(said["teacher"][i]), "student": cut(said["student"][i]),
                 **({"reference": cut(r["reference"])} if "reference" in r else {})}
                for i, r in enumerate(rows[:EXAMPLES])]
    info = {"test_rows": len(rows), "tokens": n, "threads": cfg.threads,
            "max_new_tokens": cfg.max_new_tokens,
            "generation_batch_size": cfg.generation_batch_size, "max_length": max_length,
            "reference_rows": len(refs), "examples": examples}
    fig = plot(metrics)
    report = ctx.write_report("report", metrics, figures={"responses.png": fig}, info=info)
    pyplot().close(fig)
    return report


def plot(m: dict):
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    bars = left.bar(["teacher", "student"],
                    [m["teacher_response_perplexity"], m["response_perplexity"]],
                    color=["tab:gray", "tab:blue"])
    left.bar_label(bars, fmt="%.2f")
    left.set_ylabel("perplexity on the teacher's responses")
    names = [k for k in ("top1_agreement", "rougeL_vs_teacher", "rougeL_vs_reference",
                         "teacher_rougeL_vs_reference") if k in m]
    bars = right.bar([k.replace("_vs_", "\nvs ") for k in names], [m[k] for k in names],
                     color=["tab:gray" if k.startswith("teacher") else "tab:blue"
                            for k in names])
    right.bar_label(bars, fmt="%.2f")
    right.set_ylim(0, 1.05)
    right.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"KL to teacher {m['kl_to_teacher']:.3f} nats/token; "
                 f"{m['generation_speedup']:.2f}x tokens/s")
    return fig
