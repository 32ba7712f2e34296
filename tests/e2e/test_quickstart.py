"""The quickstart end to end, as a user runs it: real Ray, parquet, Ray Train, MLflow."""

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from pipelines import Pipeline, plan
from pipelines._internal.tracking import default_tracking_uri
from pipelines.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "examples", "quickstart.yaml")
STAGES = ["data", "teacher", "teacher_outputs", "student", "evaluate"]


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
    assert [s["status"] for s in cold["stages"]] == ["ran"] * 5
    assert "> student (kd-student) started" in err and "ok evaluate" in err  # progress shown
    m = cold["stages"][-1]["metrics"]
    assert m["teacher_accuracy"] > 0.9
    assert 0.8 < m["accuracy"] <= 1 and 0.8 < m["agreement"] <= 1
    assert 0 < m["param_ratio"] < 1 and m["speedup"] > 0

    code, warm, err = distill(capsys, "run", QUICKSTART, "--store", store, "--json")
    assert code == 0, err
    assert [s["status"] for s in warm["stages"]] == ["cached"] * 5
    assert [s["key"] for s in warm["stages"]] == [s["key"] for s in cold["stages"]]
    assert warm["stages"][-1]["metrics"] == m

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


def test_temperature_change_plans_student_and_evaluate(quickstart, capsys):
    """The CLI plan names what a config change re-runs and why (that a run then does
    exactly what the plan said is tested on toy stages in tests/pipelines/test_runner.py)."""
    code, planned, _ = distill(capsys, "plan", QUICKSTART, "--store", quickstart,
                               "--set", "student.temperature=2", "--json")
    assert code == 0
    statuses = {s["name"]: s["status"] for s in planned["stages"]}
    assert statuses == {"data": "cached", "teacher": "cached", "teacher_outputs": "cached",
                        "student": "run", "evaluate": "run"}
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
    assert [s["status"] for s in planned["stages"]] == ["cached"] * 5
    reasons = {s["name"]: s["reason"] for s in planned["stages"]}
    assert reasons["teacher_outputs"] == ("artifact committed; execution settings changed "
                                          "(actors 1 -> 2): cached artifact reused")
    assert "num_workers 1 -> 2" in reasons["student"]
    code, ran, err = distill(capsys, "run", QUICKSTART, "--store", quickstart, *scale,
                             "--json")
    assert code == 0, err
    assert [s["status"] for s in ran["stages"]] == ["cached"] * 5
    code, odd, err = distill(capsys, "plan", QUICKSTART, "--store", quickstart,
                             "--set", "student.num_workers=3", "--json")
    assert code == 2 and "batch_size (64) must be a multiple of num_workers (3)" in err
