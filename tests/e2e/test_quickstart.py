"""The quickstart end to end, as a user runs it: real Ray, parquet, Ray Train, MLflow."""

import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines import Pipeline, plan
from pipelines._internal.tracking import default_tracking_uri
from pipelines.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.yaml")
STAGES = ["data", "teacher", "teacher_outputs", "student", "evaluate", "export"]


def distill(capsys, *args) -> tuple[int, dict | None, str]:
    code = main(list(args))
    out = capsys.readouterr()
    try:
        doc = json.loads(out.out) if code == 0 and "--json" in args else None
    except json.JSONDecodeError:
        raise AssertionError(f"not one JSON document on stdout:\n{out.out}\nstderr:\n{out.err}")
    return code, doc, out.err


@pytest.fixture(scope="module")
def quickstart(ray_session, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("quickstart"))
    return store


def test_cold_run_then_fully_cached(quickstart, capsys):
    store = quickstart
    code, cold, err = distill(capsys, "run", QUICKSTART, "--store", store, "--json")
    assert code == 0, err
    assert [s["name"] for s in cold["stages"]] == STAGES
    assert [s["status"] for s in cold["stages"]] == ["ran"] * len(STAGES)
    assert "> student (kd-student) started" in err and "ok evaluate" in err  # progress shown
    m = cold["stages"][STAGES.index("evaluate")]["metrics"]
    assert m["teacher_accuracy"] > 0.9
    assert 0.8 < m["accuracy"] <= 1 and 0.8 < m["agreement"] <= 1
    assert 0 < m["param_ratio"] < 1 and m["speedup"] > 0

    code, warm, err = distill(capsys, "run", QUICKSTART, "--store", store, "--json")
    assert code == 0, err
    assert [s["status"] for s in warm["stages"]] == ["cached"] * len(STAGES)
    assert [s["key"] for s in warm["stages"]] == [s["key"] for s in cold["stages"]]
    assert warm["stages"][STAGES.index("evaluate")]["metrics"] == m

    client = MlflowClient(tracking_uri=default_tracking_uri(store))
    exp = client.get_experiment_by_name("quickstart")
    for doc, status in ((cold, "ran"), (warm, "cached")):
        children = client.search_runs([exp.experiment_id],
                                      f"tags.mlflow.parentRunId = '{doc['run_id']}'")
        by_stage = {c.data.tags["distillery.stage"]: c for c in children}
        assert sorted(by_stage) == sorted(STAGES)
        assert by_stage["student"].data.params["temperature"] == "4.0"
        assert by_stage["evaluate"].data.metrics["accuracy"] == pytest.approx(m["accuracy"])
        assert all(c.data.tags["distillery.status"] == status for c in children)
        if status == "ran":  # plots of the evaluation are MLflow artifacts of its run
            names = [a.path for a in client.list_artifacts(by_stage["evaluate"].info.run_id)]
            assert any(n.endswith(".png") for n in names), names
    epochs = client.get_metric_history(
        client.search_runs([exp.experiment_id],
                           f"tags.mlflow.parentRunId = '{cold['run_id']}' and "
                           f"tags.`distillery.stage` = 'student'")[0].info.run_id, "train_loss")
    assert len(epochs) >= 2 and epochs[-1].value < epochs[0].value


LOAD = """
import json, sys, mlflow, numpy as np
from sklearn.datasets import load_digits
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/quickstart-student/1")
digits = load_digits()
out = model.predict((digits.images[:200] / 16).astype("float32")[:, None])
print(json.dumps(float((out["label"].to_numpy() == digits.target[:200]).mean())))
"""


def test_registered_student_loads_in_a_fresh_process_and_is_exported(quickstart, capsys,
                                                                      tmp_path):
    """The issue's acceptance: ``--register student=quickstart-student`` on the (cached)
    quickstart, the registry version loaded by ``mlflow.pyfunc`` in a fresh process, a
    second run makes no second version, the weights exist once; the exported folder's card
    parses and carries the evaluation's metrics; it loads with PyTorchModelHubMixin."""
    import subprocess
    import sys

    from huggingface_hub import ModelCard
    for created in ("registered", "already registered"):
        code, doc, err = distill(capsys, "run", QUICKSTART, "--store", quickstart, "--json",
                                 "--register", "student=quickstart-student")
        assert code == 0, err
        assert doc["registered"]["student"] == {"name": "quickstart-student", "version": "1",
                                                "created": created == "registered"}
    uri = default_tracking_uri(quickstart)
    proc = subprocess.run([sys.executable, "-c", LOAD, uri], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) > 0.8  # the student's own accuracy
    student = next(s["uri"] for s in doc["stages"] if s["name"] == "student")
    with open(os.path.join(student, "model", "model.safetensors"), "rb") as f:
        content = f.read()
    copies = set()
    for d, _, fs in os.walk(quickstart):  # every file holding the weights: one inode
        for f in fs:
            path = os.path.join(d, f)
            if f.endswith(".safetensors") and Path(path).read_bytes() == content:
                st = os.stat(path)
                copies.add((st.st_dev, st.st_ino))
    assert len(copies) == 1, copies  # stored once: the export links, the registry points
    evaluate = doc["stages"][STAGES.index("evaluate")]["metrics"]
    folder = next(s["uri"] for s in doc["stages"] if s["name"] == "export")
    card = ModelCard.load(os.path.join(folder, "folder", "README.md"))
    assert card.data.pipeline_tag == "image-classification"
    assert card.data.base_model.startswith("distillery:fit-classifier/")
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == pytest.approx(evaluate["accuracy"])
    assert results["speedup"] == pytest.approx(evaluate["speedup"])
    from stages.models.classifiers import MLP
    assert isinstance(MLP.from_pretrained(os.path.join(folder, "folder")), MLP)


def test_temperature_change_plans_student_and_evaluate(quickstart, capsys):
    """The CLI plan names what a config change re-runs and why (that a run then does
    exactly what the plan said is tested on toy stages in tests/pipelines/test_runner.py)."""
    code, planned, _ = distill(capsys, "plan", QUICKSTART, "--store", quickstart,
                               "--set", "student.temperature=2", "--json")
    assert code == 0
    statuses = {s["name"]: s["status"] for s in planned["stages"]}
    assert statuses == {"data": "cached", "teacher": "cached", "teacher_outputs": "cached",
                        "student": "run", "evaluate": "run", "export": "run"}
    reasons = {s["name"]: s["reason"] for s in planned["stages"]}
    assert reasons["student"] == "config changed: temperature 4.0 -> 2.0"
    assert reasons["evaluate"].startswith("input changed")


def test_python_example_builds_the_same_pipeline(quickstart):
    import runpy
    build = runpy.run_path(os.path.join(ROOT, "examples", "quickstart.py"))["build"]
    assert build().to_dict() == Pipeline.from_yaml(QUICKSTART).to_dict()
    decisions = plan(build(), store=quickstart).decisions
    assert all(d.status == "cached" for d in decisions.values())


def test_nan_loss_fails_the_stage_naming_the_step(quickstart, capsys):
    code, _, err = distill(capsys, "run", QUICKSTART, "--store", quickstart, "--quiet",
                           "--set", "student.lr=1e30")
    assert code == 1
    assert "stage 'student' failed: FloatingPointError:" in err
    assert "at epoch" in err and "step" in err
    assert "finished (committed, will be reused): data, teacher, teacher_outputs" in err
    assert "Traceback" not in err


def test_scaling_out_reuses_every_cached_artifact(quickstart, capsys):
    """More actors for teacher generation and more Ray Train workers for the student are
    execution settings: the plan keeps every artifact, and a run confirms it."""
    scale = ["--set", "teacher_outputs.actors=2", "--set", "student.num_workers=2"]
    code, planned, _ = distill(capsys, "plan", QUICKSTART, "--store", quickstart, *scale,
                               "--json")
    assert code == 0
    assert [s["status"] for s in planned["stages"]] == ["cached"] * len(STAGES)
    reasons = {s["name"]: s["reason"] for s in planned["stages"]}
    assert reasons["teacher_outputs"] == ("artifact committed; execution settings changed "
                                          "(actors 'auto' -> 2): cached artifact reused")
    assert "num_workers 'auto' -> 2" in reasons["student"]
    code, ran, err = distill(capsys, "run", QUICKSTART, "--store", quickstart, *scale,
                             "--json")
    assert code == 0, err
    assert [s["status"] for s in ran["stages"]] == ["cached"] * len(STAGES)
    code, odd, err = distill(capsys, "plan", QUICKSTART, "--store", quickstart,
                             "--set", "student.num_workers=3", "--json")
    assert code == 2 and "batch_size (64) must be a multiple of num_workers (3)" in err
