"""Text-to-image distillation on real MNIST digits: the acceptance table of issue 21.

Runs the stages of ``examples/text_to_image.yaml`` in order, in this process (each with its
own stage context; Ray Data and Ray Train work on an embedded local Ray): a latent
``StableDiffusionPipeline`` teacher trained here on captioned digits -> encode-prompts ->
trajectories (w drawn from [1, 8]) -> pairs -> a guidance-embedded LCM student and an
LCM-LoRA student -> evaluate-generation on held-out prompts against the teacher at 25 steps,
w = 4. Then: the first trajectory rows regenerated with 1 actor and compared with the
example's 2-actor rows, and every saved student loaded with
``DiffusionPipeline.from_pretrained`` in a fresh process that never imports distillery.

Writes ``benchmarks/results/text_to_image.json`` (via ``python -m benchmarks``),
``text_to_image.md`` (the table) and the evaluation's plots as ``text_to_image_*.png``.

    python -m benchmarks --only text_to_image --repetitions 1

``T2I_BENCH_STORE=<dir>`` keeps the stages' outputs there (a later invocation reuses those
whose key is unchanged); ``T2I_BENCH_KEEP=data,teacher,...`` also reuses the named stages
when their key changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import commit, example_ray
from benchmarks.diffusion import run_example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "examples", "text_to_image.yaml")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
EMBEDDED, LORA, DMD = "lcm", "lcm_lora", "dmd"
CHECK_ROWS = 200
LOAD = """
import json, sys, torch
from diffusers import DiffusionPipeline
out = {}
for name, path in json.loads(sys.argv[1]).items():
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a handwritten seven", num_inference_steps=4, guidance_scale=4.0, height=32,
               width=32, generator=torch.Generator().manual_seed(0), output_type="np").images
    out[name] = [type(pipe.scheduler).__name__, list(img.shape), float(img.std())]
assert not any(m.split(".")[0] in ("pipelines", "stages") for m in sys.modules)
print(json.dumps(out))
"""


def same_rows(outputs: dict, configs: dict, store: str, gpus: float) -> bool:
    """The first CHECK_ROWS trajectory rows again, with 1 actor: identical?"""
    from pipelines.context import StageContext
    from stages.teacher.diffusion_trajectories import DiffusionTrajectories
    cfg = {**configs["trajectories"], "rows": CHECK_ROWS, "actors": 1}
    shutil.rmtree(os.path.join(store, "trajectories_1actor"), ignore_errors=True)
    ctx = StageContext.for_testing(store, name="trajectories_1actor", seed=0,
                                   num_gpus_available=gpus, key="bench-check")
    one = DiffusionTrajectories(cfg).run(ctx, teacher=outputs["teacher"]["model"],
                                         embeddings=outputs["embeddings"]["embeddings"])
    a = one["trajectories"].to_numpy()
    b = outputs["trajectories"]["trajectories"].to_numpy()
    keep = b["id"] < CHECK_ROWS
    oa, ob = np.argsort(a["id"]), np.argsort(b["id"][keep])
    return len(oa) == CHECK_ROWS and all(
        np.array_equal(np.stack(a[c])[oa], np.stack(b[c])[keep][ob])
        for c in ("id", "prompt_id", "guidance_scale", "noise", "states", "timesteps", "sample"))


def fresh_process_load(paths: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD, json.dumps(paths)], capture_output=True,
                          text=True, cwd=tempfile.gettempdir(), timeout=600,
                          env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def acceptance(m: dict, identical: bool, loaded: dict, lora_params: int) -> list[dict]:
    t = "teacher/25"
    fid_t, acc_t = m[f"fid/{t}"], m[f"digit_accuracy/{t}"]
    e2e = m[f"speedup/{EMBEDDED}/4"]
    den = m[f"denoiser_speedup/{EMBEDDED}/4"]
    w_t = (m["digit_accuracy_w/teacher/1"], m["digit_accuracy_w/teacher/4"])
    w_s = (m[f"digit_accuracy_w/{EMBEDDED}/1"], m[f"digit_accuracy_w/{EMBEDDED}/4"])
    ok_load = "error" not in loaded and all(v[2] > 0 for v in loaded.values())
    return [
        {"check": "teacher, 25 steps, w = 4: digit accuracy on held-out prompts",
         "value": acc_t, "target": ">= 0.90", "ok": acc_t >= 0.9},
        {"check": "teacher FD / real-vs-real floor", "value": fid_t / m["fid/real/floor"],
         "target": "<= 3", "ok": fid_t <= 3 * m["fid/real/floor"]},
        {"check": "embedded-guidance LCM, 4 steps: FD / teacher FD",
         "value": m[f"fid/{EMBEDDED}/4"] / fid_t, "target": "<= 1.5",
         "ok": m[f"fid/{EMBEDDED}/4"] <= 1.5 * fid_t},
        {"check": "embedded-guidance LCM, 4 steps: digit accuracy / teacher's",
         "value": m[f"digit_accuracy/{EMBEDDED}/4"] / acc_t, "target": ">= 0.9",
         "ok": m[f"digit_accuracy/{EMBEDDED}/4"] >= 0.9 * acc_t},
        {"check": "embedded-guidance LCM, 1 step: FD / teacher FD",
         "value": m[f"fid/{EMBEDDED}/1"] / fid_t, "target": "<= 3",
         "ok": m[f"fid/{EMBEDDED}/1"] <= 3 * fid_t},
        {"check": f"LCM-LoRA, 4 steps: FD / teacher FD ({lora_params} trainable parameters)",
         "value": m[f"fid/{LORA}/4"] / fid_t, "target": "<= 2",
         "ok": m[f"fid/{LORA}/4"] <= 2 * fid_t},
        {"check": "teacher digit accuracy at w = 4 minus at w = 1", "value": w_t[1] - w_t[0],
         "target": "> 0", "ok": w_t[1] > w_t[0]},
        {"check": "embedded LCM (4 steps) digit accuracy at w = 4 minus at w = 1",
         "value": w_s[1] - w_s[0], "target": "> 0", "ok": w_s[1] > w_s[0]},
        {"check": f"speed-up, 4-step LCM over the teacher's 25 guided steps, end to end "
                  f"(denoiser alone: {den:.2f}x)", "value": e2e, "target": ">= 8", "ok": e2e >= 8},
        {"check": "every saved student loads with DiffusionPipeline.from_pretrained in a "
                  "fresh process and samples", "value": float(ok_load), "target": "1", "ok": ok_load},
        {"check": f"trajectories identical with 1 and 2 actors (first {CHECK_ROWS} rows)",
         "value": float(identical), "target": "1", "ok": identical},
    ]


def _reference_line(info: dict) -> str:
    if info.get("reference") == "paired":
        return (f"paired (`reference: paired`): the {info['real_images']} real images whose "
                f"caption is one of the {info['prompts']} held-out prompts, in halves A and B; "
                f"the {info['num_samples']} generated rows take B's captions "
                f"({info['row_prompts']} distinct), the same rows for every model.")
    return f"{info.get('reference', 'the test split')}."


def write_markdown(result: dict, path: str) -> None:
    m = result["metrics"]
    lines = ["# Text-to-image distillation on MNIST digits (latent SD pipeline trained here)", "",
             f"Machine: {result['machine_line']}. Commit: {result['commit']}.",
             f"Command: `{result['command']}`. Stage times (s): "
             + ", ".join(f"{k} {v}" for k, v in result["stage_seconds"].items()) + ".",
             (f"Reused from an earlier invocation: {', '.join(result['reused'])}."
              if result["reused"] else ""), "",
             f"Real-vs-real floor (classifier features): {m['fid/real/floor']:.3f}. Reference: "
             + _reference_line(result.get("eval_info", {})), "",
             "## Acceptance", "", "| check | measured | target | ok |", "|---|---|---|---|"]
    for row in result["acceptance"]:
        lines.append(f"| {row['check']} | {row['value']:.3f} | {row['target']} | "
                     f"{'yes' if row['ok'] else 'NO'} |")
    lines += ["", "## Quality and latency", "",
              "| model | steps | FD | precision | recall | digit acc. | distance to teacher | "
              "ms/image e2e | denoiser ms/image |", "|---|---|---|---|---|---|---|---|---|"]
    runs = sorted({tuple(k.split("/")[1:3]) for k in m if k.startswith("fid/")
                   and k.split("/")[1] not in ("real",) and k.split("/")[2].isdigit()})
    for model, steps in runs:
        k = f"{model}/{steps}"
        lines.append(f"| {model} | {steps} | {m.get(f'fid/{k}', float('nan')):.3f} | "
                     f"{m.get(f'precision/{k}', float('nan')):.3f} | "
                     f"{m.get(f'recall/{k}', float('nan')):.3f} | "
                     f"{m.get(f'digit_accuracy/{k}', float('nan')):.3f} | "
                     f"{m.get(f'teacher_distance/{k}', float('nan')):.4f} | "
                     f"{m.get(f'ms_per_image/{k}', float('nan')):.2f} | "
                     f"{m.get(f'denoiser_ms_per_image/{k}', float('nan')):.2f} |")
    ws = sorted({k.split("/")[2] for k in m if k.startswith("digit_accuracy_w/")}, key=float)
    models = sorted({k.split("/")[1] for k in m if k.startswith("digit_accuracy_w/")})
    lines += ["", "## Digit accuracy against w", "", "| model | " + " | ".join(
        f"w = {w}" for w in ws) + " |", "|---|" + "---|" * len(ws)]
    for model in models:
        lines.append(f"| {model} | " + " | ".join(
            f"{m.get(f'digit_accuracy_w/{model}/{w}', float('nan')):.3f}" for w in ws) + " |")
    lines += ["", "Students: " + "; ".join(
        f"{n}: {i.get('params')} parameters, {i.get('trainable_params')} trained"
        for n, i in result["students"].items()) + ".",
        "", "Saved students loaded in a fresh process: `" + json.dumps(result["loaded"]) + "`.",
        "", "Plots: " + ", ".join(f"[{p}]({p})" for p in result["plots"]) + "."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run(repetitions: int = 1) -> dict:
    from benchmarks.machine import machine

    gpus = example_ray()
    store = os.environ.get("T2I_BENCH_STORE") or tempfile.mkdtemp(prefix="bench-t2i-")
    keep = tuple(n for n in os.environ.get("T2I_BENCH_KEEP", "").split(",") if n)
    start, code = time.perf_counter(), commit()  # the code that runs: the commit at the start
    outputs, configs, seconds, reused = run_example(store, {}, gpus, keep, pipeline=PIPELINE)
    identical = same_rows(outputs, configs, store, gpus)
    students = {n: outputs[n]["model"] for n in (EMBEDDED, LORA, DMD)}
    loaded = fresh_process_load({n: s.path for n, s in students.items()})
    report = outputs["eval"]["report"]
    metrics = report.metrics()
    plots = []
    os.makedirs(RESULTS, exist_ok=True)
    for png in sorted(os.listdir(report.path)):
        if png.endswith(".png"):
            shutil.copy(os.path.join(report.path, png), os.path.join(RESULTS, f"text_to_image_{png}"))
            plots.append(f"text_to_image_{png}")
    table = acceptance(metrics, identical, loaded, students[LORA].info["trainable_params"])
    info = machine()
    ratio = metrics[f"fid/{EMBEDDED}/4"] / metrics["fid/teacher/25"]
    result = {
        "name": "text_to_image",
        "what": "4-step guidance-embedded LCM student FD / teacher FD at 25 guided steps "
                "(examples/text_to_image.yaml, held-out prompts)",
        "command": f"python -m benchmarks --only text_to_image --repetitions {repetitions}",
        "median_ratio": ratio, "spread": [ratio, ratio], "target": "<= 1.5 (and text_to_image.md)",
        "acceptance": table, "all_ok": all(r["ok"] for r in table), "metrics": metrics,
        "configs": configs, "stage_seconds": seconds, "reused": reused, "loaded": loaded,
        "students": {n: s.info for n, s in students.items()}, "plots": plots,
        "eval_info": {k: report.info.get(k) for k in ("reference", "real_images", "prompts",
                                                      "num_samples", "row_prompts")},
        "total_s": round(time.perf_counter() - start, 1), "commit": code,
        "machine_line": f"{info['cores']} cores, {info['memory_gib']} GiB, GPU: {info['gpu']}",
    }
    write_markdown(result, os.path.join(RESULTS, "text_to_image.md"))
    return result
