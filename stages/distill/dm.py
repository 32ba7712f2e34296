"""``dm``: Dataset Condensation with Distribution Matching (Zhao & Bilen 2023, WACV,
arXiv 2110.04181). The synthetic images S_c of every class c are learned so that their mean
embedding matches that of the real images T_c under randomly initialised networks:

    L(S) = E_{psi ~ P_psi, omega ~ Omega} sum_c || mean_{x in T_c} psi(A(x, omega))
                                                 - mean_{s in S_c} psi(A(s, omega)) ||^2

psi is the feature extractor of a freshly initialised ConvNet at every iteration (never
trained), A a differentiable siamese augmentation with the same parameters omega for the
real and synthetic batch of a class (DSA), T_c a random real batch of ``batch_real``
images. S is initialised from real images and updated with SGD (lr ``lr_img``, momentum
0.5 as in the paper). Checkpoints go to ``ctx.work_files`` every ``checkpoint_every``
iterations; a re-run resumes from the last one.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from pipelines.stage import Dataset, Stage
from stages.distill.dd_common import (NetConfig, build_net, device, dsa, image_grid,
                                      load_checkpoint, real_init, save_checkpoint, train_set,
                                      write_synthetic)

CHECKPOINT = "dm_checkpoint.pt"


class DistributionMatching(Stage):
    kind = "dm"
    version = "1"

    class Config(NetConfig):
        ipc: int = Field(1, ge=1)                    # images per class
        iterations: int = Field(1000, ge=1)
        lr_img: float = Field(1.0, gt=0)
        momentum: float = Field(0.5, ge=0, lt=1)
        batch_real: int = Field(256, ge=1)           # real images per class per iteration
        augment: bool = True                         # DSA
        checkpoint_every: int = Field(100, ge=1)

    inputs = {"data": Dataset}
    outputs = {"synthetic": Dataset}

    def run(self, ctx, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        torch.set_num_threads(1)
        x, y, num_classes, arch = train_set(data, cfg.ipc, where, cfg)
        dev = device()  # the GPU when the stage was given one (resources.num_gpus)
        by_class = [x[y == c].to(dev) for c in range(num_classes)]

        # 1. synthetic set: real images, or the last checkpoint
        xs, ys = real_init(x, y, cfg.ipc, num_classes, ctx.seed)
        xs = xs.to(dev).requires_grad_(True)
        opt = torch.optim.SGD([xs], lr=cfg.lr_img, momentum=cfg.momentum)
        start, state = 0, load_checkpoint(ctx.work_files, CHECKPOINT)
        if state is not None:
            with torch.no_grad():
                xs.copy_(state["x"])
            opt.load_state_dict(state["opt"])
            opt.param_groups[0]["lr"] = cfg.lr_img  # the config's, not the checkpoint's
            start = state["iteration"]
        gen = torch.Generator()

        for it in range(start, cfg.iterations):
            # 2. a fresh random embedding network psi, frozen
            net = build_net(arch, seed=ctx.seed * 1_000_003 + it).to(dev)
            net.requires_grad_(False)
            gen.manual_seed(ctx.seed * 1_000_003 + it)
            loss = 0.0
            for c in range(num_classes):
                # 3. per class: same augmentation for the real and the synthetic batch
                real = by_class[c][torch.randperm(len(by_class[c]), generator=gen)[:cfg.batch_real]]
                syn = xs[c * cfg.ipc:(c + 1) * cfg.ipc]
                if cfg.augment:
                    aug_seed = int(torch.randint(2**62, (1,), generator=gen))
                    real = dsa(real, aug_seed, per_sample=False)
                    syn = dsa(syn, aug_seed, per_sample=False)
                with torch.no_grad():
                    mu_real = net.features(real).flatten(1).mean(0)
                mu_syn = net.features(syn).flatten(1).mean(0)
                loss = loss + ((mu_real - mu_syn) ** 2).sum()
            # 4. one SGD step on the images
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"{where}: the DM loss diverged ({loss.item()}) at iteration {it}; lower "
                    f"lr_img ({cfg.lr_img}); the last checkpoint is kept in {ctx.work_uri}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % 10 == 0:
                ctx.log_metrics({"dm_loss": loss.item()}, step=it)
            ctx.progress(it + 1, cfg.iterations, "iterations")
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                save_checkpoint(ctx.work_files, CHECKPOINT,
                                {"x": xs.detach(), "opt": opt.state_dict(), "iteration": it + 1})

        xs = xs.detach().cpu()
        ctx.save_figure(image_grid(xs, ys, num_classes, f"DM, ipc {cfg.ipc}"), "synthetic.png")
        info = {"method": "dm", "ipc": cfg.ipc, "num_classes": num_classes, "arch": arch,
                "iterations": cfg.iterations, "resumed_from": start}
        return {"synthetic": write_synthetic(ctx, xs, ys, info)}
