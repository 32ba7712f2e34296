"""The body of a stage's Ray task: run the stage into a staging directory, describe its
outputs, commit them with the manifest written last."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import time
import traceback

from ..context import StageContext
from ..errors import UserError, find_corrupt
from ..mlmodel import write_mlmodel
from .plan import input_content
from .store import Store

LIBRARIES = ("distillery", "ray", "torch", "pyarrow", "numpy", "transformers", "diffusers",
             "mlflow")


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def classify(exc: BaseException) -> str:
    """'user' (bad input), 'corrupt' (a committed input does not match its manifest, also
    when a Ray task, actor or Train worker of the stage found it), 'deterministic' (e.g.
    NaN loss), 'error' (stage code raised); the driver adds 'system' (worker or node
    died). Only 'system' and 'error' are retried."""
    if isinstance(exc, UserError):
        return "user"
    if find_corrupt(exc) is not None:
        return "corrupt"
    if isinstance(exc, FloatingPointError):
        return "deterministic"
    return "error"


def execute_stage(stage, state: dict, store_root: str, inputs: dict,
                  board, num_gpus_available: float, mlflow_run_id: str | None, pipeline: str,
                  replace: bool, clear_work: bool = False) -> dict:
    """``state``: ``StageState.to_record()`` (its config redacted, as manifests keep it).
    ``inputs``: per input, the committed manifest and the output name it reads (a
    variadic input: a list of (upstream stage, manifest, output), opened as a dict), opened
    here as artifacts whose files are fetched and checked where the stage uses them
    (``fetch``): an input the stage does not touch is never read.
    Returns ``{"ok": True, "manifest": ...}`` or ``{"ok": False, "kind", "message",
    "traceback"}``; never leaves a half-written artifact looking committed."""
    store = Store.open(store_root, create=False)
    kind, key, name = state["kind"], state["key"], state["name"]
    staging = store.new_staging_dir(kind, key)
    work = store.work_dir(kind, key)
    if clear_work:  # --force: no resuming from the checkpoints of the replaced artifact
        store.clear_work(kind, key)
    os.makedirs(work, exist_ok=True)
    ctx = StageContext(name=name, kind=kind, key=key, seed=state["seed"], staging_dir=staging,
                       work_dir=work, board=board, num_gpus_available=num_gpus_available,
                       train_storage=store.train_storage(kind, key),
                       work_uri=store.work_uri(kind, key),
                       remote_dir=store.remote_staging(kind, key, staging))
    started = time.time()
    try:
        artifacts = {inp: {up: store.open_input(m, out) for up, m, out in ref}
                     if isinstance(ref, list) else store.open_input(*ref)
                     for inp, ref in inputs.items()}
        outputs = stage.run(ctx, **artifacts)
        check_outputs(type(stage), name, outputs, staging)
        for out in type(stage).mlflow_outputs:  # students are MLflow Models too
            write_mlmodel(outputs[out].path, stage.mlflow_model(out, outputs[out]), key)
        described = store.describe(kind, key, staging, outputs)
        plots = [os.path.relpath(os.path.join(dp, f), staging)
                 for dp, _, fs in os.walk(staging) for f in fs if f.endswith((".png", ".svg"))]
    except BaseException as e:  # noqa: BLE001 - reported to the driver, never half-committed
        store.abandon(kind, key, staging)
        return {"ok": False, "kind": classify(e), "message": failure_message(e),
                "traceback": traceback.format_exc()}
    manifest = {
        "key": key, "kind": kind, "version": state["version"], "code_hash": type(stage).code_hash(),
        "stage": name, "pipeline": pipeline, "config": state["config"], "seed": state["seed"],
        "inputs": state["inputs"], "input_content": input_content(inputs),
        "execution": state.get("execution", {}), "outputs": described, "plots": sorted(plots),
        "metrics": ctx.metrics, "seconds": round(time.time() - started, 3),
        "created": time.time(), "libraries": library_versions(), "host": socket.gethostname(),
        "mlflow_run_id": mlflow_run_id,
    }
    return {"ok": True, "manifest": store.commit(staging, manifest, replace=replace)}


def failure_message(e: BaseException) -> str:
    """A user error's or a damaged input's own message; else the exception's type too."""
    corrupt = find_corrupt(e)
    if corrupt is not None:
        return str(corrupt)
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


def check_outputs(cls, name: str, outputs, staging: str) -> None:
    where = f"stage '{name}' ({cls.kind})"
    if not isinstance(outputs, dict):
        raise TypeError(f"{where}: run() must return a dict of outputs, got {type(outputs).__name__}")
    if set(outputs) != set(cls.outputs):
        raise TypeError(f"{where}: run() returned outputs {sorted(outputs)}, declared "
                        f"{sorted(cls.outputs)}")
    for out, art in outputs.items():
        if not isinstance(art, cls.outputs[out]):
            raise TypeError(f"{where}: output '{out}' must be a {cls.outputs[out].__name__}, got "
                            f"{type(art).__name__}")
        inside = os.path.realpath(art.path)
        if os.path.commonpath([inside, os.path.realpath(staging)]) != os.path.realpath(staging):
            raise TypeError(f"{where}: output '{out}' is at {art.path}, outside the stage's own "
                            f"output directory; write outputs with ctx.write_dataset / "
                            f"ctx.save_model / ctx.output_dir")
