"""``distill export`` (a committed student and its model card, into a folder) and
``distill ui`` (the MLflow UI on a store's tracking database)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

from ..errors import UserError, allowed_list, did_you_mean
from .fetch import Committed
from .planner import make_plan
from .store import Store


def export_command(pipeline, config: str, stage: str, to: str, store_uri: str, out) -> int:
    store = Store.open(store_uri, create=False)
    plan = make_plan(pipeline, store, ())
    students = [n for n, node in pipeline.nodes.items() if type(node.stage).mlflow_outputs]
    if stage not in pipeline.nodes:
        raise UserError(f"distill export: stage '{stage}' is not in pipeline "
                        f"'{pipeline.name}'{did_you_mean(stage, pipeline.nodes)}; stages that "
                        f"make a student: {allowed_list(students)}")
    node = pipeline.nodes[stage]
    if stage not in students:
        raise UserError(f"distill export: stage '{stage}' ({node.kind}) makes no student; "
                        f"stages that do: {allowed_list(students)}")
    decision, state = plan.decisions[stage], plan.states[stage]
    manifest = store.manifest(state.kind, state.key)
    if decision.status != "cached" or manifest is None:
        raise UserError(f"distill export: stage '{stage}' ({node.kind}) has no committed "
                        f"artifact for this pipeline in store {store.root} (key "
                        f"{state.key[:12]}: {decision.reason}); run `distill run {config} "
                        f"--store {store.root}` first")
    if os.path.exists(to) and (not os.path.isdir(to) or os.listdir(to)):
        raise UserError(f"distill export: --to {to!r} exists and is not an empty folder; "
                        f"allowed: a new or empty folder")
    reports = []
    for name in pipeline.order():  # every committed evaluation downstream of the student
        if name in pipeline.downstream(stage) and plan.decisions[name].status == "cached":
            down = store.manifest(plan.states[name].kind, plan.states[name].key)
            if down and any(o.get("type") == "report" for o in down["outputs"].values()):
                reports.append((name, down.get("metrics", {})))
    output = type(node.stage).mlflow_outputs[0]
    files = Committed.of(store.root, manifest, output).local_dir()
    from ..export import export
    tmp = f"{to.rstrip(os.sep)}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    export(store, manifest, output, files, tmp, reports)
    if os.path.isdir(to):
        os.rmdir(to)
    os.replace(tmp, to)
    evaluated = ", ".join(n for n, _ in reports) or "not evaluated"
    print(f"exported stage '{stage}' ({node.kind}, {state.key[:12]}) to {to} "
          f"(card: {os.path.join(to, 'README.md')}; metrics from: {evaluated})", file=out)
    return 0


def ui_command(store_uri: str, port: int, out) -> int:
    from .tracking import default_tracking_uri
    store = Store.open(store_uri, create=False)
    uri = default_tracking_uri(store.root)
    db = uri[len("sqlite:///"):]
    if not os.path.isfile(db):
        raise UserError(f"distill ui: store {store.root} has no tracking database ({db}); "
                        f"run a pipeline with --store {store_uri} first (runs tracked on an "
                        f"MLflow server are seen in that server's own UI)")
    if not 0 < port < 65536:
        raise UserError(f"distill ui: --port {port} is not valid; allowed: 1 to 65535")
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise UserError(f"distill ui: --port {port}: 127.0.0.1:{port} cannot be used "
                            f"({e.strerror}); allowed: a free port, e.g. --port "
                            f"{free_port()}") from None
    print(f"MLflow UI of store {store.root}: http://127.0.0.1:{port}  (Ctrl-C stops it)",
          file=out, flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # one user: one worker
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
