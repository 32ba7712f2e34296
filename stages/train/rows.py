"""The rows a trained model sees (``stages.train.harness``): held in memory by every
worker, one global permutation per epoch split into global batches, or streamed from Ray
Data for tables too large to hold."""

from __future__ import annotations

from dataclasses import dataclass


from pipelines.artifacts import parquet_dataset
from pipelines.errors import UserError
from stages.lazy import lazy

torch = lazy("torch")


RAGGED_PAD = -1  # what pads a row of a ragged list column (a response's tokens) at its end


def hold_tables(tables: list, columns: dict) -> dict[str, torch.Tensor]:
    """Arrow tables (a worker's blocks) as one CPU tensor per column, of ``columns``' dtypes.
    Blocks may differ in how they store a tensor column (Ray's tensor extension v1 or v2,
    lists), so each is converted on its own. A list column whose rows differ in length
    (token ids of responses) is padded at the end with ``RAGGED_PAD`` to its longest row."""
    from pipelines.artifacts import column_to_numpy

    tables = [t for t in tables if t.num_rows]
    return {k: torch.as_tensor(_stacked([column_to_numpy(t.column(k)) for t in tables]),
                               dtype=dtype) for k, dtype in columns.items()}


def _stacked(parts: list):
    import numpy as np
    if all(p.dtype != object for p in parts):
        return np.concatenate(parts)
    rows = [np.asarray(r) for p in parts for r in p]  # lists
    if len({r.shape for r in rows}) == 1:
        return np.stack(rows)
    out = np.full((len(rows), max(len(r) for r in rows)), RAGGED_PAD,
                  dtype=np.result_type(*rows))
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def permuted_batches(held: dict, batch_size: int, seed: int, device):
    """Minibatches of a fresh permutation of ``held`` (seeded), moved to ``device``."""
    n = len(next(iter(held.values())))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    for idx in order.split(batch_size):
        yield {k: v[idx].to(device, non_blocking=True) for k, v in held.items()}


def read_share(files: list[str], columns: list[str], rank: int, world: int,
               split: str | None = "train") -> list:
    """Worker ``rank``'s share of the train rows (``split == "train"``) of the parquet
    ``files``, as Arrow tables: the train rows ``[rank * m, (rank + 1) * m)`` in file order,
    ``m = train rows // world`` (equal shares, the remainder dropped, as Ray Data's
    ``split(equal=True)``). Only the row groups holding the share are read, and of them only
    ``columns``: the bare loop's own ``pyarrow`` read, in the worker that trains on it.
    ``split`` None: every row of the files."""
    import pyarrow.compute as pc

    train = pc.field("split") == split if split else None  # None: every row
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


def train_share_bytes(files: list[str], columns: list[str], world: int,
                      split: str | None = "train") -> int:
    """A worker's share of the train rows' ``columns``, in bytes, from the parquet footers
    (uncompressed sizes, prorated by the train rows' fraction); of the data, only the
    ``split`` column is read (to count the train rows; ``split`` None: every row)."""
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
    train = dataset.count_rows(filter=pc.field("split") == split) if split else rows
    return total * train // max(rows, 1) // world


def hold_in_memory(shard_bytes: int, limit_mib: int) -> bool:
    """Whether each Ray Train worker holds its shard in memory (read once, fully shuffled
    every epoch) rather than streaming it from the object store every epoch."""
    return limit_mib > 0 and shard_bytes <= limit_mib * 2**20


@dataclass
class Rows:
    """The training rows of a run, as the harness hands them to each worker: in memory
    (``tensors``, already the training rows), the ``split == "train"`` rows of parquet
    ``files`` (read by every worker, only ``columns``), or a Ray ``stream`` (a dataset
    each Ray Train worker gets a shard of) of ``num_rows`` rows."""

    columns: dict[str, torch.dtype]
    tensors: dict[str, torch.Tensor] | None = None
    files: list[str] | None = None
    stream: object | None = None
    num_rows: int = 0
    shuffle_buffer: int = 1024
    split: str | None = "train"   # the rows of ``files`` used; None: every row

    @property
    def streamed(self) -> bool:
        return self.stream is not None

    def for_worker(self, rank: int, world: int, batch_size: int, device, shard=None):
        if self.streamed:
            return _StreamedRows(shard if shard is not None else self.stream, self.columns,
                                 max(batch_size // world, 1), self.shuffle_buffer, device,
                                 self.num_rows // world)  # Ray Data's equal split
        held = self.tensors
        if held is None:
            held = hold_tables(read_share(self.files, list(self.columns), 0, 1, self.split),
                               self.columns)
        return _HeldRows(held, rank, world, batch_size, device)


class _HeldRows:
    """Every row in memory; each epoch one permutation of all of them (the same on every
    worker), cut into global batches of ``batch_size`` (a last, partial batch is dropped,
    as ``DistributedSampler(drop_last=True)`` does, so every step is the same whatever the
    number of workers); worker ``rank`` takes the rows ``rank::world`` of each. Fewer rows
    than one batch make one batch of them all; its loss is weighted by the worker's share
    of it (``weight``), so the averaged gradient is still the mean over the batch."""

    def __init__(self, held: dict, rank: int, world: int, batch_size: int, device):
        self.held, self.rank, self.world, self.device = held, rank, world, device
        n = len(next(iter(held.values())))
        if n < world:
            raise UserError(f"{n} training rows cannot be split across {world} workers; "
                            f"allowed: num_workers at most {n}")
        self.batch_size = min(batch_size, n)
        self.steps_per_epoch = n // self.batch_size

    def batches(self, seed: int):
        """(rows of this worker, weight of its mean loss) per step."""
        n = len(next(iter(self.held.values())))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        for idx in order.split(self.batch_size)[:self.steps_per_epoch]:
            mine = idx[self.rank::self.world]
            batch = {k: v[mine].to(self.device, non_blocking=True) for k, v in self.held.items()}
            yield batch, len(mine) * self.world / len(idx)


class _StreamedRows:
    """A Ray Data shard, batches of ``batch_size / world`` shuffled within a buffer."""

    def __init__(self, shard, columns, batch_size, shuffle_buffer, device, rows):
        self.shard, self.columns, self.batch_size = shard, columns, batch_size
        self.shuffle_buffer, self.device = shuffle_buffer, device
        self.steps_per_epoch = -(-rows // batch_size)

    def batches(self, seed: int):
        for batch in self.shard.iter_torch_batches(
                batch_size=self.batch_size, local_shuffle_buffer_size=self.shuffle_buffer,
                local_shuffle_seed=seed, dtypes=self.columns, device=self.device):
            yield batch, 1.0
