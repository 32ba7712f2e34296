"""The stages' parquet writer (``pipelines._internal.writer``): every block of a Ray
Dataset becomes one parquet file written with pyarrow in the stage's process, with page
checksums, dictionary encoding only where it can pay, and the rows unchanged."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipelines._internal.writer import options, write_blocks
from pipelines.context import StageContext


def files(path):
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))


def test_options_use_dictionaries_for_text_only():
    schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float32(), 4)),
                        ("split", pa.string()), ("ok", pa.bool_())])
    opts = options(schema)
    assert opts["write_page_checksum"] is True
    assert opts["use_dictionary"] == ["split", "ok"]
    assert options(pa.schema([("x", pa.float32())]))["use_dictionary"] is False


def test_every_block_one_file_rows_unchanged(ray_session, tmp_path):
    n = 1000
    x = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    table = pa.table({"id": np.arange(n), "x": pa.FixedSizeListArray.from_arrays(x.ravel(), 8),
                      "split": np.where(np.arange(n) % 5 == 0, "test", "train")})
    ds = ray.data.from_arrow(table).repartition(7).filter(lambda r: r["id"] < 900)
    ctx = StageContext.for_testing(tmp_path, name="w", kind="teacher-outputs")
    out = ctx.write_dataset("signal", ds)
    written = files(out.path)
    assert len(written) == 7 and all(os.path.basename(f).startswith("part-") for f in written)
    back = pa.concat_tables(pq.read_table(f) for f in written).sort_by("id")
    assert back["id"].to_pylist() == list(range(900))
    np.testing.assert_array_equal(np.stack(back["x"].to_numpy(zero_copy_only=False)), x[:900])
    meta = pq.ParquetFile(written[0]).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings
                 for i in range(meta.num_columns)}
    assert any("DICTIONARY" in e for e in encodings["split"])
    assert not any("DICTIONARY" in e for e in encodings["x.list.element"])
    assert not any("DICTIONARY" in e for e in encodings["id"])


def test_an_empty_pass_keeps_its_schema(ray_session, tmp_path):
    table = pa.table({"id": np.arange(10), "v": np.ones(10, np.float32)})
    ds = ray.data.from_arrow(table).repartition(3).map_batches(
        lambda t: t.slice(0, 0), batch_format="pyarrow", batch_size=None)
    write_blocks(ds, str(tmp_path / "out"))
    written = files(tmp_path / "out")
    assert len(written) == 1
    back = pq.read_table(written[0])
    assert back.num_rows == 0 and back.schema.names == ["id", "v"]
