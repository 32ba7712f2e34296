"""One sweep trial: a Ray Tune function trainable that runs the trial's stages through the
ordinary cache, and reports the sweep metric to Tune after every epoch of the stage that
logs it (so ASHA can stop the trial) and once more at the end (``final``).

The trial is a small driver of its own, in the Tune trial's actor: it waits until the
sweep's driver has run the shared stages (the board's gate: Tune starts while they run),
plans the trial's pipeline (the shared stages are cache hits), runs the stages it must as Ray tasks (the
same ``execute_stage`` the runner uses, so artifacts are committed the same way), and
reads the metrics the stages log from the sweep's board. When Tune stops the trial, its actor
ends; the stage tasks it owns are cancelled with it (and explicitly, in ``finally``).
Only the sweep's driver talks to MLflow: the trial sends what it learned in its reports.
"""

from __future__ import annotations

import time

from .board import RayBoard
from .planner import make_plan
from .scheduler import Hooks, Schedule, run_schedule
from .store import Store
from .sweep_space import apply_params


class TrialFailed(RuntimeError):
    pass


class TrialBoard(RayBoard):
    """The sweep's board actor, with the trial's id before every stage name (one actor for
    the whole sweep rather than one per trial)."""

    def __init__(self, actor, prefix: str):
        super().__init__(actor)
        self.prefix = prefix

    def log(self, stage, metrics, step):
        super().log(self.prefix + stage, metrics, step)

    def progress(self, stage, done, total, unit):
        super().progress(self.prefix + stage, done, total, unit)

    def final_metrics(self, stage):
        return super().final_metrics(self.prefix + stage)


def run_trial(config: dict, base=None, store_root: str = "", stages: tuple = (),
              metric: str = "", gpus: float = 0.0, board_actor=None,
              known: dict | None = None) -> None:
    """``config``: {'stage.field': value} drawn by Tune; ``stages``: the trial's stages
    (the rest of what the metric needs is shared and cached); ``metric``: 'STAGE.NAME';
    ``board_actor``: the sweep's board (``board.start_board_actor``); ``known``: the
    driver's content checksums of the files the stages read by path."""
    from ray import tune

    prefix = f"{tune.get_context().get_trial_id()}/"
    metric_stage, metric_name = metric.split(".", 1)
    wait_for_shared(board_actor)
    pipeline = apply_params(base, config)
    store = Store.open(store_root, create=False)
    plan = make_plan(pipeline, store, known=known)
    manifests: dict[str, dict] = {}
    status: dict[str, str] = {}
    for name in _needed(pipeline, metric_stage):
        d, st = plan.decisions[name], plan.states[name]
        if d.status == "cached":
            manifests[name] = store.manifest(st.kind, st.key)
            status[name] = "cached"
        elif name not in stages:
            raise TrialFailed(f"shared stage '{name}' is not in the store any more ({d.reason})")
    waiting = [n for n in pipeline.order() if n in stages and n not in manifests]
    hooks = _TrialHooks(board_actor, prefix, metric_stage, metric_name, metric, status)
    schedule = Schedule(plan, manifests, waiting, board=TrialBoard(board_actor, prefix),
                        gpus=gpus, options={"scheduling_strategy": "DEFAULT"},  # not in
                        stop_on_failure=True)                                # Tune's PG
    failure = run_schedule(schedule, hooks)
    if failure is not None:
        raise TrialFailed(f"stage '{failure[0]}' failed: {failure[1]['message']}")
    steps = hooks.steps
    final = manifests[metric_stage].get("metrics", {})
    if metric_name not in final:
        raise TrialFailed(f"stage '{metric_stage}' ({pipeline.nodes[metric_stage].kind}) "
                          f"reported no metric '{metric_name}'; it reported: "
                          f"{', '.join(sorted(final)) or '(none)'}")
    tune.report({metric: final[metric_name], "epochs": _total(steps), "final": True,
                 "seconds": time.time() - hooks.started_at, "stages": status,
                 "stage_metrics": {n: manifests[n].get("metrics", {}) for n in stages
                                   if n in manifests}})


def wait_for_shared(board_actor, poll_s: float = 0.05) -> None:
    """Until the sweep's driver has run the shared stages (the board's gate): Tune starts
    the trials meanwhile, so its start-up overlaps them. Shared stages that failed fail
    the trial at once, naming the failure (the sweep raises it)."""
    import ray
    while (gate := ray.get(board_actor.gate.remote())) is None:
        time.sleep(poll_s)
    ok, message = gate
    if not ok:
        raise TrialFailed(f"the shared stages failed: {message}")


class _TrialHooks(Hooks):
    """What a trial does around the scheduler: the sweep metric reported to Tune after
    every epoch of the stage that logs it (so ASHA can stop the trial)."""

    def __init__(self, board_actor, prefix, metric_stage, metric_name, metric, status):
        self.board, self.prefix = board_actor, prefix
        self.metric_stage, self.metric_name, self.metric = metric_stage, metric_name, metric
        self.status = status
        self.steps: dict[str, set] = {}   # stage -> epochs (steps) it logged
        self.seen = 0                     # metric values already reported
        self.started_at = time.time()

    def _history(self, name: str, take: bool) -> None:
        import ray
        fetch = self.board.take_history if take else self.board.history_of
        history = ray.get(fetch.remote(self.prefix + name))
        self.steps[name] = {s for _, _, s in history if s is not None}
        if name != self.metric_stage:
            return
        from ray import tune
        values = [(v, s) for k, v, s in history if k == self.metric_name and s is not None]
        for v, s in values[self.seen:]:
            tune.report({self.metric: v, "epoch": int(s) + 1, "epochs": _total(self.steps),
                         "final": False})
        self.seen = len(values)

    def poll(self, running):
        for name in running:
            self._history(name, take=False)

    def finished(self, name, out):
        self._history(name, take=True)
        if out["ok"]:
            self.status[name] = "ran"


def _total(steps: dict[str, set]) -> int:
    return sum(len(s) for s in steps.values())


def _needed(pipeline, stage: str) -> list[str]:
    """``stage`` and every stage it depends on, in order."""
    need, frontier = {stage}, {stage}
    while frontier:
        frontier = {up for n in frontier for up in pipeline.upstream(n)} - need
        need |= frontier
    return [n for n in pipeline.order() if n in need]

