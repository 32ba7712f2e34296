"""Run the benchmarks and write benchmarks/results/ (JSON per benchmark + README table)."""

import argparse
import json
import os

from benchmarks import cached_rerun, dataset_distillation, kd_family, diffusion, sweep
from benchmarks.machine import machine

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BENCHMARKS = {"cached_rerun": cached_rerun, "dataset_distillation": dataset_distillation, "kd_family": kd_family, "diffusion": diffusion, "sweep": sweep}


def write_readme(results: list[dict], info: dict) -> None:
    lines = ["# Benchmark results", "",
             f"Machine: {info['cores']} cores, {info['memory_gib']} GiB, GPU: {info['gpu']}; "
             f"Python {info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["libraries"].items()),
             f"Date: {info['date']}", "",
             "Regenerate: `make bench` (`python -m benchmarks`).", "",
             "| benchmark | what | median | spread | target | command |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "median_ratio" not in r:
            continue
        lines.append(f"| {r['name']} | {r['what']} | {r['median_ratio']:.3f} | "
                     f"{r['spread'][0]:.3f} to {r['spread'][1]:.3f} | {r['target']} | "
                     f"`{r['command']}` |")
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
    lines += [
              "GPU paths (GPU Ray Data actors, `use_gpu` Ray Train workers), checked on a lent "
              "GPU machine: [gpu_check.md](gpu_check.md)."]
    with open(os.path.join(RESULTS, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append")
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions per benchmark")
    args = parser.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    info = machine()
    results = []
    for name in args.only or sorted(BENCHMARKS):
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
