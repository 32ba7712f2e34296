"""Sweeps (``pipelines.sweep`` / ``distill tune``) on a real local Ray, real Tune, real
parquet and a real MLflow store, with the toy stages: bad input is one clear error before
any trial; shared stages run once; the best config re-runs to the same metric; ASHA stops
a bad trial early."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines import Pipeline, UserError, run, sweep
from pipelines._internal.store import Store
from pipelines._internal.tracking import default_tracking_uri
from tests.pipelines import toy_stages

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = "import sys; import tests.pipelines.toy_stages; from pipelines.cli import main; sys.exit(main())"
ROWS = 20


def toy(epochs=3, sleep=0.0, name="toysweep"):
    return Pipeline.from_dict({"name": name, "seed": 0, "stages": {
        "nums": {"kind": "test-numbers", "config": {"n": ROWS}},
        "train": {"kind": "test-train", "config": {"epochs": epochs, "sleep": sleep},
                  "inputs": {"numbers": "nums"}},
        "sum": {"kind": "test-summarize", "inputs": {"a": "nums", "b": "nums"}}}})


BAD = {
    "unknown_stage": ({"trian.lr": {"uniform": [0.1, 1]}}, "train.score",
                      ["--space", "'trian.lr'", "did you mean 'train'"]),
    "unknown_field": ({"train.lrr": {"uniform": [0.1, 1]}}, "train.score",
                      ["'train.lrr'", "no config field 'lrr'", "did you mean 'lr'",
                       "allowed fields: crash_once, epochs, lr, sleep"]),
    "bad_bound": ({"train.lr": {"uniform": [-1, 1]}}, "train.score",
                  ["'train.lr'", "uniform value -1", "fails the field's validation",
                   "greater than 0"]),
    "float_range_on_int": ({"train.epochs": {"uniform": [1, 4]}}, "train.score",
                           ["'train.epochs'", "uniform value 2.5", "integer"]),
    "bad_choice": ({"train.epochs": {"choice": [2, "many"]}}, "train.score",
                   ["choice value 'many'"]),
    "unknown_distribution": ({"train.lr": {"unifrom": [0.1, 1]}}, "train.score",
                             ["unknown distribution 'unifrom'", "did you mean 'uniform'",
                              "allowed: choice, grid, loguniform, randint, uniform"]),
    "reversed_range": ({"train.lr": {"loguniform": [1, 0.1]}}, "train.score",
                       ["loguniform [1, 0.1]", "low must be below high"]),
    "unreported_metric": ({"train.lr": {"uniform": [0.1, 1]}}, "train.scor",
                          ["--metric train.scor", "reports no metric 'scor'",
                           "did you mean 'score'", "loss, score"]),
    "metric_of_unknown_stage": ({"train.lr": {"uniform": [0.1, 1]}}, "trian.score",
                                ["no stage 'trian'", "did you mean 'train'"]),
    "metric_not_swept": ({"train.lr": {"uniform": [0.1, 1]}}, "nums.n",
                         ["stage 'nums' is not changed by the search space",
                          "every trial would get the same value"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_error_before_any_trial(case, tmp_path):
    space, metric, expected = BAD[case]
    store = tmp_path / "store"
    with pytest.raises(UserError) as e:
        sweep(toy(), space, metric, "max", store=str(store), progress=False)
    for part in expected:
        assert part in str(e.value), (part, str(e.value))
    assert not (store / "_runs").exists() and not (store / "mlflow").exists()


def test_grid_needs_random_search(tmp_path):
    with pytest.raises(UserError, match="grid, which --search optuna cannot draw from"):
        sweep(toy(), {"train.lr": {"grid": [0.1, 1]}}, "train.score", "max", search="optuna",
              store=str(tmp_path), progress=False)


@pytest.fixture(scope="module")
def grid_sweep(ray_session, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("sweep-store"))
    result = sweep(toy(sleep=0.3), {"train.lr": {"grid": [0.05, 2.0, 0.5]}}, "train.score",
                   "max", scheduler="fifo", max_concurrent=2, store=store, progress=False)
    return store, result


def test_at_most_max_concurrent_trials_at_once(grid_sweep):
    store, result = grid_sweep
    spans = []
    for m in Store(store).manifests():
        if m["kind"] == "test-train":
            spans.append((m["created"] - m["seconds"], m["created"]))
    assert len(spans) == 3
    most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert most <= 2, spans


def test_shared_stages_run_once_and_trials_reuse_them(grid_sweep):
    store, result = grid_sweep
    # 'sum' does not feed the metric: neither shared nor part of a trial
    assert result.shared_stages == [{"name": "nums", "status": "ran"}]
    assert [t.status for t in result.trials] == ["completed"] * 3
    for t in result.trials:
        assert t.stages == {"nums": "cached", "train": "ran"} and t.epochs == 3
        expected = toy_stages.ToyTrain.score(t.params["train.lr"], 3, ROWS)
        assert t.metric == pytest.approx(expected, rel=1e-9)
    assert result.best == {"params": {"train.lr": 2.0},
                           "metric": max(t.metric for t in result.trials)}
    doc = result.to_json()
    assert set(doc) == {"sweep_run_id", "metric", "mode", "best_config", "best", "trials",
                        "shared_stages"}
    assert set(doc["trials"][0]) == {"trial_id", "params", "metric", "status", "epochs"}
    table = pd.read_parquet(os.path.join(result.directory, "trials.parquet"))
    assert list(table.columns) == ["trial", "train.lr", "metric", "status", "seconds", "epochs",
                                   "error"]
    assert sorted(table["train.lr"]) == [0.05, 0.5, 2.0]
    assert os.path.getsize(os.path.join(result.directory, "metric_vs_params.png")) > 1000


def test_mlflow_has_one_sweep_run_with_nested_trials(grid_sweep):
    store, result = grid_sweep
    client = MlflowClient(default_tracking_uri(store))
    exp = client.get_experiment_by_name("toysweep")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.sweep_run_id]
    trials = [r for r in children if r.data.tags.get("distillery.type") == "trial"]
    assert len(trials) == 3
    assert {float(r.data.params["train.lr"]) for r in trials} == {0.05, 0.5, 2.0}
    assert all(r.data.tags["distillery.stage.nums"] == "cached" for r in trials)
    hist = client.get_metric_history(trials[0].info.run_id, "train.score")
    assert sorted(m.step for m in hist) == [0, 1, 2]
    shared = [r for r in children if r.data.tags.get("distillery.type") == "pipeline"]
    assert len(shared) == 1  # the shared stages' run, nested under the sweep
    arts = {a.path for a in client.list_artifacts(result.sweep_run_id)}
    assert {"metric_vs_params.png", "trials.parquet", "best.yaml"} <= arts


def test_best_config_reruns_to_the_same_metric(grid_sweep, tmp_path):
    _, result = grid_sweep
    spec = yaml.safe_load(open(result.best_config))
    assert spec["stages"]["train"]["config"]["lr"] == 2.0
    again = run(Pipeline.from_yaml(result.best_config), store=str(tmp_path), progress=False)
    assert again["train"].status == "ran"  # a fresh store: computed, not looked up
    assert again["train"].metrics["score"] == pytest.approx(result.best["metric"], rel=1e-12)


def test_second_sweep_finds_everything_cached(grid_sweep):
    store, first = grid_sweep
    again = sweep(toy(sleep=0.3), {"train.lr": {"grid": [0.05, 2.0, 0.5]}}, "train.score",
                  "max", scheduler="fifo", store=store, progress=False)
    assert again.shared_stages == [{"name": "nums", "status": "cached"}]
    assert all(t.stages == {"nums": "cached", "train": "cached"} and t.epochs == 0
               for t in again.trials)
    assert again.best == first.best


def test_asha_stops_a_bad_trial_early(ray_session, tmp_path):
    # one at a time: the good trial sets the bar at every rung, the bad ones fall below it
    result = sweep(toy(epochs=6, sleep=0.4), {"train.lr": {"grid": [2.0, 0.01, 0.02]}},
                   "train.score", "max", scheduler="asha", max_concurrent=1,
                   store=str(tmp_path), progress=False)
    by_lr = {t.params["train.lr"]: t for t in result.trials}
    assert by_lr[2.0].status == "completed" and by_lr[2.0].epochs == 6
    stopped = [t for t in result.trials if t.status == "stopped"]
    assert stopped and all(t.epochs < 6 for t in stopped)
    assert result.total_epochs < 18
    assert result.best["params"] == {"train.lr": 2.0}


def cli(*args):
    return subprocess.run([sys.executable, "-c", LAUNCH, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


PIPELINE = """
name: clisweep
stages:
  nums: {kind: test-numbers, config: {n: 20}}
  train: {kind: test-train, config: {epochs: 2}, inputs: {numbers: nums}}
"""


def test_cli_tune_json_and_bad_input(tmp_path):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    (tmp_path / "space.yaml").write_text("train.lr: {choice: [0.1, 1e-2]}\n")
    (tmp_path / "bad.yaml").write_text("train.lr: {choice: [0.1, -1]}\n")
    bad = cli("tune", str(tmp_path / "p.yaml"), "--space", str(tmp_path / "bad.yaml"),
              "--metric", "train.score", "--mode", "max", "--store", str(tmp_path / "s"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "key 'train.lr': choice value -1 fails the field's validation" in bad.stderr
    good = cli("tune", str(tmp_path / "p.yaml"), "--space", str(tmp_path / "space.yaml"),
               "--metric", "train.score", "--mode", "max", "--samples", "2", "--scheduler",
               "fifo", "--store", str(tmp_path / "s"), "--json")
    assert good.returncode == 0, good.stderr
    doc = json.loads(good.stdout)
    assert doc["metric"] == "train.score" and doc["mode"] == "max"
    assert doc["shared_stages"] == [{"name": "nums", "status": "ran"}]
    assert len(doc["trials"]) == 2 and all(t["status"] == "completed" for t in doc["trials"])
    assert all(t["params"]["train.lr"] in (0.1, 0.01) for t in doc["trials"])
    rerun = cli("run", doc["best_config"], "--store", str(tmp_path / "s"), "--json")
    assert rerun.returncode == 0, rerun.stderr
    stages = {s["name"]: s for s in json.loads(rerun.stdout)["stages"]}
    assert stages["train"]["metrics"]["score"] == pytest.approx(doc["best"]["metric"])


def test_trials_are_scheduled_like_a_run_with_its_retries(ray_session, tmp_path):
    """A trial runs its stages with the runner's scheduler: a stage whose process dies is
    retried as its resources.max_retries allows, and the trial completes."""
    p = Pipeline.from_dict({"name": "retrysweep", "seed": 0, "stages": {
        "nums": {"kind": "test-numbers", "config": {"n": ROWS}},
        "train": {"kind": "test-train", "config": {"epochs": 2, "crash_once": True},
                  "inputs": {"numbers": "nums"}, "resources": {"max_retries": 1}}}})
    result = sweep(p, {"train.lr": {"grid": [0.2, 0.4]}}, metric="train.score", mode="max",
                   samples=1, scheduler="fifo", store=str(tmp_path / "store"), progress=False)
    assert [t.status for t in result.trials] == ["completed", "completed"]
    for t in result.trials:
        assert t.metric == pytest.approx(toy_stages.ToyTrain.score(t.params["train.lr"], 2, ROWS))


def test_a_failed_shared_stage_fails_the_sweep_and_no_trial_trains(ray_session, tmp_path):
    """Tune starts the trials while the driver runs the shared stages; when one of those
    fails, the waiting trials fail at once naming it, no trial stage runs, and the sweep
    raises the shared stage's own error (and its MLflow run is FAILED)."""
    from pipelines import StageFailed
    p = Pipeline.from_dict({"name": "failsweep", "seed": 0, "stages": {
        "nums": {"kind": "test-numbers", "config": {"n": ROWS}},
        "scaled": {"kind": "test-scale", "config": {"fail": "error"},
                   "inputs": {"numbers": "nums"}},
        "train": {"kind": "test-train", "config": {"epochs": 2},
                  "inputs": {"numbers": "scaled"}}}})
    store = str(tmp_path / "store")
    with pytest.raises(StageFailed) as e:
        sweep(p, {"train.lr": {"grid": [0.2, 0.4]}}, metric="train.score", mode="max",
              samples=1, scheduler="fifo", store=store, progress=False)
    assert e.value.stage == "scaled" and "boom in scale" in e.value.cause
    assert not [m for m in Store(store).manifests() if m["kind"] == "test-train"]
    client = MlflowClient(default_tracking_uri(store))
    runs = client.search_runs([client.get_experiment_by_name("failsweep").experiment_id])
    sweeps = [r for r in runs if r.data.tags.get("distillery.type") == "sweep"]
    assert [r.info.status for r in sweeps] == ["FAILED"]


def test_interrupting_the_shared_stages_thread_raises_keyboardinterrupt_in_it():
    """Ctrl-C reaches only the sweep's main thread; ``interrupt`` carries it into the thread
    running the shared stages, which then stops as an interrupted ``distill run`` does."""
    import threading
    import time

    from pipelines._internal.sweep_shared import SharedStages
    seen = threading.Event()

    class Busy(SharedStages):
        def run(self):
            try:
                while True:
                    time.sleep(0.01)
            except KeyboardInterrupt:
                seen.set()

    t = Busy(None, None, None, None, False, {})
    t.start()
    time.sleep(0.1)
    assert t.is_alive() and not seen.is_set()
    t.interrupt()
    t.join(timeout=5)
    assert seen.is_set() and not t.is_alive()
