"""Small helpers for stages that read a Dataset artifact's parquet files directly."""

from __future__ import annotations

import hashlib

import pyarrow.compute as pc

from pipelines.errors import bad_value


def image_dataset(ctx, x, label, test_fraction: float, info: dict):
    """Write the image-classification dataset layout shared by the built-in datasets:
    ``id`` (the row's index, stable), ``x``, ``label`` and a stratified ``split`` drawn
    from the stage seed (same seed, same split)."""
    import numpy as np
    from sklearn.model_selection import train_test_split
    ids = np.arange(len(label), dtype=np.int64)
    _, test_ids = train_test_split(ids, test_size=test_fraction, stratify=label,
                                   random_state=ctx.seed)
    split = np.full(len(ids), "train", dtype=object)
    split[test_ids] = "test"
    columns = {"id": ids, "x": x, "label": label, "split": split.astype(str)}
    ctx.progress(len(ids), len(ids), "rows", force=True)
    return ctx.write_dataset("data", columns, info=info)


def parquet(data):
    """A ``pyarrow.dataset.Dataset`` over the artifact's files (schema, counts, heads)."""
    from pipelines.artifacts import parquet_dataset
    return parquet_dataset(data.files())


def require_columns(data, columns: list[str], where: str):
    """The artifact's parquet dataset; a missing column is a ``UserError``."""
    table = parquet(data)
    missing = sorted(set(columns) - set(table.schema.names))
    if missing:
        raise bad_value(where, "columns", table.schema.names, f"also the columns {missing}")
    return table


def read_split(data, split: str, columns: list[str], where: str) -> dict:
    """The ``columns`` of the rows with ``split == split`` as numpy arrays; no such rows is
    a ``UserError`` naming ``where``."""
    require_columns(data, columns + ["split"], where)
    cols = data.to_numpy(columns, filter=pc.field("split") == split)
    if not len(cols[columns[0]]):
        raise bad_value(where, f"number of rows with split == {split!r}", 0, "at least one")
    return cols


def stable_id(text: str) -> int:
    """A row id from its text alone (63 bits of sha1): the same text, the same id."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") >> 1
