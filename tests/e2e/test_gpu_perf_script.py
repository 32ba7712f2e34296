"""The GPU rows' prepared script (``benchmarks/gpu_perf.py``) at its tiny sizes on the CPU,
in its own process as it runs on a lent GPU machine: every row reached, the stage and its
bare loop doing the same work (the trajectories' final latents agree), the JSON and the
table written; a spent budget records the rows as not reached."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def gpu_perf(tmp_path, **env) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_perf"], check=False, cwd=ROOT,
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "BENCH_TINY": "1", "BENCH_RESULTS": str(out), "OUT": "",
             "GPU_PERF_REPETITIONS": "1", **env})
    path = out / "gpu_perf.json"
    return proc, json.loads(path.read_text()) if path.exists() else None


def test_every_row_runs_at_tiny_sizes_and_agrees_with_its_bare_loop(tmp_path):
    proc, result = gpu_perf(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = result["rows"]
    assert list(rows) == ["trajectories", "teacher_outputs", "student_step"]
    for name, row in rows.items():
        assert row["reached"], (name, row)
        assert len(row["repetitions"]) == 1 and 0 < row["median_ratio"] < 10, (name, row)
    assert rows["trajectories"]["max_abs_diff"] < 1e-3
    assert rows["student_step"]["stage_epoch_s"] > 0
    table = (tmp_path / "out" / "gpu_perf.md").read_text()
    assert "| trajectories |" in table and "NOT reached" not in table


def test_rows_past_the_budget_are_recorded_as_not_reached(tmp_path):
    proc, result = gpu_perf(tmp_path, GPU_PERF_BUDGET_S="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(not r["reached"] and "budget" in r["why"] for r in result["rows"].values())
    assert (tmp_path / "out" / "gpu_perf.md").read_text().count("NOT reached") == 3
