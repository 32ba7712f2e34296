"""Diffusion timestep distillation on scikit-learn digits: the acceptance table of issue 7.

Runs the stages of ``examples/diffusion_digits.yaml`` in order, in this process (each with
its own stage context; Ray Data and Ray Train work on an embedded local Ray), with the
example's configs plus the overrides of the chosen profile (``gpu`` when CUDA is available,
otherwise ``cpu``: a smaller, honest setting for 2 cores). Then regenerates the first rows
of the trajectories with 1 actor and compares them with the pipeline's 2-actor rows.

Writes ``benchmarks/results/diffusion.json`` (via ``python -m benchmarks``),
``diffusion.md`` (the table) and the evaluation's plots as ``diffusion_*.png``.

    python -m benchmarks --only diffusion --repetitions 1

``DIFFUSION_BENCH_STORE=<dir>`` keeps the stages' outputs there (a later invocation reuses
those whose key is unchanged); ``DIFFUSION_BENCH_KEEP=data,classifier,teacher,trajectories,pairs``
also reuses the named stages when their key changed: the students of a new commit trained
and scored on the teacher, classifier and pairs of an earlier one.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = os.path.join(ROOT, "examples", "diffusion_digits.yaml")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
STUDENTS = ("consistency", "progressive", "reflow")

# per-profile overrides of the example's stage configs
PROFILES = {
    "gpu": {"teacher": {"epochs": 1500, "max_minutes": 15.0},
            "trajectories": {"rows": 6000}},
    "cpu": {"teacher": {"epochs": 300, "max_minutes": 40.0, "threads": 1},
            "trajectories": {"rows": 1000, "keep_states": 9},
            "consistency": {"epochs": 6}, "progressive": {"start_steps": 8, "epochs": 3},
            "reflow": {"epochs": 15},
            "eval": {"teacher_steps": [50, 20, 10, 4, 2, 1], "threads": 1}},
}
CHECK_ROWS = 200  # trajectory rows regenerated with 1 actor


def _profile() -> str:
    import torch
    return os.environ.get("DIFFUSION_BENCH_PROFILE", "gpu" if torch.cuda.is_available() else "cpu")


def run_example(store: str, overrides: dict, gpus: float, keep: tuple[str, ...] = (),
                pipeline: str = PIPELINE) -> tuple[dict, dict, dict, list]:
    """Every stage of the example, in file order (a topological order), in this process.
    A stage whose committed outputs (same config, same inputs) are already in ``store``
    from an earlier invocation is reused, as the orchestrator's cache would. The stages
    named in ``keep`` are reused from ``store`` even when their key differs (an earlier
    commit's code made them): a comparison of students before and after a change, on the
    same teacher, classifier and trajectories.
    Returns (artifacts by stage, configs used, seconds per stage, reused stages)."""
    import hashlib
    import pickle

    import stages.catalog  # noqa: F401  registers the catalog
    from pipelines.context import StageContext
    from pipelines.stage import get_stage_class

    with open(pipeline) as f:
        spec = yaml.safe_load(f)
    outputs, configs, seconds, keys, reused = {}, {}, {}, {}, []
    for name, node in spec["stages"].items():
        cls = get_stage_class(node["kind"])
        stage = cls({**node.get("config", {}), **overrides.get(name, {})})
        inputs, ups = {}, []
        for inp, ref in node.get("inputs", {}).items():
            many = {}
            for one in ref if isinstance(ref, list) else [ref]:  # a list: Many(...)
                up, _, out = one.partition(".")
                arts = outputs[up]
                many[up] = arts[out] if out else next(iter(arts.values()))
                ups.append(keys[up])
            inputs[inp] = many if isinstance(ref, list) else many[up]
        keys[name] = hashlib.sha256(json.dumps(
            [cls.kind, cls.version, stage.config.model_dump(mode="json"), ups]).encode()
        ).hexdigest()[:16]
        configs[name] = stage.config.model_dump(mode="json")
        done = os.path.join(store, name, "done.pkl")
        if os.path.exists(done):
            with open(done, "rb") as f:
                key, outs, secs = pickle.load(f)
            if key == keys[name] or name in keep:
                outputs[name], seconds[name], keys[name] = outs, secs, key
                reused.append(name)
                print(f"  {name}: reused ({secs} s when it ran)", flush=True)
                continue
        shutil.rmtree(os.path.join(store, name), ignore_errors=True)
        ctx = StageContext.for_testing(store, name=name, kind=cls.kind, seed=spec["seed"],
                                       num_gpus_available=gpus, key=keys[name])
        start = time.perf_counter()
        outputs[name] = stage.run(ctx, **inputs)
        seconds[name] = round(time.perf_counter() - start, 1)
        with open(done, "wb") as f:
            pickle.dump((keys[name], outputs[name], seconds[name]), f)
        print(f"  {name}: {seconds[name]} s", flush=True)
    return outputs, configs, seconds, reused


def same_rows(trajectories, store: str, gpus: float) -> bool:
    """The first CHECK_ROWS rows again, with 1 actor: identical to the 2-actor rows?"""
    from pipelines.context import StageContext
    from stages.teacher.diffusion_trajectories import DiffusionTrajectories
    cfg = {**trajectories["cfg"], "rows": CHECK_ROWS, "actors": 1}
    shutil.rmtree(os.path.join(store, "trajectories_1actor"), ignore_errors=True)  # no old rows
    ctx = StageContext.for_testing(store, name="trajectories_1actor", seed=trajectories["seed"],
                                   num_gpus_available=gpus, key="bench-check")
    one = DiffusionTrajectories(cfg).run(ctx, teacher=trajectories["teacher"])
    a = one["trajectories"].to_numpy()
    b = trajectories["artifact"].to_numpy()
    keep = b["id"] < CHECK_ROWS
    oa, ob = np.argsort(a["id"]), np.argsort(b["id"][keep])
    return all(np.array_equal(a[c][oa], b[c][keep][ob])
               for c in ("id", "label", "noise", "states", "timesteps", "sample"))


def acceptance(m: dict, identical: bool) -> list[dict]:
    best1 = min(STUDENTS, key=lambda s: m[f"fid/{s}/1"])
    best4 = min(STUDENTS, key=lambda s: m[f"fid/{s}/4"])
    t_fid, t_acc = m["fid/teacher/best"], m["class_accuracy/teacher/best"]
    speed = m["ms_per_image/teacher/best"] / m[f"ms_per_image/{best1}/1"]
    return [
        {"check": "teacher FID at its best step count / real-vs-real floor",
         "value": t_fid / m["fid/real/floor"], "target": "<= 3", "ok": t_fid <= 3 * m["fid/real/floor"]},
        {"check": "teacher class accuracy at its best step count",
         "value": t_acc, "target": ">= 0.95", "ok": t_acc >= 0.95},
        {"check": f"best 1-step student ({best1}) FID / teacher best FID",
         "value": m[f"fid/{best1}/1"] / t_fid, "target": "<= 3", "ok": m[f"fid/{best1}/1"] <= 3 * t_fid},
        {"check": f"best 1-step student ({best1}) class accuracy / teacher's",
         "value": m[f"class_accuracy/{best1}/1"] / t_acc, "target": ">= 0.9",
         "ok": m[f"class_accuracy/{best1}/1"] >= 0.9 * t_acc},
        {"check": f"best 4-step student ({best4}) FID / teacher best FID",
         "value": m[f"fid/{best4}/4"] / t_fid, "target": "<= 1.5", "ok": m[f"fid/{best4}/4"] <= 1.5 * t_fid},
        {"check": f"speed-up of the 1-step {best1} student over the teacher at its best steps",
         "value": speed, "target": ">= 20", "ok": speed >= 20},
        {"check": f"trajectories from 2 actors identical to 1 actor (first {CHECK_ROWS} rows)",
         "value": float(identical), "target": "1 (identical)", "ok": identical},
    ]


def _millions(n: int) -> str:
    return f"{n / 1e6:.3f}M"


def write_markdown(result: dict, metrics: dict, path: str) -> None:
    models = [("teacher", sorted(int(k.split("/")[2]) for k in metrics
                                 if k.startswith("fid/teacher/") and k.split("/")[2].isdigit()))]
    models += [(s, [1, 2, 4]) for s in STUDENTS]
    same = [n for n in result["reused_from_earlier_invocation"] if n not in result.get("kept", [])]
    lines = ["# Diffusion timestep distillation on scikit-learn digits", "",
             f"Profile `{result['profile']}`; machine: {result['machine_line']}.",
             f"Command: `{result['command']}`. Stage times (s): "
             + ", ".join(f"{k} {v}" for k, v in result["stage_seconds"].items()) + "."
             + (f" Reused from an earlier invocation of the same command (same configs and "
                f"inputs): {', '.join(same)}." if same else "")
             + (f" Kept from an earlier invocation, made by the code of its commit, whatever "
                f"their keys are now (DIFFUSION_BENCH_KEEP): {', '.join(result['kept'])}."
                if result.get("kept") else ""), "",
             f"Real-vs-real FID floor (classifier features, {result['num_samples']} samples): "
             f"{metrics['fid/real/floor']:.2f}; teacher best at "
             f"{int(metrics['steps/teacher/best'])} steps.", "",
             "Parameters: teacher " + _millions(next(iter(result["students"].values()))
                                                 ["teacher_params"]) + "; " + "; ".join(
                 f"{n} {_millions(i['params'])} ({i['tensors_from_teacher']} of "
                 f"{i['tensors']} tensors initialised from the teacher)"
                 for n, i in result["students"].items()) + ".", "",
             "## Acceptance", "", "| check | measured | target | ok |", "|---|---|---|---|"]
    for row in result["acceptance"]:
        lines.append(f"| {row['check']} | {row['value']:.3f} | {row['target']} | "
                     f"{'yes' if row['ok'] else 'NO'} |")
    lines += ["", "## Quality against steps", "",
              "| model | steps | FID | KID | precision | recall | class acc. | ms/image |",
              "|---|---|---|---|---|---|---|---|"]
    for name, steps in models:
        for s in steps:
            k = f"{name}/{s}"
            lines.append(f"| {name} | {s} | {metrics[f'fid/{k}']:.2f} | {metrics[f'kid/{k}']:.4f} | "
                         f"{metrics[f'precision/{k}']:.3f} | {metrics[f'recall/{k}']:.3f} | "
                         f"{metrics[f'class_accuracy/{k}']:.3f} | {metrics[f'ms_per_image/{k}']:.3f} |")
    lines += ["", "Plots: [FID vs steps](diffusion_fid_vs_steps.png), sample grids "
              + ", ".join(f"[{n}](diffusion_samples_{n}.png)" for n in ("teacher",) + STUDENTS)
              + ".", "", "Overrides of the example's configs: `"
              + json.dumps(result["overrides"]) + "`."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run(repetitions: int = 1) -> dict:
    import ray
    import torch

    from benchmarks.machine import machine

    profile = _profile()
    overrides = PROFILES[profile]
    if profile == "cpu":
        torch.set_num_threads(1)  # shared cores: one thread is many times faster than two
    reps = []
    for rep in range(repetitions):
        for attempt in range(10):  # a loaded machine can time out Ray's node start-up
            if ray.is_initialized():
                break
            try:
                ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                         include_dashboard=False, log_to_driver=False, configure_logging=False,
                         _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
            except Exception as e:  # noqa: BLE001
                print(f"  ray.init failed ({e}); retrying", flush=True)
                ray.shutdown()
        gpus = ray.cluster_resources().get("GPU", 0.0)
        store = os.environ.get("DIFFUSION_BENCH_STORE") or tempfile.mkdtemp(prefix="bench-diff-")
        start = time.perf_counter()
        keep = tuple(n for n in os.environ.get("DIFFUSION_BENCH_KEEP", "").split(",") if n)
        outputs, configs, seconds, reused = run_example(store, overrides, gpus, keep)
        traj = {"cfg": configs["trajectories"], "teacher": outputs["teacher"]["model"],
                "artifact": outputs["trajectories"]["trajectories"], "seed": 0}
        identical = same_rows(traj, store, gpus)
        report = outputs["eval"]["report"]
        metrics = report.metrics()
        os.makedirs(RESULTS, exist_ok=True)
        for png in os.listdir(report.path):
            if png.endswith(".png"):
                shutil.copy(os.path.join(report.path, png),
                            os.path.join(RESULTS, f"diffusion_{png}"))
        reps.append({"metrics": metrics, "identical": identical, "seconds": seconds,
                     "reused": reused,
                     "total_s": round(time.perf_counter() - start, 1),
                     "teacher": outputs["teacher"]["model"].info,
                     "students": {n: outputs[n]["model"].info for n in STUDENTS},
                     "num_samples": report.info["num_samples"]})
        print(f"  repetition {rep + 1}/{repetitions}: {reps[-1]['total_s']} s", flush=True)

    last = reps[-1]
    table = acceptance(last["metrics"], last["identical"])
    ratios = [acceptance(r["metrics"], r["identical"])[2]["value"] for r in reps]
    info = machine()
    result = {
        "name": "diffusion",
        "what": "best 1-step student FID / teacher FID at its best step count "
                "(examples/diffusion_digits.yaml, classifier-feature FID on digits)",
        "command": f"python -m benchmarks --only diffusion --repetitions {repetitions}",
        "profile": profile, "overrides": overrides, "configs": configs,
        "median_ratio": statistics.median(ratios), "spread": [min(ratios), max(ratios)],
        "target": "<= 3 (and the other rows of diffusion.md)",
        "acceptance": table, "all_ok": all(r["ok"] for r in table),
        "metrics": last["metrics"], "teacher": last["teacher"], "students": last["students"],
        "stage_seconds": last["seconds"], "total_s": last["total_s"],
        "reused_from_earlier_invocation": last["reused"],
        "kept": [n for n in keep if n in last["reused"]],
        "num_samples": last["num_samples"],
        "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available()
        else "cpu",
        "machine_line": f"{info['cores']} cores, {info['memory_gib']} GiB, GPU {info['gpu']}, "
                        f"torch {info['libraries'].get('torch')}, "
                        f"diffusers {info['libraries'].get('diffusers')}, "
                        f"ray {info['libraries'].get('ray')}, {info['date']}",
    }
    write_markdown(result, last["metrics"], os.path.join(RESULTS, "diffusion.md"))
    return result
