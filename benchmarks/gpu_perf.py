"""Issue 26's GPU rows, as one prepared script for a lent GPU machine: each stage against a
bare loop doing the same calls on the same GPU and batch, both sides alternately in every
repetition, the bare side warmed up first (CUDA context, kernels, the weights' files read).

1. ``trajectories``: ``diffusion-trajectories`` on a latent UNet of Stable Diffusion 1.5's
   size (random weights, ``benchmarks.gpu_models.sd15_pipeline``), 64 x 64 latents,
   classifier-free guidance (w = 7.5: two UNet passes per step), DDIM; the denoiser and the
   scheduler only, no VAE decoding. Stage: its Ray Data actor pool (one actor on the GPU),
   the teacher loaded there, every state written as parquet. Bare: one process loading the
   same UNet onto the GPU and sampling the same rows shard by shard with the same calls
   (``row_noise``, ``row_guidance``, ``teacher_scheduler``, ``sample_teacher``), the
   results copied to host memory as the stage's are. Figure: rows/s ratio (bare seconds /
   stage seconds); the final latents of both are compared (``max_abs_diff``).
2. ``teacher_outputs``: ``teacher-outputs`` with a ``transformers`` causal LM of
   SmolLM2-135M's shape (``gpu_models.causal_lm``): top-32 next-token log-probabilities of
   every token of every prompt (max_length 128). Bare: the same tokenizer, model, batches
   and top-k in one process. Figure: rows/s ratio.
3. ``student_step``: ``kd-student`` (Hinton KD of a ConvNet1D student on a teacher's
   MNIST-1D logits) with ``use_gpu`` (one Ray Train worker on the GPU) against
   ``benchmarks.train_overhead.bare_training`` on the same GPU: steps/s of the steady-state
   epoch (time between the last two checkpoints) and of the whole stage (start-up
   included).

Each stage runs through ``Stage.run`` with a ``StageContext`` of its own (what the runner
calls, as ``tests/stages/test_gpu.py`` does), not through ``pipelines.run``: MLflow is not
on the GPU machine and its wheels do not fit the 64 MiB carried beside Ray's. The runner's
own costs left out (commit about 1 ms, MLflow about 15 ms per stage run) are measured on the
CPU (``orchestration.json``).

A row not reached within ``GPU_PERF_BUDGET_S`` (default 420 s from the start) or that fails
is recorded as not reached, with why; the JSON and a markdown table go to ``$OUT`` when set
(the device tool), else to ``BENCH_RESULTS`` or ``benchmarks/results``.

Prepared command (from the repository root here, once: the wheels; see
``benchmarks/results/gpu_check.md``, section "Issue 26's GPU rows"):

    python -m benchmarks.gpu_perf --carry .whl       # here: the wheels the machine lacks
    # on the machine (device tool: carry [".whl"], timeout_s 540):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
      PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled GPU_PERF_COMMIT=<HEAD here> \
      python3 -m benchmarks.gpu_perf

Sizes (environment): ``GPU_TRAJ_ROWS`` (128), ``GPU_TRAJ_STEPS`` (8), ``GPU_TRAJ_BATCH``
(16), ``GPU_LM_ROWS`` (16384), ``GPU_LM_BATCH`` (64), ``GPU_KD_ROWS`` (60000),
``GPU_KD_EPOCHS`` (10), ``GPU_PERF_REPETITIONS`` (5, as many as each row's share of the
budget allows: each row gets an equal share of what is left when it starts, at least one
repetition): sized, unmeasured, for the three rows to fit the 15 minutes of device time a
session is lent (machine start and wheels included), not for a minute of bare work per
side as the CPU rows are. ``BENCH_TINY=1``: tiny models and
sizes, on the CPU too, for checking the script (``tests/benchmarks/test_gpu_perf.py``).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time

from benchmarks import common
from benchmarks.gpu_rows import ROWS, Setup

HERE = os.path.dirname(os.path.abspath(__file__))


def sizes() -> dict:
    s = common.size
    return {"traj_rows": s("GPU_TRAJ_ROWS", 128, 8), "traj_steps": s("GPU_TRAJ_STEPS", 8, 2),
            "traj_batch": s("GPU_TRAJ_BATCH", 16, 4), "lm_rows": s("GPU_LM_ROWS", 16384, 32),
            "lm_batch": s("GPU_LM_BATCH", 64, 8), "kd_rows": s("GPU_KD_ROWS", 60000, 400),
            "kd_epochs": s("GPU_KD_EPOCHS", 10, 2),
            "repetitions": s("GPU_PERF_REPETITIONS", 5, 1)}


def out_dir() -> str:
    return (os.environ.get("OUT") or os.environ.get("BENCH_RESULTS")
            or os.path.join(HERE, "results"))


def device_info() -> dict:
    import ray
    import torch
    try:  # the device machine's copy of the tree may have no git: GPU_PERF_COMMIT names it
        commit = os.environ.get("GPU_PERF_COMMIT") or common.commit() or "unknown"
    except OSError:
        commit = "unknown"
    info = {"cuda": torch.cuda.is_available(), "torch": torch.__version__,
            "ray": ray.__version__, "python": sys.version.split()[0],
            "cpus": os.cpu_count(), "commit": commit}
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1))
    return info


def table(result: dict) -> str:
    lines = [f"# GPU rows (issue 26): {result['device'].get('gpu', 'no GPU: CPU check')}", "",
             (f"Commit {result['device']['commit']}; torch {result['device']['torch']}, "
              f"ray {result['device']['ray']}; sizes {json.dumps(result['sizes'])}"), "",
             "| row | what | bare | stage | ratio (median, spread) | target | reached |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        if not r.get("reached"):
            lines.append(f"| {name} | {r.get('what', '')} | | | | >= 0.9 | NOT reached: "
                         f"{r.get('why', '')} |")
            continue
        steady = (f"; steady-state epoch {r['steady_epoch_ratio']}"
                  if r.get("steady_epoch_ratio") else "")
        lines.append(f"| {name} | {r['what']} | {r['bare']} | {r['stage']}{steady} | "
                     f"**{r['median_ratio']}** ({r['spread'][0]} to {r['spread'][1]}) | >= 0.9 "
                     f"| yes, {len(r['repetitions'])} repetition(s) |")
    return "\n".join(lines) + "\n"


def save(result: dict) -> None:
    """The JSON and the table as they stand (after every row: a run cut short keeps them)."""
    os.makedirs(out_dir(), exist_ok=True)
    with open(os.path.join(out_dir(), "gpu_perf.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir(), "gpu_perf.md"), "w") as f:
        f.write(table(result))


def run_rows(result: dict, budget_s: float) -> None:
    """Each row into ``result["rows"]``, saved after every row."""
    import ray
    import torch
    t0 = time.monotonic()
    common.start_ray()
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if not gpus and not (common.tiny() or os.environ.get("GPU_PERF_CPU") == "1"):
        raise SystemExit("gpu_perf: Ray reports no GPU; allowed: a CUDA machine, or "
                         "BENCH_TINY=1 (or GPU_PERF_CPU=1 at full model sizes) to check the "
                         "script on the CPU")
    setup = Setup(root=tempfile.mkdtemp(prefix="gpu_perf_"), gpus=gpus,
                  device=torch.device("cuda" if gpus else "cpu"), sizes=sizes(),
                  tiny=common.tiny(), deadline=t0 + budget_s)
    rows, end = result.setdefault("rows", {}), setup.deadline
    for i, (name, fn) in enumerate(ROWS.items()):
        now = time.monotonic()
        if now > end:
            rows[name] = {"reached": False, "why": f"the {budget_s:.0f} s budget was spent"}
        else:  # this row's share of what is left: no new repetition starts after it
            setup.deadline = now + (end - now) / (len(ROWS) - i)
            print(f"gpu_perf: {name}", flush=True)
            try:
                rows[name] = fn(setup) | {"reached": True}
            except Exception as e:  # recorded: the next row still runs
                rows[name] = {"reached": False, "why": f"{type(e).__name__}: {e}"[:400]}
            print(f"gpu_perf: {name}: {json.dumps(rows[name])[:600]}", flush=True)
        save(result)
    common.stop_ray()


def carry(folder: str) -> None:
    """Download here the wheels the GPU machine lacks (its image has torch, transformers,
    pyarrow, pandas; not Ray, diffusers, pydantic 2.14, mnist1d), Ray's without its Java
    jar and the dashboard's source map so that all of it fits the 64 MiB carried."""
    import subprocess
    import zipfile
    os.makedirs(folder, exist_ok=True)
    names = ["ray==2.60.0", "diffusers==0.42.1", "pydantic==2.14.4", "pydantic-core==2.50.5",
             "annotated-types", "typing-inspection", "jsonschema", "jsonschema-specifications",
             "referencing", "rpds-py", "importlib-metadata", "typing-extensions", "mnist1d"]
    platforms = [a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64") for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                    "cp", *platforms, "-d", folder, *names], check=True)
    for wheel in glob.glob(os.path.join(folder, "ray-*.whl")):
        slim = wheel + ".slim"
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                if not (item.filename.startswith("ray/jars/") or item.filename.endswith(".js.map")):
                    dst.writestr(item, src.read(item.filename))
        os.replace(slim, wheel)  # RECORD still lists the dropped files: pip --no-deps is fine
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.whl")))
    print(f"{folder}: {total / 2**20:.1f} MiB of wheels")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--carry":
        return carry(sys.argv[2])
    budget = float(os.environ.get("GPU_PERF_BUDGET_S", "420"))
    result = {"name": "gpu_perf", "device": device_info(), "sizes": sizes(),
              "command": "python3 -m benchmarks.gpu_perf", "budget_s": budget}
    run_rows(result, budget)
    print(table(result))


if __name__ == "__main__":
    main()
