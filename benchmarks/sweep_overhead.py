"""Sweep overhead: a sweep of N trials vs the ideal (shared stages once + N x trial stages).

The pipeline is examples/quickstart.yaml without its ``evaluate`` stage and the stages
that read it (``export``) (a sweep does not
run stages downstream of the metric's stage, so both sides do the same stages). Each
repetition, with a fresh store for each side, times as the user sees them (the whole
``distill`` process, interpreter and embedded Ray start-up included):

- sweep: ``distill tune --space SPACE --metric student.train_accuracy --mode max
  --samples N --scheduler fifo --max-concurrent 1`` (FIFO: every trial trains all its
  epochs; one trial at a time, so the ideal below is the right comparison and the figure
  shows overhead, not parallelism). The shared stages (data, teacher, teacher_outputs) run
  once, then N ``student`` trials;
- ideal: one cold ``distill run`` of the same pipeline (shared stages once + one student:
  ``cold_s``) plus N - 1 further students at the time that student took in that run
  (``student_s``, the runner's figure): ideal = cold_s + (N - 1) * student_s.

Profile and fix (stop 15; ``BEFORE``: the same command at commit 871e176, 1.30): timed
inside the trials, a sweep spent about 5 s starting Tune, then 4.4 s between every two
trials: Tune (Ray 2.60 defaults to ``reuse_actors=False``) ended each trial's actor and
started a fresh one, which imported Ray Tune, torch and the pipeline again. The sweep now
asks Tune to reuse the trial actor (``reuse_actors=True``): 0.05 s between trials. What
is left: Tune's start and end (about 10 s a sweep) and the first trial's stage worker (a
fresh process: Tune gives trial actors a runtime environment of their own, so their tasks
cannot reuse the driver's workers).

Stop 37 (``STOP37``: 1.160 at commit 25783ad, run back to back with the fix): Tune's start
(about 3 s to the first trial) came after the shared stages. The driver now runs the shared
stages in a thread while Tune starts its trial actors; the trials wait at the board's gate
until the shared stages end (a failure there fails them at once, and the sweep raises it):
1.045.

The figure is sweep seconds / ideal seconds (target <= 1.2), both sides run alternately
(order swapped every other repetition), median and spread. The quickstart is the example
size; the default N = ``BENCH_TRIALS`` = 6 makes the ideal about two minutes on 2 cores.
``BENCH_TINY=1``: N = 2, teacher and student 1 epoch each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

from benchmarks import common
from pipelines import Pipeline

PIPELINE = os.path.join(common.ROOT, "examples", "quickstart.yaml")
# the same command at commit 871e176: a fresh Tune trial actor for every trial
BEFORE = {"commit": "871e176", "median_ratio": 1.3025, "spread": [1.2677, 1.4371],
          "median_sweep_s": 193.6, "median_ideal_s": 146.15}
# the same command at commit 25783ad, run just before the fix below on the same machine:
# the shared stages ran before Tune started
STOP37 = {"commit": "25783ad", "median_ratio": 1.1599, "spread": [1.0954, 1.2097],
          "median_sweep_s": 21.75, "median_ideal_s": 18.39}
SPACE = "student.temperature: {uniform: [1, 8]}\nstudent.lr: {loguniform: [1.0e-3, 3.0e-2]}\n"
METRIC = "student.train_accuracy"


def overrides() -> list[str]:
    return ["--set", "teacher.epochs=1", "--set", "student.epochs=1"] if common.tiny() else []


def distill(*args) -> tuple[float, dict]:
    exe = os.path.join(os.path.dirname(sys.executable), "distill")
    t0 = time.perf_counter()
    proc = subprocess.run([exe, *args, *overrides(), "--json", "--quiet"], capture_output=True,
                          text=True, cwd=common.ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"distill {args[0]} failed:\n{proc.stderr[-4000:]}")
    return seconds, json_document(proc.stdout)


def json_document(stdout: str) -> dict:
    """The ``--json`` document; Ray may print warnings of its own (the raylet's "many
    Python workers started") on the same stream, before or after it."""
    start = stdout.index("\n{") + 1 if not stdout.startswith("{") else 0
    return json.JSONDecoder().raw_decode(stdout[start:])[0]


def run(repetitions: int = 5) -> dict:
    trials = common.size("BENCH_TRIALS", 6, 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-overhead-") as work:
        with open(PIPELINE) as f:
            spec = yaml.safe_load(f)
        # evaluate and whatever reads it (the export of the student's card)
        for name in {"evaluate"} | Pipeline.from_dict(spec).downstream("evaluate"):
            del spec["stages"][name]
        pipeline, space = os.path.join(work, "pipeline.yaml"), os.path.join(work, "space.yaml")
        with open(pipeline, "w") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        with open(space, "w") as f:
            f.write(SPACE)
        for i in range(repetitions):
            def ideal():
                seconds, doc = distill("run", pipeline, "--store", os.path.join(work, f"run{i}"))
                stages = {s["name"]: s for s in doc["stages"]}
                assert all(s["status"] == "ran" for s in stages.values()), doc
                return {"cold_s": seconds, "student_s": stages["student"]["seconds"],
                        "stage_s": {n: s["seconds"] for n, s in stages.items()}}

            def sweep():
                seconds, doc = distill("tune", pipeline, "--space", space, "--metric", METRIC,
                                       "--mode", "max", "--samples", str(trials), "--scheduler",
                                       "fifo", "--max-concurrent", "1", "--store",
                                       os.path.join(work, f"sweep{i}"))
                assert len(doc["trials"]) == trials, doc["trials"]
                assert all(t["status"] == "completed" for t in doc["trials"]), doc["trials"]
                return {"sweep_s": seconds, "trial_epochs": [t["epochs"] for t in doc["trials"]],
                        "shared_stages": doc["shared_stages"]}

            sides = [ideal, sweep]
            out = {}
            for fn in (sides if i % 2 == 0 else sides[::-1]):
                out.update(fn())
            ideal_s = out["cold_s"] + (trials - 1) * out["student_s"]
            rows.append({"sweep_s": round(out["sweep_s"], 2), "cold_s": round(out["cold_s"], 2),
                         "student_s": round(out["student_s"], 2),
                         "ideal_s": round(ideal_s, 2), "ratio": round(out["sweep_s"] / ideal_s, 4),
                         "stage_s": out["stage_s"], "trial_epochs": out["trial_epochs"],
                         "shared_stages": out["shared_stages"]})
            print(f"  repetition {i + 1}/{repetitions}: sweep {out['sweep_s']:.1f}s, ideal "
                  f"{ideal_s:.1f}s (cold run {out['cold_s']:.1f}s + {trials - 1} x student "
                  f"{out['student_s']:.1f}s), ratio {out['sweep_s'] / ideal_s:.3f}", flush=True)
    median, spread = common.summary([r["ratio"] for r in rows])
    command = f"python -m benchmarks --only sweep_overhead --repetitions {repetitions}"
    return {
        "name": "sweep_overhead",
        "what": f"distill tune of the quickstart (no evaluate), {trials} FIFO trials one at a "
                f"time / (cold distill run + {trials - 1} x its student stage time)",
        "command": command,
        "median_ratio": median, "spread": spread, "target": "ratio <= 1.1 (issue 26)",
        "met": median <= 1.1, "trials": trials, "space": SPACE, "metric": METRIC,
        "overrides": overrides()[1::2], "repetitions": rows,
        "median_sweep_s": common.summary([r["sweep_s"] for r in rows], 2)[0],
        "median_ideal_s": common.summary([r["ideal_s"] for r in rows], 2)[0],
        "before": BEFORE,
        "more_rows": [before_row(command), {
            "name": "sweep_overhead before the overlap",
            "what": f"the first row at commit {STOP37['commit']}, the same day and machine: "
                    f"the shared stages ran, then Tune started (sweep "
                    f"{STOP37['median_sweep_s']:.1f} s, ideal {STOP37['median_ideal_s']:.1f} s)",
            "median_ratio": STOP37["median_ratio"], "spread": STOP37["spread"],
            "target": "ratio <= 1.1", "command": command}],
    }


def before_row(command: str) -> dict:
    return {"name": "sweep_overhead before the fix",
            "what": f"the first row at commit {BEFORE['commit']}: Tune started a fresh trial actor "
                    f"for every trial (sweep {BEFORE['median_sweep_s']:.0f} s, ideal "
                    f"{BEFORE['median_ideal_s']:.0f} s)",
            "median_ratio": BEFORE["median_ratio"], "spread": BEFORE["spread"],
            "target": "ratio <= 1.2", "command": command}
