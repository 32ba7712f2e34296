"""The stages' parquet writer: every block of a ``ray.data.Dataset`` written with
``pyarrow.parquet.write_table`` as the pass produces it.

Why not Ray Data's ``write_parquet``: it adds a write operator to the pass (its own tasks,
each a worker process, behind the executor's resource budget), about a second of fixed
cost; and with parquet's default dictionary encoding, every file of a float tensor
column (features, logits, embeddings) first builds a dictionary that overflows and falls
back, which costs more than the write itself once a pass has many blocks. Measured on
this project's 2-core CPU (``python -m benchmarks --only teacher_generation``, the
``parquet write`` row): Ray Data's writer 0.20 of one ``write_table`` of the same rows.

Here (``write_blocks``): on a one-node Ray, the stage's own process takes each block from
the object store as soon as the pass has made it (zero-copy on that node) and a few
threads write it (pyarrow releases the GIL), one file per block, ``part-NNNNN.parquet``;
on a cluster of several nodes, Ray Data's write tasks run where the blocks are, so no
node downloads the whole pass (``write_parquet`` with the same options). ``options``:
page checksums always (a corrupted byte is never used); dictionary encoding only for
columns that can profit from it (strings, binaries, booleans), never for numbers.

A file is complete once its footer is written (last), so a pass cut short leaves files
that are either whole or unreadable (``shards`` relies on it); empty blocks write no file,
unless the whole pass is empty (one empty file keeps the schema).
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from ..artifacts import WRITE_OPTIONS as CHECKSUMS


def options(schema) -> dict:
    """``pyarrow.parquet.write_table`` options for a table of ``schema``."""
    import pyarrow.types as t
    dictionary = [f.name for f in schema
                  if t.is_string(f.type) or t.is_large_string(f.type) or t.is_binary(f.type)
                  or t.is_large_binary(f.type) or t.is_boolean(f.type)
                  or t.is_dictionary(f.type)]
    return {**CHECKSUMS, "use_dictionary": dictionary or False}


def write_table(table, path: str, filesystem=None) -> None:
    import pyarrow.parquet as pq
    pq.write_table(table, path, filesystem=filesystem, **options(table.schema))


def write_blocks(ds, directory: str, filesystem=None, threads: int | None = None,
                 scheme: str = "") -> None:
    """Write ``ds`` as parquet files under ``directory`` (a path of ``filesystem``; local
    when None; ``scheme`` + ``directory`` is its URI for Ray Data on several nodes)."""
    from ..context import alive_nodes
    if alive_nodes() > 1:
        ds.write_parquet(f"{scheme}{directory}", filesystem=filesystem,
                         use_dictionary=False, **CHECKSUMS)
        return
    import pyarrow.fs
    import ray
    from ray.data.block import BlockAccessor

    fs = filesystem or pyarrow.fs.LocalFileSystem()
    fs.create_dir(directory, recursive=True)
    threads = threads or min(4, os.cpu_count() or 1)
    written, empty = 0, []

    def write(ref, index) -> int:
        table = BlockAccessor.for_block(ray.get(ref)).to_arrow()
        if table.num_rows == 0:
            empty.append(table)
            return 0
        write_table(table, f"{directory}/part-{index:05d}.parquet", fs)
        return 1

    with ThreadPoolExecutor(threads, thread_name_prefix="parquet-writer") as pool:
        pending, index = set(), 0
        for bundle in ds.iter_internal_ref_bundles():
            for ref in bundle.block_refs:
                if len(pending) >= 2 * threads:  # hold few blocks: the pass streams on
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    written += sum(future.result() for future in done)
                pending.add(pool.submit(write, ref, index))
                index += 1
        written += sum(future.result() for future in pending)
    if not written and empty:
        write_table(empty[0], f"{directory}/part-00000.parquet", fs)
