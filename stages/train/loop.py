"""The training loop shared by every stage that fits a classifier (in-process or on a Ray
Train worker): one epoch of minibatch steps with a non-finite-loss check; and a Ray Train
worker's shard held in memory, fully shuffled every epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from pydantic import Field

from pipelines.artifacts import parquet_dataset
from pipelines.stage import StageConfig


class OptimConfig(StageConfig):
    """Optimiser fields shared by training stages (AdamW)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def train_epoch(model: torch.nn.Module, batches: Iterable, opt: torch.optim.Optimizer,
                loss_fn: Callable, epoch: int) -> dict[str, float]:
    """One pass over ``batches``; ``loss_fn(model, batch) -> (loss, logits, labels)``.
    Returns the mean loss and the training accuracy (no accuracy when ``logits`` is None;
    ``labels`` then only counts the examples); a NaN/inf loss raises
    ``FloatingPointError`` naming the epoch and the step within it."""
    model.train()
    total_loss, correct, seen, scored = 0.0, 0, 0, False
    for step, batch in enumerate(batches):
        loss, logits, labels = loss_fn(model, batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss is {loss.item()} at epoch {epoch} "
                                     f"step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += loss.item() * len(labels)
        if logits is not None:
            correct, scored = correct + (logits.argmax(1) == labels).sum().item(), True
        seen += len(labels)
    metrics = {"train_loss": total_loss / max(seen, 1)}
    if scored or not seen:
        metrics["train_accuracy"] = correct / max(seen, 1)
    return metrics


def hold_tables(tables: list, columns: dict) -> dict[str, torch.Tensor]:
    """Arrow tables (a worker's blocks) as one CPU tensor per column, of ``columns``' dtypes.
    Blocks may differ in how they store a tensor column (Ray's tensor extension v1 or v2,
    lists), so each is converted on its own."""
    import numpy as np
    from pipelines.artifacts import column_to_numpy

    def array(table, k):
        a = column_to_numpy(table.column(k))
        return np.stack([np.asarray(r) for r in a]) if a.dtype == object else a  # lists

    tables = [t for t in tables if t.num_rows]
    return {k: torch.as_tensor(np.concatenate([array(t, k) for t in tables]), dtype=dtype)
            for k, dtype in columns.items()}


def permuted_batches(held: dict, batch_size: int, seed: int, device):
    """Minibatches of a fresh permutation of ``held`` (seeded), moved to ``device``."""
    n = len(next(iter(held.values())))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for idx in order.split(batch_size):
        yield {k: v[idx].to(device, non_blocking=True) for k, v in held.items()}


def read_share(files: list[str], columns: list[str], rank: int, world: int) -> list:
    """Worker ``rank``'s share of the train rows (``split == "train"``) of the parquet
    ``files``, as Arrow tables: the train rows ``[rank * m, (rank + 1) * m)`` in file order,
    ``m = train rows // world`` (equal shares, the remainder dropped, as Ray Data's
    ``split(equal=True)``). Only the row groups holding the share are read, and of them only
    ``columns``: the bare loop's own ``pyarrow`` read, in the worker that trains on it."""
    import pyarrow.compute as pc

    train = pc.field("split") == "train"
    dataset = parquet_dataset(files)
    if world == 1:  # every train row: one multi-threaded scan
        return [dataset.to_table(columns=columns, filter=train)]
    groups = [g for f in dataset.get_fragments() for g in f.split_by_row_group()]
    counts = [g.count_rows(filter=train) for g in groups]  # reads the split column only
    m = sum(counts) // world
    lo, hi, start, tables = rank * m, (rank + 1) * m, 0, []
    for group, count in zip(groups, counts):
        a, b = max(lo, start), min(hi, start + count)
        if a < b:
            tables.append(group.to_table(columns=columns, filter=train).slice(a - start, b - a))
        start += count
    return tables


def train_share_bytes(files: list[str], columns: list[str], world: int) -> int:
    """A worker's share of the train rows' ``columns``, in bytes, from the parquet footers
    (uncompressed sizes, prorated by the train rows' fraction); of the data, only the
    ``split`` column is read (to count the train rows)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        meta = pq.ParquetFile(f).metadata
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            total += sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                         if group.column(j).path_in_schema.split(".")[0] in columns)
    dataset = parquet_dataset(files)
    rows = dataset.count_rows()
    train = dataset.count_rows(filter=pc.field("split") == "train")
    return total * train // max(rows, 1) // world


def hold_in_memory(shard_bytes: int, limit_mib: int) -> bool:
    """Whether each Ray Train worker holds its shard in memory (read once, fully shuffled
    every epoch) rather than streaming it from the object store every epoch."""
    return limit_mib > 0 and shard_bytes <= limit_mib * 2**20
