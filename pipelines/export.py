"""Hub-ready exports: a student's files plus a Hugging Face model card (``README.md``).

Used by the ``export`` stage (a new artifact: the committed student is never changed) and
by ``distill export PIPELINE STAGE --to DIR``. The card's YAML metadata follows the Hub's
model-card format: ``base_model`` (the teacher), ``library_name`` and ``pipeline_tag``
(from the student's ``MLmodel``, see ``pipelines.mlmodel``), ``tags: [distillation,
<method>]`` and a ``model-index`` with the metrics of the evaluation that scored it. With
no evaluation the card says "not evaluated": a number is never invented.
"""

from __future__ import annotations

import os
import shutil

from .errors import UserError
from .mlmodel import read_metadata

LOADERS = {  # how a user loads the folder, by library_name
    "diffusers": "from diffusers import DiffusionPipeline\n"
                 "pipe = DiffusionPipeline.from_pretrained(\"{folder}\")",
    "transformers": "from transformers import {auto}, AutoTokenizer\n"
                    "model = {auto}.from_pretrained(\"{folder}\")\n"
                    "tokenizer = AutoTokenizer.from_pretrained(\"{folder}\")",
    "pytorch": "from stages.models.classifiers import load_classifier  # pip install distillery\n"
               "model = load_classifier(\"{folder}\")  # {arch}.from_pretrained "
               "(huggingface_hub.PyTorchModelHubMixin)",
}
AUTO_CLASSES = {"text-generation": "AutoModelForCausalLM"}  # by pipeline_tag; else AutoModel


def lineage(store, manifest: dict) -> list[dict]:
    """The manifests ``manifest`` was made from, nearest first (breadth first)."""
    by_key = {m["key"]: m for m in store.manifests()}
    out, seen, frontier = [], {manifest["key"]}, [manifest]
    while frontier:
        nxt = []
        for m in frontier:
            for refs in m.get("inputs", {}).values():
                for ref in refs if isinstance(refs, list) else [refs]:
                    up = by_key.get(ref.partition("/")[0])
                    if up is not None and up["key"] not in seen:
                        seen.add(up["key"])
                        out.append(up)
                        nxt.append(up)
        frontier = nxt
    return out


def teacher_of(upstream: list[dict]) -> dict | None:
    """The nearest model the student was made from."""
    for m in upstream:
        if any(o.get("type") == "model" for o in m.get("outputs", {}).values()):
            return m
    return None


def base_model(teacher: dict | None, teacher_dir: str | None) -> str:
    """The teacher's Hub id, else ``distillery:<kind>/<key>``. A copy of a Hub repository
    names itself in its own card's usage code (``from_pretrained("org/name")``, the most
    often named id); ``_name_or_path`` of its config is the id it was loaded from, which for
    a fine-tuned model saved as-is is its parent (all-MiniLM-L6-v2 names
    nreimers/MiniLM-L6-H384-uncased), so it comes second."""
    if teacher is None:
        return "unknown"
    import collections
    import json
    import re
    folder = teacher_dir or ""
    try:
        with open(os.path.join(folder, "README.md"), encoding="utf-8") as f:
            ids = re.findall(r"(?:from_pretrained|SentenceTransformer)\(\s*['\"]"
                             r"([\w.-]+/[\w.-]+)['\"]", f.read())
        if ids:
            return collections.Counter(ids).most_common(1)[0][0]
    except OSError:
        pass
    for rel in ("config.json", "model_index.json"):
        try:
            with open(os.path.join(folder, rel)) as f:
                name = json.load(f).get("_name_or_path", "")
        except (OSError, ValueError):
            continue
        if name.count("/") == 1 and not os.path.exists(name) and not name.startswith("."):
            return name
    return f"distillery:{teacher['kind']}/{teacher['key'][:12]}"


def student_metrics(stage: str, metrics: dict) -> tuple[dict, dict]:
    """(the student's own metrics, the teacher's) of an evaluation report: metrics naming
    the stage as a path segment (``fid/<stage>/1``), or every metric of a report that
    names no stage (an evaluation of one student); the teacher's name ``teacher``."""
    own = {k: v for k, v in metrics.items() if stage in k.split("/")}
    teacher = {k: v for k, v in metrics.items()
               if "teacher" in k.split("/") or k.startswith("teacher_")}
    if not own and not any("/" in k for k in metrics):
        own = {k: v for k, v in metrics.items() if k not in teacher}
    return own, teacher


def card(stage: str, manifest: dict, upstream: list[dict], meta: dict, base: str,
         reports: list[tuple[str, dict]]) -> str:
    import yaml
    method = str(meta.get("method", manifest["kind"]))
    own, vs_teacher = {}, {}
    for _, metrics in reports:
        o, t = student_metrics(stage, metrics)
        own.update(o)
        vs_teacher.update(t)
    data = next((m for m in upstream if m["kind"].startswith("load-")), None)
    header = {"base_model": base, "library_name": meta.get("library_name", "pytorch"),
              "pipeline_tag": meta.get("pipeline_tag"),
              "tags": ["distillation", method.split(" ")[0], manifest["kind"]]}
    if own:
        header["model-index"] = [{"name": stage, "results": [{
            "task": {"type": meta.get("pipeline_tag")},
            "dataset": {"name": data["stage"] if data else "unknown",
                        "type": data["kind"] if data else "unknown"},
            "metrics": [{"type": k.split("/")[0], "name": k, "value": float(v)}
                        for k, v in sorted(own.items())]}]}]
    made = {m.get("stage", m["kind"]): {"kind": m["kind"], "config": m.get("config", {})}
            for m in [manifest, *upstream]}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {stage}", "",
             f"{article(meta.get('pipeline_tag', 'model'))} student distilled by "
             f"distillery from `{base}` with **{method}**"
             + (f" ({meta['paper']})." if meta.get("paper") else "."), "",
             "## Evaluation", ""]
    if own:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(own.items())]
        lines += ["", f"Measured by {', '.join(f'`{r}`' for r, _ in reports)} in the same "
                      f"run as the teacher."]
    else:
        lines += ["Not evaluated: no evaluation report was wired to this export."]
    if vs_teacher:
        lines += ["", "## Against the teacher", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(vs_teacher.items())]
    loader = LOADERS.get(meta.get("library_name"), "")
    lines += ["", "## How to load", "", "```python",
              loader.format(folder=".", arch=meta.get("architecture", "the architecture"),
                            auto=AUTO_CLASSES.get(meta.get("pipeline_tag"), "AutoModel")),
              "```", "", "As an MLflow model: `mlflow.pyfunc.load_model(\".\")` (its "
              "`MLmodel`, no pickled objects).", "",
              "## How it was made", "", f"Seed {manifest.get('seed')}; the stages (resolved "
              f"configs) it was made from:", "", "```yaml",
              yaml.safe_dump(made, sort_keys=False).strip(), "```", "", "## Lineage", "",
              "| stage | kind | artifact key | version |", "|---|---|---|---|"]
    lines += [f"| {m.get('stage')} | {m['kind']} | {m['key'][:12]} | {m.get('version')} |"
              for m in [manifest, *upstream]]
    return "\n".join(lines) + "\n"


def link_or_copy(src: str, dst: str) -> str:
    """A hard link (the same bytes, never rewritten: committed files are read-only by
    contract and verified by hash), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def article(word: str) -> str:
    return f"{'An' if word[:1].lower() in 'aeiou' else 'A'} {word}"


def export(store, manifest: dict, output: str, files_dir: str, dest: str,
           reports: list[tuple[str, dict]], link: bool = False) -> str:
    """Write ``dest``: the files of the committed student ``manifest`` (output ``output``,
    verified in ``files_dir``) and its model card, from ``reports`` ((evaluation stage,
    metrics) pairs). ``link``: hard-link the student's files where the file system allows
    (an export inside the store: its weights stored once), else copy."""
    meta = read_metadata(files_dir)
    if meta is None:
        raise UserError(f"stage '{manifest.get('stage')}' ({manifest['kind']}): export: the "
                        f"artifact {manifest['key'][:12]} has no MLmodel (made before students "
                        f"were MLflow Models); remake it with --force {manifest.get('stage')}")
    upstream = lineage(store, manifest) if store is not None else []
    teacher = teacher_of(upstream)
    teacher_dir = None
    if teacher is not None:  # its config names its Hub id (a local store: read in place)
        from ._internal.fetch import Committed
        out = next(n for n, o in teacher["outputs"].items() if o.get("type") == "model")
        source = Committed.of(store.root, teacher, out)
        teacher_dir = None if source.remote else source.where
    text = card(manifest.get("stage", "student"), manifest, upstream, meta,
                base_model(teacher, teacher_dir), reports)
    shutil.copytree(files_dir, dest, dirs_exist_ok=True,
                    copy_function=link_or_copy if link else shutil.copy2)
    readme = os.path.join(dest, "README.md")
    if os.path.lexists(readme):  # a linked student card: replaced, never written through
        os.unlink(readme)
    with open(readme, "w") as f:
        f.write(text)
    return dest
