"""Cold run vs cached re-run of the quickstart pipeline.

Each repetition uses a fresh store: one cold ``distill run`` (every stage runs, embedded
Ray started), then the same command again (every stage cached). Both are timed as the
user sees them: the whole ``distill`` process, interpreter start-up included. The figure
is the ratio cached / cold, its median over the repetitions and its spread, and the
cached re-run's own median seconds against what it took before verified reads and
content-keyed inputs came in (issue 20: 6.4-8.1 s on this machine): a fully cached re-run
must not hash anything. (The cold run halved when the teachers moved to the in-process
harness, 83 s -> about 41 s, so the ratio rose with the cached seconds unchanged.) Issue 26's
targets: cached at most 3.5 s, cold at most 30 s, medians of at least 5 repetitions.
"""

import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import json_document

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "examples", "quickstart.yaml")


def timed_run(store: str) -> tuple[float, dict]:
    distill = os.path.join(os.path.dirname(sys.executable), "distill")
    t0 = time.perf_counter()
    proc = subprocess.run([distill, "run", PIPELINE, "--store", store, "--json", "--quiet"],
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"distill run failed:\n{proc.stderr}")
    return seconds, json_document(proc.stdout)


def run(repetitions: int = 3) -> dict:
    rows = []
    for i in range(repetitions):
        with tempfile.TemporaryDirectory(prefix="bench-store-") as store:
            cold, cold_doc = timed_run(store)
            cached, cached_doc = timed_run(store)
        assert all(s["status"] == "ran" for s in cold_doc["stages"]), cold_doc
        assert all(s["status"] == "cached" for s in cached_doc["stages"]), cached_doc
        rows.append({"cold_s": round(cold, 2), "cached_s": round(cached, 2),
                     "ratio": round(cached / cold, 4)})
        print(f"  repetition {i + 1}/{repetitions}: cold {cold:.1f}s, cached {cached:.1f}s, "
              f"ratio {cached / cold:.3f}", flush=True)
    ratios = [r["ratio"] for r in rows]
    return {
        "name": "cached_rerun",
        "what": "cached re-run of examples/quickstart.yaml vs its cold run (whole distill "
                "process, fresh store per repetition)",
        "command": f"python -m benchmarks --only cached_rerun --repetitions {repetitions}",
        "repetitions": rows,
        "median_ratio": statistics.median(ratios),
        "spread": [min(ratios), max(ratios)],
        "median_cold_s": statistics.median(r["cold_s"] for r in rows),
        "median_cached_s": statistics.median(r["cached_s"] for r in rows),
        "target": "ratio <= 0.10 (issue 20, at an 83 s cold run; issue 26: the seconds below)",
        "figures": [{"figure": "median seconds of the cached re-run (whole process)",
                     "value": statistics.median(r["cached_s"] for r in rows),
                     "target": "<= 3.5 (issue 26; 6.9 before it: torch and Ray imported to "
                               "plan, now named lazily through stages.lazy)",
                     "met": statistics.median(r["cached_s"] for r in rows) <= 3.5},
                    {"figure": "median seconds of the cold run (whole process)",
                     "value": statistics.median(r["cold_s"] for r in rows),
                     "target": "<= 30 (issue 26; 51-83 before it)",
                     "met": statistics.median(r["cold_s"] for r in rows) <= 30}],
    }
