"""The store: commits are atomic, only committed manifests count, gc removes debris."""

import json
import os
import threading
import time

import numpy as np
import pytest

from pipelines import StageContext, UserError
from pipelines._internal.gc import collect, garbage
from pipelines._internal.store import MANIFEST, Store, describe_output


def staged(store, kind="k", key="abc", n=5):
    staging = store.new_staging_dir(kind, key)
    ctx = StageContext(name="s", kind=kind, key=key, seed=0, staging_dir=staging,
                       work_dir=store.work_dir(kind, key))
    art = ctx.write_dataset("data", {"id": np.arange(n), "x": np.ones((n, 2, 2), "float32")},
                            info={"note": "hi"})
    entry = describe_output(art.path, "dataset", staging, art.info)
    return staging, {"key": key, "kind": kind, "version": "1", "outputs": {"data": entry}}


def test_commit_moves_staging_and_writes_manifest_last(tmp_path):
    store = Store.open(tmp_path / "s")
    staging, manifest = staged(store)
    assert not store.is_committed("k", "abc")
    committed = store.commit(staging, manifest)
    assert committed is manifest and not os.path.exists(staging)
    m = store.manifest("k", "abc")
    out = m["outputs"]["data"]
    assert out["rows"] == 5 and out["info"] == {"note": "hi"} and "x:" in out["schema"]
    assert out["bytes"] == sum(f["bytes"] for f in out["files"]) > 0
    assert [x["key"] for x in store.manifests()] == ["abc"]


def test_directory_without_manifest_is_not_committed(tmp_path):
    store = Store.open(tmp_path / "s")
    os.makedirs(store.artifact_dir("k", "abc") + "/data")
    assert not store.is_committed("k", "abc") and store.manifests() == []
    with open(os.path.join(store.artifact_dir("k", "abc"), MANIFEST), "w") as f:
        f.write('{"key": "ab')  # torn write
    assert not store.is_committed("k", "abc")
    staging, manifest = staged(store)       # a later run replaces the debris
    store.commit(staging, manifest)
    assert store.manifest("k", "abc")["outputs"]["data"]["rows"] == 5


def test_concurrent_commits_of_one_key_have_one_winner(tmp_path):
    store = Store.open(tmp_path / "s")
    jobs = [staged(store, n=3) for _ in range(6)]
    for i, (_, m) in enumerate(jobs):
        m["attempt"] = i
    results = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def go(i):
        barrier.wait()
        results[i] = store.commit(*jobs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    winner = store.manifest("k", "abc")["attempt"]
    assert all(r["attempt"] == winner for r in results)
    assert os.listdir(os.path.join(store.root, "_staging", "k")) == []


def test_replace_swaps_a_committed_artifact(tmp_path):
    store = Store.open(tmp_path / "s")
    store.commit(*staged(store, n=3))
    staging, m = staged(store, n=4)
    store.commit(staging, m, replace=True)
    assert store.manifest("k", "abc")["outputs"]["data"]["rows"] == 4


def test_unwritable_store_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="store path .* is not writable"):
        Store.open(blocker / "store")
    with pytest.raises(UserError, match=r"scheme 'gs://'.*allowed: a local path, file://, "
                                        r"s3://bucket/prefix"):
        Store.open("gs://bucket/x")
    with pytest.raises(UserError, match="carries credentials"):  # never logged with a run
        Store.open("s3://AKIA:secret@bucket/x")


def test_run_records_and_last_run(tmp_path):
    store = Store.open(tmp_path / "s")
    store.write_run({"run_id": "r1", "pipeline": "p", "started": 1})
    store.write_run({"run_id": "r2", "pipeline": "p", "started": 2})
    store.write_run({"run_id": "r3", "pipeline": "q", "started": 3})
    assert store.last_run("p")["run_id"] == "r2" and store.last_run("z") is None


def test_gc_removes_debris_keeps_committed_and_live_staging(tmp_path):
    store = Store.open(tmp_path / "s")
    store.commit(*staged(store, key="good"))
    os.makedirs(store.work_dir("k", "good"))                       # finished checkpoints
    os.makedirs(store.artifact_dir("k", "torn"))                   # no manifest
    os.makedirs(store.work_dir("k", "unfinished"))                 # resumable: kept
    dead = os.path.join(store.root, "_staging", "k", "x.otherhost.1.ab")
    os.makedirs(dead)
    os.utime(dead, (1, 1))                                        # another node, long ago
    busy = os.path.join(store.root, "_staging", "k", "x.otherhost.2.cd")
    os.makedirs(busy)                                             # another node, just now
    live = store.new_staging_dir("k", "live")                      # this process: alive
    paths = garbage(store)
    assert store.artifact_dir("k", "torn") in paths and dead in paths
    assert store.work_dir("k", "good") in paths
    assert live not in paths and busy not in paths
    assert store.work_dir("k", "unfinished") not in paths
    assert store.artifact_dir("k", "good") not in paths
    removed, _ = collect(store, dry_run=True)
    assert removed == paths and os.path.exists(dead)
    collect(store)
    assert not os.path.exists(dead) and store.is_committed("k", "good")
    store.write_run({"run_id": "r", "pipeline": "p", "started": 1, "ok": True, "states": {}})
    store.write_run({"run_id": "q", "pipeline": "q", "started": 2, "ok": None,
                     "states": {"s": {"key": "good"}}})          # in progress: keeps its keys
    collect(store, unreferenced=True)
    assert store.is_committed("k", "good")
    store.write_run({"run_id": "q", "pipeline": "q", "started": 2, "ok": True, "states": {}})
    collect(store, unreferenced=True)
    assert not store.is_committed("k", "good")


def test_manifest_json_is_plain_json(tmp_path):
    store = Store.open(tmp_path / "s")
    store.commit(*staged(store))
    with open(os.path.join(store.artifact_dir("k", "abc"), MANIFEST)) as f:
        assert json.load(f)["kind"] == "k"


def test_staging_of_another_host_is_kept_while_anything_in_it_is_written(tmp_path):
    """Another node's staging directory is debris only once nothing under it was written
    for a day: a write deep inside counts, though it leaves the top directory's mtime."""
    store = Store.open(str(tmp_path))
    tag = os.path.join(store.root, "_staging", "toy", "k1.another-node.4242.abcd1234")
    deep = os.path.join(tag, "model", "shards")
    os.makedirs(deep)
    old = time.time() - 2 * 24 * 3600
    for d in (tag, os.path.join(tag, "model"), deep):
        os.utime(d, (old, old))
    with open(os.path.join(deep, "part-0.parquet"), "w") as f:
        f.write("being written")
    os.utime(deep, (old, old))  # as if the directory's own entry were old
    assert garbage(store) == []
    os.utime(os.path.join(deep, "part-0.parquet"), (old, old))
    assert garbage(store) == [tag]
