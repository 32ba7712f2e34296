"""``herding``: the herding coreset baseline of dataset distillation (Welling 2009, "Herding
dynamical weights to learn"; as used by Rebuffi et al. 2017, iCaRL, and the DC benchmark,
Cui et al. 2022). Per class c, real images are chosen greedily so that the running mean of
their embeddings stays closest to the class mean mu_c:

    s_k = argmin_{i not chosen} || mu_c - (phi(x_i) + sum_{j<k} phi(x_{s_j})) / k ||

phi is the feature extractor of a trained expert: the ConvNet of ``expert-trajectories``
(expert ``expert``, its last recorded epoch), streamed as one parquet row. The output is a
synthetic-set artifact of real images, like ``random-subset``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Stage
from stages.distill.dd_common import (NetConfig, build_net, dataset_key, functional_forward,
                                      image_grid, train_set, write_synthetic)
from stages.distill.experts import ExpertReader


def herd(features: torch.Tensor, k: int) -> list[int]:
    """Indices of ``k`` rows of ``features`` chosen by herding."""
    mu, chosen, total = features.mean(0), [], torch.zeros_like(features[0])
    for step in range(1, k + 1):
        dist = ((mu - (total + features) / step) ** 2).sum(1)
        dist[chosen] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        total += features[i]
    return chosen


class Herding(Stage):
    kind = "herding"
    version = "1"

    class Config(NetConfig):
        ipc: int = Field(1, ge=1)   # images per class
        expert: int = Field(0, ge=0)  # whose final parameters embed the images

    inputs = {"experts": Dataset, "data": Dataset}
    outputs = {"synthetic": Dataset}

    def run(self, ctx, experts, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        x, y, num_classes, arch = train_set(data, cfg.ipc, where, cfg)
        reader = ExpertReader(experts, where, arch, dataset_key(data, f"{where} input 'data'"))
        if cfg.expert >= reader.num_experts:
            raise bad_value(f"{where} config", "expert", cfg.expert,
                            f"an index below {reader.num_experts}, the experts of input 'experts'")
        theta = reader.load(cfg.expert, reader.epochs)
        with torch.no_grad():
            feats = functional_forward(build_net(arch), theta, x, features=True)
        idx = torch.cat([torch.nonzero(y == c).flatten()[herd(feats[y == c], cfg.ipc)]
                         for c in range(num_classes)])
        xs, ys = x[idx], y[idx]
        ctx.save_figure(image_grid(xs, ys, num_classes, f"herding, ipc {cfg.ipc}"), "synthetic.png")
        info = {"method": "herding", "ipc": cfg.ipc, "num_classes": num_classes, "arch": arch}
        return {"synthetic": write_synthetic(ctx, xs, ys, info)}
