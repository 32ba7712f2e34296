"""Every ``export`` in a store checked as a user of the Hub would: issue 25's acceptance
("every exported folder of the examples has a card that ``huggingface_hub.ModelCard.load``
parses, with the metrics of the run that evaluated it, and the folder loads with its
library's ``from_pretrained``").

For each committed ``export`` artifact: the card parsed by ``ModelCard.load``; its
``model-index`` metrics compared with the ``metrics.json`` of the evaluation report wired
into the export (read from the store, not from the card's own text); the folder loaded with
the ``from_pretrained`` its ``library_name`` names (``PyTorchModelHubMixin`` classes for
torch classifiers, ``AutoModel`` and ``AutoTokenizer`` for transformers,
``DiffusionPipeline`` for diffusers) and, as an MLflow model, with
``mlflow.pyfunc.load_model`` and its own input example.

    distill run examples/quickstart.yaml --store S    # and the other examples
    python -m benchmarks.exports --store S

Writes ``benchmarks/results/outputs.md`` (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

from benchmarks.common import commit
from benchmarks.machine import machine

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "outputs.md")


def load_with_library(folder: str, library: str, task: str | None) -> str:
    """Load ``folder`` with its library's ``from_pretrained``; what was loaded."""
    if library == "pytorch":
        from stages.models.classifiers import ARCH_FILE, ARCHITECTURES
        with open(os.path.join(folder, ARCH_FILE)) as f:
            cls = ARCHITECTURES[json.load(f)["architecture"]]
        model = cls.from_pretrained(folder)  # huggingface_hub.PyTorchModelHubMixin
        return f"{cls.__name__}.from_pretrained ({sum(p.numel() for p in model.parameters())} params)"
    if library == "transformers":
        import transformers
        from pipelines.export import AUTO_CLASSES
        auto = AUTO_CLASSES.get(task, "AutoModel")  # the class the card tells users to use
        model = getattr(transformers, auto).from_pretrained(folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        return f"{auto} -> {type(model).__name__}, AutoTokenizer -> {type(tok).__name__}"
    if library == "diffusers":
        from diffusers import DiffusionPipeline
        return f"DiffusionPipeline -> {type(DiffusionPipeline.from_pretrained(folder)).__name__}"
    raise ValueError(f"unknown library_name {library!r}")


def pyfunc_predict(folder: str) -> str:
    import mlflow
    from mlflow.models import Model
    model = mlflow.pyfunc.load_model(folder)
    example = Model.load(folder).load_input_example(folder)
    out = model.predict(example)
    return f"predict(input example) -> {type(out).__name__} of {len(out)}"


def check(store: str, manifest: dict) -> dict:
    from huggingface_hub import ModelCard
    folder = os.path.join(store, "export", manifest["key"], "folder")
    card = ModelCard.load(os.path.join(folder, "README.md"))
    got = {r.metric_name: r.metric_value for r in (card.data.eval_results or [])}
    report = manifest["inputs"].get("report")
    expected = {}
    if report:
        key, _, output = report.partition("/")
        path = glob.glob(os.path.join(store, "*", key, output, "metrics.json"))[0]
        with open(path) as f:
            expected = json.load(f)
    from pipelines.export import student_metrics
    student = manifest["inputs"]["model"].partition("/")[0]
    student_stage = json.load(open(glob.glob(os.path.join(store, "*", student,
                                                          "manifest.json"))[0]))["stage"]
    own, _ = student_metrics(student_stage, expected)
    mismatched = [k for k, v in own.items() if k not in got or abs(got[k] - v) > 1e-9 * max(1, abs(v))]
    return {"store": store, "pipeline": manifest.get("pipeline"), "student": student_stage,
            "library": card.data.library_name, "base_model": card.data.base_model,
            "pipeline_tag": card.data.pipeline_tag, "metrics": len(got),
            "report_metrics": len(own), "mismatched": mismatched,
            "evaluated": bool(got) and bool(own) and not mismatched,
            "loaded": load_with_library(folder, card.data.library_name, card.data.pipeline_tag),
            "pyfunc": pyfunc_predict(folder), "sample": dict(sorted(got.items())[:3])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, nargs="+", help="one or more stores")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    start = time.perf_counter()
    from stages.serving.export import Export
    rows = [check(store, m) for store in args.store
            for m in (json.load(open(p)) for p in sorted(
                glob.glob(os.path.join(store, "export", "*", "manifest.json"))))
            if m["version"] == Export.version]  # those the current code made
    m = machine()
    lines = ["# Exported students: cards and loading", "",
             f"Command: `python -m benchmarks.exports --store {' '.join(args.store)}` (commit "
             f"{commit()}, {time.perf_counter() - start:.0f} s) after `distill run "
             f"examples/<example>.yaml --store <store>` for the examples below", "",
             f"Machine: {m['cores']}-core CPU, {m['memory_gib']} GiB, GPU {m['gpu']}; {m['date']}",
             "", f"{len(rows)} exports; every card parsed by `huggingface_hub.ModelCard.load`; "
             f"with the report's metrics: {sum(r['evaluated'] for r in rows)} of {len(rows)}.", "",
             "| store | pipeline | student | library_name | pipeline_tag | base_model | card metrics "
             "(= report's) | from_pretrained | mlflow.pyfunc | some metrics |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['store']} | {r['pipeline']} | {r['student']} | {r['library']} | "
                     f"{r['pipeline_tag']} | `{r['base_model']}` | {r['metrics']} "
                     f"({'all equal' if not r['mismatched'] else 'DIFFER: ' + ', '.join(r['mismatched'])}) | "
                     f"{r['loaded']} | {r['pyfunc']} | "
                     + ", ".join(f"{k} {v:.4g}" for k, v in r["sample"].items()) + " |")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(r["evaluated"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
