"""Two runs of one pipeline started at the same time on one store, both drivers on the same
Ray cluster: both succeed, every artifact key is committed exactly once (the run that loses
a commit adopts the winner's artifact), nothing is left half-written, and MLflow holds both
runs."""

import os
import subprocess
import sys

from pipelines import Pipeline, run
from pipelines._internal.gc import garbage
from pipelines._internal.store import Store
from pipelines._internal.tracking import default_tracking_uri
from tests.pipelines import toy_stages  # noqa: F401
from tests.pipelines.test_cli import LAUNCH, ROOT, json_document

SPEC = """
name: twice
seed: 0
stages:
  nums: {kind: test-numbers, config: {n: 40, sleep: 8}}
  double: {kind: test-scale, inputs: {numbers: nums}}
  triple: {kind: test-scale, config: {factor: 3.0}, inputs: {numbers: nums}}
"""


def test_two_runs_of_one_pipeline_at_the_same_time(ray_session, tmp_path):
    path, store = tmp_path / "p.yaml", tmp_path / "store"
    path.write_text(SPEC)
    address = ray_session.get_runtime_context().gcs_address
    env = os.environ | {"PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", LAUNCH, "run", str(path), "--store",
                               str(store), "--address", address, "--json", "--quiet"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    docs = [json_document(out) for out, _ in outs]
    stages = [{s["name"]: s for s in d["stages"]} for d in docs]
    # both runs started before either committed 'nums' (it sleeps 8 s): both ran it
    assert stages[0]["nums"]["status"] == stages[1]["nums"]["status"] == "ran"

    st = Store(str(store))
    manifests = st.manifests()
    keys = [(m["kind"], m["key"]) for m in manifests]
    assert len(keys) == len(set(keys)) == 3  # one committed artifact per stage key
    for name in ("nums", "double", "triple"):
        assert stages[0][name]["key"] == stages[1][name]["key"]
        assert stages[0][name]["uri"] == stages[1][name]["uri"]
    by_kind = {m["stage"]: m for m in manifests}
    assert by_kind["nums"]["outputs"]["numbers"]["rows"] == 40
    # the loser's outputs are gone, not left beside the winner's or as debris (what gc
    # would remove besides: the finished stages' work directories, as after any run)
    debris = [g for g in garbage(st) if not g.startswith(os.path.join(st.root, "_work"))]
    assert debris == [], debris
    for kind in ("test-numbers", "test-scale"):
        assert not os.listdir(os.path.join(st.root, "_staging", kind))
    for m in manifests:  # every file the manifest lists is there, with its size
        root = st.artifact_dir(m["kind"], m["key"])
        for out in m["outputs"].values():
            for f in out["files"]:
                assert os.path.getsize(os.path.join(root, out["path"], f["path"])) == f["bytes"]

    from mlflow.tracking import MlflowClient  # both pipeline runs tracked, both finished
    client = MlflowClient(tracking_uri=default_tracking_uri(str(store)))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`distillery.type` = 'pipeline'")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"], runs

    again = run(Pipeline.from_yaml(str(path)), store=str(store), progress=False)
    assert [s.status for s in again.stages] == ["cached"] * 3
