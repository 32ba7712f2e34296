"""Artifact types: what flows between stages.

An artifact is an immutable directory on the store. Its type says how to read it:

- ``Dataset``: a parquet dataset written and read with Ray Data (``.read()``), or with
  pyarrow for small data (``.to_arrow()``, ``.to_numpy()``).
- ``Model``: a model directory in the model library's own ``save_pretrained`` format.
- ``Report``: metrics (``metrics.json``) and plots of an evaluation.

``info`` carries what a downstream stage must know to use the artifact (for example the
top-k and precision of a teacher signal); it is recorded in the manifest.

An output a stage makes (``ctx.save_model``, ``ctx.write_dataset``) is a plain path in
its staging directory. An input, opened from a committed manifest, is resolved on the
node that uses it, and only its verified bytes are used:

- ``path`` is, on the node where it is read, a local directory whose every file was
  checked against the manifest's bytes and sha256: on a local store the store's own
  directory, on an ``s3://`` store a copy downloaded into that node's cache (once per
  node). So **pass the artifact object, not its path, to Ray Data actors and Ray Train
  workers: ``.path`` there fetches on that node.** A path string resolved by the stage's
  coordinator names its node's cache, which other nodes do not have.
- a dataset is read where it lives (``uri`` on a remote store): ``read``, ``files`` and
  ``to_arrow`` first check each parquet file's bytes and sha256 (a remote object is
  hashed as it streams from the store, nothing kept), then read with every parquet
  page's checksum verified, also in Ray Data's read tasks on other nodes.

A node remembers what it checked, with each file's size and mtime (see
``pipelines._internal.fetch``): an unchanged file is not hashed again. A file that does
not match fails the stage with ``CorruptArtifact``, naming the artifact and what to do
(``distill verify --repair``, then run again).
"""

from __future__ import annotations

import json
import os
from typing import Any

# parquet written by the core and its stages carries a CRC per page (read side: see
# ``page_checksums``); pass as keyword arguments to any parquet writer
WRITE_OPTIONS = {"write_page_checksum": True}


class Artifact:
    """``path`` (a property: resolved and verified on first use on each node for an
    input), ``info``, ``uri`` (where a remote store keeps it), ``source`` (the committed
    output an input comes from: ``pipelines._internal.fetch.Committed``; None for an
    output being made)."""

    type_name = "artifact"
    __slots__ = ("_path", "info", "uri", "source")

    def __init__(self, path: str | None = None, info: dict[str, Any] | None = None,
                 uri: str | None = None, source=None):
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "info", dict(info or {}))
        object.__setattr__(self, "uri", uri)
        object.__setattr__(self, "source", source)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self):
        return type(self), (self._path, self.info, self.uri, self.source)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.__reduce__() == other.__reduce__()

    __hash__ = None

    def __repr__(self) -> str:
        where = (f"{self.source.kind}/{self.source.key[:12]}/{self.source.output}"
                 if self.source else self._path)
        return f"{type(self).__name__}({where!r}, info={self.info!r})"

    @property
    def path(self) -> str:
        """A local directory of the artifact's files, verified on this node (an input)."""
        if self.source is None:
            return self._path
        return self.source.local_dir()

    @classmethod
    def from_manifest(cls, root: str, entry: dict) -> "Artifact":
        """The output ``entry`` of a manifest, at its path under ``root``, unverified."""
        return cls(path=os.path.join(root, entry["path"]), info=entry.get("info", {}))

    @classmethod
    def committed(cls, source) -> "Artifact":
        """The input artifact of a committed output (``fetch.Committed``)."""
        return cls(info=source.entry.get("info", {}), source=source,
                   uri=source.where if source.remote else None)


class Dataset(Artifact):
    type_name = "dataset"
    __slots__ = ()

    def read(self, columns: list[str] | None = None, **kwargs):
        """A lazy ``ray.data.Dataset`` over the parquet files (only ``columns``, if given:
        Ray Data pushes the projection down into the parquet read), every page's
        checksum verified by the read tasks.

        Read with Ray Data's first parquet datasource: the second (Ray 2.60's default)
        starts a pool of 32 actors to read the file footers on every read and stops it
        after, 15-30 s per read on 2 cores against well under a second. The setting is
        per process and only consulted when the read is built, so it is set just for this
        call, on whichever node builds the read."""
        import ray.data
        paths = self.files() if self.source else (self.uri or self._path)
        kwargs.setdefault("fragment_scan_options", page_checksums())
        context = ray.data.DataContext.get_current()
        v2, context.use_datasource_v2 = context.use_datasource_v2, False
        try:
            ds = ray.data.read_parquet(paths, **kwargs)
        finally:
            context.use_datasource_v2 = v2
        return ds.select_columns(columns) if columns else ds

    def files(self) -> list[str]:
        """The parquet files: local paths, or the store's URIs for a dataset on a remote
        store (``pyarrow.parquet.ParquetFile`` and ``parquet_dataset`` read both). An
        input's files are its manifest's, each checked first."""
        if self.source:
            return self.source.verified_files(".parquet")
        if self.uri:
            import pyarrow.fs
            fs, base = pyarrow.fs.FileSystem.from_uri(self.uri)
            scheme = self.uri.split("://", 1)[0]
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
            return sorted(f"{scheme}://{i.path}" for i in infos if i.path.endswith(".parquet"))
        return sorted(os.path.join(self._path, f) for f in os.listdir(self._path)
                      if f.endswith(".parquet"))

    def to_arrow(self, columns: list[str] | None = None, filter=None):
        """The whole dataset as one pyarrow Table (for data that fits in memory).
        Ray Data tensor columns come back as Ray's tensor extension type."""
        try:
            return parquet_dataset(self.files()).to_table(columns=columns, filter=filter)
        except OSError as e:
            if self.source is None or "checksum" not in str(e):
                raise
            from .errors import CorruptArtifact
            raise CorruptArtifact(f"{self.source.label()} is damaged: a parquet page fails "
                                  f"its checksum ({e}); {self.source.advice()}") from None

    def to_numpy(self, columns: list[str] | None = None, filter=None) -> dict:
        """Columns as numpy arrays (tensor columns as stacked ndarrays)."""
        table = self.to_arrow(columns, filter)
        return {name: column_to_numpy(table.column(name)) for name in table.column_names}


class Model(Artifact):
    type_name = "model"
    __slots__ = ()


class Report(Artifact):
    type_name = "report"
    __slots__ = ()

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


def page_checksums():
    """pyarrow's parquet scan options that verify each page's CRC (a page written
    without one is read as before), with Ray Data's own defaults otherwise (buffered
    streams of 8 MiB)."""
    import pyarrow.dataset as pads
    return pads.ParquetFragmentScanOptions(page_checksum_verification=True,
                                           use_buffered_stream=True, buffer_size=8 << 20)


def parquet_dataset(files: list[str]):
    """A ``pyarrow.dataset.Dataset`` over parquet files, every page's checksum verified
    when it is read: local paths, or URIs of one object store (``Dataset.files()`` of a
    remote dataset)."""
    import pyarrow.dataset as pads
    import ray.data  # noqa: F401  registers Ray's Arrow tensor extension types
    fmt = pads.ParquetFileFormat(default_fragment_scan_options=page_checksums())
    if files and "://" in files[0]:
        import pyarrow.fs
        fs = pyarrow.fs.FileSystem.from_uri(files[0])[0]
        return pads.dataset([f.split("://", 1)[1] for f in files], filesystem=fs,
                            format=fmt)
    return pads.dataset(files, format=fmt)
