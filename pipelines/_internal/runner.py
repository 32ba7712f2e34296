"""The Ray runner: runs a plan's stages as Ray tasks, independent branches at once,
tracks everything in MLflow, and writes a run record to the store."""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field

from ..artifacts import ARTIFACT_TYPES, Artifact
from ..errors import StageFailed
from .execute import execute_stage
from .plan import should_retry
from .planner import Plan, make_plan
from .progress import Display
from .store import Store
from .tracking import Tracker, resolve_tracking_uri


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
    error: str = ""

    def __getitem__(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict:
        return {"run_id": self.run_id,
                "stages": [{k: v for k, v in asdict(s).items() if k != "reason"}
                           for s in self.stages]}


def connect_ray(address: str | None) -> None:
    """Attach to a cluster (``address``, e.g. 'auto' on a head node) or start an embedded
    local Ray with more logical CPUs than cores (see RAY_NOTES.md)."""
    import ray
    if ray.is_initialized():
        return
    common = dict(log_to_driver=bool(os.environ.get("DISTILL_VERBOSE")), configure_logging=False)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1),
                 include_dashboard=False, **common)


def input_artifacts(pipeline, name: str, manifests: dict, store: Store) -> dict[str, Artifact]:
    node = pipeline.nodes[name]
    out = {}
    for inp, (up, output) in node.inputs.items():
        m = manifests[up]
        entry = m["outputs"][output]
        cls = ARTIFACT_TYPES[entry["type"]]
        out[inp] = cls.from_manifest(store.artifact_dir(m["kind"], m["key"]), entry)
    return out


def run_plan(plan: Plan, address: str | None = None, tracking_uri: str | None = None,
             progress: bool = True, command: str | None = None) -> RunResult:
    pipeline, store = plan.pipeline, plan.store
    display = Display(enabled=progress)
    for w in plan.warnings:
        display.event(f"warning: {w}")
    tracker = Tracker(resolve_tracking_uri(store.root, tracking_uri), pipeline.name, store.root)
    run_id = tracker.start_parent(pipeline.name, {"seed": str(pipeline.seed)},
                                  {"distillery.store": store.root})
    started = time.time()
    results: dict[str, StageResult] = {}
    manifests: dict[str, dict] = {}
    record = {"run_id": run_id, "pipeline": pipeline.name, "started": started,
              "store": store.root, "pipeline_spec": pipeline.to_dict(),
              "states": {n: s.to_record() for n, s in plan.states.items()}, "stages": {}}
    failure: tuple[str, dict] | None = None
    try:
        for name, d in plan.decisions.items():
            if d.status != "cached":
                continue
            state = plan.states[name]
            m = store.manifest(state.kind, state.key)
            manifests[name] = m
            rid = tracker.start_stage(run_id, name, state.kind, d.key, state.config, "cached")
            tracker.log_metrics(rid, [(k, v, None) for k, v in m.get("metrics", {}).items()])
            tracker.end(rid, True)
            results[name] = StageResult(name, state.kind, "cached", d.key,
                                        store.artifact_dir(state.kind, d.key), 0.0,
                                        dict(m.get("metrics", {})), d.reason)
            display.finish(name, "cached", 0.0)
        if plan.to_run():
            failure = _run_stages(plan, manifests, results, tracker, run_id, display, address)
    finally:
        ok = failure is None
        for name, d in plan.decisions.items():
            if name not in results:
                st = plan.states[name]
                results[name] = StageResult(name, st.kind, "skipped", d.key,
                                            store.artifact_dir(st.kind, d.key), 0.0, {}, d.reason)
        ordered = [results[n] for n in plan.decisions]
        record["stages"] = {s.name: asdict(s) for s in ordered}
        record["finished"] = time.time()
        record["ok"] = ok
        store.write_run(record)
        tracker.end(run_id, ok)
    result = RunResult(run_id, pipeline.name, store.root, ordered, ok)
    if failure is not None:
        name, out = failure
        finished = [s.name for s in ordered if s.status in ("ran", "cached")]
        resume = command or f"distill run <pipeline file> --store {shlex.quote(store.root)}"
        cause = out["message"]
        if os.environ.get("DISTILL_VERBOSE") and out.get("traceback"):
            cause += "\n" + out["traceback"]
        raise StageFailed(name, cause, finished, resume, user_error=out["kind"] == "user")
    return result


def _run_stages(plan, manifests, results, tracker, run_id, display, address):
    import ray
    from .board import RayBoard, start_board_actor

    pipeline, store = plan.pipeline, plan.store
    connect_ray(address)
    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    board_actor = start_board_actor()
    board = RayBoard(board_actor)
    remote = ray.remote(execute_stage)
    waiting = plan.to_run()
    pending: dict = {}          # ObjectRef -> stage name
    attempts: dict[str, int] = {}
    stage_runs: dict[str, tuple[str, float]] = {}
    failure = None

    def submit(name: str) -> None:
        node, state = pipeline.nodes[name], plan.states[name]
        res = node.effective_resources
        if name not in stage_runs:
            rid = tracker.start_stage(run_id, name, state.kind, state.key, state.config, "running")
            stage_runs[name] = (rid, time.time())
            display.start(name, state.kind, plan.decisions[name].reason)
        ref = remote.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0,
                             name=f"stage:{name}").remote(
            node.stage, state.to_record(), store.root,
            input_artifacts(pipeline, name, manifests, store), board, gpus,
            stage_runs[name][0], pipeline.name, plan.decisions[name].reason.startswith("forced"))
        pending[ref] = name

    try:
        while waiting or pending:
            if failure is None:
                for name in [n for n in waiting if pipeline.upstream(n) <= set(manifests)]:
                    waiting.remove(name)
                    submit(name)
            elif not pending:
                break
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            display.update(ray.get(board_actor.snapshot.remote())["progress"])
            for ref in ready:
                name = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker or its node died
                    out = {"ok": False, "kind": "system", "message": f"{type(e).__name__}: {e}"}
                rid, t0 = stage_runs[name]
                state = plan.states[name]
                history = ray.get(board_actor.take_history.remote(name))
                if out["ok"]:
                    m = out["manifest"]
                    manifests[name] = m
                    _track_stage(tracker, rid, store, m, history)
                    secs = time.time() - t0
                    results[name] = StageResult(name, state.kind, "ran", state.key,
                                                store.artifact_dir(state.kind, state.key), secs,
                                                dict(m.get("metrics", {})),
                                                plan.decisions[name].reason)
                    display.finish(name, "ran", secs)
                    continue
                attempts[name] = attempts.get(name, 0) + 1
                retries = pipeline.nodes[name].effective_resources.max_retries
                if should_retry(out["kind"], attempts[name] - 1, retries):
                    display.event(f" retry {name} ({attempts[name]}/{retries}): {out['message']}")
                    submit(name)
                    continue
                tracker.log_metrics(rid, history)
                tracker.set_tag(rid, "distillery.status", "failed")
                tracker.set_tag(rid, "distillery.error", out["message"][:4000])
                tracker.end(rid, False)
                secs = time.time() - t0
                results[name] = StageResult(name, state.kind, "failed", state.key,
                                            store.artifact_dir(state.kind, state.key), secs, {},
                                            out["message"])
                display.finish(name, "failed", secs)
                if failure is None:
                    failure = (name, out)
    finally:
        ray.kill(board_actor)
    return failure


def _track_stage(tracker: Tracker, rid: str, store: Store, manifest: dict, history) -> None:
    if not history:
        history = [(k, v, None) for k, v in manifest.get("metrics", {}).items()]
    tracker.log_metrics(rid, history)
    root = store.artifact_dir(manifest["kind"], manifest["key"])
    tracker.log_artifacts(rid, [os.path.join(root, p) for p in manifest.get("plots", [])])
    tracker.set_tag(rid, "distillery.status", "ran")
    tracker.end(rid, True)


def run(pipeline, store: str = ".distill", force=(), address: str | None = None,
        tracking_uri: str | None = None, progress: bool = True,
        command: str | None = None) -> RunResult:
    """Run ``pipeline``: reuse every committed stage, run the rest on Ray."""
    st = Store.open(store)
    return run_plan(make_plan(pipeline, st, force), address, tracking_uri, progress, command)


def plan(pipeline, store: str = ".distill", force=()) -> Plan:
    """What ``run`` would do: per stage, cached or run, and why. Starts nothing."""
    return make_plan(pipeline, Store.open(store, create=False), force)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)
