"""``load-digits``: scikit-learn's 8x8 handwritten digits (UCI optical recognition of
handwritten digits; Alpaydin & Kaynak 1998), shipped inside the scikit-learn wheel.

1797 images, 10 classes. Pixels (0..16) are scaled to [0, 1] and shaped (1, 8, 8).
Rows keep their scikit-learn index as a stable ``id``; ``split`` is a stratified
train/test split drawn from the stage seed, so the same seed gives the same split.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pipelines.stage import Dataset, Stage, StageConfig
from stages.data.tables import image_dataset


class LoadDigits(Stage):
    kind = "load-digits"
    version = "1"

    class Config(StageConfig):
        test_fraction: float = Field(0.2, gt=0, lt=1)

    outputs = {"data": Dataset}

    def run(self, ctx):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        label = digits.target.astype(np.int64)
        info = {"num_classes": 10, "input_shape": [1, 8, 8]}
        return {"data": image_dataset(ctx, x, label, self.config.test_fraction, info)}
