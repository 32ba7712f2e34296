"""The loop shared by the distribution-matching family (``dm``, ``datadam``): synthetic
images learned against a fresh, frozen, randomly initialised ConvNet per iteration, class by
class, with the same differentiable siamese augmentation for a class's real batch and its
synthetic images. The method gives only the per-class loss."""

from __future__ import annotations

import math
from typing import Callable

import torch
from pydantic import Field

from stages.distill.dd_common import (NetConfig, build_net, device, dsa, image_grid,
                                      load_checkpoint, real_init, save_checkpoint, train_set,
                                      write_synthetic)

# (net, real batch, synthetic images of the class) -> (loss, {metric: value})
ClassLoss = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, dict[str, float]]]


class MatchingConfig(NetConfig):
    """The fields every method of the family has (its own add to them)."""

    ipc: int = Field(1, ge=1)                    # images per class
    iterations: int = Field(1000, ge=1)
    lr_img: float = Field(1.0, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)
    batch_real: int = Field(256, ge=1)           # real images per class per iteration
    augment: bool = True                         # DSA
    checkpoint_every: int = Field(100, ge=1)


def match_images(ctx, cfg, data, method: str, title: str, class_loss: ClassLoss,
                 checkpoint: str):
    """The synthetic set of ``cfg.ipc`` images per class (``cfg``: ``ipc``,
    ``iterations``, ``lr_img``, ``momentum``, ``batch_real``, ``augment``,
    ``checkpoint_every`` and the ConvNet's fields), written as the stage's ``synthetic``
    output:

    1. the synthetic set starts from real images (or the last checkpoint, a resumed run);
    2. every iteration builds a fresh random network, frozen;
    3. per class, a random real batch and the class's synthetic images, both through the
       same augmentation, give ``class_loss``;
    4. one SGD step on the images with the sum over classes.
    """
    where = f"stage '{ctx.name}' ({method})"
    torch.set_num_threads(1)
    x, y, num_classes, arch = train_set(data, cfg.ipc, where, cfg)
    dev = device()  # the GPU when the stage was given one (resources.num_gpus)
    by_class = [x[y == c].to(dev) for c in range(num_classes)]

    xs, ys = real_init(x, y, cfg.ipc, num_classes, ctx.seed)                       # 1.
    xs = xs.to(dev).requires_grad_(True)
    opt = torch.optim.SGD([xs], lr=cfg.lr_img, momentum=cfg.momentum)
    start, state = 0, load_checkpoint(ctx.work_files, checkpoint)
    if state is not None:
        with torch.no_grad():
            xs.copy_(state["x"])
        opt.load_state_dict(state["opt"])
        opt.param_groups[0]["lr"] = cfg.lr_img  # the config's, not the checkpoint's
        start = state["iteration"]
    gen = torch.Generator()

    for it in range(start, cfg.iterations):
        net = build_net(arch, seed=ctx.seed * 1_000_003 + it).to(dev)             # 2.
        net.requires_grad_(False)
        gen.manual_seed(ctx.seed * 1_000_003 + it)
        loss, metrics = 0.0, {}
        for c in range(num_classes):                                                # 3.
            real = by_class[c][torch.randperm(len(by_class[c]), generator=gen)[:cfg.batch_real]]
            syn = xs[c * cfg.ipc:(c + 1) * cfg.ipc]
            if cfg.augment:
                aug_seed = int(torch.randint(2**62, (1,), generator=gen))
                real = dsa(real, aug_seed, per_sample=False)
                syn = dsa(syn, aug_seed, per_sample=False)
            class_value, parts = class_loss(net, real, syn)
            loss = loss + class_value
            for k, v in parts.items():
                metrics[k] = metrics.get(k, 0.0) + v
        if not math.isfinite(loss.item()):                                          # 4.
            raise FloatingPointError(
                f"{where}: the {method} loss diverged ({loss.item()}) at iteration {it}; "
                f"lower lr_img ({cfg.lr_img}); the last checkpoint is kept in {ctx.work_uri}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 10 == 0:
            ctx.log_metrics({f"{method}_loss": loss.item(), **metrics}, step=it)
        ctx.progress(it + 1, cfg.iterations, "iterations")
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            save_checkpoint(ctx.work_files, checkpoint,
                            {"x": xs.detach(), "opt": opt.state_dict(), "iteration": it + 1})

    xs = xs.detach().cpu()
    ctx.save_figure(image_grid(xs, ys, num_classes, f"{title}, ipc {cfg.ipc}"), "synthetic.png")
    info = {"method": method, "ipc": cfg.ipc, "num_classes": num_classes, "arch": arch,
            "iterations": cfg.iterations, "resumed_from": start}
    return write_synthetic(ctx, xs, ys, info)
