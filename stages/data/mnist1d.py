"""``load-mnist1d``: MNIST-1D (Greydanus 2020, "Scaling down deep learning",
arXiv 2011.14439), a procedurally generated 1-D analogue of MNIST: each of the 10 digits is
a 12-point template that is padded, translated, scaled, sheared and noised into a length-40
signal.

The data are generated locally with ``mnist1d.data.make_dataset(args)`` from the package's
``get_dataset_args()`` with ``args.seed = ctx.seed`` (never ``get_dataset``, which
downloads). ``num_samples // 10`` examples per class (5000 rows by default), standardised
by the package to mean 0 / std 1 and shaped channels-first (1, 40). ``id`` is the row's
index in the generated set (train rows then test rows), which does not depend on
``test_fraction``; ``split``: the package's own split, the first ``1 - test_fraction`` of
the (shuffled) rows are ``train``, the rest ``test``. Same seed, same data.
"""

from __future__ import annotations

import random

import numpy as np
from pydantic import Field

from pipelines.stage import Dataset, Stage, StageConfig


def generate(num_samples: int, train_split: float, seed: int) -> dict:
    """``make_dataset`` with the package defaults but these three fields. It seeds the
    global ``random`` / ``numpy`` generators, so their state is restored afterwards."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        return make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class LoadMNIST1D(Stage):
    kind = "load-mnist1d"
    version = "1"

    class Config(StageConfig):
        num_samples: int = Field(5000, ge=20)  # rows: num_samples // 10 per class
        test_fraction: float = Field(0.2, gt=0, lt=1)  # the package's 1 - train_split

    outputs = {"data": Dataset}

    def run(self, ctx):
        cfg = self.config
        raw = generate(cfg.num_samples, 1 - cfg.test_fraction, ctx.seed)
        x = np.concatenate([raw["x"], raw["x_test"]]).astype(np.float32)[:, None, :]
        label = np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)
        ids = np.arange(len(label), dtype=np.int64)
        split = np.where(ids < len(raw["y"]), "train", "test").astype(str)
        columns = {"id": ids, "x": x, "label": label, "split": split}
        info = {"num_classes": 10, "input_shape": [1, int(x.shape[-1])]}
        ctx.progress(len(ids), len(ids), "rows", force=True)
        return {"data": ctx.write_dataset("data", columns, info=info)}
