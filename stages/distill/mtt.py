"""``mtt``: Dataset Distillation by Matching Training Trajectories (Cazenavette et al. 2022,
CVPR, arXiv 2203.11932).

Every iteration draws an expert e and a start epoch t < ``max_start_epoch`` from an
``expert-trajectories`` artifact, streaming only the two vectors theta*_t and
theta*_{t+M} (M = ``expert_epochs``). A student starts at theta*_t and takes N =
``syn_steps`` SGD steps on minibatches of the synthetic set (DSA-augmented if ``augment``),
with the learnable synthetic learning rate alpha = exp(a) (eq. 1 of the paper; learned in
log space so that it stays positive and its step is scale-free), starting, as in the
paper's code, at the experts' own learning rate (``lr_init`` overrides it):

    theta_{n+1} = theta_n - alpha * grad_theta L_CE(A(x_syn), y_syn; theta_n)

The synthetic set starts from ``ipc`` random real images per class, as in the paper, or,
when the optional input ``init`` is wired, from another synthetic set of the same IPC (a
``dm`` or ``herding`` output): MTT then refines it. On digits at IPC 1 that start matters
more than any setting of MTT's own (benchmarks/results/gpu_check.md).

The images and alpha minimise the normalised parameter-matching loss (eq. 2):

    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2

differentiated through the whole unrolled student (``torch.func.functional_call`` on a
flat parameter vector), with SGD + momentum 0.5 on the images (``lr_img``) and on a = log alpha
(``lr_lr``). The learned alpha is ``synthetic_lr`` in the manifest info.

DATM's options (Guo et al. 2024, ICLR, "Towards Lossless Dataset Distillation via
Difficulty-Aligned Trajectory Matching", arXiv 2310.05773):

- the matching window: t is drawn from [``min_start_epoch``, upper), upper moving linearly
  from ``max_start_epoch_from`` (when set) to ``max_start_epoch`` over the iterations, so a
  larger IPC can match later, harder epochs;
- ``soft_labels``: learned label logits L (one row per image) replace the hard labels in
  the student's loss, CE(softmax(L_i), f_theta(A(x_i))), updated with the images (SGD,
  ``lr_label``). L starts from the logits of an expert (expert 0 at epoch
  ``max_start_epoch``) on the initial images, and the initial images are real images that
  expert classifies correctly; a class with fewer than ``ipc`` such images fills up with
  others (``info.soft_init_misclassified`` counts them). The set keeps both its hard labels
  and a ``soft_label`` column, softmax(L).

FTD's EMA (Du et al. 2023, CVPR, arXiv 2211.11004): with ``ema_decay`` the stage writes an
exponential moving average of the images over the iterations instead of the last ones.

Checkpoints of the images, alpha and both optimisers go to ``ctx.work_files`` every
``checkpoint_every`` iterations; a re-run resumes there. A non-finite loss or a
non-finite alpha (or one above ``max_lr``) stops the run with a ``FloatingPointError`` that names the
iteration; the last good checkpoint is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Stage
from stages.distill.dd_common import (NetConfig, build_net, dataset_key, device, dsa,
                                      functional_forward, image_grid, load_checkpoint,
                                      read_synthetic, real_init, save_checkpoint, train_set,
                                      write_synthetic)
from stages.distill.experts import ExpertReader

CHECKPOINT = "mtt_checkpoint.pt"


class MatchTrajectories(Stage):
    kind = "mtt"
    version = "1"  # unchanged by input ``init`` and by DATM's / FTD's options at their
    #                defaults: without them the stage computes what it did

    class Config(NetConfig):
        # added after artifacts existed: at their defaults, left out of the key
        added = ('min_start_epoch', 'max_start_epoch_from', 'soft_labels', 'lr_label',
                 'ema_decay')
        ipc: int = Field(1, ge=1)                    # images per class
        iterations: int = Field(300, ge=1)
        syn_steps: int = Field(20, ge=1)             # N student steps
        expert_epochs: int = Field(2, ge=1)          # M expert epochs to match
        max_start_epoch: int = Field(10, ge=1)       # t is drawn from [min, upper)
        min_start_epoch: int = Field(0, ge=0)        # DATM: the window's lower bound
        max_start_epoch_from: int | None = Field(None, ge=1)  # DATM: upper's first value
        soft_labels: bool = False                    # DATM: learned soft labels
        lr_label: float = Field(2.0, gt=0)           # SGD (momentum 0.5) on label logits
        ema_decay: float | None = Field(None, gt=0, lt=1)  # FTD: EMA of the images
        batch_syn: int | None = Field(None, ge=1)    # student minibatch; None = whole set
        lr_img: float = Field(100.0, gt=0)
        lr_lr: float = Field(1e-3, gt=0)           # on log alpha
        lr_init: float | None = Field(None, gt=0)    # initial alpha; None: the experts' lr
        max_lr: float = Field(10.0, gt=0)            # alpha above this counts as diverged
        momentum: float = Field(0.5, ge=0, lt=1)
        augment: bool = True                         # DSA on the student's minibatches
        checkpoint_every: int = Field(25, ge=1)

        @model_validator(mode="after")
        def _window(self):
            upper = self.max_start_epoch_from or self.max_start_epoch
            if not self.min_start_epoch < upper <= self.max_start_epoch:
                raise ValueError(f"the matching window needs min_start_epoch < "
                                 f"max_start_epoch_from <= max_start_epoch; got "
                                 f"{self.min_start_epoch}, {self.max_start_epoch_from}, "
                                 f"{self.max_start_epoch}")
            return self

        def upper(self, it: int) -> int:
            """DATM's moving upper bound of the start epoch at iteration ``it``."""
            if self.max_start_epoch_from is None:
                return self.max_start_epoch
            frac = it / max(self.iterations - 1, 1)
            return round(self.max_start_epoch_from
                         + (self.max_start_epoch - self.max_start_epoch_from) * frac)

    inputs = {"experts": Dataset, "data": Dataset}
    optional_inputs = {"init": Dataset}   # a synthetic set to start from (dm, herding)
    outputs = {"synthetic": Dataset}

    def run(self, ctx, experts, data, init=None):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        torch.set_num_threads(1)
        x, y, num_classes, arch = train_set(data, cfg.ipc, where, cfg)
        reader = ExpertReader(experts, where, arch, dataset_key(data, f"{where} input 'data'"))
        if cfg.max_start_epoch + cfg.expert_epochs > reader.epochs:
            raise bad_value(f"{where} config", "max_start_epoch + expert_epochs",
                            cfg.max_start_epoch + cfg.expert_epochs,
                            f"at most the {reader.epochs} epochs recorded by input 'experts'")

        # 1. synthetic images (real ones, or input 'init'), alpha, optimisers; or the last
        #    checkpoint
        dev = device()  # the GPU when the stage was given one (resources.num_gpus)
        net = build_net(arch).to(dev)  # the module whose parameters functional_forward replaces
        missed, label_logits = 0, None
        judge = reader.load(0, cfg.max_start_epoch).to(dev) if cfg.soft_labels else None
        if init is not None:
            xs, ys = self._start_from(init, x, num_classes, f"{where} input 'init'")
        elif cfg.soft_labels:  # DATM: images the expert gets right, its logits as labels
            xs, ys, missed = correct_init(net, judge, x, y, cfg.ipc, num_classes, ctx.seed)
        else:
            xs, ys = real_init(x, y, cfg.ipc, num_classes, ctx.seed)
        if cfg.soft_labels:
            with torch.no_grad():
                label_logits = functional_forward(net, judge, xs.to(dev)).detach()
            label_logits.requires_grad_(True)
        xs, ys = xs.to(dev).requires_grad_(True), ys.to(dev)
        ema = xs.detach().clone() if cfg.ema_decay else None
        lr_init = cfg.lr_init or reader.lr  # alpha starts where the experts' SGD was
        log_lr = torch.tensor(math.log(lr_init), device=dev, requires_grad=True)
        opt_img = torch.optim.SGD([xs], lr=cfg.lr_img, momentum=cfg.momentum)
        opt_lr = torch.optim.SGD([log_lr], lr=cfg.lr_lr, momentum=cfg.momentum)
        opt_label = (torch.optim.SGD([label_logits], lr=cfg.lr_label, momentum=cfg.momentum)
                     if label_logits is not None else None)
        start, state = 0, load_checkpoint(ctx.work_files, CHECKPOINT)
        if state is not None:
            with torch.no_grad():
                xs.copy_(state["x"])
                log_lr.copy_(state["syn_lr"].log())
            opt_img.load_state_dict(state["opt_img"])
            opt_lr.load_state_dict(state["opt_lr"])
            if opt_label is not None:
                with torch.no_grad():
                    label_logits.copy_(state["labels"])
                opt_label.load_state_dict(state["opt_label"])
            if ema is not None:
                ema = state["ema"].to(dev)
            for opt, lr in ((opt_img, cfg.lr_img), (opt_lr, cfg.lr_lr), (opt_label, cfg.lr_label)):
                if opt is not None:
                    opt.param_groups[0]["lr"] = lr  # the config's, not the checkpoint's
            start = state["iteration"]
        syn_lr = log_lr.detach().exp()
        gen = torch.Generator()
        batch = cfg.batch_syn or len(xs)

        for it in range(start, cfg.iterations):
            # 2. an expert segment theta*_t -> theta*_{t+M}: two rows streamed from parquet
            gen.manual_seed(ctx.seed * 1_000_003 + it)
            e = int(torch.randint(reader.num_experts, (1,), generator=gen))
            t = int(torch.randint(cfg.min_start_epoch, cfg.upper(it), (1,), generator=gen))
            theta_start = reader.load(e, t).to(dev)
            theta_target = reader.load(e, t + cfg.expert_epochs).to(dev)

            # 3. unroll N student steps on the synthetic set
            theta = theta_start.clone().requires_grad_(True)
            syn_lr = log_lr.exp()
            targets = ys if label_logits is None else label_logits.softmax(1)
            for n in range(cfg.syn_steps):
                idx = torch.randperm(len(xs), generator=gen)[:batch]
                xb = xs[idx]
                if cfg.augment:
                    xb = dsa(xb, int(torch.randint(2**62, (1,), generator=gen)))
                ce = F.cross_entropy(functional_forward(net, theta, xb), targets[idx])
                grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
                theta = theta - syn_lr * grad

            # 4. normalised matching loss, one step on the images and on alpha
            loss = ((theta - theta_target) ** 2).sum() / ((theta_start - theta_target) ** 2).sum()
            if not math.isfinite(loss.item()):
                self._diverged(ctx, where, it, f"the matching loss is {loss.item()}", syn_lr)
            opt_img.zero_grad(set_to_none=True)
            opt_lr.zero_grad(set_to_none=True)
            if opt_label is not None:
                opt_label.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            opt_lr.step()
            if opt_label is not None:
                opt_label.step()
            if ema is not None:
                ema.mul_(cfg.ema_decay).add_(xs.detach(), alpha=1 - cfg.ema_decay)
            syn_lr = log_lr.detach().exp()
            if not (math.isfinite(syn_lr.item()) and syn_lr.item() <= cfg.max_lr):
                self._diverged(ctx, where, it, f"the synthetic learning rate became "
                               f"{syn_lr.item()} (max_lr {cfg.max_lr})", syn_lr)
            if it % 10 == 0:
                ctx.log_metrics({"mtt_loss": loss.item(), "synthetic_lr": syn_lr.item()}, step=it)
            ctx.progress(it + 1, cfg.iterations, "iterations")
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                extra = {"labels": label_logits.detach(), "opt_label": opt_label.state_dict()
                         } if opt_label is not None else {}
                save_checkpoint(ctx.work_files, CHECKPOINT, {
                    "x": xs.detach(), "syn_lr": syn_lr, "iteration": it + 1,
                    "opt_img": opt_img.state_dict(), "opt_lr": opt_lr.state_dict(), **extra,
                    **({"ema": ema} if ema is not None else {})})

        xs, ys = (ema if ema is not None else xs).detach().cpu(), ys.cpu()
        soft = label_logits.detach().softmax(1).cpu() if label_logits is not None else None
        ctx.save_figure(image_grid(xs, ys, num_classes, f"MTT, ipc {cfg.ipc}"), "synthetic.png")
        info = {"method": "mtt", "ipc": cfg.ipc, "num_classes": num_classes, "arch": arch,
                "synthetic_lr": float(syn_lr.item()), "iterations": cfg.iterations,
                "resumed_from": start, "expert_rows_read": reader.rows_read,
                "init": "real" if init is None else init.info.get("method", "synthetic")}
        if cfg.soft_labels:
            info["soft_init_misclassified"] = missed
            ctx.log_metrics({"soft_init_misclassified": missed})
        return {"synthetic": write_synthetic(ctx, xs, ys, info, soft=soft)}

    def _start_from(self, init: Dataset, x: torch.Tensor, num_classes: int, where: str):
        """The images and labels of a synthetic set with this stage's IPC, classes and
        image shape, in class order."""
        xs, ys = read_synthetic(init, where)
        if tuple(xs.shape[1:]) != tuple(x.shape[1:]):
            raise bad_value(where, "image shape", list(xs.shape[1:]),
                            f"{list(x.shape[1:])}, the shape of input 'data'")
        counts = torch.bincount(ys, minlength=num_classes).tolist()
        if len(counts) != num_classes or set(counts) != {self.config.ipc}:
            raise bad_value(where, "images per class", counts,
                            f"{self.config.ipc} for each of the {num_classes} classes "
                            f"(this stage's ipc)")
        order = torch.argsort(ys, stable=True)
        return xs[order].clone(), ys[order].clone()

    def _diverged(self, ctx, where, it, what, syn_lr):
        raise FloatingPointError(
            f"{where}: diverged at iteration {it}: {what} (synthetic lr {syn_lr.item():.4g}); "
            f"lower lr_init ({self.config.lr_init or 'unset: the experts lr'}), lr_lr "
            f"({self.config.lr_lr}) or lr_img ({self.config.lr_img}); the last checkpoint is "
            f"kept in {ctx.work_uri}")


@torch.no_grad()
def correct_init(net, theta, x, y, ipc: int, num_classes: int, seed: int):
    """DATM's initialisation: per class, ``ipc`` random real images the network (flat
    parameters ``theta``) classifies correctly, filled up with others when a class has too
    few; (images, labels, how many were filled up)."""
    gen = torch.Generator().manual_seed(seed)
    dev = theta.device
    picked, missed = [], 0
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        pred = torch.cat([functional_forward(net, theta, x[idx[k:k + 512]].to(dev)).argmax(1)
                          .cpu() for k in range(0, len(idx), 512)])
        right, wrong = idx[pred == c], idx[pred != c]
        picked.append(torch.cat([right, wrong])[:ipc])
        missed += max(0, ipc - len(right))
    idx = torch.cat(picked)
    return x[idx].clone(), y[idx].clone(), missed
