"""``random-subset``: the baseline every dataset-distillation method must beat (Wang et al.
2018; DD-Ranking, Li et al. 2025): ``ipc`` real training images per class drawn uniformly
at random (from the stage seed), written as a synthetic-set artifact like the learned ones.
"""

from __future__ import annotations

from pydantic import Field

from pipelines.stage import Dataset, Stage, StageConfig
from stages.distill.dd_common import image_grid, real_init, train_set, write_synthetic


class RandomSubset(Stage):
    kind = "random-subset"
    version = "1"

    class Config(StageConfig):
        ipc: int = Field(1, ge=1)  # images per class

    inputs = {"data": Dataset}
    outputs = {"synthetic": Dataset}

    def run(self, ctx, data):
        where = f"stage '{ctx.name}' ({self.kind})"
        x, y, num_classes, _ = train_set(data, self.config.ipc, where)
        xs, ys = real_init(x, y, self.config.ipc, num_classes, ctx.seed)
        ctx.save_figure(image_grid(xs, ys, num_classes, f"random subset, ipc {self.config.ipc}"),
                        "synthetic.png")
        info = {"method": "random", "ipc": self.config.ipc, "num_classes": num_classes}
        return {"synthetic": write_synthetic(ctx, xs, ys, info)}
