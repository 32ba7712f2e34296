"""The runner on a real local Ray, with real parquet and a real MLflow store."""

import json
import os

import pytest
from mlflow.tracking import MlflowClient

from pipelines import Pipeline, StageFailed, UserError, plan, run
from pipelines._internal.store import Store
from pipelines._internal.tracking import default_tracking_uri
from tests.pipelines import toy_stages  # noqa: F401


def diamond(**overrides):
    spec = {"name": "diamond", "seed": 1, "stages": {
        "nums": {"kind": "test-numbers", "config": {"n": 40, "sleep": 2.0}},
        "double": {"kind": "test-scale", "config": {"factor": 2}, "inputs": {"numbers": "nums"}},
        "triple": {"kind": "test-scale", "config": {"factor": 3}, "inputs": {"numbers": "nums"}},
        "sum": {"kind": "test-summarize", "inputs": {"a": "double", "b": "triple"}}}}
    return Pipeline.from_dict(spec, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def first_runs(ray_session, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("store"))
    cold = run(diamond(), store=store, progress=False)
    warm = run(diamond(), store=store, progress=False)
    return store, cold, warm


def test_cold_run_runs_everything_with_real_outputs(first_runs):
    store, cold, _ = first_runs
    assert [s.status for s in cold.stages] == ["ran"] * 4
    sums = cold["sum"].metrics
    assert sums["rows"] == 40
    assert sums["sum_b"] == pytest.approx(1.5 * sums["sum_a"], rel=1e-4)
    m = json.load(open(os.path.join(cold["nums"].uri, "manifest.json")))
    assert m["outputs"]["numbers"]["rows"] == 40 and m["libraries"]["ray"] == "2.60.0"
    assert m["mlflow_run_id"] and m["stage"] == "nums"


def test_independent_branches_run_concurrently(first_runs):
    _, cold, _ = first_runs
    spans = []
    for name in ("double", "triple"):
        m = json.load(open(os.path.join(cold[name].uri, "manifest.json")))
        spans.append((m["created"] - m["seconds"], m["created"]))
    (a0, a1), (b0, b1) = spans
    assert a0 < b1 and b0 < a1, f"branches did not overlap: {spans}"


def test_second_run_is_all_cached_and_fast(first_runs):
    _, cold, warm = first_runs
    assert [s.status for s in warm.stages] == ["cached"] * 4
    assert [s.key for s in warm.stages] == [s.key for s in cold.stages]
    assert warm["sum"].metrics == cold["sum"].metrics


def test_changed_config_reruns_only_downstream_as_planned(first_runs):
    store, cold, _ = first_runs
    p = diamond(**{"triple.factor": 4})
    predicted = plan(p, store=store)
    assert {n: d.status for n, d in predicted.decisions.items()} == {
        "nums": "cached", "double": "cached", "triple": "run", "sum": "run"}
    assert predicted.decisions["triple"].reason == "config changed: factor 3.0 -> 4.0"
    assert predicted.decisions["sum"].reason == "input changed: b (upstream 'triple' re-runs)"
    result = run(p, store=store, progress=False)
    assert {s.name: s.status for s in result.stages} == {
        "nums": "cached", "double": "cached", "triple": "ran", "sum": "ran"}
    assert result["sum"].metrics["sum_b"] == pytest.approx(2 * result["sum"].metrics["sum_a"], rel=1e-4)


def test_force_reruns_one_stage(first_runs):
    store, cold, _ = first_runs
    st = Store(store)
    before = st.manifest("test-scale", cold["double"].key)["created"]
    work = st.work_dir("test-scale", cold["double"].key)
    os.makedirs(work, exist_ok=True)
    open(os.path.join(work, "old-checkpoint"), "w").close()
    p = plan(diamond(), store=store, force=["double"])
    assert p.decisions["sum"].status == "cached"
    assert "runs too if 'double' (forced) commits different content" in p.decisions["sum"].reason
    assert p.checks == ["sum"]
    result = run(diamond(), store=store, force=["double"], progress=False)
    # double is deterministic: the same content, so sum's artifact still holds
    assert {s.name: s.status for s in result.stages} == {
        "nums": "cached", "double": "ran", "triple": "cached", "sum": "cached"}
    assert "inputs' content is unchanged" in result["sum"].reason
    assert result["double"].key == cold["double"].key
    assert st.manifest("test-scale", cold["double"].key)["created"] > before
    assert not os.path.exists(os.path.join(work, "old-checkpoint"))  # no resume from it


def test_forced_stage_with_new_content_reruns_downstream_in_the_same_run(ray_session,
                                                                       tmp_path):
    store = str(tmp_path / "store")
    noisy = diamond(**{"double.noise": "true"})
    cold = run(noisy, store=store, progress=False)
    result = run(noisy, store=store, force=["double"], progress=False)
    assert {s.name: s.status for s in result.stages} == {
        "nums": "cached", "double": "ran", "triple": "cached", "sum": "ran"}
    assert result["sum"].key == cold["sum"].key  # replaced under its key
    assert result["sum"].reason.startswith("input content changed: a")
    assert result["sum"].metrics["sum_a"] != cold["sum"].metrics["sum_a"]
    m = Store(store).manifest("test-summarize", cold["sum"].key)
    assert m["created"] > Store(store).manifest("test-scale", cold["double"].key)["created"]


def test_execution_settings_leave_the_artifact_cached(first_runs):
    store, cold, _ = first_runs
    p = diamond(**{"triple.threads": 4})
    predicted = plan(p, store=store)
    assert predicted.decisions["triple"].status == "cached"
    assert predicted.decisions["triple"].reason == (
        "artifact committed; execution settings changed (threads 1 -> 4): cached artifact "
        "reused")
    result = run(p, store=store, progress=False)
    assert [s.status for s in result.stages] == ["cached"] * 4
    assert result["triple"].key == cold["triple"].key


def test_mlflow_parent_with_one_nested_run_per_stage(first_runs):
    store, cold, warm = first_runs
    client = MlflowClient(tracking_uri=default_tracking_uri(store))
    exp = client.get_experiment_by_name("diamond")
    for result, status in ((cold, "ran"), (warm, "cached")):
        parent = client.get_run(result.run_id)
        assert parent.info.status == "FINISHED"
        children = client.search_runs([exp.experiment_id],
                                      f"tags.mlflow.parentRunId = '{result.run_id}'")
        by_name = {c.data.tags["distillery.stage"]: c for c in children}
        assert set(by_name) == {"nums", "double", "triple", "sum"}
        assert all(c.data.tags["distillery.status"] == status for c in children)
        assert by_name["triple"].data.params["factor"] == "3.0"
        assert by_name["sum"].data.metrics["rows"] == 40
    loss = client.get_metric_history(
        [c for c in client.search_runs([exp.experiment_id],
                                       f"tags.mlflow.parentRunId = '{cold.run_id}'")
         if c.data.tags["distillery.stage"] == "double"][0].info.run_id, "loss")
    assert [m.step for m in loss] == [0, 1, 2]


def test_failing_stage_names_cause_finished_and_resume(ray_session, tmp_path):
    p = diamond(**{"triple.fail": "error", "nums.sleep": 0})
    with pytest.raises(StageFailed) as e:
        run(p, store=str(tmp_path), progress=False, command="distill run d.yaml")
    msg = str(e.value)
    assert "stage 'triple' failed: RuntimeError: boom in scale" in msg
    assert "finished (committed, will be reused): nums" in msg
    assert "resume with: distill run d.yaml" in msg
    result = e.value.result
    assert not Store(str(tmp_path)).is_committed("test-scale", result["triple"].key)
    assert Store(str(tmp_path)).is_committed("test-scale", result["double"].key)
    rec = Store(str(tmp_path)).runs()[-1]
    assert rec["ok"] is False and rec["outcome"] == "failed"
    assert rec["stages"]["triple"]["status"] == "failed"
    assert rec["stages"]["sum"]["status"] == "skipped"
    assert [s["name"] for s in result.to_json()["stages"]] == ["nums", "double", "triple"]
    client = MlflowClient(tracking_uri=default_tracking_uri(str(tmp_path)))
    assert client.get_run(result.run_id).info.status == "FAILED"
    children = client.search_runs([client.get_experiment_by_name("diamond").experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.run_id}'")
    status = {c.data.tags["distillery.stage"]: c.info.status for c in children}
    assert status == {"nums": "FINISHED", "double": "FINISHED", "triple": "FAILED"}
    staging = os.path.join(tmp_path, "_staging", "test-scale")
    assert not os.path.isdir(staging) or os.listdir(staging) == []


def test_nan_metric_fails_saying_at_which_step(ray_session, tmp_path):
    p = diamond(**{"double.fail": "nan", "nums.sleep": 0})
    with pytest.raises(StageFailed, match=r"stage 'double' failed: FloatingPointError: "
                                          r"metric 'loss' is nan at step 2"):
        run(p, store=str(tmp_path), progress=False)


def test_user_error_inside_stage_is_flagged(ray_session, tmp_path):
    with pytest.raises(StageFailed) as e:
        run(diamond(**{"double.fail": "user", "nums.sleep": 0}), store=str(tmp_path), progress=False)
    assert e.value.user_error and "field 'factor' is bad" in str(e.value)


def test_worker_crash_is_retried_as_configured(ray_session, tmp_path):
    spec = diamond(**{"double.fail": "crash-once", "nums.sleep": 0}).to_dict()
    with pytest.raises(StageFailed, match="stage 'double' failed: .*(Worker|died|crash)"):
        run(Pipeline.from_dict(spec), store=str(tmp_path / "a"), progress=False)
    spec["stages"]["double"]["resources"] = {"max_retries": 1}
    result = run(Pipeline.from_dict(spec), store=str(tmp_path / "b"), progress=False)
    assert result["double"].status == "ran"


def test_code_change_without_version_bump_is_warned_not_trusted_silently(first_runs):
    store, cold, _ = first_runs
    path = os.path.join(cold["nums"].uri, "manifest.json")
    m = json.load(open(path))
    m["code_hash"] = "0" * 16       # as if built by other code under the same version
    with open(path, "w") as f:
        json.dump(m, f)
    p = plan(diamond(), store=store)
    assert p.decisions["nums"].status == "cached"
    assert any("stage 'nums' (test-numbers): its code changed" in w and "--force nums" in w
               for w in p.warnings)


def test_resources_the_cluster_cannot_give_are_a_user_error(ray_session, tmp_path):
    spec = diamond(**{"nums.sleep": 0}).to_dict()
    spec["stages"]["nums"]["resources"] = {"num_gpus": 64}
    with pytest.raises(UserError, match=r"stage 'nums' \(test-numbers\): resources.num_gpus 64 "
                                        r"is more than the Ray cluster has"):
        run(Pipeline.from_dict(spec), store=str(tmp_path), progress=False)
    rec = Store(str(tmp_path)).runs()[-1]
    assert rec["ok"] is False and rec["outcome"] == "failed"


def test_secret_config_values_are_written_nowhere(ray_session, tmp_path):
    """A secret-looking config value changes the cache key, but is in no file of the store
    (manifests, run records, the MLflow database) and in no plan reason."""
    spec = {"name": "secret", "seed": 0, "stages": {
        "nums": {"kind": "test-numbers", "config": {"n": 5, "api_token": "sk-LEAK-1"}}}}
    store = str(tmp_path / "store")
    first = run(Pipeline.from_dict(spec), store=store, progress=False)
    again = Pipeline.from_dict(spec, ["nums.api_token=sk-LEAK-2"])
    assert plan(again, store=store).decisions["nums"].reason == (
        "config changed: a value that is not shown (a secret-looking key)")
    second = run(again, store=store, progress=False)
    assert second["nums"].status == "ran" and second["nums"].key != first["nums"].key
    files = [os.path.join(d, f) for d, _, fs in os.walk(store) for f in fs]
    assert any(f.endswith("mlflow.db") for f in files) and any("_runs" in f for f in files)
    leaked = [f for f in files if b"sk-LEAK" in open(f, "rb").read()]
    assert leaked == []


def test_a_variadic_input_gets_each_stage_by_name(first_runs):
    store, cold, _ = first_runs
    p = Pipeline.from_dict({"name": "many", "seed": 1, "stages": {
        "nums": {"kind": "test-numbers", "config": {"n": 40, "sleep": 2.0}},
        "double": {"kind": "test-scale", "config": {"factor": 2}, "inputs": {"numbers": "nums"}},
        "count": {"kind": "test-count-many", "inputs": {"parts": ["nums", "double"]}}}})
    result = run(p, store=store, progress=False)
    assert result["nums"].status == "cached" and result["double"].status == "cached"
    assert result["count"].metrics == {"rows/nums": 40, "rows/double": 40}
    m = Store(store).manifest("test-count-many", result["count"].key)
    assert m["inputs"]["parts"] == [f"{cold['nums'].key}/numbers", f"{cold['double'].key}/scaled"]
    from pipelines.cli import main
    assert main(["lineage", result["count"].key[:12], "--store", store]) == 0


def test_a_stage_made_from_content_that_was_remade_since_runs_again(ray_session, tmp_path,
                                                                   capsys):
    """Freshness across runs: another pipeline re-made 'double' (same key, other content);
    the next plan of the diamond sees that 'sum' was made from the old content."""
    store = str(tmp_path / "store")
    noisy = diamond(**{"double.noise": "true"})
    cold = run(noisy, store=store, progress=False)
    spec = noisy.to_dict()
    only = Pipeline.from_dict({"name": "only-double", "seed": spec["seed"], "stages": {
        n: spec["stages"][n] for n in ("nums", "double")}})
    again = run(only, store=store, force=["double"], progress=False)
    assert again["double"].key == cold["double"].key
    predicted = plan(noisy, store=store)
    assert predicted.decisions["sum"].status == "run"
    assert predicted.decisions["sum"].reason.startswith("input content changed: a (an upstream "
                                                        "artifact was remade")
    assert predicted.decisions["triple"].status == "cached"
    result = run(noisy, store=store, progress=False)
    assert result["sum"].status == "ran" and result["sum"].key == cold["sum"].key
    assert plan(noisy, store=store).to_run() == []
    from pipelines.cli import main
    assert main(["lineage", result["sum"].key[:12], "--store", store]) == 0
    assert "a <- scaled of test-scale" in capsys.readouterr().out
