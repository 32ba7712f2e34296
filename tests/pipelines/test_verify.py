"""Verified reads: every committed file a stage uses is checked against its manifest on the
node that uses it (a marker per node skips unchanged files), parquet pages carry checksums,
an artifact handed to a Ray task fetches its own copy there, and ``distill verify`` finds
and removes damaged artifacts; on a local store and on an ``s3://`` store (moto's server
on loopback)."""

import io
import json
import os
import shutil

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import Dataset, Model, StageContext
from pipelines._internal.fetch import VERIFIED, cache_root, forget
from pipelines._internal.store import Store
from pipelines.artifacts import WRITE_OPTIONS, parquet_dataset
from pipelines.cli import main
from pipelines.errors import CorruptArtifact
from tests.pipelines import toy_stages, verify_stages  # noqa: F401


def flip(data: bytes) -> bytes:
    """``data`` (a parquet file) with 64 bytes inverted in the middle of its largest
    column chunk: inside a page (one page per chunk in these small files), past its
    header."""
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    chunks = [meta.row_group(g).column(c) for g in range(meta.num_row_groups)
              for c in range(meta.num_columns)]
    chunk = max(chunks, key=lambda c: c.total_compressed_size)
    assert chunk.total_compressed_size > 256
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    at = start + chunk.total_compressed_size // 2
    out = bytearray(data)
    for i in range(at, at + 64):
        out[i] ^= 0xFF
    return bytes(out)


def damage_file(path: str, keep_stamp: bool = False) -> None:
    """Flip bytes of a local file (a parquet file inside a data page); ``keep_stamp``:
    with its size and mtime as they were, as silent bit rot would leave them."""
    st = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    data = flip(data) if path.endswith(".parquet") else bytes(b ^ 0xFF for b in data[:64]) + data[64:]
    with open(path, "wb") as f:
        f.write(data)
    if keep_stamp:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def damage_object(uri: str) -> None:
    bucket, key = uri[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3")
    data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    data = flip(data) if key.endswith(".parquet") else bytes(b ^ 0xFF for b in data[:64]) + data[64:]
    s3.put_object(Bucket=bucket, Key=key, Body=data)


def committed(store, key: str = "k1", rows: int = 2000):
    """A committed artifact of kind 'toy' made by stage 'maker': a model folder and a
    parquet dataset written as ``ctx.write_dataset`` writes one."""
    staging = store.new_staging_dir("toy", key)
    ctx = StageContext("maker", "toy", key, 0, staging, staging + "-work")
    model = ctx.output_dir("model")
    with open(os.path.join(model, "weights.bin"), "wb") as f:
        f.write(os.urandom(5000))
    rows_out = ctx.write_dataset("rows", pa.table({"id": list(range(rows)),
                                                  "x": [i * 0.5 for i in range(rows)]}))
    outputs = {"model": Model(model), "rows": rows_out}
    manifest = {"key": key, "kind": "toy", "version": "1", "stage": "maker",
                "outputs": store.describe("toy", key, staging, outputs)}
    return store.commit(staging, manifest)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """This process's own node cache (markers, copies)."""
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# -- markers: hash once, again only after a change ----------------------------------------
def test_the_marker_skips_unchanged_files_and_rehashes_changed_ones(tmp_path, cache):
    store = Store.open(tmp_path / "store")
    m = committed(store)
    model = store.open_input(m, "model")
    weights = os.path.join(store.artifact_dir("toy", "k1"), "model", "weights.bin")
    assert model.path == os.path.dirname(weights)  # a local store's own directory
    marker = os.path.join(cache_root(store.root), VERIFIED, "toy", "k1", "model.json")
    st = os.stat(weights)
    sha = m["outputs"]["model"]["files"][0]["sha256"]
    assert read_json(marker) == {weights: [st.st_size, st.st_mtime_ns, sha]}

    damage_file(weights, keep_stamp=True)  # same size and mtime: trusted, not hashed again
    assert model.path == os.path.dirname(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    with pytest.raises(CorruptArtifact) as e:
        model.path  # noqa: B018
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("artifact toy/k1 (output 'model', made by stage 'maker') is "
                          "damaged: file model/weights.bin: its manifest lists 5000 bytes, "
                          f"sha256 {sha[:12]}; found 5000 bytes, sha256 ")
    assert f"distill verify --repair --store {store.root}" in msg and "--force maker" in msg

    damage_file(weights)  # flipped back: the same bytes as committed, a new mtime
    assert model.path == os.path.dirname(weights)
    with open(weights, "ab") as f:  # one byte more, the mtime put back: the size tells
        f.write(b"!")
    os.utime(weights, ns=(st.st_atime_ns, read_json(marker)[weights][1]))
    with pytest.raises(CorruptArtifact, match="found 5001 bytes"):
        model.path  # noqa: B018
    os.remove(weights)
    with pytest.raises(CorruptArtifact, match="found no such file"):
        model.path  # noqa: B018


def test_a_dataset_is_verified_before_it_is_read_and_its_pages_after(tmp_path, cache):
    store = Store.open(tmp_path / "store")
    m = committed(store)
    rows = store.open_input(m, "rows")
    marker = os.path.join(cache_root(store.root), VERIFIED, "toy", "k1", "rows.json")
    assert not os.path.exists(marker)  # opened, not used: nothing hashed
    assert rows.to_numpy()["id"].tolist() == list(range(2000))
    (part,) = rows.files()
    assert list(read_json(marker)) == [part]

    damage_file(part, keep_stamp=True)  # bit rot the marker cannot see: the page CRC does
    with pytest.raises(CorruptArtifact, match=r"artifact toy/k1 \(output 'rows', made by "
                                              r"stage 'maker'\) is damaged: a parquet page "
                                              r"fails its checksum .*distill verify --repair"):
        rows.to_arrow()
    os.utime(part)  # and the sha256 once the file is seen to change
    with pytest.raises(CorruptArtifact, match="file rows/part-00000.parquet: its manifest"):
        rows.files()


def test_parquet_pages_carry_checksums_that_reads_verify(ray_session, tmp_path):
    """What the core writes (a table, a Ray Data dataset) has a CRC per page, which pyarrow
    reads (``parquet_dataset``) and Ray Data's read tasks (``Dataset.read``) check."""
    import ray.data
    ctx = StageContext.for_testing(tmp_path)
    columns = {"id": list(range(3000)), "x": [i * 0.25 for i in range(3000)]}
    table = ctx.write_dataset("table", columns)
    ray_written = ctx.write_dataset("ray", ray.data.range(3000, override_num_blocks=1).map_batches(
        lambda b: {"id": b["id"], "x": b["id"] * 0.25}))
    for out in (table, ray_written):
        files = out.files()
        assert parquet_dataset(files).to_table().num_rows == 3000
        for f in files:
            damage_file(f)
        with pytest.raises(OSError, match="CRC checksum verification failed"):
            parquet_dataset(files).to_table()
    # uncompressed pages: nothing but the CRC can tell the damage
    plain = Dataset(ctx.output_dir("plain"))
    pq.write_table(pa.table(columns), os.path.join(plain.path, "p.parquet"),
                   compression="none", **WRITE_OPTIONS)
    damage_file(plain.files()[0])
    assert pq.read_table(plain.files()[0]).num_rows == 3000  # read unchecked: silently wrong
    with pytest.raises(Exception, match="CRC checksum verification failed"):
        plain.read().take_all()


# -- an artifact handed to another process fetches there -----------------------------------
def test_an_artifact_shipped_to_a_ray_task_fetches_its_own_copy_there(ray_session, s3_uri,
                                                                       tmp_path, cache):
    import ray

    def use(model):
        with open(os.path.join(model.path, "weights.bin"), "rb") as f:
            return model.path, f.read()

    other = str(tmp_path / "other-node")
    task = ray.remote(num_cpus=0.25)(use).options(
        runtime_env={"env_vars": {"DISTILL_CACHE_DIR": other}})
    for root in (s3_uri, str(tmp_path / "store")):
        store = Store.open(root)
        m = committed(store)
        model = store.open_input(m, "model")
        path, data = ray.get(task.remote(model))
        assert len(data) == 5000
        node_cache = os.path.join(other, os.path.basename(cache_root(store.root)))
        assert os.path.isfile(os.path.join(node_cache, VERIFIED, "toy", "k1", "model.json"))
        if root == s3_uri:  # downloaded into the other node's cache; none here
            assert path == os.path.join(node_cache, "toy", "k1", m["data"], "model")
            assert not os.path.exists(os.path.join(cache_root(store.root), "toy"))
        else:
            assert path == os.path.join(store.artifact_dir("toy", "k1"), "model")
        assert not os.path.exists(os.path.join(cache_root(store.root), VERIFIED))


def test_a_damaged_object_on_s3_is_caught_on_download(s3_uri, tmp_path, cache):
    store = Store.open(s3_uri)
    m = committed(store)
    data = f"{s3_uri}/toy/k1/{m['data']}"
    damage_object(f"{data}/model/weights.bin")
    damage_object(f"{data}/rows/part-00000.parquet")
    model, rows = store.open_input(m, "model"), store.open_input(m, "rows")
    with pytest.raises(CorruptArtifact, match=r"artifact toy/k1 .* file model/weights.bin"):
        model.path  # noqa: B018
    assert not os.path.exists(os.path.join(cache_root(s3_uri), "toy", "k1", m["data"],
                                           "model", "weights.bin"))
    with pytest.raises(CorruptArtifact, match=r"file rows/part-00000.parquet"):
        rows.read()


# -- a pipeline meets a damaged input; distill verify finds and removes it -----------------
PIPELINE = """
name: verified
seed: 3
stages:
  nums: {kind: test-numbers, config: {n: 600}}
  model: {kind: test-make-model}
  use: {kind: test-use-model, inputs: {numbers: nums, model: model}}
"""


def distill(capsys, *args) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def damage(store, manifest: dict, output: str, name_end: str) -> str:
    """Flip bytes of the committed file of ``output`` whose name ends with ``name_end``;
    its path relative to the artifact."""
    entry = manifest["outputs"][output]
    (f,) = [f for f in entry["files"] if f["path"].endswith(name_end)]
    rel = f"{entry['path']}/{f['path']}"
    if store.root.startswith("s3://"):
        damage_object(f"{store.artifact_dir(manifest['kind'], manifest['key'])}/"
                      f"{manifest['data']}/{rel}")
    else:
        damage_file(os.path.join(store.artifact_dir(manifest["kind"], manifest["key"]), rel))
    return rel


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_damaged_input_fails_the_stage_and_verify_repairs_it(ray_session, where, s3_uri,
                                                               tmp_path, capsys):
    root = s3_uri if where == "s3" else str(tmp_path / "store")
    config = tmp_path / "p.yaml"
    config.write_text(PIPELINE)
    run = ["run", str(config), "--store", root, "--quiet"]
    code, out, err = distill(capsys, *run, "--json")
    assert code == 0, err
    assert [s["status"] for s in json.loads(out)["stages"]] == ["ran"] * 3
    store = Store.open(root, create=False)
    by_stage = {m["stage"]: m for m in store.manifests()}
    use_report = by_stage["use"]["metrics"]

    for stage, output, name_end in (("nums", "numbers", ".parquet"),
                                    ("model", "model", "weights.bin")):
        m = by_stage[stage]
        label = f"{m['kind']}/{m['key'][:12]}"
        rel = damage(store, m, output, name_end)
        if where == "s3":  # a node without a verified copy of it, as a fresh node would be
            forget(root, m["kind"], m["key"])
        code, out, err = distill(capsys, *run, "--force", "use")
        assert code == 1
        assert (f"stage 'use' failed: artifact {label} (output '{output}', made by stage "
                f"'{stage}') is damaged: file {rel}: its manifest lists") in err
        assert f"distill verify --repair --store {root}" in err and "Traceback" not in err

        code, out, err = distill(capsys, "verify", "--store", root)
        assert code == 1 and out.startswith(f"damaged: {label} (stage '{stage}', output "
                                             f"'{output}'): {rel}: manifest lists ")
        assert "1 damaged file(s) in 1 artifact(s)" in out
        code, out, err = distill(capsys, "verify", "--store", root, "--repair", "--json")
        report = json.loads(out)
        assert code == 0 and report["removed"] == [f"{m['kind']}/{m['key']}"]
        assert report["damaged"][0]["file"] == rel and report["artifacts"] == 3
        assert not store.is_committed(m["kind"], m["key"])
        assert distill(capsys, "verify", "--store", root)[0] == 0

        code, out, err = distill(capsys, *run, "--force", "use", "--json")
        assert code == 0, err
        status = {s["name"]: s["status"] for s in json.loads(out)["stages"]}
        assert status == {"nums": "cached", "model": "cached", stage: "ran", "use": "ran"}
        by_stage = {m["stage"]: m for m in store.manifests()}
        assert by_stage["use"]["metrics"] == use_report  # the same bytes, made again

    # a fully cached run opens no input: nothing is hashed, no marker written
    shutil.rmtree(os.path.join(cache_root(store.root), VERIFIED))
    code, out, err = distill(capsys, *run, "--json")
    assert [s["status"] for s in json.loads(out)["stages"]] == ["cached"] * 3
    assert not os.path.exists(os.path.join(cache_root(store.root), VERIFIED))


def test_verify_selects_by_kind_or_key_and_names_a_missing_store(tmp_path, capsys, cache):
    store = Store.open(tmp_path / "store")
    committed(store, "k1")
    committed(store, "k2")
    code, out, _ = distill(capsys, "verify", "toy", "--store", store.root)
    assert code == 0 and "verified 2 artifact(s), 4 file(s)" in out
    os.remove(os.path.join(store.artifact_dir("toy", "k2"), "model", "weights.bin"))
    code, out, _ = distill(capsys, "verify", "k1", "--store", store.root)
    assert code == 0 and "verified 1 artifact(s), 2 file(s)" in out
    code, out, _ = distill(capsys, "verify", "k2", "--store", store.root)
    assert code == 1 and "model/weights.bin: manifest lists 5000 bytes" in out
    assert "found no such file" in out
    code, _, err = distill(capsys, "verify", "nope", "--store", store.root)
    assert code == 2 and "'nope' is neither a kind nor the start of a key" in err
    assert "kinds there: toy" in err
    code, _, err = distill(capsys, "verify", "--store", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("error: --store: there is no store at")
    assert err.count("\n") == 1
