"""The one scheduling loop: ``distill run`` and every sweep trial run their stages with it.

It submits each stage as a Ray task (``execute_stage``) once its inputs are committed,
independent branches at once; retries a failed attempt as ``resources.max_retries`` allows
(``plan.should_retry``); polls progress while stages run; and decides, when a forced stage
commits, whether the cached stages below it still hold (``fresh``): a stage whose
manifest recorded different input content than what is now committed runs again, under
the same key, in the same run. What a caller does around it (MLflow runs, the progress
display, Tune reports) it does in ``Hooks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .execute import execute_stage
from .plan import fresh, input_refs, should_retry


class Hooks:
    """What the caller does as stages go; every method may be left as is."""

    def started(self, name: str, reason: str) -> str | None:
        """A stage's first attempt is submitted; returns its MLflow run id (or None)."""
        return None

    def poll(self, running: list[str]) -> None:
        """Called about twice a second while stages run."""

    def retried(self, name: str, attempt: int, retries: int, message: str) -> None:
        """An attempt failed and the stage is submitted again."""

    def finished(self, name: str, out: dict) -> None:
        """The stage's last attempt ended: ``out`` is ``execute_stage``'s result. Raising
        here stops the loop (stages still running are cancelled)."""

    def kept(self, name: str, manifest: dict) -> None:
        """A stage below a forced stage was checked and its cached artifact still holds."""


@dataclass
class Schedule:
    """The stages to run (``waiting``), and the cached stages below forced ones to check
    (``check``), of one plan; ``manifests`` holds the committed manifest of every stage
    done so far and is filled as stages commit."""
    plan: object
    manifests: dict
    waiting: list[str]
    check: list[str] = field(default_factory=list)
    board: object = None
    gpus: float = 0.0
    options: dict = field(default_factory=dict)   # extra Ray task options
    stop_on_failure: bool = False
    reasons: dict = field(default_factory=dict)   # stage -> why it runs (checked stages)
    failure: tuple | None = None


def run_schedule(s: Schedule, hooks: Hooks) -> tuple | None:
    """Run ``s`` to the end; returns the first failure ``(stage, out)`` or None. After a
    failure nothing new starts, and stages already running finish (``stop_on_failure``:
    they are cancelled)."""
    import ray

    plan, pipeline, store = s.plan, s.plan.pipeline, s.plan.store
    remote = ray.remote(execute_stage)
    pending: dict = {}                  # ObjectRef -> stage name
    attempts: dict[str, int] = {}
    run_ids: dict[str, str | None] = {}
    replace: set[str] = set()           # checked stages that run again under their key

    def submit(name: str) -> None:
        node, state, decision = pipeline.nodes[name], plan.states[name], plan.decisions[name]
        res = node.effective_resources
        first = name not in run_ids
        if first:
            run_ids[name] = hooks.started(name, s.reasons.get(name, decision.reason))
        forced = decision.forced or name in replace
        ref = remote.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=0,
                             name=f"stage:{name}", **s.options).remote(
            node.stage, state.to_record(), store.root,
            input_refs(pipeline, name, s.manifests), s.board, s.gpus, run_ids[name],
            pipeline.name, forced, forced and first)
        pending[ref] = name

    def ready(name: str) -> bool:
        return pipeline.upstream(name) <= set(s.manifests)

    try:
        while s.waiting or s.check or pending:
            if s.failure is None:
                for name in [n for n in s.check if ready(n)]:
                    s.check.remove(name)
                    st = plan.states[name]
                    manifest = store.manifest(st.kind, st.key)
                    changed = fresh(manifest, input_refs(pipeline, name, s.manifests)) \
                        if manifest else ["(artifact gone)"]
                    if not changed:
                        s.manifests[name] = manifest
                        hooks.kept(name, manifest)
                        continue
                    s.reasons[name] = (f"input content changed: {', '.join(changed)} (an "
                                       f"upstream stage re-ran and committed other content)")
                    replace.add(name)
                    s.waiting.append(name)
                for name in [n for n in s.waiting if ready(n)]:
                    s.waiting.remove(name)
                    submit(name)
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            hooks.poll(list(pending.values()))
            for ref in done:
                name = pending.pop(ref)
                try:
                    out = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker or its node died
                    out = {"ok": False, "kind": "system",
                           "message": f"{type(e).__name__}: {e}"}
                attempts[name] = attempts.get(name, 0) + (not out["ok"])
                retries = pipeline.nodes[name].effective_resources.max_retries
                if not out["ok"] and should_retry(out["kind"], attempts[name] - 1, retries):
                    hooks.retried(name, attempts[name], retries, out["message"])
                    submit(name)
                    continue
                if out["ok"]:
                    s.manifests[name] = out["manifest"]
                elif s.failure is None:
                    s.failure = (name, out)
                hooks.finished(name, out)
                if not out["ok"] and s.stop_on_failure:
                    return s.failure
    finally:
        for ref in pending:  # interrupted or stopped: stop what still runs
            ray.cancel(ref, force=True)
    if s.failure is None and (s.waiting or s.check):
        stuck = s.waiting + s.check
        s.failure = (stuck[0], {"ok": False, "kind": "error",
                                "message": f"stages {stuck} cannot start: their inputs "
                                           f"never came"})
    return s.failure

