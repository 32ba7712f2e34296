"""The ``expert-trajectories`` artifact's files: one parquet file per expert, one row group
per recorded epoch (``epoch``, the flat ``params``), read one (expert, epoch) at a time by
the trajectory-matching stages."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.stage import Dataset
from stages.distill.dd_common import check_experts


def shard_name(expert: int) -> str:
    return f"expert-{expert:05d}.parquet"


class ExpertReader:
    """Streams single (expert, epoch) parameter vectors from an ``expert-trajectories``
    artifact: one parquet row group per read, nothing else is loaded."""

    def __init__(self, experts: Dataset, where: str, arch: dict | None = None,
                 key: str | None = None):
        if arch is not None:
            check_experts(experts, arch, key, where)
        self.path = experts.path
        self.num_experts = int(experts.info["experts"])
        self.epochs = int(experts.info["epochs"])
        self.lr = float(experts.info["lr"])  # the experts' SGD learning rate
        self.rows_read = 0

    def load(self, expert: int, epoch: int) -> torch.Tensor:
        f = pq.ParquetFile(os.path.join(self.path, shard_name(expert)))
        group = f.read_row_group(epoch, columns=["epoch", "params"])
        assert group.column("epoch")[0].as_py() == epoch, (expert, epoch)
        self.rows_read += 1
        flat = group.column("params").combine_chunks().flatten().to_numpy()
        return torch.from_numpy(flat.astype(np.float32))
