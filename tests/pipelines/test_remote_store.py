"""The S3 store against a real S3-compatible server (moto's server mode on loopback, from
``conftest.s3_server``): conditional commits, verified downloads, --force, run records, gc,
and the messages for a store that cannot be used. No Ray needed."""

import json
import os
import shutil

import boto3
import pyarrow as pa
import pytest

from pipelines import Dataset, Model
from pipelines._internal.gc import collect, garbage
from pipelines._internal.remote_store import RemoteStore, after_conditional_put
from pipelines._internal.store import Store
from pipelines.errors import CorruptArtifact, UserError
from tests.conftest import S3_BUCKET


def stage_outputs(store: RemoteStore, key: str, text: str):
    """What a stage leaves in a staging directory: a model folder and a parquet dataset."""
    import pyarrow.parquet as pq
    staging = store.new_staging_dir("toy", key)
    os.makedirs(os.path.join(staging, "model"))
    with open(os.path.join(staging, "model", "config.json"), "w") as f:
        f.write(text)
    os.makedirs(os.path.join(staging, "rows"))
    pq.write_table(pa.table({"id": list(range(7))}), os.path.join(staging, "rows", "p.parquet"))
    outputs = {"model": Model(os.path.join(staging, "model")),
               "rows": Dataset(os.path.join(staging, "rows"), info={"n": 7})}
    return staging, outputs


def manifest_of(key: str, outputs: dict) -> dict:
    return {"key": key, "kind": "toy", "version": "1", "outputs": outputs}


def objects(prefix: str) -> list[str]:
    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", [])
                  if not o["Key"].endswith("/"))  # pyarrow's empty directory markers


def test_one_commit_wins_and_the_loser_adopts_it(s3_uri):
    store = Store.open(s3_uri)
    assert isinstance(store, RemoteStore) and store.manifests() == []
    a_staging, a_out = stage_outputs(store, "k1", "a")
    b_staging, b_out = stage_outputs(store, "k1", "b")
    a = manifest_of("k1", store.describe("toy", "k1", a_staging, a_out))
    b = manifest_of("k1", store.describe("toy", "k1", b_staging, b_out))
    assert a["outputs"]["rows"]["rows"] == 7 and "id: int64" in a["outputs"]["rows"]["schema"]
    assert not store.is_committed("toy", "k1")  # uploaded is not committed
    won = store.commit(a_staging, a)
    lost = store.commit(b_staging, b)
    assert lost == won and won["data"] == os.path.basename(a_staging)
    prefix = f"{store.prefix}/toy/k1/"
    # the loser's upload is gone; the winner's files are all there, and the manifest
    assert objects(prefix) == sorted([prefix + "manifest.json"] + [
        f"{prefix}{won['data']}/{o['path']}/{f['path']}"
        for o in won["outputs"].values() for f in o["files"]])
    assert not os.path.exists(a_staging) and not os.path.exists(b_staging)
    assert [m["key"] for m in store.manifests()] == ["k1"] and store.find("k")[0] == won
    assert garbage(store) == []


def test_many_commits_of_one_key_at_once_leave_one_artifact(s3_uri):
    """Eight committers of one key at the same moment, each with its own store client (as
    eight drivers would be): one manifest, which every committer returns; only its upload
    is left on the store."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier
    stores = [Store.open(s3_uri) for _ in range(8)]
    staged = []
    for i, store in enumerate(stores):
        staging, out = stage_outputs(store, "k9", f"writer {i}")
        staged.append((staging, manifest_of("k9", store.describe("toy", "k9", staging, out))))
    barrier = Barrier(len(stores))

    def commit(i):
        stores[i].client  # noqa: B018 - connect before the race
        barrier.wait()
        return stores[i].commit(*staged[i])

    with ThreadPoolExecutor(len(stores)) as pool:
        results = list(pool.map(commit, range(len(stores))))
    committed = stores[0].manifest("toy", "k9")
    assert all(r == committed for r in results)
    assert committed["data"] in {os.path.basename(staging) for staging, _ in staged}
    prefix = f"{stores[0].prefix}/toy/k9/"
    assert {k[len(prefix):].split("/")[0] for k in objects(prefix)} == {
        "manifest.json", committed["data"]}


def test_what_a_commit_does_after_its_conditional_put():
    assert after_conditional_put(None, False) == "done"
    assert after_conditional_put("PreconditionFailed", True) == "adopt"
    assert after_conditional_put("PreconditionFailed", False) == "retry"  # removed since
    assert after_conditional_put("ConditionalRequestConflict", False) == "retry"  # AWS: 409


def test_inputs_are_downloaded_checked_and_read_from_the_store(s3_uri, tmp_path, monkeypatch):
    store = Store.open(s3_uri)
    staging, out = stage_outputs(store, "k2", "model-config")
    m = store.commit(staging, manifest_of("k2", store.describe("toy", "k2", staging, out)))
    model = store.open_input(m, "model")
    with open(os.path.join(model.path, "config.json")) as f:
        assert f.read() == "model-config"
    rows = store.open_input(m, "rows")  # a dataset is read where it lives
    assert rows.uri == f"{s3_uri}/toy/k2/{m['data']}/rows" and rows.info == {"n": 7}
    assert rows.files() == [f"{rows.uri}/p.parquet"] and rows.to_numpy()["id"].tolist() == \
        list(range(7))
    local_rows = os.path.join(store.cache, "toy", "k2", m["data"], "rows")
    assert not os.path.exists(local_rows)  # read where it lives, not downloaded...
    assert rows.path == local_rows and os.listdir(local_rows) == ["p.parquet"]  # ...unless asked

    # a corrupted object on the store is caught on download, in a node with no copy yet
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "other-node"))
    boto3.client("s3").put_object(Bucket=S3_BUCKET, Body=b"model-confiG",
                                  Key=f"{store.prefix}/toy/k2/{m['data']}/model/config.json")
    fresh = RemoteStore(s3_uri)
    with pytest.raises(CorruptArtifact, match="model/config.json: its manifest lists 12 bytes"):
        fresh.open_input(m, "model").path  # noqa: B018
    assert not os.path.exists(os.path.join(fresh.cache, "toy", "k2", m["data"], "model",
                                           "config.json"))
    # the first node's verified copy is used as it is
    monkeypatch.undo()
    assert store.open_input(m, "model").path == model.path


def test_force_replaces_and_deletes_the_old_upload(s3_uri):
    store = Store.open(s3_uri)
    staging, out = stage_outputs(store, "k3", "one")
    first = store.commit(staging, manifest_of("k3", store.describe("toy", "k3", staging, out)))
    staging, out = stage_outputs(store, "k3", "two")
    second = store.commit(staging, manifest_of("k3", store.describe("toy", "k3", staging, out)),
                          replace=True)
    assert store.manifest("toy", "k3") == second != first
    assert not [k for k in objects(f"{store.prefix}/toy/k3/") if first["data"] in k]


def test_failed_attempts_and_dead_uploads_are_garbage(s3_uri):
    store = Store.open(s3_uri)
    staging, out = stage_outputs(store, "k4", "x")
    store.describe("toy", "k4", staging, out)
    store.abandon("toy", "k4", staging)  # a stage that raised after writing
    assert objects(f"{store.prefix}/toy/k4/") == [] and not os.path.exists(staging)

    staging, out = stage_outputs(store, "k5", "x")
    store.describe("toy", "k5", staging, out)  # our own upload in progress: kept
    assert garbage(store) == []
    dead = os.path.basename(staging).replace(f".{os.getpid()}.", ".999999999.")
    s3 = boto3.client("s3")
    s3.put_object(Bucket=S3_BUCKET, Key=f"{store.prefix}/toy/k5/{dead}/model/w.bin", Body=b"1")
    assert garbage(store) == [f"{s3_uri}/toy/k5/{dead}"]
    collect(store)
    assert not [k for k in objects(f"{store.prefix}/toy/k5/") if dead in k]
    assert [k for k in objects(f"{store.prefix}/toy/k5/") if os.path.basename(staging) in k]


def test_run_records_round_trip(s3_uri):
    store = Store.open(s3_uri)
    for i, p in enumerate("ppq"):
        store.write_run({"run_id": f"r{i}", "pipeline": p, "started": i})
    assert [r["run_id"] for r in store.runs()] == ["r0", "r1", "r2"]
    assert store.last_run("p")["run_id"] == "r1" and store.last_run("z") is None
    body = boto3.client("s3").get_object(Bucket=S3_BUCKET, Key=f"{store.prefix}/_runs/r2.json")
    assert json.loads(body["Body"].read())["pipeline"] == "q"


def test_a_store_that_cannot_be_used_is_one_clear_message(s3_server):
    with pytest.raises(UserError, match=r"--store: store 's3://no-such-bucket/x' cannot be "
                                        r"written .*allowed: s3://bucket/prefix"):
        Store.open("s3://no-such-bucket/x")
    with pytest.raises(UserError, match="names no bucket"):
        Store.open("s3://")
    with pytest.raises(UserError, match="carries a query or fragment"):
        Store.open("s3://bucket/p?endpoint_override=127.0.0.1:9")


def test_pickled_store_reconnects(s3_uri):
    import pickle
    store = Store.open(s3_uri)
    store.fs  # noqa: B018 - made, then not pickled
    again = pickle.loads(pickle.dumps(store))
    assert again.root == store.root and again.manifests() == []
    shutil.rmtree(again.cache, ignore_errors=True)

