"""``evaluate-generation`` for a latent text-to-image teacher (a diffusers pipeline folder
of a supported family) and its few-step students, on the held-out prompts (``split ==
"test"`` of the ``encode-prompts`` output, sorted by id).

Rows: n images per (model, steps), n = min(``num_samples`` or |B|, |B|), x_T of row r =
``row_noise(seed, 2^40 + r)`` (no trajectory row's noise), the same for every model. A and B
(random halves, seeded) and the prompts, by ``reference`` (``auto``: ``paired`` when ``data``
has a ``prompt`` column, else ``test-split``; the choice is the report's ``reference``):
- ``paired``: the ``data`` rows (every split) whose prompt is a held-out prompt; row r is
  prompted with B[r]'s prompt, so real and generated sets share one prompt distribution,
  as COCO's FID takes its reference images' captions. Every split, as FID's reference is
  conventionally the whole real set (CIFAR-10's and ImageNet's training images): the
  held-out prompts' test images alone are too few (MNIST's 13 held-out captions: 151).
  A held-out prompt no data row has is not scored (info ``row_prompts`` of ``prompts``).
- ``test-split``: the ``data`` test images; row r is held-out prompt r mod P. Fair only when
  those prompts cover the data as its test split does (MNIST's 13 held-out captions name 8
  of the 10 digits: real images of them, uniform per caption, score 2.7x the floor).

Quality, on the stored embeddings (no text encoder): the teacher at each of
``teacher_steps`` with ``sampler`` and w = ``guidance_scale`` (classifier-free or the
family's embedded guidance), students with their own scheduler at ``student_steps``
(``guidance: embedded``: w through the slot; ``fixed``: no guidance). Latents decoded by
the teacher's VAE, D(z / scaling_factor + shift_factor), to [0, 1]; for the classifier
(``fit-classifier``) grey (BT.601 luma) if it takes one channel, then ``classifier_view``:
centre-cropped to its aspect ratio and resized (bilinear, antialiased) to its size, or
(``crop``, a teacher trained on padded images) its centre crop of the classifier's size.
Metrics ``<metric>/<model>/<steps>``: ``fid``, ``kid``, ``precision``, ``recall``
against A (``fid/real/floor``: FID(A, B) at n; FID and KID by torchmetrics, as in the pixel
path); ``teacher_distance``: per-row RMSE over pixels in [0, 1] to the reference teacher's
image (the largest ``teacher_steps``) from the same noise and prompt, averaged (0 for the
reference); ``digit_accuracy`` when ``data`` has ``prompt`` and ``label`` columns (paired:
B[r]'s label; else a prompt's label: the majority label of its rows; rows of unlabelled
prompts skipped); ``digit_accuracy_w/<model>/<w>`` for each of ``guidance_scales``: the reference
teacher and every embedded-guidance student at its largest step count.

Latency, on the saved pipelines (``DiffusionPipeline.from_pretrained``; the teacher's
scheduler set to ``sampler``): ``ms_per_image`` end to end (``pipe(prompt=[...], ...,
output_type="np")``, text encoding and decoding included; w = ``guidance_scale`` for the
teacher and embedded students, 1 for fixed ones) and ``denoiser_ms_per_image`` (the
denoising loop alone), on ``latency_batch_size`` prompts, the same torch threads, every
run once per round in an order rotated per round, the median of ``latency_repeats``
rounds. ``speedup`` / ``denoiser_speedup`` = reference teacher ms / student ms. Plots: a
sample grid (a row per prompt, a column per model and steps), accuracy against w, FID.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow.compute as pc
import torch

from pipelines.errors import bad_value
from stages.data.tables import parquet, read_split, require_columns
from stages.evaluate.generation_metrics import (Features, accuracy, fid, fid_plot, kid,
                                                paired_rows, precision_recall, prompt_labels,
                                                real_floor, real_halves, to_classifier)
from stages.evaluate.timing import pyplot
from stages.models.classifiers import load_classifier
from stages.models.device import device as torch_device
from stages.models.diffusion import row_noise, where_of
from stages.models.diffusion_sampling import check_student_steps
from stages.models.families import load_latent
from stages.models.families.base import check_embeddings
from stages.models.families.conditioning import Conditioning
from stages.models.families.sampling import (guidance_mode, sample_student, sample_teacher,
                                              teacher_scheduler)

EVAL_ROWS = 1 << 40             # noise ids of the evaluation rows
GRID_ROWS = 8                   # prompts shown in the sample grid


def run_latent(stage, ctx, teacher, classifier, data, students, embeddings, w) -> dict:
    cfg, where = stage.config, where_of(ctx, stage.kind)
    model = load_latent(teacher.path, w("teacher"))                         # 1. checks
    if model.student is not None:
        raise bad_value(w("teacher"), "model", teacher.path, "a teacher (this folder is a "
                        f"{model.student.get('method')} student)")
    if embeddings is None:
        raise bad_value(where, "input 'embeddings'", None, "the encode-prompts output of the "
                        f"teacher's pipeline (a {model.pipeline_class} teacher is scored on "
                        "its held-out prompts)")
    check_embeddings(model, embeddings.info, w("embeddings"))
    shape = model.latent_shape(cfg.height, cfg.width)
    for steps in cfg.teacher_steps:  # a sampler the family lacks: before any work
        teacher_scheduler(model, cfg.sampler, steps, shape, f"{where} config")
    models = {"teacher": model}
    for name, art in students.items():
        s = models[name] = load_latent(art.path, w(name))
        if s.student is None:
            raise bad_value(w(name), "model", art.path, "a student folder (with student.json)")
        theirs = (s.pipeline_class, list(s.latent_shape(cfg.height, cfg.width)))
        if theirs != (model.pipeline_class, list(shape)):
            raise bad_value(w(name), "pipeline class and latent shape", theirs,
                            f"the teacher's {(model.pipeline_class, list(shape))}")
        for steps in cfg.steps_of(name):
            check_student_steps(s, steps, f"{w(name)} config student_steps")
    net = load_classifier(classifier.path, w("classifier"))
    in_shape = tuple(int(v) for v in net.in_shape)
    if len(in_shape) != 3 or in_shape[0] not in (1, 3):
        raise bad_value(w("classifier"), "input shape", list(in_shape),
                        "(1 or 3 channels, height, width): an image classifier")
    device = torch_device()
    cond = Conditioning(embeddings, "test", w("embeddings")).to(device)
    real, halves, prompt_of, row_label, mode, pool = reference(data, cond, cfg, ctx.seed, w)
    if tuple(real.shape[1:]) != in_shape:
        raise bad_value(w("data"), "image shape", list(real.shape[1:]),
                        f"the classifier's input {list(in_shape)}")
    features = Features(net)
    feat_a, n, metrics = real_floor(features, real, cfg, ctx.seed, halves)  # 2. real halves

    ref = max(cfg.teacher_steps)
    embedded = [s for s in students if models[s].student.get("guidance") == "embedded"]
    ws = {name: cfg.guidance_scale if name == "teacher" or name in embedded else 1.0
          for name in models}
    runs = list(dict.fromkeys([("teacher", ref)] + [("teacher", s) for s in cfg.teacher_steps]
                              + [(s, k) for s in students for k in cfg.steps_of(s)]))
    rows = np.arange(n)
    grid_rows = np.unique(prompt_of, return_index=True)[1]
    grid_rows = np.sort(grid_rows)[:GRID_ROWS]  # the first rows of distinct prompts
    sampler = Sampler(models, cond, torch.as_tensor(prompt_of),
                      row_noise(ctx.seed, EVAL_ROWS + rows, shape), cfg, ctx.seed, device,
                      f"{where} config")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    grids, preds, ref_images = {}, {}, None
    try:
        for i, (name, steps) in enumerate(runs):                            # 3. quality
            feats, pred, dist = [], [], []
            for a, images in sampler.images(name, steps, ws[name]):
                f, p = features(to_classifier(images, in_shape, cfg.classifier_view))
                feats.append(f)
                pred.append(p)
                images = images.half()   # compared as stored: the reference to itself is 0
                if ref_images is None:
                    ref_images = torch.empty((n, *images.shape[1:]), dtype=torch.float16)
                if (name, steps) == ("teacher", ref):
                    ref_images[a:a + len(images)] = images
                diff = images.float() - ref_images[a:a + len(images)].float()
                dist.append(diff.pow(2).flatten(1).mean(1).sqrt())
                pick = grid_rows[(grid_rows >= a) & (grid_rows < a + len(images))] - a
                grids.setdefault((name, steps), []).append(images[pick].float())
            feat, preds[(name, steps)] = np.concatenate(feats), np.concatenate(pred)
            key = f"{name}/{steps}"
            metrics[f"fid/{key}"] = fid(feat_a, feat)
            metrics[f"kid/{key}"] = kid(feat_a, feat, cfg.kid_subsets, cfg.kid_subset_size,
                                        ctx.seed)
            if n > cfg.pr_k:  # k-th neighbours within the generated set
                metrics[f"precision/{key}"], metrics[f"recall/{key}"] = precision_recall(
                    feat_a, feat, cfg.pr_k)
            metrics[f"teacher_distance/{key}"] = float(torch.cat(dist).mean())
            accuracy(metrics, f"digit_accuracy/{key}", preds[(name, steps)], row_label)
            ctx.progress(i + 1, len(runs), "model x steps")
        curves = {"teacher": ref, **{s: max(cfg.steps_of(s)) for s in embedded}}
        if row_label is not None and (row_label >= 0).any():                # 4. against w
            for name, steps in curves.items():
                for gw in cfg.guidance_scales:
                    p = preds[(name, steps)] if gw == cfg.guidance_scale else np.concatenate(
                        [features(to_classifier(x, in_shape, cfg.classifier_view))[1]
                         for _, x in sampler.images(name, steps, gw)])
                    accuracy(metrics, f"digit_accuracy_w/{name}/{gw:g}", p, row_label)
        sampler.release()
        e2e, den = latency(models, runs, cond, ws, cfg, ctx.seed, shape, device, where)
    finally:                                                                # 5. speed
        torch.set_num_threads(threads)
    for (name, steps), ms in e2e.items():
        metrics[f"ms_per_image/{name}/{steps}"] = ms
        metrics[f"denoiser_ms_per_image/{name}/{steps}"] = den[(name, steps)]
        if name != "teacher":
            metrics[f"speedup/{name}/{steps}"] = e2e[("teacher", ref)] / ms
            metrics[f"denoiser_speedup/{name}/{steps}"] = (den[("teacher", ref)] /
                                                           den[(name, steps)])
    metrics["steps/teacher/reference"] = ref
    grids = {k: torch.cat(v) for k, v in grids.items()}
    figures = {"samples.png": grid_plot(grids, runs, [cond.prompts[prompt_of[r]]   # 6. plots
                                                      for r in grid_rows]),
               "fid_vs_steps.png": fid_plot(metrics, cfg.teacher_steps,
                                            {n: cfg.steps_of(n) for n in students},
                                            ref, list(students), "teacher reference")}
    if any(k.startswith("digit_accuracy_w/") for k in metrics):
        figures["accuracy_vs_w.png"] = w_plot(metrics, curves, cfg.guidance_scales)
    info = {"num_samples": n, "prompts": len(cond), "reference": mode,
            "real_images": pool,
            "row_prompts": len(np.unique(prompt_of)),
            "labelled_rows": int((row_label >= 0).sum()) if row_label is not None else 0,
            "threads": cfg.threads, "device": str(device), "batch_size": cfg.batch_size,
            "teacher_reference_steps": ref, "guidance_scale": cfg.guidance_scale,
            "latent_shape": list(shape), "latency_batch": cfg.latency_batch_size,
            "latency_repeats": cfg.latency_repeats, "pipeline_class": model.pipeline_class}
    report = ctx.write_report("report", metrics, figures=figures, info=info)
    for fig in figures.values():
        pyplot().close(fig)
    return {"report": report}


def reference(data, cond, cfg, seed: int, w):
    """(real images, (A, B), held-out prompt index of each generated row, row labels or
    None, the reference used, |A| + |B| before the cut to n): the module docstring's
    ``reference``."""
    names = set(parquet(data).schema.names)
    mode = cfg.reference if cfg.reference != "auto" else (
        "paired" if "prompt" in names else "test-split")
    if mode == "test-split":
        real = read_split(data, "test", ["x"], w("data"))["x"].astype(np.float32)
        halves = real_halves(len(real), cfg.num_samples, seed)
        prompt_of = np.arange(len(halves[1])) % len(cond)
        labels = prompt_labels(data, cond.prompts)
        return (real, halves, prompt_of, None if labels is None else labels[prompt_of], mode,
                len(real))
    if "prompt" not in names:
        raise bad_value(f"{w('data')} (config reference: paired)", "columns", sorted(names),
                        "a 'prompt' column (or reference: test-split)")
    where = f"{w('data')} (config reference: {cfg.reference})"
    require_columns(data, ["x"], where)
    cols = data.to_numpy(["x", "prompt", *(["label"] if "label" in names else [])],
                         filter=pc.field("prompt").isin(cond.prompts))  # in row order
    pool, need = len(cols["prompt"]), 2 * max(10, cfg.pr_k + 1)
    if pool < need:
        raise bad_value(where, "images whose prompt is a held-out prompt", pool,
                        f"at least {need} (or reference: test-split)")
    half_a, half_b, prompt_of = paired_rows(cols["prompt"], cond.prompts, cfg.num_samples,
                                            seed)
    labels = cols["label"][half_b].astype(np.int64) if "label" in cols else None
    real = np.asarray(cols["x"]).astype(np.float32)
    return real, (half_a, half_b), prompt_of, labels, mode, pool


class Sampler:
    """The evaluation rows of one (model, steps, w), batch by batch, decoded to [0, 1];
    one denoiser in memory at a time, the teacher's VAE throughout."""

    def __init__(self, models, cond, index, noise, cfg, seed, device, where):
        self.models, self.cond, self.index, self.noise = models, cond, index, noise
        self.cfg, self.seed, self.device, self.where = cfg, seed, device, where
        self.vae = models["teacher"].load("vae").eval().to(device)
        self.name, self.net = None, None

    def release(self):
        self.net = self.vae = None

    @torch.inference_mode()
    def images(self, name: str, steps: int, w: float):
        if name != self.name:
            self.net = None
            self.net, self.name = self.models[name].denoiser().to(self.device), name
        gen = torch.Generator().manual_seed(self.seed + 1)  # consistency re-noising
        bs = self.cfg.batch_size
        for a in range(0, len(self.noise), bs):
            cond = self.cond.batch(self.index[a:a + bs])
            z = denoise(self.models[name], self.net, self.noise[a:a + bs], cond, w, steps,
                        self.cfg.sampler, gen, self.where)
            yield a, decode(self.vae, z.to(self.device)).cpu()


def denoise(model, net, noise, cond, w: float, steps: int, sampler: str, gen, where):
    """Final latents: a teacher with ``sampler`` and w, a student with its scheduler."""
    wt = torch.full((len(noise),), float(w), device=next(net.parameters()).device)
    if model.student is not None:
        return sample_student(model, net, noise, cond, wt, steps, gen)
    sched = teacher_scheduler(model, sampler, steps, tuple(noise.shape[1:]), where)
    return sample_teacher(model, net, noise, cond, wt, sched, guidance_mode(model, w != 1.0),
                          keep=[])[0]


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    shift = vae.config.get("shift_factor") or 0.0
    x = vae.decode(z / vae.config.scaling_factor + shift).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


def timed(device, fn, *args, **kwargs) -> float:
    """ms of one call of ``fn`` (the GPU's queue drained before and after)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    fn(*args, **kwargs)
    sync()
    return (time.perf_counter() - start) * 1e3


@torch.inference_mode()
def latency(models, runs, cond, ws, cfg, seed, shape, device, where):
    """(end-to-end, denoiser-only) ms per image of every run: the median of rotated
    rounds on one batch of the held-out prompts (the module docstring)."""
    m = cfg.latency_batch_size
    index = torch.arange(m) % len(cond)
    prompts = [cond.prompts[i] for i in index.tolist()]
    noise, batch = row_noise(seed, EVAL_ROWS + np.arange(m), shape), cond.batch(index)
    f = models["teacher"].vae_scale_factor()
    pipes = {}
    for name, model in models.items():
        pipes[name] = model.pipeline().to(device)
        pipes[name].set_progress_bar_config(disable=True)
        if name == "teacher":
            pipes[name].scheduler = teacher_scheduler(model, cfg.sampler, 1, shape, where)
    e2e, den = {r: [] for r in runs}, {r: [] for r in runs}
    for r in range(cfg.latency_repeats):
        for name, steps in runs[r % len(runs):] + runs[:r % len(runs)]:
            pipe, model, w = pipes[name], models[name], ws[name]
            e2e[(name, steps)].append(timed(
                device, pipe, prompt=prompts, num_inference_steps=steps, guidance_scale=w,
                height=shape[1] * f, width=shape[2] * f, output_type="np",
                generator=torch.Generator().manual_seed(seed)) / m)
            net, gen = getattr(pipe, model.family.denoiser), torch.Generator().manual_seed(seed + 1)
            den[(name, steps)].append(timed(device, denoise, model, net, noise, batch, w, steps,
                                            cfg.sampler, gen, where) / m)
    return ({k: float(np.median(v)) for k, v in e2e.items()},
            {k: float(np.median(v)) for k, v in den.items()})


def grid_plot(grids: dict, runs: list, prompts: list[str]):
    plt = pyplot()
    rows = min(len(v) for v in grids.values())
    fig, axes = plt.subplots(rows, len(runs), figsize=(max(len(runs) * 1.2, 4),
                                                       rows * 1.25 + 0.5), squeeze=False)
    for c, run in enumerate(runs):
        axes[0][c].set_title(f"{run[0]}\n{run[1]} steps", fontsize=7)
        for r in range(rows):
            ax = axes[r][c]
            ax.set(xticks=[], yticks=[])
            ax.imshow(grids[run][r].permute(1, 2, 0).numpy(), vmin=0, vmax=1)
            if c == 0:
                ax.set_ylabel(prompts[r % len(prompts)][:28], fontsize=6)
    fig.suptitle("a row per held-out prompt, the same noise in every column", fontsize=8)
    fig.tight_layout()
    return fig


def w_plot(metrics: dict, curves: dict, guidance_scales):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ws = sorted(set(guidance_scales))
    for name, steps in curves.items():
        ax.plot(ws, [metrics[f"digit_accuracy_w/{name}/{w:g}"] for w in ws], marker="o",
                label=f"{name} ({steps} steps)")
    ax.set(xlabel="guidance scale w", ylabel="digit accuracy (classifier)",
           title="accuracy against guidance")
    ax.legend()
    return fig
