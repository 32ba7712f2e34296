"""Small helpers for stages that read a Dataset artifact's parquet files directly."""

from __future__ import annotations

import pyarrow.compute as pc

from pipelines.errors import bad_value


def parquet(data):
    """A ``pyarrow.dataset.Dataset`` over the artifact's files (schema, counts, heads)."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  registers Ray's tensor extension types
    return pads.dataset(data.files(), format="parquet")


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
