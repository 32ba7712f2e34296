"""Cold quickstart, whole ``distill`` process, with kd-student's ``num_workers: auto`` (its
default: the stage's process for the quickstart's small rows) against ``num_workers: 1``
(one Ray Train worker, the default before issue 26), alternating in one run, a fresh store
each time.

    python -m benchmarks.cold_workers --repetitions 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.cached_rerun import PIPELINE, ROOT
from benchmarks.common import commit


def cold(extra: list[str]) -> float:
    distill = [sys.executable, "-m", "pipelines.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-store-") as store:
        t0 = time.perf_counter()
        proc = subprocess.run([*distill, "run", PIPELINE, "--store", store, "--quiet", *extra],
                              capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=5)
    args = parser.parse_args()
    runs = {"auto": [], "1": []}
    for i in range(args.repetitions):
        for name in ("auto", "1") if i % 2 == 0 else ("1", "auto"):
            runs[name].append(cold(["--set", f"student.num_workers={name}"]))
            print(f"  {i + 1}/{args.repetitions} num_workers {name}: {runs[name][-1]:.1f} s",
                  flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"commit {commit()}: cold quickstart median auto {med['auto']:.1f} s "
          f"{[round(x, 1) for x in runs['auto']]}, 1 worker {med['1']:.1f} s "
          f"{[round(x, 1) for x in runs['1']]}, ratio {med['auto'] / med['1']:.3f}")


if __name__ == "__main__":
    main()
