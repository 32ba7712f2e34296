"""Run the benchmarks and write benchmarks/results/ (JSON per benchmark + README table)."""

import argparse
import json
import os

from benchmarks import (cached_rerun, dataset_distillation, diffusion, embedding_pass, kd_family,
                        kd_llm, loader, orchestration, sweep, sweep_overhead,
                        teacher_generation,
                        teacher_training, text_to_image, train_overhead)
from benchmarks.machine import machine

# BENCH_RESULTS=<dir>: write somewhere else (trial runs at BENCH_TINY=1 sizes)
RESULTS = os.environ.get("BENCH_RESULTS") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results")
BENCHMARKS = {"cached_rerun": cached_rerun, "dataset_distillation": dataset_distillation, "kd_family": kd_family, "diffusion": diffusion, "sweep": sweep,
              "teacher_generation": teacher_generation, "train_overhead": train_overhead,
              "teacher_training": teacher_training, "orchestration": orchestration,
              "sweep_overhead": sweep_overhead, "loader": loader,
              "text_to_image": text_to_image, "kd_llm": kd_llm,
              "embedding_pass": embedding_pass}


def write_readme(results: list[dict], info: dict) -> None:
    lines = ["# Benchmark results", "",
             f"Machine: {info['cores']} cores, {info['memory_gib']} GiB, GPU: {info['gpu']}; "
             f"Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["libraries"].items()),
             f"Date: {info['date']}", "",
             "Regenerate: `make bench` (`python -m benchmarks`).", "",
             "| benchmark | what | median | spread | target | command |",
             "|---|---|---|---|---|---|"]
    for r in results:  # a result's own row, then the further figures it lists in more_rows
        for row in ([r] if "median_ratio" in r else []) + r.get("more_rows", []):
            lines.append(f"| {row['name']} | {row['what']} | {row['median_ratio']:.3f} | "
                         f"{row['spread'][0]:.3f} to {row['spread'][1]:.3f} | {row['target']} | "
                         f"`{row['command']}` |")
    lines += ["", "Each figure is a ratio measured within one run; per-repetition numbers are "
              "in the JSON files next to this one.", ""]
    for r in results:  # quality benchmarks: a table of figures against their targets
        if "figures" not in r:
            continue
        lines += [f"## {r['name']}: {r['what']}", "", f"Command: `{r['command']}`", "",
                  "| figure | value | target | met |", "|---|---|---|---|"]
        lines += [f"| {f['figure']} | {f['value']} | {f['target']} | "
                  f"{'yes' if f['met'] else 'NO'} |" for f in r["figures"]]
        if os.path.isdir(os.path.join(RESULTS, r["name"])):
            lines.append(f"\nPlots: [{r['name']}/]({r['name']}/)")
        lines.append("")
    lines += ["Before-and-after comparisons of a change, on the same committed artifacts: "
              "[harness_change.md](harness_change.md) (the training harness).", ""]
    lines += [
              "GPU paths (GPU Ray Data actors, `use_gpu` Ray Train workers), checked on a lent "
              "GPU machine: [gpu_check.md](gpu_check.md). Issue 26's GPU rows (a latent UNet "
              "of SD 1.5's size, teacher-outputs with a transformers LM, a student's step "
              "rate, each against a bare loop on the same GPU): one prepared script, "
              "`python -m benchmarks.gpu_perf`, run on a lent GPU machine as "
              "gpu_check.md says; no session of that issue has been lent one yet."]
    with open(os.path.join(RESULTS, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions per benchmark")
    parser.add_argument("--readme", action="store_true",
                        help="only rewrite the README table from the JSON files there")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    info = machine()
    results = []
    for name in [] if args.readme else (args.only or sorted(BENCHMARKS)):
        print(f"benchmark {name}", flush=True)
        result = BENCHMARKS[name].run(repetitions=1 if args.quick else args.repetitions) | {"machine": info}
        with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        results.append(result)
    existing = []
    for name in sorted(BENCHMARKS):
        path = os.path.join(RESULTS, f"{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                existing.append(json.load(f))
    write_readme(existing, info)


if __name__ == "__main__":
    main()
