"""What the runner records of a student (a stage with ``mlflow_outputs``): on the stage's
MLflow run, its inputs as MLflow datasets (the lineage: URIs and content checksums), the
student as an external LoggedModel (when it ran: its files stay in the store), and, for a
stage with ``register: NAME``, a Model Registry version whose source is the artifact's
folder on the store (one version per artifact key)."""

from __future__ import annotations

from ..errors import UserError
from ..mlmodel import MLMODEL
from .fetch import Committed


def has_mlmodel(manifest: dict, output: str) -> bool:
    return any(f["path"] == MLMODEL for f in manifest["outputs"][output].get("files", []))


def check_packaged(manifest: dict, output: str, name: str, what: str) -> None:
    """A student committed before students were MLflow Models has no ``MLmodel``."""
    if not has_mlmodel(manifest, output):
        raise UserError(f"stage '{name}' ({manifest['kind']}): {what}: its committed artifact "
                        f"{manifest['key'][:12]} has no MLmodel (it was made before students "
                        f"were MLflow Models); remake it with --force {name}")


def lineage(plan, name: str, manifest: dict) -> list[tuple[str, str, str, str]]:
    """(input, 'stage.output', URI, content checksum) of every input of stage ``name``."""
    node, store = plan.pipeline.nodes[name], plan.store
    content = manifest.get("input_content", {})
    out = []
    for inp, ref in node.inputs.items():
        refs = ref if isinstance(ref, list) else [ref]
        digests = content.get(inp) if isinstance(ref, list) else [content.get(inp)]
        for (up, output), digest in zip(refs, digests or [None] * len(refs)):
            state = plan.states[up]
            uri = f"{store.artifact_dir(state.kind, state.key)}/{output}"
            out.append((inp, f"{up}.{output}", uri, str(digest or state.key)))
    return out


def track_student(tracker, plan, name: str, run_id: str, manifest: dict, ran: bool,
                  registered: dict) -> str | None:
    """Lineage, the logged model (``ran``) and the registry version of stage ``name``;
    returns a line for the display when a version was registered or found."""
    node = plan.pipeline.nodes[name]
    outputs = type(node.stage).mlflow_outputs
    if not outputs:
        return None
    tracker.log_lineage(run_id, lineage(plan, name, manifest))
    if not has_mlmodel(manifest, outputs[0]):
        if node.register:
            check_packaged(manifest, outputs[0], name, "register")
        return None
    source = Committed.of(plan.store.root, manifest, outputs[0]).where
    model_id = None
    if ran:
        model_id = tracker.log_model(run_id, name, node.kind, manifest["key"], source)
    if not node.register:
        return None
    version, created = tracker.register(node.register, source, run_id, manifest["key"],
                                        model_id)
    registered[name] = {"name": node.register, "version": version, "created": created}
    verb = "registered" if created else "already registered"
    return f"{name}: {verb} as models:/{node.register}/{version}"
