"""Resumable dataset writes: a long Ray Data pass (teacher generation) that was cut short,
by a killed driver or spent retries, produces only the rows it had not written yet.

Ray Data writes the pass's parquet files into the stage's work location (``ctx.work_uri``:
the store's ``_work/<kind>/<key>/``, reachable by every node), a directory per attempt.
A parquet file is complete once its footer is written (last), so at the start of an
attempt every readable file of earlier attempts is a committed shard; the ids it holds
are done. A shard holding any id of a shard of an earlier attempt already kept (two
attempts that ran at once, as two runs of one key do) is left out, so every id is in the
output exactly once; one attempt's own files never repeat a row. The attempt reads only
the rest of its input, writes its own files, and its output is the earlier shards plus its
own files (hard links, or server-side copies on an object store), committed with the
artifact as usual. Unreadable files (cut mid-write, or being written by a concurrent run
of the same key) are ignored, never deleted: two runs of one key each produce their rows
once. ``gc`` removes the work location once the artifact is committed.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field


def _filesystem(location: str):
    import pyarrow.fs
    if "://" in location:
        fs, path = pyarrow.fs.FileSystem.from_uri(location)
        return fs, path, location.split("://", 1)[0] + "://"
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(location), ""


def repeated(kept: list, files: list) -> list[bool]:
    """For each id array in ``files`` (one attempt's), whether it holds an id of ``kept``
    (the arrays of earlier attempts' shards); one hash of ``kept`` for the attempt."""
    if not kept:
        return [False] * len(files)
    import pyarrow as pa
    import pyarrow.compute as pc
    hit = pc.is_in(pa.concat_arrays(files), value_set=pa.concat_arrays(kept))
    out, start = [], 0
    for ids in files:
        out.append(bool(pc.any(hit.slice(start, len(ids))).as_py()))
        start += len(ids)
    return out


@dataclass
class ResumableWrite:
    """``remaining(ds)`` → the rows still to produce; ``write(ds)`` → the whole output."""
    ctx: object
    name: str
    id_column: str = "id"
    shards: list[str] = field(default_factory=list)   # complete files of earlier attempts
    done: object = None                               # their ids (a pyarrow array)

    def __post_init__(self):
        import pyarrow as pa
        import pyarrow.fs
        import pyarrow.parquet as pq
        self.fs, self.base, self.scheme = _filesystem(
            f"{self.ctx.work_uri.rstrip('/')}/shards/{self.name}")
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.base, recursive=True,
                                                              allow_not_found=True))
        attempts: dict[str, list] = {}  # attempt -> [(path, ids)] of its complete files
        for info in sorted(infos, key=lambda i: i.path):
            if info.type != pyarrow.fs.FileType.File or not info.path.endswith(".parquet"):
                continue
            try:
                with self.fs.open_input_file(info.path) as f:
                    ids = pq.read_table(f, columns=[self.id_column]).column(
                        self.id_column).combine_chunks()
            except (OSError, pa.ArrowInvalid, KeyError):
                continue  # cut mid-write, or still being written by another run
            attempt = info.path[len(self.base) + 1:].split("/", 1)[0]
            attempts.setdefault(attempt, []).append((info.path, ids))
        kept = []
        for files in attempts.values():
            clash = repeated(kept, [ids for _, ids in files])
            for (path, ids), rows_done_before in zip(files, clash):
                if not rows_done_before:  # else another attempt wrote them too (two runs)
                    self.shards.append(path)
                    kept.append(ids)
        self.done = pa.concat_arrays(kept) if kept else pa.array([], pa.int64())
        self.attempt = f"{self.base}/{uuid.uuid4().hex[:12]}"

    @property
    def done_rows(self) -> int:
        return len(self.done)

    def remaining(self, ds):
        """``ds`` (a ``ray.data.Dataset`` with the id column) without the rows done."""
        if not self.done_rows:
            return ds
        import pyarrow.compute as pc
        done = self.done

        def drop_done(table):
            return table.filter(pc.invert(pc.is_in(table[self.id_column], value_set=done)))

        return ds.map_batches(drop_done, batch_format="pyarrow", batch_size=None)

    def write(self, ds, info: dict | None = None):
        """Write ``ds`` (the remaining rows) as this attempt's shards, then make the
        output ``name`` of the stage from every shard; returns its ``Dataset``."""
        import pyarrow.fs

        from ..artifacts import Dataset
        from .writer import write_blocks
        if ds is not None:
            write_blocks(ds, self.attempt, self.fs, scheme=self.scheme)
        mine = sorted(i.path for i in self.fs.get_file_info(pyarrow.fs.FileSelector(
            self.attempt, recursive=True, allow_not_found=True)) if i.path.endswith(".parquet"))
        ctx = self.ctx
        path = ctx.output_dir(self.name)
        if ctx.remote_dir:  # server-side copies into the commit's upload
            fs, target, scheme = _filesystem(f"{ctx.remote_dir}/{self.name}")
            for i, src in enumerate(self.shards + mine):
                fs.copy_file(src, f"{target}/part-{i:05d}.parquet")
            return Dataset(path=path, info=dict(info or {}), uri=f"{scheme}{target}")
        for i, src in enumerate(self.shards + mine):
            dst = os.path.join(path, f"part-{i:05d}.parquet")
            if os.path.lexists(dst):  # an earlier attempt's link into these staging files:
                os.remove(dst)        # copying over it would truncate the shard it shares
            try:
                os.link(src, dst)
            except OSError:
                self.fs.copy_file(src, dst)
        return Dataset(path=path, info=dict(info or {}))
