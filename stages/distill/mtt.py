"""``mtt``: Dataset Distillation by Matching Training Trajectories (Cazenavette et al. 2022,
CVPR, arXiv 2203.11932).

Every iteration draws an expert e and a start epoch t < ``max_start_epoch`` from an
``expert-trajectories`` artifact, streaming only the two vectors theta*_t and
theta*_{t+M} (M = ``expert_epochs``). A student starts at theta*_t and takes N =
``syn_steps`` SGD steps on minibatches of the synthetic set (DSA-augmented if ``augment``),
with the learnable synthetic learning rate alpha = exp(a) (eq. 1 of the paper; learned in
log space so that it stays positive and its step is scale-free):

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

Checkpoints of the images, alpha and both optimisers go to ``ctx.work_files`` every
``checkpoint_every`` iterations; a re-run resumes there. A non-finite loss or a
non-finite alpha (or one above ``max_lr``) stops the run with a ``FloatingPointError`` that names the
iteration; the last good checkpoint is kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

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
    version = "1"  # unchanged by input ``init``: without it the stage computes what it did

    class Config(NetConfig):
        ipc: int = Field(1, ge=1)                    # images per class
        iterations: int = Field(300, ge=1)
        syn_steps: int = Field(20, ge=1)             # N student steps
        expert_epochs: int = Field(2, ge=1)          # M expert epochs to match
        max_start_epoch: int = Field(10, ge=1)       # t is drawn from [0, max_start_epoch)
        batch_syn: int | None = Field(None, ge=1)    # student minibatch; None = whole set
        lr_img: float = Field(100.0, gt=0)
        lr_lr: float = Field(1e-3, gt=0)           # on log alpha
        lr_init: float = Field(0.01, gt=0)           # initial synthetic learning rate alpha
        max_lr: float = Field(10.0, gt=0)            # alpha above this counts as diverged
        momentum: float = Field(0.5, ge=0, lt=1)
        augment: bool = True                         # DSA on the student's minibatches
        checkpoint_every: int = Field(25, ge=1)

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
        if init is None:
            xs, ys = real_init(x, y, cfg.ipc, num_classes, ctx.seed)
        else:
            xs, ys = self._start_from(init, x, num_classes, f"{where} input 'init'")
        xs, ys = xs.to(dev).requires_grad_(True), ys.to(dev)
        log_lr = torch.tensor(math.log(cfg.lr_init), device=dev, requires_grad=True)
        opt_img = torch.optim.SGD([xs], lr=cfg.lr_img, momentum=cfg.momentum)
        opt_lr = torch.optim.SGD([log_lr], lr=cfg.lr_lr, momentum=cfg.momentum)
        start, state = 0, load_checkpoint(ctx.work_files, CHECKPOINT)
        if state is not None:
            with torch.no_grad():
                xs.copy_(state["x"])
                log_lr.copy_(state["syn_lr"].log())
            opt_img.load_state_dict(state["opt_img"])
            opt_lr.load_state_dict(state["opt_lr"])
            for opt, lr in ((opt_img, cfg.lr_img), (opt_lr, cfg.lr_lr)):
                opt.param_groups[0]["lr"] = lr  # the config's, not the checkpoint's
            start = state["iteration"]
        syn_lr = log_lr.detach().exp()
        net = build_net(arch).to(dev)  # the module whose parameters functional_forward replaces
        gen = torch.Generator()
        batch = cfg.batch_syn or len(xs)

        for it in range(start, cfg.iterations):
            # 2. an expert segment theta*_t -> theta*_{t+M}: two rows streamed from parquet
            gen.manual_seed(ctx.seed * 1_000_003 + it)
            e = int(torch.randint(reader.num_experts, (1,), generator=gen))
            t = int(torch.randint(cfg.max_start_epoch, (1,), generator=gen))
            theta_start = reader.load(e, t).to(dev)
            theta_target = reader.load(e, t + cfg.expert_epochs).to(dev)

            # 3. unroll N student steps on the synthetic set
            theta = theta_start.clone().requires_grad_(True)
            syn_lr = log_lr.exp()
            for n in range(cfg.syn_steps):
                idx = torch.randperm(len(xs), generator=gen)[:batch]
                xb = xs[idx]
                if cfg.augment:
                    xb = dsa(xb, int(torch.randint(2**62, (1,), generator=gen)))
                ce = F.cross_entropy(functional_forward(net, theta, xb), ys[idx])
                grad = torch.autograd.grad(ce, theta, create_graph=True)[0]
                theta = theta - syn_lr * grad

            # 4. normalised matching loss, one step on the images and on alpha
            loss = ((theta - theta_target) ** 2).sum() / ((theta_start - theta_target) ** 2).sum()
            if not math.isfinite(loss.item()):
                self._diverged(ctx, where, it, f"the matching loss is {loss.item()}", syn_lr)
            opt_img.zero_grad(set_to_none=True)
            opt_lr.zero_grad(set_to_none=True)
            loss.backward()
            opt_img.step()
            opt_lr.step()
            syn_lr = log_lr.detach().exp()
            if not (math.isfinite(syn_lr.item()) and syn_lr.item() <= cfg.max_lr):
                self._diverged(ctx, where, it, f"the synthetic learning rate became "
                               f"{syn_lr.item()} (max_lr {cfg.max_lr})", syn_lr)
            if it % 10 == 0:
                ctx.log_metrics({"mtt_loss": loss.item(), "synthetic_lr": syn_lr.item()}, step=it)
            ctx.progress(it + 1, cfg.iterations, "iterations")
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                save_checkpoint(ctx.work_files, CHECKPOINT, {
                    "x": xs.detach(), "syn_lr": syn_lr, "iteration": it + 1,
                    "opt_img": opt_img.state_dict(), "opt_lr": opt_lr.state_dict()})

        xs, ys = xs.detach().cpu(), ys.cpu()
        ctx.save_figure(image_grid(xs, ys, num_classes, f"MTT, ipc {cfg.ipc}"), "synthetic.png")
        info = {"method": "mtt", "ipc": cfg.ipc, "num_classes": num_classes, "arch": arch,
                "synthetic_lr": float(syn_lr.item()), "iterations": cfg.iterations,
                "resumed_from": start, "expert_rows_read": reader.rows_read,
                "init": "real" if init is None else init.info.get("method", "synthetic")}
        return {"synthetic": write_synthetic(ctx, xs, ys, info)}

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
            f"lower lr_init ({self.config.lr_init}), lr_lr ({self.config.lr_lr}) or lr_img "
            f"({self.config.lr_img}); the last checkpoint is kept in {ctx.work_uri}")
