"""``evaluate-generation``: quality against steps of a diffusion teacher and its few-step
students, all measured in the same run on the same noise and labels.

Features: the penultimate layer (the input of the last linear layer) of a classifier
trained on the real data by ``fit-classifier``, no downloaded weights. Real reference: the
real images split in two random halves A and B; generated sets have |B| images (or
``num_samples``), compared with A.

- FID (Heusel et al. 2017, eq. 6): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
  ``fid/real/floor`` is FID(A, B) at the same sample count.
- KID (Binkowski et al. 2018, eq. 3): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3,
  mean over ``kid_subsets`` random subsets.
- Precision / recall (Kynkaanniemi et al. 2019, eq. 1-2): k-nearest-neighbour balls
  (k = ``pr_k``) around real (resp. generated) features.
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
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Many, Model, Report, Stage, StageConfig
from stages.evaluate.timing import pyplot
from stages.models.classifiers import load_classifier
from stages.models.diffusion import check_shape, load_diffusion, where_of
from stages.models.diffusion_sampling import SAMPLERS, check_student_steps, sample_any
from stages.models.device import device as torch_device

RESERVED = ("teacher", "real")  # model names of the metrics that are not students


# -- metrics ------------------------------------------------------------------------------
def fid(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s_a @ s_b)
    if not np.isfinite(covmean).all():  # near-singular: regularise (as pytorch-fid does)
        eye = np.eye(len(s_a)) * 1e-6
        covmean = linalg.sqrtm((s_a + eye) @ (s_b + eye))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def kid(a: np.ndarray, b: np.ndarray, subsets: int, size: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    d, m = a.shape[1], min(size, len(a), len(b))
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
        values.append(off(kxx) + off(kyy) - 2 * kxy.mean())
    return float(np.mean(values))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)

    def radii(x):  # distance to the k-th nearest neighbour within the set (self excluded)
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def coverage(support, r, query):  # share of query points inside some support ball
        return (torch.cdist(query, support) <= r[None, :]).any(1).float().mean().item()

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


class Features:
    """The classifier's penultimate features (input of its last ``nn.Linear``) and logits."""

    def __init__(self, classifier):
        self.model = classifier.eval()
        last = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.register_forward_hook(lambda mod, inp, out: setattr(self, "_feat", inp[0]))

    @torch.inference_mode()
    def __call__(self, x01: torch.Tensor, batch: int = 1000):
        feats, logits = [], []
        for i in range(0, len(x01), batch):
            logits.append(self.model(x01[i:i + batch].float()))
            feats.append(self._feat.flatten(1))
        return torch.cat(feats).double().numpy(), torch.cat(logits).argmax(1).numpy()


class EvaluateGeneration(Stage):
    kind = "evaluate-generation"
    version = "3"  # 2: latency measured side by side in rounds (was one timed pass each)
    # 3: any number of students, named by their stage

    class Config(StageConfig):
        teacher_steps: list[PositiveInt] = [100, 50, 20, 10, 4, 2, 1]
        student_steps: list[PositiveInt] = [1, 2, 4]
        sampler: Literal[SAMPLERS] = "ddim"
        num_samples: int | None = Field(None, ge=10)  # default: half the real images
        batch_size: int = Field(1000, ge=1)
        threads: int = Field(1, ge=1)                 # torch threads for every model (CPU)
        kid_subsets: int = Field(50, ge=1)
        kid_subset_size: int = Field(500, ge=2)
        pr_k: int = Field(3, ge=1)
        latency_batch_size: int = Field(256, ge=1)
        latency_repeats: int = Field(5, ge=1)

    inputs = {"teacher": Model, "classifier": Model, "data": Dataset,
              "students": Many(Model)}
    outputs = {"report": Report}

    def run(self, ctx, teacher, classifier, data, students):
        cfg = self.config
        where = where_of(ctx, self.kind)
        w = lambda field: (f"{where} input 'students' (stage '{field}')"  # noqa: E731
                           if field in students else where_of(ctx, self.kind, field))
        for name in students:
            if name in RESERVED:
                raise bad_value(w("students"), "student stage name", name,
                                f"any name but {', '.join(RESERVED)} (metric names use them)")
        t_model = load_diffusion(teacher.path, w("teacher"))                # 1. load, check
        models = {"teacher": t_model}
        for name in students:
            models[name] = load_diffusion(students[name].path, w(name))
            if models[name].student is None:
                raise bad_value(w(name), "model", students[name].path,
                                "a student folder (with student.json)")
            check_shape(t_model, models[name].shape, w(name), "student")
            for steps in cfg.student_steps:
                check_student_steps(models[name], steps, w(name) + " config student_steps")
        net = load_classifier(classifier.path, w("classifier"))
        check_shape(t_model, net.in_shape, w("classifier"), "classifier input")
        real = data.to_numpy(["x"])["x"].astype(np.float32)
        check_shape(t_model, real.shape[1:], w("data"), "image")
        features = Features(net)
        device = torch_device()

        rng = np.random.default_rng(ctx.seed)                                # 2. real halves
        order = rng.permutation(len(real))
        half_a, half_b = order[: len(real) // 2], order[len(real) // 2:]
        n = min(cfg.num_samples or len(half_b), len(half_b))
        feat_a, _ = features(torch.as_tensor(real[half_a]))
        feat_b, _ = features(torch.as_tensor(real[half_b[:n]]))
        metrics = {"fid/real/floor": fid(feat_a, feat_b),
                   "kid/real/floor": kid(feat_a, feat_b, cfg.kid_subsets, cfg.kid_subset_size,
                                         ctx.seed)}

        gen = torch.Generator().manual_seed(ctx.seed)                         # 3. same noise
        noise = torch.randn((n, *t_model.shape), generator=gen)
        num_classes = t_model.num_classes
        labels = np.arange(n) % num_classes if num_classes else np.zeros(n, np.int64)
        runs = [("teacher", s) for s in cfg.teacher_steps] + \
               [(name, s) for name in students for s in cfg.student_steps]
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
            for steps in cfg.student_steps:
                metrics[f"speedup/{name}/{steps}"] = (metrics["ms_per_image/teacher/best"] /
                                                      metrics[f"ms_per_image/{name}/{steps}"])
        figures = {f"samples_{name}.png": _grid_plot(name, rows, t_model.shape)
                   for name, rows in grids.items()}
        figures["fid_vs_steps.png"] = _fid_plot(metrics, cfg, best, list(students))
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


def _fid_plot(metrics: dict, cfg, best: int, students: list[str]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    models = ["teacher", *students]
    for name in models:
        steps = sorted(cfg.teacher_steps if name == "teacher" else cfg.student_steps)
        ax.plot(steps, [metrics[f"fid/{name}/{s}"] for s in steps], marker="o", label=name)
    ax.axhline(metrics["fid/real/floor"], color="gray", ls="--", label="real vs real")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title(f"FID against steps (teacher best: {best} steps)")
    ax.legend()
    return fig
