"""Artifact types: what flows between stages.

An artifact is an immutable directory on the store. Its type says how to read it:

- ``Dataset``: a parquet dataset written and read with Ray Data (``.read()``), or with
  pyarrow for small data (``.to_arrow()``, ``.to_numpy()``).
- ``Model``: a model directory in the model library's own ``save_pretrained`` format.
- ``Report``: metrics (``metrics.json``) and plots of an evaluation.

``info`` carries what a downstream stage must know to use the artifact (for example the
top-k and precision of a teacher signal); it is recorded in the manifest.

On a remote store (``s3://``) ``uri`` is where the artifact lives on the store. A model or
report is downloaded into a cache on the node that runs the stage, each file checked
against its manifest's sha256, and ``path`` is that copy. A dataset is read where it
lives (``read``, ``files``, ``to_arrow``), so Ray Data's read tasks on any node of a
cluster, and a Ray Train worker reading its share, find it without a copy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Artifact:
    path: str
    info: dict[str, Any] = field(default_factory=dict)
    uri: str | None = None

    type_name = "artifact"

    @classmethod
    def from_manifest(cls, root: str, entry: dict) -> "Artifact":
        return cls(path=os.path.join(root, entry["path"]), info=entry.get("info", {}))


@dataclass(frozen=True)
class Dataset(Artifact):
    type_name = "dataset"

    def read(self, columns: list[str] | None = None, **kwargs):
        """A lazy ``ray.data.Dataset`` over the parquet files (only ``columns``, if given:
        Ray Data pushes the projection down into the parquet read).

        Read with Ray Data's first parquet datasource: the second (Ray 2.60's default)
        starts a pool of 32 actors to read the file footers on every read and stops it
        after, 15-30 s per read on 2 cores against well under a second. The setting is
        per process and only consulted when the read is built, so it is set just for this
        call, on whichever node builds the read."""
        import ray.data
        context = ray.data.DataContext.get_current()
        v2, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(self.uri or self.path, **kwargs)
        finally:
            context.use_datasource_v2 = v2
        return ds.select_columns(columns) if columns else ds

    def files(self) -> list[str]:
        """The parquet files: local paths, or the store's URIs for a dataset on a remote
        store (``pyarrow.parquet.ParquetFile`` and ``parquet_dataset`` read both)."""
        if self.uri:
            import pyarrow.fs
            fs, base = pyarrow.fs.FileSystem.from_uri(self.uri)
            scheme = self.uri.split("://", 1)[0]
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
            return sorted(f"{scheme}://{i.path}" for i in infos if i.path.endswith(".parquet"))
        return sorted(os.path.join(self.path, f) for f in os.listdir(self.path)
                      if f.endswith(".parquet"))

    def to_arrow(self, columns: list[str] | None = None, filter=None):
        """The whole dataset as one pyarrow Table (for data that fits in memory).
        Ray Data tensor columns come back as Ray's tensor extension type."""
        return parquet_dataset(self.files()).to_table(columns=columns, filter=filter)

    def to_numpy(self, columns: list[str] | None = None, filter=None) -> dict:
        """Columns as numpy arrays (tensor columns as stacked ndarrays)."""
        table = self.to_arrow(columns, filter)
        return {name: column_to_numpy(table.column(name)) for name in table.column_names}


@dataclass(frozen=True)
class Model(Artifact):
    type_name = "model"


@dataclass(frozen=True)
class Report(Artifact):
    type_name = "report"

    def metrics(self) -> dict[str, float]:
        with open(os.path.join(self.path, "metrics.json")) as f:
            return json.load(f)


ARTIFACT_TYPES: dict[str, type[Artifact]] = {t.type_name: t for t in (Dataset, Model, Report)}


def column_to_numpy(column):
    """A pyarrow column (plain, list or Ray tensor extension) as a numpy array."""
    import numpy as np
    column = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if hasattr(column, "to_numpy_ndarray"):  # Ray Data tensor column
        return column.to_numpy_ndarray()
    try:
        return column.to_numpy(zero_copy_only=False)
    except TypeError:
        return np.asarray(column.to_pylist())


def parquet_dataset(files: list[str]):
    """A ``pyarrow.dataset.Dataset`` over parquet files: local paths, or URIs of one
    object store (``Dataset.files()`` of a remote dataset)."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  registers Ray's Arrow tensor extension types
    if files and "://" in files[0]:
        import pyarrow.fs
        fs = pyarrow.fs.FileSystem.from_uri(files[0])[0]
        return pads.dataset([f.split("://", 1)[1] for f in files], filesystem=fs,
                            format="parquet")
    return pads.dataset(files, format="parquet")
