"""Instruction-model distillation of SmolLM2-135M-Instruct: the acceptance table of the
[llm] issue.

Runs the stages of ``examples/kd_llm.yaml`` in order, in this process (each with its own
stage context; Ray Data and Ray Train on an embedded local Ray): the GGUF teacher ->
instructions from the standard library -> greedy responses with top-20 log-probabilities
-> four 10-layer students, same tokens and steps: SFT, token KD and on-policy GKD from a
depth-pruned initialisation, and token KD from fixed layers (no pruning) -> one evaluate-lm each on the held-out prompts.
Then the first responses are generated again with 1 actor and compared with the
example's 2-actor rows.

Writes ``benchmarks/results/kd_llm.json`` (via ``python -m benchmarks``) and
``kd_llm.md`` (the table).

    python -m benchmarks --only kd_llm --repetitions 1

``KD_LLM_BENCH_STORE=<dir>`` keeps the stages' outputs there (a later invocation reuses
those whose key is unchanged); ``KD_LLM_BENCH_KEEP=responses`` (comma-separated stage
names) reuses those stages' kept outputs even when their key changed (an earlier commit made
them), so the students can be compared again without the 15-minute generation.
"""

from __future__ import annotations

import os
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc

from benchmarks.common import commit, example_ray
from benchmarks.diffusion import run_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "examples", "kd_llm.yaml")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
STUDENTS = ("sft", "token_kd", "gkd", "layers_kd")
CHECK_ROWS = 16
COLUMNS = [("response_perplexity", "perplexity on the teacher's responses", "{:.3f}"),
           ("top1_agreement", "top-1 agreement", "{:.3f}"),
           ("kl_to_teacher", "KL to teacher (nats/token)", "{:.3f}"),
           ("rougeL_vs_teacher", "ROUGE-L vs teacher", "{:.3f}"),
           ("rougeL_vs_reference", "ROUGE-L vs reference", "{:.3f}"),
           ("student_tokens_per_s", "tokens/s (batch 8)", "{:.1f}"),
           ("generation_speedup", "speed-up", "{:.2f}x"),
           ("student_params", "parameters", "{:,.0f}")]


def same_rows(outputs: dict, configs: dict, gpus: float) -> bool:
    """The first CHECK_ROWS prompts' responses again, with 1 actor: identical?"""
    from pipelines.context import StageContext
    from stages.teacher.generate_responses import GenerateResponses
    prompts = outputs["instructions"]["prompts"]
    ids = sorted(prompts.to_numpy(["id"])["id"].tolist())[:CHECK_ROWS]
    # a fresh directory: the check generates again every time (no shards of an earlier run)
    ctx = StageContext.for_testing(tempfile.mkdtemp(prefix="kdllm-1actor-"),
                                   name="responses_1actor", seed=0, num_gpus_available=gpus,
                                   key="bench-check")
    table = prompts.to_arrow()
    subset = ctx.write_dataset("prompts", table.filter(pc.is_in(table["id"], pa.array(ids))),
                               info=prompts.info)
    one = GenerateResponses({**configs["responses"], "actors": 1}).run(
        ctx, model=outputs["teacher"]["model"], prompts=subset)["responses"]
    a = {r["id"]: r["response_ids"] for r in one.to_arrow().to_pylist()}
    b = {r["id"]: r["response_ids"] for r in outputs["responses"]["responses"].to_arrow()
         .to_pylist() if r["id"] in a}
    return len(a) == CHECK_ROWS and a == b


def acceptance(m: dict, identical: bool) -> list[dict]:
    s, t, g, f = m["sft"], m["token_kd"], m["gkd"], m["layers_kd"]
    return [
        {"check": "token KD beats SFT: held-out perplexity on the teacher's responses",
         "value": f"{t['response_perplexity']:.3f} vs {s['response_perplexity']:.3f}",
         "ok": t["response_perplexity"] < s["response_perplexity"]},
        {"check": "token KD beats SFT: top-1 agreement with the teacher",
         "value": f"{t['top1_agreement']:.3f} vs {s['top1_agreement']:.3f}",
         "ok": t["top1_agreement"] > s["top1_agreement"]},
        {"check": "goal: GKD at least token KD's figures (perplexity, agreement)",
         "value": f"{g['response_perplexity']:.3f}, {g['top1_agreement']:.3f}",
         "ok": g["response_perplexity"] <= t["response_perplexity"]
         and g["top1_agreement"] >= t["top1_agreement"]},
        {"check": "depth-pruned initialisation vs fixed layers, token KD (perplexity, "
                   "agreement)",
         "value": f"{t['response_perplexity']:.3f}, {t['top1_agreement']:.3f} vs "
                  f"{f['response_perplexity']:.3f}, {f['top1_agreement']:.3f}",
         "ok": t["response_perplexity"] < f["response_perplexity"]},
        {"check": "generation speed-up of the 10-layer student over the teacher, batch 8",
         "value": f"{t['generation_speedup']:.2f}x", "ok": t["generation_speedup"] >= 2},
        {"check": f"generate-responses identical with 1 and 2 actors (first {CHECK_ROWS})",
         "value": str(identical), "ok": identical},
    ]


def write_markdown(result: dict, path: str) -> None:
    m = result["metrics"]
    lines = ["# Instruction-model distillation: SmolLM2-135M-Instruct -> 10 of its 30 layers",
             "", f"Machine: {result['machine_line']}. Commit: {result['commit']}.",
             f"Command: `{result['command']}`. Stage times (s): "
             + ", ".join(f"{k} {v}" for k, v in result["stage_seconds"].items()) + "."
             + (f" Reused from the kept store: {', '.join(result['reused'])}."
                if result["reused"] else ""), "",
             f"Teacher on the same held-out responses: perplexity "
             f"{m['sft']['teacher_response_perplexity']:.3f}, "
             f"{m['sft']['teacher_tokens_per_s']:.1f} tokens/s at batch 8; ROUGE-L of its "
             f"answers vs the references {m['sft'].get('teacher_rougeL_vs_reference', 0):.3f}.",
             "", "## Acceptance", "", "| check | measured | ok |", "|---|---|---|"]
    lines += [f"| {r['check']} | {r['value']} | {'yes' if r['ok'] else 'NO'} |"
              for r in result["acceptance"]]
    lines += ["", "## Students (same size, tokens and steps)", "",
              "| student | " + " | ".join(c[1] for c in COLUMNS) + " |",
              "|---|" + "---|" * len(COLUMNS)]
    for name in STUDENTS:
        lines.append(f"| {name} | " + " | ".join(
            fmt.format(m[name][k]) if k in m[name] else "-" for k, _, fmt in COLUMNS) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run(repetitions: int = 1) -> dict:
    from benchmarks.machine import machine

    gpus = example_ray()
    store = os.environ.get("KD_LLM_BENCH_STORE") or tempfile.mkdtemp(prefix="bench-kdllm-")
    start, code = time.perf_counter(), commit()  # the code that runs: the commit at the start
    # the students and their evaluations (the example's export needs the orchestrator's
    # commit, which this in-process runner does not make)
    outputs, configs, seconds, reused = run_example(
        store, {}, gpus, pipeline=PIPELINE, only=tuple(f"eval_{n}" for n in STUDENTS),
        keep=tuple(n for n in os.environ.get("KD_LLM_BENCH_KEEP", "").split(",") if n))
    identical = same_rows(outputs, configs, gpus)
    metrics = {name: outputs[f"eval_{name}"]["report"].metrics() for name in STUDENTS}
    info = machine()
    s, t = metrics["sft"], metrics["token_kd"]
    ratio = t["response_perplexity"] / s["response_perplexity"]
    result = {
        "name": "kd_llm",
        "what": "token-KD student's held-out response perplexity / the SFT student's "
                "(examples/kd_llm.yaml, SmolLM2-135M-Instruct teacher)",
        "command": f"python -m benchmarks --only kd_llm --repetitions {repetitions}",
        "median_ratio": ratio, "spread": [ratio, ratio], "target": "< 1 (and kd_llm.md)",
        "metrics": metrics, "acceptance": acceptance(metrics, identical),
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()}, "reused": reused,
        "seconds": round(time.perf_counter() - start, 1), "commit": code,
        "machine_line": f"{info['cores']} cores, {info['memory_gib']} GiB, GPU: {info['gpu']}",
    }
    os.makedirs(RESULTS, exist_ok=True)
    write_markdown(result, os.path.join(RESULTS, "kd_llm.md"))
    return result
