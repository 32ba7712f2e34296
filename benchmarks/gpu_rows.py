"""The three rows of ``benchmarks.gpu_perf``: set-up (not timed), then the stage and its
bare loop alternately, ``repetitions`` times, each stage run in a fresh work folder."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from benchmarks import common, gpu_models


@dataclass
class Setup:
    root: str
    gpus: float
    device: object          # torch.device
    sizes: dict
    tiny: bool
    deadline: float         # time.monotonic() by which this row's repetitions should end


def _ctx(s: Setup, name: str, kind: str):
    from pipelines.context import StageContext
    from pipelines.testing import ray_board
    return StageContext.for_testing(os.path.join(s.root, f"{name}_{time.monotonic_ns()}"),
                                    name=name, kind=kind, num_gpus_available=s.gpus,
                                    board=ray_board() if kind == "kd-student" else None,
                                    key=f"{name}{time.monotonic_ns()}")


def _run(s: Setup, cls, config: dict, name: str, **inputs):
    return cls(config).run(_ctx(s, name, cls.kind), **inputs)


def _sync(s: Setup) -> None:
    import torch
    if s.device.type == "cuda":
        torch.cuda.synchronize()


def _alternate(s: Setup, bare, stage, per: str, count: int) -> dict:
    """``bare()`` and ``stage()`` each return seconds; warm-up of the bare side first."""
    bare()
    reps, took = [], 0.0
    for i in range(s.sizes["repetitions"]):
        if reps and time.monotonic() + took > s.deadline:  # the next one would end past it
            break
        began = time.monotonic()
        sides = [("bare", bare), ("stage", stage)]
        timed = {n: f() for n, f in (sides if i % 2 == 0 else sides[::-1])}
        reps.append({"bare_s": round(timed["bare"], 3), "stage_s": round(timed["stage"], 3),
                     "ratio": round(timed["bare"] / timed["stage"], 4)})
        took = time.monotonic() - began
        print(f"  {i + 1}: bare {timed['bare']:.2f}s, stage {timed['stage']:.2f}s "
              f"({count} {per})", flush=True)
    median, spread = common.summary([r["ratio"] for r in reps])
    bare_s = float(np.median([r["bare_s"] for r in reps]))
    stage_s = float(np.median([r["stage_s"] for r in reps]))
    return {"median_ratio": median, "spread": spread, "repetitions": reps,
            "bare": f"{count / bare_s:.3g} {per}/s", "stage": f"{count / stage_s:.3g} {per}/s"}


# -- 1. trajectories of an SD 1.5-sized UNet ------------------------------------------------
def trajectories(s: Setup) -> dict:
    import torch

    from stages.data.load_prompts import LoadPrompts
    from stages.models.diffusion import row_noise
    from stages.models.families import load_latent
    from stages.models.families.conditioning import Conditioning
    from stages.models.families.sampling import (
        guidance_mode,
        row_guidance,
        teacher_scheduler,
    )
    from stages.models.families.sampling import sample_teacher as sample_latent
    from stages.teacher.diffusion_trajectories import (
        DiffusionTrajectories,
        kept_indices,
    )
    from stages.teacher.encode_prompts import EncodePrompts
    from stages.teacher.pretrained_diffusion import PretrainedDiffusion

    z = s.sizes
    folder = gpu_models.sd15_pipeline(os.path.join(s.root, "sd15"), s.tiny)
    prompts_txt = os.path.join(s.root, "prompts.txt")
    with open(prompts_txt, "w") as f:
        f.write("\n".join(gpu_models.sentences(z["traj_rows"])) + "\n")
    prompts = _run(s, LoadPrompts, {"path": prompts_txt, "test_fraction": 0.0},
                   "prompts")["prompts"]
    teacher = _run(s, PretrainedDiffusion, {"path": folder}, "teacher")["model"]
    embeddings = _run(s, EncodePrompts, {}, "embeddings", pipeline=teacher,
                      prompts=prompts)["embeddings"]
    config = {"rows": z["traj_rows"], "steps": z["traj_steps"], "sampler": "ddim",
              "guidance_scale": 7.5, "shard_size": z["traj_batch"]}
    cfg = DiffusionTrajectories.Config(**config)
    last = {}

    def bare() -> float:
        _sync(s)
        t0 = time.perf_counter()
        model = load_latent(teacher.path, "bare")
        net = model.denoiser().to(s.device)
        cond = Conditioning(embeddings, "train", "bare").to(s.device)
        shape = model.latent_shape(cfg.height, cfg.width)
        keep, mode = kept_indices(cfg.steps, cfg.keep_states), guidance_mode(model, cfg.guided)
        finals = []
        for start in range(0, cfg.rows, cfg.shard_size):
            ids = np.arange(start, min(start + cfg.shard_size, cfg.rows))
            sched = teacher_scheduler(model, cfg.sampler, cfg.steps, shape, "bare")
            w = row_guidance(0, ids, cfg.guidance_scale)
            final, _, _ = sample_latent(  # states and final come back in host memory
                model, net, row_noise(0, ids, shape), cond.batch(torch.as_tensor(ids)),
                w.to(s.device), sched, mode, keep)
            finals.append(final.numpy())
        last["bare"] = np.concatenate(finals)
        return time.perf_counter() - t0

    def stage() -> float:
        t0 = time.perf_counter()
        out = _run(s, DiffusionTrajectories, config, "trajectories", teacher=teacher,
                   embeddings=embeddings)["trajectories"]
        seconds = time.perf_counter() - t0
        got = out.to_numpy(["id", "sample"])
        last["stage"] = got["sample"][np.argsort(got["id"])]
        return seconds

    result = _alternate(s, bare, stage, "rows", cfg.rows)
    diff = float(np.abs(last["stage"].astype(np.float32) - last["bare"]).max())
    size = "a tiny config" if s.tiny else "SD 1.5's config"
    return result | {"what": f"diffusion-trajectories, UNet2DConditionModel of {size} "
                             f"({teacher.info['params'] / 1e6:.0f}M parameters), "
                             f"{cfg.steps} DDIM steps, CFG w=7.5, batch {cfg.shard_size}",
                     "max_abs_diff": diff}


# -- 2. teacher-outputs of a SmolLM2-135M-shaped causal LM -----------------------------------
def teacher_outputs(s: Setup) -> dict:
    import torch

    from stages.data.load_prompts import LoadPrompts
    from stages.models.text import load_text_model, tokenize
    from stages.teacher.pretrained_model import PretrainedModel
    from stages.teacher.teacher_outputs import TeacherOutputs

    z = s.sizes
    folder = gpu_models.causal_lm(os.path.join(s.root, "lm"), s.tiny)
    lines = os.path.join(s.root, "lines.txt")
    with open(lines, "w") as f:
        f.write("\n".join(gpu_models.sentences(z["lm_rows"], seed=1, length=(40, 120))) + "\n")
    data = _run(s, LoadPrompts, {"path": lines, "test_fraction": 0.0}, "lines")["prompts"]
    model = _run(s, PretrainedModel, {"path": folder, "use": "causal-lm"}, "lm")["model"]
    config = {"signal": "topk_logprobs", "top_k": 32, "max_length": 128,
              "text_column": "prompt", "batch_size": z["lm_batch"]}

    def bare() -> float:
        _sync(s)
        t0 = time.perf_counter()
        texts = [str(t) for t in common.load_columns(data.files(), ["prompt"])["prompt"]]
        net, tok = load_text_model(model.path, "causal-lm", "bare")
        net.to(s.device)
        with torch.inference_mode():
            for i in range(0, len(texts), config["batch_size"]):
                enc = tokenize(tok, [t + tok.eos_token for t in texts[i:i + config["batch_size"]]],
                               config["max_length"])
                ids = torch.tensor(enc["input_ids"], dtype=torch.int64, device=s.device)
                mask = torch.tensor(enc["attention_mask"], dtype=torch.int64, device=s.device)
                logp = torch.log_softmax(net(input_ids=ids, attention_mask=mask).logits.float(), -1)
                values, indices = logp.topk(config["top_k"], dim=-1)
                rest = (1 - values.exp().sum(-1)).clamp(min=0)
                for v in (values, indices.int(), rest):
                    v.cpu().numpy()
        return time.perf_counter() - t0

    def stage() -> float:
        t0 = time.perf_counter()
        _run(s, TeacherOutputs, config, "signal", model=model, data=data)
        return time.perf_counter() - t0

    shape = "a tiny shape" if s.tiny else "SmolLM2-135M's shape"
    return _alternate(s, bare, stage, "rows", z["lm_rows"]) | {
        "what": f"teacher-outputs topk_logprobs (k 32, 128 tokens), LlamaForCausalLM of "
                f"{shape} ({model.info['params'] / 1e6:.0f}M parameters), "
                f"batch {config['batch_size']}"}


# -- 3. a student's training step rate -----------------------------------------------------
def student_step(s: Setup) -> dict:
    from benchmarks.train_overhead import bare_training, checkpoint_gap
    from stages.data.mnist1d import LoadMNIST1D
    from stages.teacher.fit_classifier import FitClassifier
    from stages.teacher.teacher_outputs import TeacherOutputs
    from stages.train.kd_student import KDStudent

    z = s.sizes
    data = _run(s, LoadMNIST1D, {"num_samples": z["kd_rows"]}, "data")["data"]
    teacher = _run(s, FitClassifier, {"arch": "convnet1d", "width": 32, "depth": 3,
                                      "epochs": 1}, "teacher", data=data)["model"]
    signal = _run(s, TeacherOutputs, {}, "signal", model=teacher, data=data)["signal"]
    config = {"arch": "convnet1d", "width": 64, "depth": 3, "epochs": z["kd_epochs"],
              "batch_size": 256, "temperature": 4.0, "alpha": 0.9}
    last = {}

    def bare() -> float:
        _sync(s)
        out = bare_training(signal, config, 0, 1, str(s.device))
        last["bare_epoch_s"], last["rows"] = out["epoch_s"][-1], out["rows"]
        return out["seconds"]

    def stage() -> float:
        ctx = _ctx(s, "student", KDStudent.kind)
        t0 = time.perf_counter()
        KDStudent({**config, "num_workers": 1, "use_gpu": s.gpus > 0}).run(ctx, signal=signal)
        seconds = time.perf_counter() - t0
        last["stage_epoch_s"] = checkpoint_gap(ctx.train_storage)
        return seconds

    result = _alternate(s, bare, stage, "epochs", z["kd_epochs"])
    steady = last.get("stage_epoch_s")
    return result | {
        "what": f"kd-student (ConvNet1D width 64, batch 256, {z['kd_epochs']} epochs, "
                f"{last['rows']} train rows), 1 Ray Train worker with use_gpu, whole stage "
                f"vs bare loop",
        "steady_epoch_ratio": round(last["bare_epoch_s"] / steady, 4) if steady else None,
        "bare_epoch_s": last["bare_epoch_s"], "stage_epoch_s": steady}


ROWS = {"trajectories": trajectories, "teacher_outputs": teacher_outputs,
        "student_step": student_step}
