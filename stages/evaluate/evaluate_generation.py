"""``evaluate-generation``: quality against steps of a diffusion teacher and its few-step
students, all measured in the same run on the same noise and labels.

Features: the penultimate layer (the input of the last linear layer) of a classifier
trained on the real data by ``fit-classifier``, no downloaded weights. Real reference: the
real images split in two random halves A and B; generated sets have |B| images (or
``num_samples``), compared with A.

- FID (Heusel et al. 2017, eq. 6): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)),
  by ``torchmetrics.image.fid.FrechetInceptionDistance`` in float64 (the trace of the
  root: the sum of the square roots of the eigenvalues of S_r S_g). ``fid/real/floor`` is
  FID(A, B) at the same sample count.
- KID (Binkowski et al. 2018, eq. 3): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, mean
  over ``kid_subsets`` random subsets of ``kid_subset_size`` rows (at most the set sizes;
  defaults 100 and 1000 as torchmetrics'),
  by ``torchmetrics.image.kid.KernelInceptionDistance``; the subsets drawn by torch's
  generator seeded with the run's seed (reproducible; the global state left as it was).
- Precision / recall (Kynkaanniemi et al. 2019, eq. 1-2): k-nearest-neighbour balls
  (k = ``pr_k``) around real (resp. generated) features; our own code, as no maintained
  library has it (torchmetrics' precision / recall are classification metrics).
- class_accuracy: the classifier's accuracy on class-conditional samples (label = i mod C).
- ms_per_image: measured side by side after the quality runs, on one latency batch
  (``latency_batch_size`` of the same noise, the same torch threads for every model): in
  each of ``latency_repeats`` rounds every (model, steps) generates that batch once, in an
  order rotated from round to round, so a slow moment of the machine hits every model
  alike; the median over the rounds, per image. ``speedup/<student>/<steps>`` = ms of the
  teacher at its best step count / ms of the student.

Students: any number, wired as a list (``students: [consistency, progressive, reflow]``).
Metric names: ``<metric>/<model>/<steps>`` with model ``teacher`` or the student's stage
name; ``fid/real/floor``; ``fid/teacher/best``,
``class_accuracy/teacher/best``, ``ms_per_image/teacher/best`` and ``steps/teacher/best`` at
the teacher's best (lowest FID) step count. Plots: a sample grid per model (a row per step
count, a column per class), FID against steps.

A latent text-to-image teacher (a diffusers pipeline folder of a supported family, with
the ``encode-prompts`` output as input ``embeddings``) is scored on its held-out prompts
by ``stages.evaluate.generation_t2i`` (same metrics on the decoded images, plus
teacher_distance, digit_accuracy, accuracy against w and end-to-end latency).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Many, Model, Report, Stage, StageConfig
from stages.evaluate.generation_metrics import (CLASSIFIER_VIEWS, REFERENCES, RESERVED,
                                                Features, fid, fid_plot, kid,
                                                precision_recall, real_floor)
from stages.evaluate.timing import pyplot
from stages.models.classifiers import load_classifier
from stages.models.diffusion import check_shape, load_diffusion, where_of
from stages.models.diffusion_sampling import SAMPLERS, check_student_steps, sample_any
from stages.models.device import device as torch_device
from stages.models.families import is_latent

class EvaluateGeneration(Stage):
    kind = "evaluate-generation"
    version = "6"  # 2: latency measured side by side in rounds (was one timed pass each)
    # 3: any number of students, named by their stage; 4: latent text-to-image teachers;
    # 5: FID and KID by torchmetrics (FID the same to ~1e-12, KID on other random subsets)
    # 6: text-to-image: the real reference paired with the prompts (``reference``)

    class Config(StageConfig):
        teacher_steps: list[PositiveInt] = [100, 50, 20, 10, 4, 2, 1]
        student_steps: list[PositiveInt] = [1, 2, 4]
        # a student's own step counts (by its stage name), e.g. {dmd: [1]} for a
        # generator trained for one step; the others take student_steps
        steps_for: dict[str, list[PositiveInt]] = {}

        def steps_of(self, name: str) -> list[int]:
            return self.steps_for.get(name, self.student_steps)
        sampler: Literal[SAMPLERS] = "ddim"
        num_samples: int | None = Field(None, ge=10)  # default: half the real images
        batch_size: int = Field(1000, ge=1)
        threads: int = Field(1, ge=1)                 # torch threads for every model (CPU)
        # torchmetrics' (and Binkowski et al.'s) defaults; capped to the set sizes, so on
        # sets under 1000 rows every subset is (nearly) the whole set: KID is then the
        # all-rows unbiased MMD^2, free of subset noise (benchmarks/results/metrics_agreement.md)
        kid_subsets: int = Field(100, ge=1)
        kid_subset_size: int = Field(1000, ge=2)
        pr_k: int = Field(3, ge=1)
        latency_batch_size: int = Field(256, ge=1)
        latency_repeats: int = Field(5, ge=1)
        # latent text-to-image teachers only (``generation_t2i``): the teacher's w, the
        # w of the accuracy-against-w curve, the image size (default: the pipeline's)
        guidance_scale: float = Field(4.0, ge=0)
        guidance_scales: list[float] = Field([1.0, 4.0], min_length=1)
        height: int | None = Field(None, ge=8)
        width: int | None = Field(None, ge=8)
        # how a generated image meets the classifier: "resize" (centre-cropped to its
        # aspect ratio, then resized) or "crop" (its centre crop of the classifier's size,
        # for a teacher trained on the real images padded, e.g. 28 -> 32 pixels; resized
        # only where it is smaller)
        classifier_view: Literal[CLASSIFIER_VIEWS] = "resize"
        # the real images a text-to-image teacher is compared with: "paired" (the data
        # rows whose prompt is a held-out prompt; generated rows take their prompts),
        # "test-split" (the data's test split; generated rows cycle through the held-out
        # prompts: fair only when those cover the data as the test split does), "auto"
        # (paired when the data has a ``prompt`` column)
        reference: Literal[REFERENCES] = "auto"

    inputs = {"teacher": Model, "classifier": Model, "data": Dataset,
              "students": Many(Model)}
    optional_inputs = {"embeddings": Dataset}  # latent text-to-image teachers
    outputs = {"report": Report}

    def run(self, ctx, teacher, classifier, data, students, embeddings=None):
        cfg = self.config
        where = where_of(ctx, self.kind)
        w = lambda field: (f"{where} input 'students' (stage '{field}')"  # noqa: E731
                           if field in students else where_of(ctx, self.kind, field))
        for name in students:
            if name in RESERVED:
                raise bad_value(w("students"), "student stage name", name,
                                f"any name but {', '.join(RESERVED)} (metric names use them)")
        for name in cfg.steps_for:
            if name not in students:
                raise bad_value(f"{where} config steps_for", "student", name,
                                list(students))
        if is_latent(teacher.path):
            from stages.evaluate.generation_t2i import run_latent
            return run_latent(self, ctx, teacher, classifier, data, students, embeddings, w)
        if embeddings is not None:
            raise bad_value(w("embeddings"), "input", "wired", "unwired for a pixel-space "
                            "UNet2DModel teacher (embeddings are for text-to-image pipelines)")
        if cfg.reference != "auto":
            raise bad_value(f"{where} config reference", "value", cfg.reference,
                            "auto for a pixel-space UNet2DModel teacher (scored against the "
                            "real images of its classes; reference is for text-to-image)")
        t_model = load_diffusion(teacher.path, w("teacher"))                # 1. load, check
        models = {"teacher": t_model}
        for name in students:
            models[name] = load_diffusion(students[name].path, w(name))
            if models[name].student is None:
                raise bad_value(w(name), "model", students[name].path,
                                "a student folder (with student.json)")
            check_shape(t_model, models[name].shape, w(name), "student")
            for steps in cfg.steps_of(name):
                check_student_steps(models[name], steps, w(name) + " config student_steps")
        net = load_classifier(classifier.path, w("classifier"))
        check_shape(t_model, net.in_shape, w("classifier"), "classifier input")
        real = data.to_numpy(["x"])["x"].astype(np.float32)
        check_shape(t_model, real.shape[1:], w("data"), "image")
        features = Features(net)
        device = torch_device()

        feat_a, n, metrics = real_floor(features, real, cfg, ctx.seed)  # 2. real halves

        gen = torch.Generator().manual_seed(ctx.seed)                         # 3. same noise
        noise = torch.randn((n, *t_model.shape), generator=gen)
        num_classes = t_model.num_classes
        labels = np.arange(n) % num_classes if num_classes else np.zeros(n, np.int64)
        runs = [("teacher", s) for s in cfg.teacher_steps] + \
               [(name, s) for name in students for s in cfg.steps_of(name)]
        threads = torch.get_num_threads()
        torch.set_num_threads(cfg.threads)
        grids: dict[str, list] = {}
        try:
            for i, (name, steps) in enumerate(runs):                          # 4. sample
                model = models[name].to(device)
                images = _generate(model, noise, labels, steps, cfg, ctx.seed, w(name))
                feat, pred = features(((images + 1) / 2).clamp(0, 1))
                key = f"{name}/{steps}"
                metrics[f"fid/{key}"] = fid(feat_a, feat)                    # 5. score
                metrics[f"kid/{key}"] = kid(feat_a, feat, cfg.kid_subsets, cfg.kid_subset_size,
                                            ctx.seed)
                p, r = precision_recall(feat_a, feat, cfg.pr_k)
                metrics[f"precision/{key}"], metrics[f"recall/{key}"] = p, r
                if num_classes:
                    metrics[f"class_accuracy/{key}"] = float((pred == labels).mean())
                grids.setdefault(name, []).append((steps, images[: max(num_classes or 10, 1)]))
                ctx.progress(i + 1, len(runs), "model x steps")
            ms = _latency(models, runs, noise[:cfg.latency_batch_size],              # 6. speed
                          labels[:cfg.latency_batch_size], cfg, ctx.seed, w, device)
            for (name, steps), value in ms.items():
                metrics[f"ms_per_image/{name}/{steps}"] = value
        finally:
            torch.set_num_threads(threads)

        best = min(cfg.teacher_steps, key=lambda s: metrics[f"fid/teacher/{s}"])  # 7. best
        metrics["steps/teacher/best"] = best
        for m in ("fid", "kid", "precision", "recall", "class_accuracy", "ms_per_image"):
            if f"{m}/teacher/{best}" in metrics:
                metrics[f"{m}/teacher/best"] = metrics[f"{m}/teacher/{best}"]
        for name in students:
            for steps in cfg.steps_of(name):
                metrics[f"speedup/{name}/{steps}"] = (metrics["ms_per_image/teacher/best"] /
                                                      metrics[f"ms_per_image/{name}/{steps}"])
        figures = {f"samples_{name}.png": _grid_plot(name, rows, t_model.shape)
                   for name, rows in grids.items()}
        figures["fid_vs_steps.png"] = fid_plot(metrics, cfg.teacher_steps,
                                               {n: cfg.steps_of(n) for n in students},
                                               best, list(students))
        info = {"num_samples": n, "real_images": len(real), "threads": cfg.threads,
                "device": str(device), "batch_size": cfg.batch_size, "teacher_best_steps": best,
                "latency_batch": min(n, cfg.latency_batch_size),
                "latency_repeats": cfg.latency_repeats}
        report = ctx.write_report("report", metrics, figures=figures, info=info)
        for fig in figures.values():
            pyplot().close(fig)
        return {"report": report}


def _generate(model, noise, labels, steps, cfg, seed, where):
    """All samples in batches of ``batch_size``: images in [-1, 1] on the CPU."""
    out = []
    gen = torch.Generator().manual_seed(seed + 1)  # re-noising of consistency sampling
    for i in range(0, len(noise), cfg.batch_size):
        out.append(sample_any(model, noise[i:i + cfg.batch_size],
                              labels[i:i + cfg.batch_size], steps, cfg.sampler, gen, where))
    return torch.cat(out).float()


def _latency(models, runs, noise, labels, cfg, seed, w, device) -> dict:
    """ms per image of every (model, steps) on one batch: the median of
    ``latency_repeats`` rounds, each timing every run once in a rotated order."""
    times = {run: [] for run in runs}
    for r in range(cfg.latency_repeats):
        for name, steps in runs[r % len(runs):] + runs[:r % len(runs)]:
            gen = torch.Generator().manual_seed(seed + 1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            sample_any(models[name], noise, labels, steps, cfg.sampler, gen, w(name))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[(name, steps)].append((time.perf_counter() - start) * 1e3 / len(noise))
    return {run: float(np.median(t)) for run, t in times.items()}


def _grid_plot(name: str, rows: list, shape):
    plt = pyplot()
    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.8, len(rows) * 0.85),
                             squeeze=False)
    for r, (steps, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                img = ((images[c] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
                ax.imshow(img[..., 0] if shape[0] == 1 else img, cmap="gray", vmin=0, vmax=1)
        axes[r][0].set_title(f"{steps} steps", fontsize=7, loc="left")
    fig.suptitle(f"{name}: samples (one column per class)")
    return fig
