"""Sweep of the quickstart: ASHA vs FIFO on the same 6 trials.

``distill tune examples/quickstart.yaml`` over the KD student's temperature (uniform 1-8)
and learning rate (loguniform 1e-5 to 0.1: the low end gives bad trials), 6 samples,
random search with the pipeline's seed (so both schedulers get the same 6 configs), metric
``student.train_accuracy`` (logged every epoch, so ASHA can stop trials). Each scheduler
gets a fresh store. Checked and recorded:

- the teacher and teacher-outputs stages run exactly once per sweep (shared stages
  ``ran``, one committed artifact of each kind in the store);
- the best config file re-runs (``distill run best.yaml --force student``: the student is
  trained again from the shared teacher outputs) to the same metric;
- ASHA stops at least one trial, and its total training epochs against FIFO's is the figure
  (``median_ratio``; one repetition per run of the benchmark).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import json_document

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "examples", "quickstart.yaml")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SPACE = "student.temperature: {uniform: [1, 8]}\nstudent.lr: {loguniform: [1.0e-5, 0.1]}\n"
METRIC = "student.train_accuracy"
SHRINK = ["--set", "teacher.epochs=5"]   # the teacher is shared; keep it short


def _cmd(*args) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "distill")
    return ["nice", "-n", "5", exe, *args, "--json", "--quiet"]


def _result(proc, what: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"distill {what} failed:\n{err[-4000:]}")
    return json_document(out)


def distill(*args) -> dict:
    proc = subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    return _result(proc, args[0])


def committed(store: str, kind: str) -> int:
    d = os.path.join(store, kind)
    return sum(os.path.exists(os.path.join(d, k, "manifest.json")) for k in os.listdir(d)) \
        if os.path.isdir(d) else 0


def start_sweep(scheduler: str, space: str, store: str):
    args = ["tune", PIPELINE, *SHRINK, "--space", space, "--metric", METRIC, "--mode", "max",
            "--samples", "6", "--scheduler", scheduler, "--max-concurrent", "2",
            "--store", store]
    return subprocess.Popen(_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT), time.perf_counter()


def sweep_summary(doc: dict, store: str, seconds: float) -> dict:
    return {"seconds": round(seconds, 1), "doc": doc,
            "epochs": sum(t["epochs"] for t in doc["trials"]),
            "stopped": sum(t["status"] == "stopped" for t in doc["trials"]),
            "teacher_artifacts": committed(store, "fit-classifier"),
            "teacher_outputs_artifacts": committed(store, "teacher-outputs")}


def run(repetitions: int = 1) -> dict:
    """Both sweeps side by side (separate stores; the epoch counts do not depend on wall
    time), then the best config of the ASHA sweep re-run."""
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as work:
        space = os.path.join(work, "space.yaml")
        with open(space, "w") as f:
            f.write(SPACE)
        stores = {s: os.path.join(work, s) for s in ("asha", "fifo")}
        started = {s: start_sweep(s, space, stores[s]) for s in stores}
        done = {}
        for s, (proc, t0) in started.items():
            doc = _result(proc, f"tune --scheduler {s}")
            done[s] = sweep_summary(doc, stores[s], time.perf_counter() - t0)
            print(f"  {s}: {done[s]['seconds']:.0f}s, epochs {done[s]['epochs']}, statuses "
                  f"{[t['status'] for t in doc['trials']]}", flush=True)
        asha, fifo = done["asha"], done["fifo"]
        rerun = distill("run", asha["doc"]["best_config"], "--store", stores["asha"],
                        "--force", "student")
    return summarize(asha, fifo, rerun, repetitions)


def summarize(asha: dict, fifo: dict, rerun: dict, repetitions: int = 1) -> dict:
    student = next(s for s in rerun["stages"] if s["name"] == "student")
    rerun_metric = student["metrics"][METRIC.split(".", 1)[1]]
    shared_once = all(
        s["status"] == "ran" for r in (asha, fifo) for s in r["doc"]["shared_stages"]) and all(
        r[k] == 1 for r in (asha, fifo) for k in ("teacher_artifacts", "teacher_outputs_artifacts"))
    ratio = asha["epochs"] / fifo["epochs"]
    result = {
        "name": "sweep",
        "what": "6-trial sweep of the quickstart KD student (temperature, lr): training epochs "
                "with ASHA / with FIFO (same 6 configs)",
        "command": f"python -m benchmarks --only sweep --repetitions {repetitions}",
        "median_ratio": round(ratio, 4), "spread": [round(ratio, 4), round(ratio, 4)],
        "target": "ratio < 1 with >= 1 trial stopped; teacher + teacher-outputs once; best "
                  "config re-runs to the same metric",
        "space": SPACE, "metric": METRIC, "overrides": SHRINK[1:],
        "asha": asha, "fifo": fifo,
        "shared_stages_ran_once": shared_once,
        "best_metric": asha["doc"]["best"]["metric"], "rerun_metric": rerun_metric,
        "rerun_same_metric": abs(rerun_metric - asha["doc"]["best"]["metric"]) < 1e-9,
        "asha_stopped_some": asha["stopped"] >= 1,
    }
    write_markdown(result)
    return result


def write_markdown(r: dict) -> None:
    lines = ["# Sweep benchmark: ASHA vs FIFO on the quickstart", "",
             f"`{r['command']}`; `distill tune examples/quickstart.yaml --set teacher.epochs=5 "
             f"--space SPACE --metric {r['metric']} --mode max --samples 6 --max-concurrent 2`",
             "", "Space:", "", "```yaml", r["space"].rstrip(), "```", "",
             "| scheduler | trials completed | stopped | training epochs | wall time | best "
             f"{r['metric']} |", "|---|---|---|---|---|---|"]
    for name in ("asha", "fifo"):
        s = r[name]
        done = sum(t["status"] == "completed" for t in s["doc"]["trials"])
        lines.append(f"| {name} | {done} | {s['stopped']} | {s['epochs']} | {s['seconds']:.0f} s | "
                     f"{s['doc']['best']['metric']:.4f} |")
    lines += ["", f"Training epochs ASHA / FIFO: **{r['median_ratio']:.3f}**. Teacher and "
              f"teacher-outputs ran once per sweep: {r['shared_stages_ran_once']}. Best config "
              f"re-run (`distill run best.yaml --force student`): {r['rerun_metric']:.6f} vs "
              f"{r['best_metric']:.6f} in the sweep (same: {r['rerun_same_metric']}).", "",
              *[f"Note: {n}" for n in r.get("notes", [])], "",
              "Trials (ASHA):", "", "| trial | temperature | lr | metric | status | epochs |",
              "|---|---|---|---|---|---|"]
    for t in r["asha"]["doc"]["trials"]:
        p = t["params"]
        m = f"{t['metric']:.4f}" if t["metric"] is not None else "-"
        lines.append(f"| {t['trial_id']} | {p['student.temperature']:.2f} | "
                     f"{p['student.lr']:.2e} | {m} | {t['status']} | {t['epochs']} |")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    from benchmarks.machine import machine
    out = run() | {"machine": machine()}
    with open(os.path.join(RESULTS, "sweep.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: out[k] for k in ("median_ratio", "shared_stages_ran_once",
                                          "rerun_same_metric", "asha_stopped_some")}))
