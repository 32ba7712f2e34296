"""``sre2l``: Squeeze, Recover and Relabel (Yin, Xing & Shen 2023, NeurIPS, arXiv
2306.13092), with the curriculum of CDA (Yin & Shen 2024, "Dataset Distillation via
Curriculum Data Synthesis in Large Data Era", arXiv 2311.18838).

1. Squeeze: the input ``teacher``, a classifier trained with batch norm on the real data
   (``fit-classifier`` with ``norm: batch``); its running statistics (mu_l, sigma_l^2) at
   every BN layer l summarise the data.
2. Recover: ``ipc`` images per class, from Gaussian noise, optimised (Adam, betas (0.5,
   0.9), cosine learning rate) so that a random-resized crop A(x) of them is classified as
   its class and its batch statistics at every BN layer match the teacher's:

       L(x) = CE(teacher(A(x)), y)
              + r_bn * sum_l ( ||mu_l(A(x)) - mu_l||_2 + ||sigma_l^2(A(x)) - sigma_l^2||_2 )

   (the first layer's term times ``first_bn_multiplier``, as SRe2L's code). A is a
   differentiable random-resized crop of area fraction in [lower, 1]; with ``curriculum``
   (CDA) the lower bound moves from ``crop_scale[1]`` (easy, whole images) to
   ``crop_scale[0]`` (hard, small crops) over the iterations, linearly or on a cosine;
   without it, it is ``crop_scale[0]`` throughout (SRe2L).
3. Relabel: the teacher's softmax on each recovered image is its ``soft_label``;
   ``evaluate-synthetic`` with the same ``teacher`` wired relabels every augmented view
   while the fresh networks train, as SRe2L evaluates (FKD-style).

Images are recovered in chunks of ``batch_size`` (class-balanced, in class order); a
checkpoint after every chunk and every ``checkpoint_every`` iterations inside one lets a
re-run resume.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Stage, StageConfig
from stages.distill.dd_common import (device, image_grid, load_checkpoint, num_classes_of,
                                      real_split, save_checkpoint, write_synthetic)

CHECKPOINT = "sre2l_checkpoint.pt"
CURRICULA = ("none", "linear", "cosine")


def random_resized_crop(x: torch.Tensor, lower: float, gen: torch.Generator,
                        upper: float = 1.0) -> torch.Tensor:
    """A crop of area fraction in [lower, upper] (aspect ratio in [3/4, 4/3]) at a random
    place of every image, resized back to the image's size; differentiable in ``x``."""
    n = len(x)
    area = lower + (upper - lower) * torch.rand(n, generator=gen)
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * torch.rand(n, generator=gen))
    sw = (area * ratio).sqrt().clamp(max=1.0)
    sh = (area / ratio).sqrt().clamp(max=1.0)
    tx = (1 - sw) * (2 * torch.rand(n, generator=gen) - 1)
    ty = (1 - sh) * (2 * torch.rand(n, generator=gen) - 1)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([sw, zero, tx], 1), torch.stack([zero, sh, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


class BNStatistics:
    """Forward hooks on every batch-norm layer: the distance of the batch's statistics to
    the layer's running ones, summed over the layers of the last forward."""

    def __init__(self, net: torch.nn.Module, first_multiplier: float):
        self.layers = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self.terms = []
        self.hooks = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, args, output):
        h = args[0]
        dims = [0] + list(range(2, h.ndim))
        mean, var = h.mean(dims), h.var(dims, unbiased=False)
        self.terms.append((mean - module.running_mean).norm(2)
                          + (var - module.running_var).norm(2))

    def take(self) -> torch.Tensor:
        total = sum(w * t for w, t in zip(self.weights, self.terms))
        self.terms = []
        return total

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


class SRe2L(Stage):
    kind = "sre2l"
    version = "1"

    class Config(StageConfig):
        ipc: int = Field(1, ge=1)                    # images per class
        iterations: int = Field(1000, ge=1)          # per chunk of images
        lr: float = Field(0.25, gt=0)                # Adam on the images (cosine decay)
        r_bn: float = Field(0.01, ge=0)              # weight of the BN-statistics term
        first_bn_multiplier: float = Field(10.0, ge=0)
        crop_scale: tuple[float, float] = (0.08, 1.0)  # RRC area fraction [lower, upper]
        curriculum: Literal[CURRICULA] = "none"     # CDA: none (SRe2L), linear, cosine
        batch_size: int = Field(100, ge=1)           # images recovered together
        checkpoint_every: int = Field(100, ge=1)

        @model_validator(mode="after")
        def _scale(self):
            lo, hi = self.crop_scale
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"crop_scale needs 0 < lower <= upper <= 1; got {[lo, hi]}")
            return self

        def lower(self, it: int) -> float:
            """The crop scale's lower bound at iteration ``it`` (CDA's curriculum)."""
            hard, easy = self.crop_scale
            frac = it / max(self.iterations - 1, 1)
            if self.curriculum == "linear":
                return easy + (hard - easy) * frac
            if self.curriculum == "cosine":
                return hard + (easy - hard) * 0.5 * (1 + math.cos(math.pi * frac))
            return hard

    inputs = {"teacher": Model, "data": Dataset}
    outputs = {"synthetic": Dataset}

    def run(self, ctx, teacher, data):
        from stages.models.classifiers import load_classifier
        cfg, where = self.config, f"stage '{ctx.name}' ({self.kind})"
        torch.set_num_threads(1)
        net = load_classifier(teacher.path, f"{where} input 'teacher'").to(device())
        net.eval().requires_grad_(False)
        _, y = real_split(data, "train", f"{where} input 'data'")
        num_classes = num_classes_of(data, y)
        shape = list(net.in_shape)
        if len(shape) != 3 or net.num_classes != num_classes:
            raise bad_value(f"{where} input 'teacher'", "classifier (input shape, classes)",
                            [shape, net.num_classes], f"images (channels, height, width) and "
                            f"the {num_classes} classes of input 'data'")
        bn = BNStatistics(net, cfg.first_bn_multiplier)
        if not bn.layers:
            raise bad_value(f"{where} input 'teacher'", "normalisation", "no batch norm",
                            "a classifier with batch norm (fit-classifier norm: batch): "
                            "SRe2L recovers images from its running statistics")
        try:
            xs, metrics = self.recover(ctx, cfg, net, bn, shape, num_classes)
        finally:
            bn.close()
        ys = torch.arange(num_classes).repeat_interleave(cfg.ipc)
        with torch.no_grad():                                               # 3. relabel
            soft = torch.cat([net(xs[i:i + 512].to(device())).softmax(1).cpu()
                              for i in range(0, len(xs), 512)])
        agree = float((soft.argmax(1) == ys).float().mean())
        ctx.log_metrics({"teacher_accuracy_on_synthetic": agree, **metrics})
        ctx.save_figure(image_grid(xs, ys, num_classes, f"SRe2L, ipc {cfg.ipc}"),
                        "synthetic.png")
        info = {"method": "sre2l", "ipc": cfg.ipc, "num_classes": num_classes,
                "curriculum": cfg.curriculum, "teacher_accuracy_on_synthetic": agree}
        return {"synthetic": write_synthetic(ctx, xs, ys, info, soft=soft)}

    def recover(self, ctx, cfg, net, bn, shape, num_classes):
        """2. every chunk of images from noise; (images, last metrics)."""
        dev, total = device(), num_classes * cfg.ipc
        labels = torch.arange(num_classes).repeat_interleave(cfg.ipc)
        state = load_checkpoint(ctx.work_files, CHECKPOINT) or {}
        done = list(state.get("done", torch.zeros(0, *shape)).split(cfg.batch_size))
        done = [d for d in done if len(d)]
        chunks = list(range(0, total, cfg.batch_size))
        metrics = {}
        for k in range(len(done), len(chunks)):
            lo, hi = chunks[k], min(chunks[k] + cfg.batch_size, total)
            y = labels[lo:hi].to(dev)
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + k)
            x = torch.randn(hi - lo, *shape, generator=gen).to(dev).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
            start = 0
            if state.get("chunk") == k:
                with torch.no_grad():
                    x.copy_(state["x"])
                opt.load_state_dict(state["opt"])
                start = state["iteration"]
                gen.set_state(state["gen"])
            for it in range(start, cfg.iterations):
                for group in opt.param_groups:  # cosine decay of the images' learning rate
                    group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
                view = random_resized_crop(x, cfg.lower(it), gen)
                ce = F.cross_entropy(net(view), y)
                stats = bn.take()
                loss = ce + cfg.r_bn * stats
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                metrics = {"ce": ce.item(), "bn_distance": float(stats),
                           "crop_lower": cfg.lower(it)}
                if it % 10 == 0:
                    ctx.log_metrics({**metrics, "loss": loss.item()},
                                    step=k * cfg.iterations + it)
                ctx.progress(k * cfg.iterations + it + 1, len(chunks) * cfg.iterations,
                             "iterations")
                if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < cfg.iterations:
                    save_checkpoint(ctx.work_files, CHECKPOINT, {
                        "done": torch.cat(done) if done else torch.zeros(0, *shape),
                        "chunk": k, "x": x.detach(), "opt": opt.state_dict(),
                        "iteration": it + 1, "gen": gen.get_state()})
            done.append(x.detach().cpu())
            save_checkpoint(ctx.work_files, CHECKPOINT, {"done": torch.cat(done), "chunk": -1})
        return torch.cat(done)[:total], metrics
