"""The quickstart end to end on an ``s3://`` store (moto's S3 server on loopback, endpoint
and credentials from the environment as on a cluster node): every artifact, run record,
Ray Train checkpoint and MLflow artifact is on the store; the second run is fully cached."""

import json

import boto3
import pytest
from mlflow.tracking import MlflowClient

from pipelines._internal.gc import garbage
from pipelines._internal.store import Store
from pipelines._internal.tracking import default_tracking_uri
from pipelines.cli import main
from tests.conftest import S3_BUCKET
from tests.e2e.test_quickstart import QUICKSTART, STAGES

FAST = ["--set", "teacher.epochs=5", "--set", "student.epochs=3",
        "--set", "student.num_workers=1",     # Ray Train, its checkpoints on the store
        "--set", "teacher_outputs.actors=2"]  # an actor pool: its shards written to the store


def distill(capsys, *args) -> tuple[int, dict, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else {}, out.err


def keys(prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET,
                                                                         Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_quickstart_on_s3_then_fully_cached(ray_session, s3_uri, capsys):
    code, cold, err = distill(capsys, "run", QUICKSTART, "--store", s3_uri, "--json", *FAST)
    assert code == 0, err
    assert [s["status"] for s in cold["stages"]] == ["ran"] * len(STAGES)
    m = cold["stages"][STAGES.index("evaluate")]["metrics"]
    assert m["teacher_accuracy"] > 0.85 and 0.7 < m["accuracy"] <= 1
    assert all(s["uri"].startswith(s3_uri + "/") for s in cold["stages"])

    code, warm, err = distill(capsys, "run", QUICKSTART, "--store", s3_uri, "--json", *FAST)
    assert code == 0, err
    assert [s["status"] for s in warm["stages"]] == ["cached"] * len(STAGES)
    assert [s["key"] for s in warm["stages"]] == [s["key"] for s in cold["stages"]]
    assert warm["stages"][STAGES.index("evaluate")]["metrics"] == m

    store = Store.open(s3_uri, create=False)
    prefix = store.prefix + "/"
    on_store = keys(prefix)
    manifests = {m["stage"]: m for m in store.manifests()}
    assert sorted(manifests) == sorted(STAGES)
    for man in manifests.values():  # every listed file is on the store, under the commit
        sizes = {k: o["Size"] for o in boto3.client("s3").list_objects_v2(
            Bucket=S3_BUCKET, Prefix=f"{prefix}{man['kind']}/{man['key']}/")["Contents"]
            for k in [o["Key"]]}
        for out in man["outputs"].values():
            for f in out["files"]:
                key = f"{prefix}{man['kind']}/{man['key']}/{man['data']}/{out['path']}/{f['path']}"
                assert sizes[key] == f["bytes"], key
    # Ray Data wrote the teacher's outputs straight to the store: parquet under the commit
    signal = manifests["teacher_outputs"]["outputs"]["signal"]
    assert signal["rows"] == 1797 and any(f["path"].endswith(".parquet")
                                          for f in signal["files"])
    # run records, Ray Train's checkpoints, the evaluation's plots logged to MLflow
    assert {f"{prefix}_runs/{d['run_id']}.json" for d in (cold, warm)} <= set(on_store)
    student = manifests["student"]
    assert any(k.startswith(f"{prefix}_work/kd-student/{student['key']}/ray_train/")
               and "checkpoint" in k for k in on_store)
    plots = [k for k in on_store if k.startswith(f"{prefix}mlflow/artifacts/")
             and k.endswith(".png")]
    assert plots, on_store[:20]
    client = MlflowClient(tracking_uri=default_tracking_uri(s3_uri))
    exp = client.get_experiment_by_name("quickstart")
    assert exp.artifact_location == f"{s3_uri}/mlflow/artifacts"
    # nothing half-written: what gc would remove is only the finished stages' checkpoints
    assert [g for g in garbage(store) if "/_work/" not in g] == []


def test_plan_and_ls_read_an_s3_store(ray_session, s3_uri, capsys):
    assert main(["plan", QUICKSTART, "--store", s3_uri, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["store"] == s3_uri
    assert main(["ls", "--store", s3_uri]) == 0
    assert "no committed artifacts in " + s3_uri in capsys.readouterr().out


@pytest.mark.parametrize("uri, match", [
    ("s3://no-such-bucket-here/x", "store 's3://no-such-bucket-here/x' cannot be written"),
    ("gs://bucket/x", "scheme 'gs://'"),
])
def test_bad_store_uri_is_one_message(s3_server, capsys, uri, match):
    assert main(["run", QUICKSTART, "--store", uri]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
