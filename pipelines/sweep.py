"""Ray Tune sweeps over any config field of any stage of a pipeline.

    from pipelines import Pipeline, sweep
    p = Pipeline.from_yaml("examples/quickstart.yaml")
    result = sweep(p, {"student.temperature": {"uniform": [1, 8]},
                       "student.lr": {"loguniform": [1e-4, 0.1]}},
                   metric="student.train_accuracy", mode="max", samples=6)
    result.best_config   # a pipeline file that ``distill run`` accepts

or ``distill tune CONFIG --space SPACE.yaml --metric STAGE.METRIC --mode max``.

1. The space and the metric are checked against the pipeline before anything runs
   (``sweep_space``): unknown fields (did you mean), values a field rejects, a metric the
   stage does not report or a stage the space cannot change are one clear error.
2. The stages the metric needs that the space cannot change (neither their config nor any
   of their inputs) are *shared*: they run once, or are found in the store, with the normal
   runner, in the driver, while Tune starts the trials; the trials wait for them (the
   board's gate) and fail at once, naming the error, if they fail. Stages downstream of
   the metric's stage are not needed to rank trials and do not run in them.
3. Every trial (``sweep_trial.run_trial``) runs the rest through the same cache: the shared
   artifacts are cache hits, and trials with equal upstream configs share those too. The
   metric goes to Tune after every epoch of the stage that logs it, so ASHA stops bad
   trials early; stopped trials are marked ``stopped``.
4. MLflow: one sweep run; the shared stages' pipeline run and one run per trial (params,
   metric per epoch, final stage metrics, status) nested under it; a scatter plot of the
   metric against every parameter, the results table and the best config as artifacts.
5. Outputs in ``<store>/_runs/sweeps/<sweep id>/``: ``best.yaml`` (the best completed
   trial's whole pipeline), ``trials.parquet`` (trial, parameters, metric, status, time,
   epochs), ``metric_vs_params.png``, ``sweep.json`` (what ``--json`` prints).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid

from .errors import UserError, allowed_list, did_you_mean
from ._internal.sweep_report import (SweepResult, TrialResult, finish, fmt, fmt_params,
                                      print_table)  # noqa: F401  (print_table: the CLI's)
from ._internal.sweep_space import Param, load_space, max_epochs, parse_space

SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("random", "optuna", "hyperopt")
MODES = ("max", "min")


# -- checks before anything runs ---------------------------------------------------------
def check_metric(pipeline, metric: str, store=None) -> tuple[str, str]:
    """``STAGE.METRIC``: the stage must exist and, as far as can be known before running
    it, report the metric (its class's declared ``metrics``, else what committed
    artifacts of its kind reported)."""
    stage, dot, name = str(metric).partition(".")
    if not dot or not stage or not name:
        raise UserError(f"--metric: {metric!r} is not valid; expected STAGE.METRIC, e.g. "
                        f"'{next(reversed(pipeline.nodes))}.accuracy'")
    if stage not in pipeline.nodes:
        raise UserError(f"--metric {metric}: no stage '{stage}'{did_you_mean(stage, pipeline.nodes)}"
                        f"; stages: {allowed_list(pipeline.nodes)}")
    node = pipeline.nodes[stage]
    known, source = tuple(type(node.stage).metrics), "reports"
    if not known and store is not None:
        known = tuple(sorted({k for m in store.manifests() if m.get("kind") == node.kind
                              for k in m.get("metrics", {})}))
        source = "reported in earlier runs"
    if known and name not in known:
        raise UserError(f"--metric {metric}: stage '{stage}' ({node.kind}) reports no metric "
                        f"'{name}'{did_you_mean(name, known)}; it {source}: {allowed_list(known)}")
    return stage, name


def split_stages(pipeline, params: list[Param], metric_stage: str) -> tuple[list, list]:
    """(shared, trial) stages among those the metric's stage needs."""
    from ._internal.sweep_trial import _needed
    affected = {p.stage for p in params}
    for p in params:
        affected |= pipeline.downstream(p.stage)
    needed = _needed(pipeline, metric_stage)
    if metric_stage not in affected:
        raise UserError(f"--metric {metric_stage}.*: stage '{metric_stage}' is not changed by the "
                        f"search space (neither its config nor its inputs), so every trial would "
                        f"get the same value; name a metric of a stage the space affects: "
                        f"{allowed_list(affected)}")
    return [n for n in needed if n not in affected], [n for n in needed if n in affected]


def _check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{what}: {value!r} is not valid; allowed: {allowed_list(allowed)}"
                        f"{did_you_mean(str(value), allowed)}")


def _check_count(what: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UserError(f"{what}: {value!r} is not valid; expected an integer >= 1")


# -- the sweep -------------------------------------------------------------------------
def sweep(pipeline, space, metric: str, mode: str, samples: int | None = None,
          scheduler: str = "asha", search: str = "random", max_concurrent: int | None = None,
          store: str = ".distill", address: str | None = None, tracking_uri: str | None = None,
          progress: bool = True) -> SweepResult:
    """Search ``space`` (a dict or a YAML file of ``stage.field: {distribution: values}``)
    for the best ``metric`` ('STAGE.METRIC', ``mode`` max or min). ``samples``: trials
    (default 10; 1 when the space is all ``grid``, whose every value is tried per sample).
    ``max_concurrent``: at most this many trials at once (default: half the cluster's CPUs,
    each trial's training workers plus the Ray Data tasks feeding them)."""
    from ._internal.progress import Display
    from ._internal.runner import connect_ray
    from ._internal.planner import Plan, make_plan
    from ._internal.store import Store
    from ._internal.tracking import Tracker, resolve_tracking_uri

    _check_choice("--mode", mode, MODES)
    _check_choice("--scheduler", scheduler, SCHEDULERS)
    _check_choice("--search", search, SEARCHERS)
    _check_count("--samples", samples)
    _check_count("--max-concurrent", max_concurrent)
    params = parse_space(load_space(space), pipeline)
    grid = [p.key for p in params if p.dist == "grid"]
    if grid and search != "random":
        raise UserError(f"--space: key '{grid[0]}' uses grid, which --search {search} cannot "
                        f"draw from; use choice, or --search random")
    st = Store.open(store)
    metric_stage, metric_name = check_metric(pipeline, metric, st)
    shared, trial_stages = split_stages(pipeline, params, metric_stage)
    if samples is None:
        samples = 1 if len(grid) == len(params) else 10

    display = Display(enabled=progress)
    connect_ray(address, dashboard=scheduler == "asha")
    import ray
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if max_concurrent is None:
        max_concurrent = max(1, int(cpus // 2))

    sweep_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    out_dir = os.path.join(st.runs_dir(), "sweeps", sweep_id)
    os.makedirs(out_dir, exist_ok=True)
    tracker = Tracker(resolve_tracking_uri(st.root, tracking_uri), pipeline.name, st.root)
    sweep_run = tracker.client.create_run(
        tracker.experiment_id, run_name=f"sweep {pipeline.name}",
        tags={"distillery.type": "sweep", "distillery.sweep": sweep_id,
              "distillery.store": st.root}).info.run_id
    tracker._params(sweep_run, {"metric": metric, "mode": mode, "samples": str(samples),
                                "scheduler": scheduler, "search": search,
                                "max_concurrent": str(max_concurrent), "seed": str(pipeline.seed),
                                **{f"space.{p.key}": json.dumps({p.dist: list(p.values)})
                                   for p in params}})
    outcome = "FAILED"
    board = shared_run = None
    try:
        from ._internal.board import start_board_actor
        from ._internal.sweep_shared import SharedStages
        board = start_board_actor()
        if shared:  # run by the driver while Tune starts the trials, which wait for them
            full = make_plan(pipeline, st)
            sub = Plan(pipeline, st, {n: full.states[n] for n in shared},
                       {n: full.decisions[n] for n in shared},
                       [w for w in full.warnings if any(f"'{n}'" in w for n in shared)])
            display.event(f"sweep {sweep_id}: shared stages {', '.join(shared)}")
            shared_run = SharedStages(sub, board, address, tracking_uri, progress, {
                "mlflow.parentRunId": sweep_run, "distillery.sweep": sweep_id})
            shared_run.start()
        else:
            board.open_gate.remote(True)
        display.event(f"sweep {sweep_id}: {samples} sample(s) of {', '.join(p.key for p in params)}"
                      f" on {', '.join(trial_stages)}; {scheduler}, {search} search, at most "
                      f"{max_concurrent} at once")
        trials = _tune(pipeline, params, st, trial_stages, metric, mode, samples, scheduler,
                       search, max_concurrent, gpus, sweep_id, display, board)
        shared_status = []
        if shared_run is not None:
            shared_run.join()
            if shared_run.error is not None:  # the trials failed at the gate, saying so
                raise shared_run.error
            shared_status = [{"name": s.name, "status": s.status}
                             for s in shared_run.result.stages]
        result = finish(pipeline, params, trials, shared_status, metric, mode, sweep_run,
                        out_dir, tracker)
        outcome = "FINISHED"
        return result
    except (KeyboardInterrupt, SystemExit):
        outcome = "KILLED"
        if shared_run is not None and shared_run.is_alive():
            shared_run.interrupt()  # its stages stop and its MLflow run ends KILLED too
            shared_run.join(timeout=30)
        raise
    finally:
        tracker.end(sweep_run, outcome)
        if board is not None and outcome != "KILLED":  # interrupted: Ray's shutdown ends
            import ray                                 # it after the trials waiting on it
            ray.kill(board)


def _tune(pipeline, params, st, trial_stages, metric, mode, samples, scheduler, search,
          max_concurrent, gpus, sweep_id, display, board) -> list[TrialResult]:
    import logging

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ._internal.planner import known_contents
    from ._internal.sweep_trial import run_trial
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.CRITICAL)  # trial errors are reported by the sweep itself
    if scheduler == "asha":
        sched = ASHAScheduler(time_attr="epoch", grace_period=1, reduction_factor=2,
                              max_t=max_epochs(pipeline, params, metric.split(".")[0]),
                              stop_last_trials=False)
    else:
        sched = FIFOScheduler()
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        searcher = OptunaSearch(seed=pipeline.seed)
    elif search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch
        searcher = HyperOptSearch(random_state_seed=pipeline.seed)
    else:  # Tune applies max_concurrent_trials to Searchers only, not to this generator
        searcher = BasicVariantGenerator(random_state=pipeline.seed,
                                         max_concurrent=max_concurrent)
    log = _TrialLog(display, metric, [p.key for p in params])
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=pipeline, store_root=st.root,
                             stages=tuple(trial_stages), metric=metric, gpus=gpus,
                             board_actor=board, known=known_contents(pipeline)),
        {"cpu": 0.01})
    tuner = tune.Tuner(
        trainable, param_space={p.key: p.tune_domain() for p in params},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=samples,
                                    reuse_actors=True,  # Ray 2.60's default is False
                                    scheduler=sched, search_alg=searcher,
                                    max_concurrent_trials=(None if search == "random"
                                                           else max_concurrent)),
        run_config=tune.RunConfig(name=sweep_id, verbose=0, callbacks=[_callback(log)],
                                  storage_path=st.sweep_storage()))
    # Ctrl-C interrupts the sweep (KeyboardInterrupt: the sweep run is KILLED), rather than
    # Tune ending the experiment quietly with its running trials looking stopped
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    try:  # Tune prints its own experiment banner on stdout: the sweep reports instead
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            tuner.fit()
    finally:
        tune_log.setLevel(level)
    return log.results()


def _callback(log: "_TrialLog"):
    """A Tune callback (it runs in the driver) feeding ``log``; ray.tune is imported only
    when a sweep runs."""
    from ray.tune import Callback

    class Events(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            log.on_trial_start(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            log.on_trial_result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            log.on_trial_complete(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            log.on_trial_error(trial)

    return Events()


class _TrialLog:
    """In the driver: progress lines, and every trial's reports, status and error."""

    def __init__(self, display, metric: str, keys: list[str]):
        self.display, self.metric, self.keys = display, metric, keys
        self.trials: dict[str, object] = {}
        self.reports: dict[str, list[dict]] = {}

    def __getstate__(self):  # Tune pickles its callbacks: leave out the stream and trials
        return {"display": None, "metric": self.metric, "keys": self.keys, "trials": {},
                "reports": {}}

    def _params(self, trial) -> dict:
        return {k: trial.config.get(k) for k in self.keys}

    def on_trial_start(self, trial):
        self.trials[trial.trial_id] = trial
        self.reports.setdefault(trial.trial_id, [])
        self.display.event(f"> trial {trial.trial_id} started: {fmt_params(self._params(trial))}")

    def on_trial_result(self, trial, result):
        self.reports.setdefault(trial.trial_id, []).append(
            {k: result.get(k) for k in (self.metric, "epoch", "epochs", "final", "seconds",
                                        "stages", "stage_metrics", "time_total_s")})

    def on_trial_complete(self, trial):
        last = (self.reports.get(trial.trial_id) or [{}])[-1]
        status = "ok" if last.get("final") else "stopped"
        value = last.get(self.metric)
        self.display.event(f"{status:>7} trial {trial.trial_id}: {self.metric} = "
                           f"{fmt(value)} after {last.get('epochs') or 0} epoch(s)")

    def on_trial_error(self, trial):
        self.trials[trial.trial_id] = trial
        self.display.event(f" FAILED trial {trial.trial_id}: {_error_text(trial)}")

    def results(self) -> list[TrialResult]:
        out = []
        for tid in sorted(self.trials):
            trial, reports = self.trials[tid], self.reports.get(tid, [])
            last = reports[-1] if reports else {}
            error = _error_text(trial) if trial.status == "ERROR" else ""
            status = "failed" if error else "completed" if last.get("final") else "stopped"
            metric = last.get(self.metric)
            out.append(TrialResult(
                trial_id=tid, params=self._params(trial),
                metric=float(metric) if metric is not None else None, status=status,
                epochs=int(last.get("epochs") or 0),
                seconds=round(float(last.get("time_total_s") or 0.0), 2),
                stages=dict(last.get("stages") or {}), error=error,
                history=[(r["epoch"], r[self.metric]) for r in reports if r.get("epoch")],
                stage_metrics=dict(last.get("stage_metrics") or {})))
        return out


def _error_text(trial) -> str:
    """The trial's own error message (the last line naming it), not Tune's traceback."""
    text = ""
    try:
        text = trial.get_error() or ""
    except Exception:  # noqa: BLE001 - error file not written yet
        pass
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    for line in reversed(lines):
        if "TrialFailed:" in line:
            return line.split("TrialFailed:", 1)[1].strip()
    for line in reversed(lines):  # the last 'SomeError: message' line
        head = line.split(":", 1)[0]
        if ":" in line and head.replace(".", "").isidentifier() and head.endswith(("Error", "Exception")):
            return line[:500]
    return lines[-1][:500] if lines else "trial failed"


__all__ = ["sweep", "SweepResult", "TrialResult", "SCHEDULERS", "SEARCHERS"]
