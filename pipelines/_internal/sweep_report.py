"""A sweep's results: the trials' table, the best trial's pipeline file, the plot of the
metric against every parameter, the printed table and the MLflow records (the driver in
``pipelines.sweep`` runs the trials; this module reports them)."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field

from .sweep_space import apply_params


@dataclass
class TrialResult:
    trial_id: str
    params: dict
    metric: float | None
    status: str                 # completed | stopped | failed
    epochs: int
    seconds: float
    stages: dict = field(default_factory=dict)      # trial stage -> ran | cached
    error: str = ""
    history: list = field(default_factory=list)     # (epoch, metric value)
    stage_metrics: dict = field(default_factory=dict)


@dataclass
class SweepResult:
    sweep_run_id: str
    metric: str
    mode: str
    best_config: str | None
    best: dict | None           # {"params", "metric"}
    trials: list[TrialResult]
    shared_stages: list[dict]   # {"name", "status": ran | cached}
    directory: str

    def to_json(self) -> dict:
        return {"sweep_run_id": self.sweep_run_id, "metric": self.metric, "mode": self.mode,
                "best_config": self.best_config, "best": self.best,
                "trials": [{"trial_id": t.trial_id, "params": t.params, "metric": t.metric,
                            "status": t.status, "epochs": t.epochs} for t in self.trials],
                "shared_stages": self.shared_stages}

    @property
    def total_epochs(self) -> int:
        return sum(t.epochs for t in self.trials)


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())


# -- results -----------------------------------------------------------------------------
def finish(pipeline, params, trials, shared_status, metric, mode, sweep_run, out_dir,
            tracker) -> SweepResult:
    done = [t for t in trials if t.status == "completed" and t.metric is not None]
    best_trial = (max if mode == "max" else min)(done, key=lambda t: t.metric) if done else None
    best_config, best = None, None
    if best_trial is not None:
        best = {"params": best_trial.params, "metric": best_trial.metric}
        best_config = os.path.join(out_dir, "best.yaml")
        write_pipeline_file(apply_params(pipeline, best_trial.params), best_config,
                            f"best trial {best_trial.trial_id} of a sweep: {metric} = "
                            f"{best_trial.metric:.6g} ({mode})")
    result = SweepResult(sweep_run, metric, mode, best_config, best, trials, shared_status,
                         out_dir)
    table = trials_table(result)
    table.to_parquet(os.path.join(out_dir, "trials.parquet"), index=False)
    plot = os.path.join(out_dir, "metric_vs_params.png")
    plot_metric_vs_params(result, [p.key for p in params], plot)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(result.to_json(), f, indent=2, default=str)
    _track(tracker, result, shared_status)
    return result


def write_pipeline_file(pipeline, path: str, comment: str) -> None:
    import yaml
    with open(path, "w") as f:
        f.write(f"# {comment}\n# distill run {path}\n")
        yaml.safe_dump(pipeline.to_dict(), f, sort_keys=False, default_flow_style=None)


def trials_table(result: SweepResult):
    """One row per trial: trial, one column per parameter, metric, status, time, epochs."""
    import pandas as pd
    rows = []
    for t in result.trials:
        row = {"trial": t.trial_id}
        for k, v in t.params.items():
            row[k] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
        row.update({"metric": t.metric, "status": t.status, "seconds": t.seconds,
                    "epochs": t.epochs, "error": t.error})
        rows.append(row)
    return pd.DataFrame(rows)


def print_table(result: SweepResult, stream=None) -> None:
    from rich.console import Console
    from rich.table import Table
    keys = list(result.trials[0].params) if result.trials else []
    table = Table(title=f"sweep {result.sweep_run_id}: {result.metric} ({result.mode})",
                  title_justify="left")
    for col in ("trial", *keys, "metric", "status", "time", "epochs"):
        table.add_column(col, no_wrap=True)
    best = result.best["params"] if result.best else None
    for t in result.trials:
        mark = " *" if best is not None and t.params == best and t.status == "completed" else ""
        table.add_row(t.trial_id, *(fmt(t.params[k]) for k in keys),
                      (fmt(t.metric) if t.metric is not None else "-") + mark,
                      t.status, f"{t.seconds:.1f}s", str(t.epochs))
    console = Console(file=stream or sys.stdout, width=160)
    console.print(table)
    shared = ", ".join(f"{s['name']} ({s['status']})" for s in result.shared_stages) or "none"
    console.print(f"shared stages: {shared}")
    console.print(f"best config: {result.best_config or '(no trial completed)'}")


def plot_metric_vs_params(result: SweepResult, keys: list[str], path: str) -> None:
    """One scatter per parameter: the metric of every trial, by status."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    colors = {"completed": "tab:blue", "stopped": "tab:orange", "failed": "tab:red"}
    for ax, key in zip(axes[0], keys):
        values = [t.params.get(key) for t in result.trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({json.dumps(v) for v in values}) if not numeric else []
        for status, color in colors.items():
            pts = [(v if numeric else labels.index(json.dumps(v)), t.metric)
                   for v, t in zip(values, result.trials)
                   if t.status == status and t.metric is not None]
            if pts:
                ax.scatter(*zip(*pts), c=color, label=status, alpha=0.8)
        if numeric and values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_xscale("log")
        if labels:
            ax.set_xticks(range(len(labels)), labels, rotation=30)
        ax.set_xlabel(key)
        ax.set_ylabel(result.metric)
    if any(ax.get_legend_handles_labels()[0] for ax in axes[0]):
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{result.metric} vs parameters ({len(result.trials)} trials; stopped: last "
                 f"value before stopping)", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _track(tracker, result: SweepResult, shared_status: list[dict]) -> None:
    """A nested MLflow run per trial; the plot, table and best config on the sweep run."""
    from .tracking import flatten
    shared = {f"distillery.stage.{s['name']}": s["status"] for s in shared_status}
    for t in result.trials:
        rid = tracker.client.create_run(
            tracker.experiment_id, run_name=f"trial {t.trial_id}",
            tags={"mlflow.parentRunId": result.sweep_run_id, "distillery.type": "trial",
                  "distillery.trial": t.trial_id, "distillery.status": t.status, **shared,
                  **{f"distillery.stage.{n}": s for n, s in t.stages.items()},
                  **({"distillery.error": t.error[:4000]} if t.error else {})}).info.run_id
        tracker._params(rid, flatten({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                      for k, v in t.params.items()}))
        history = [(result.metric, v, e - 1) for e, v in t.history]  # the stage's steps
        history += [(f"{n}.{k}", v, None) for n, ms in t.stage_metrics.items()
                    for k, v in ms.items() if isinstance(v, (int, float)) and math.isfinite(v)
                    and not (t.history and f"{n}.{k}" == result.metric)]
        history += [("epochs", t.epochs, None), ("seconds", t.seconds, None)]
        if t.metric is not None:
            history.append(("metric", t.metric, None))
        tracker.log_metrics(rid, history)
        tracker.end(rid, {"completed": "FINISHED", "stopped": "KILLED"}.get(t.status, "FAILED"))
    files = [os.path.join(result.directory, f) for f in
             ("metric_vs_params.png", "trials.parquet", "sweep.json", "best.yaml")]
    tracker.log_artifacts(result.sweep_run_id, [f for f in files if os.path.exists(f)])
    if result.best is not None:
        tracker.log_metrics(result.sweep_run_id, [("best_metric", result.best["metric"], None)])
    tracker.set_tag(result.sweep_run_id, "distillery.trials", json.dumps(
        {s: sum(t.status == s for t in result.trials) for s in ("completed", "stopped", "failed")}))
