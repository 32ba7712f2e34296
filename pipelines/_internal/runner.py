"""The Ray runner: runs a plan's stages as Ray tasks, independent branches at once,
tracks everything in MLflow, and writes a run record to the store."""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import asdict, dataclass, field

from ..errors import StageFailed, UserError
from .planner import Plan, make_plan
from .progress import Display
from .scheduler import Hooks, Schedule, run_schedule
from .store import Store
from .students import track_student
from .tracking import Tracker, redact, resolve_tracking_uri


@dataclass
class StageResult:
    name: str
    kind: str
    status: str            # ran | cached | failed | skipped
    key: str
    uri: str
    seconds: float
    metrics: dict = field(default_factory=dict)
    reason: str = ""


@dataclass
class RunResult:
    run_id: str
    pipeline: str
    store: str
    stages: list[StageResult]
    ok: bool = True
    registered: dict = field(default_factory=dict)  # stage -> {name, version, created}

    def __getitem__(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict:
        """``{"run_id", "stages": [...]}``; stages a failure kept from running are left out."""
        doc = {"run_id": self.run_id,
               "stages": [{k: v for k, v in asdict(s).items() if k != "reason"}
                          for s in self.stages if s.status != "skipped"]}
        if self.registered:  # Model Registry versions (register: / --register)
            doc["registered"] = self.registered
        return doc


def connect_ray(address: str | None, dashboard: bool = False) -> None:
    """Attach to a cluster (``address``, e.g. 'auto' on a head node) or start an embedded
    local Ray with more logical CPUs than cores (see RAY_NOTES.md). ``dashboard``: the
    embedded Ray gets the dashboard, whose State API Ray Train needs to clean up the
    workers of a trial an early-stopping sweep scheduler stops."""
    import ray
    if ray.is_initialized():
        return
    common = dict(log_to_driver=bool(os.environ.get("DISTILL_VERBOSE")), configure_logging=False)
    if not address:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                 include_dashboard=dashboard, **common)
        return
    try:
        ray.init(address=address, **common)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"--address: cannot connect to a Ray cluster at {address!r} ({e}); "
                        f"allowed: 'auto' on a cluster node, ray://HOST:10001, HOST:6379, or "
                        f"no --address for an embedded Ray") from None


def check_feasible(pipeline, names: list[str], available: dict) -> None:
    """A stage asking for more than the whole cluster has would wait forever: say so."""
    for name in names:
        res = pipeline.nodes[name].effective_resources
        for attr, key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            want, have = getattr(res, attr), available.get(key, 0.0)
            if want > have:
                raise UserError(f"stage '{name}' ({pipeline.nodes[name].kind}): resources.{attr} "
                                f"{want:g} is more than the Ray cluster has ({have:g} {key}); "
                                f"allowed: 0 to {have:g}")


def run_plan(plan: Plan, address: str | None = None, tracking_uri: str | None = None,
             progress: bool = True, command: str | None = None,
             tags: dict | None = None) -> RunResult:
    """``tags``: extra MLflow tags of the pipeline run (a sweep nests it under its run)."""
    pipeline, store = plan.pipeline, plan.store
    display = Display(enabled=progress)
    for w in plan.warnings:
        display.event(f"warning: {w}")
    tracker = Tracker(resolve_tracking_uri(store.root, tracking_uri), pipeline.name, store.root)
    register = {n: node.register for n, node in pipeline.nodes.items() if node.register}
    if register:
        tracker.check_registry(register)
    run_id = tracker.start_parent(pipeline.name, {"seed": str(pipeline.seed)},
                                  {"distillery.store": store.root, **(tags or {})})
    results: dict[str, StageResult] = {}
    manifests: dict[str, dict] = {}
    record = {"run_id": run_id, "pipeline": pipeline.name, "started": time.time(),
              "store": store.root, "pipeline_spec": redact(pipeline.to_dict()),
              "states": {n: s.to_record() for n, s in plan.states.items()}, "stages": {},
              "ok": None, "registered": {}}  # ok None while running: gc keeps its keys
    store.write_run(record)
    failure: tuple[str, dict] | None = None
    outcome = "KILLED"  # unless the try block completes
    try:
        for name, d in plan.decisions.items():
            if d.status != "cached" or name in plan.checks:
                continue
            state = plan.states[name]
            m = manifests[name] = store.manifest(state.kind, state.key)
            record_cached(tracker, run_id, plan, name, m, results, d.reason, display,
                          record["registered"])
            display.finish(name, "cached", 0.0)
        if plan.to_run():
            failure = _run_stages(plan, manifests, results, tracker, run_id, display, address,
                                  record["registered"])
        outcome = "FINISHED" if failure is None else "FAILED"
    except UserError:  # e.g. --address unreachable, resources the cluster cannot give
        outcome = "FAILED"
        raise
    finally:
        for name, d in plan.decisions.items():
            if name not in results:
                st = plan.states[name]
                results[name] = StageResult(name, st.kind, "skipped", d.key,
                                            store.artifact_dir(st.kind, d.key), 0.0, {}, d.reason)
        ordered = [results[n] for n in plan.decisions]
        record.update(stages={s.name: asdict(s) for s in ordered}, finished=time.time(),
                      ok=outcome == "FINISHED", outcome=outcome.lower())
        store.write_run(record)
        tracker.end(run_id, outcome)
    result = RunResult(run_id, pipeline.name, store.root, ordered, failure is None,
                       record["registered"])
    if failure is not None:
        name, out = failure
        finished = [s.name for s in ordered if s.status in ("ran", "cached")]
        resume = command or f"distill run <pipeline file> --store {shlex.quote(store.root)}"
        cause = out["message"]
        if os.environ.get("DISTILL_VERBOSE") and out.get("traceback"):
            cause += "\n" + out["traceback"]
        raise StageFailed(name, cause, finished, resume, user_error=out["kind"] == "user",
                          result=result)
    return result


class _RunHooks(Hooks):
    """What ``distill run`` does around the scheduler: MLflow runs, the display, records."""

    def __init__(self, plan, results, tracker, run_id, display, board_actor, registered):
        self.plan, self.results, self.tracker, self.run_id = plan, results, tracker, run_id
        self.display, self.board_actor, self.registered = display, board_actor, registered
        self.stage_runs: dict[str, tuple[str, float]] = {}   # open MLflow stage runs
        self.reasons: dict[str, str] = {}

    def started(self, name, reason):
        state = self.plan.states[name]
        rid = self.tracker.start_stage(self.run_id, name, state.kind, state.key,
                                       {**state.config, **state.execution}, "running")
        self.stage_runs[name] = (rid, time.time())
        self.reasons[name] = reason
        self.display.start(name, state.kind, reason)
        return rid

    def poll(self, running):
        import ray
        self.display.update(ray.get(self.board_actor.snapshot.remote())["progress"])

    def retried(self, name, attempt, retries, message):
        self.display.event(f" retry {name} ({attempt}/{retries}): {message}")

    def kept(self, name, manifest):
        record_cached(self.tracker, self.run_id, self.plan, name, manifest, self.results,
                      "artifact committed; its inputs' content is unchanged", self.display,
                      self.registered)
        self.display.finish(name, "cached", 0.0)

    def finished(self, name, out):
        import ray
        history = ray.get(self.board_actor.take_history.remote(name))
        rid, t0 = self.stage_runs.pop(name)
        state, secs, store = self.plan.states[name], time.time() - t0, self.plan.store
        uri = store.artifact_dir(state.kind, state.key)
        if out["ok"]:
            m = out["manifest"]
            line = track_student(self.tracker, self.plan, name, rid, m, True, self.registered)
            _track_stage(self.tracker, rid, store, m, history, "ran")
            if line:
                self.display.event(line)
            self.results[name] = StageResult(name, state.kind, "ran", state.key, uri, secs,
                                             dict(m.get("metrics", {})), self.reasons[name])
            self.display.finish(name, "ran", secs)
            return
        self.tracker.log_metrics(rid, history)
        self.tracker.set_tag(rid, "distillery.status", "failed")
        self.tracker.set_tag(rid, "distillery.error", out["message"][:4000])
        self.tracker.end(rid, "FAILED")
        self.results[name] = StageResult(name, state.kind, "failed", state.key, uri, secs, {},
                                         out["message"])
        self.display.finish(name, "failed", secs)


def _run_stages(plan, manifests, results, tracker, run_id, display, address, registered):
    import ray
    from .board import RayBoard, start_board_actor

    pipeline = plan.pipeline
    connect_ray(address)
    available = ray.cluster_resources()
    if not address:  # a cluster may autoscale; the embedded Ray will not
        check_feasible(pipeline, plan.to_run(), available)
    board_actor = start_board_actor()
    hooks = _RunHooks(plan, results, tracker, run_id, display, board_actor, registered)
    schedule = Schedule(plan, manifests, plan.to_run(), list(plan.checks),
                        RayBoard(board_actor), float(available.get("GPU", 0.0)))
    try:
        return run_schedule(schedule, hooks)
    finally:
        for rid, _ in hooks.stage_runs.values():  # interrupted: close its MLflow runs
            tracker.end(rid, "KILLED")
        ray.kill(board_actor)


def record_cached(tracker, run_id, plan, name, manifest, results, reason, display,
                  registered) -> None:
    state, store = plan.states[name], plan.store
    rid = tracker.start_stage(run_id, name, state.kind, state.key,
                              {**state.config, **state.execution}, "cached")
    line = track_student(tracker, plan, name, rid, manifest, False, registered)
    _track_stage(tracker, rid, store, manifest, [], "cached", plots=False)
    if line:
        display.event(line)
    results[name] = StageResult(name, state.kind, "cached", state.key,
                                store.artifact_dir(state.kind, state.key), 0.0,
                                dict(manifest.get("metrics", {})), reason)


def _track_stage(tracker: Tracker, rid: str, store: Store, manifest: dict, history,
                 status: str, plots: bool = True) -> None:
    if not history:
        history = [(k, v, None) for k, v in manifest.get("metrics", {}).items()]
    tracker.log_metrics(rid, history)
    if plots:
        tracker.log_artifacts(rid, store.local_files(manifest, manifest.get("plots", [])))
    tracker.set_tag(rid, "distillery.status", status)
    tracker.end(rid, "FINISHED")


def run(pipeline, store: str = ".distill", force=(), address: str | None = None,
        tracking_uri: str | None = None, progress: bool = True,
        command: str | None = None) -> RunResult:
    """Run ``pipeline``: reuse every committed stage, run the rest on Ray."""
    st = Store.open(store)
    return run_plan(make_plan(pipeline, st, force), address, tracking_uri, progress, command)


def plan(pipeline, store: str = ".distill", force=()) -> Plan:
    """What ``run`` would do: per stage, cached or run, and why. Starts nothing."""
    return make_plan(pipeline, Store.open(store, create=False), force)
