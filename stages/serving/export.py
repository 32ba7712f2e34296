"""``export``: a student (any stage with ``mlflow_outputs``) as a folder ready for the
Hugging Face Hub: its files (weights, configs, tokenizer or pipeline components, the
``MLmodel``) and a model card (``README.md``) with YAML metadata (``base_model`` = the
teacher, ``library_name``, ``pipeline_tag``, ``tags: [distillation, <method>]``,
``model-index`` with the wired evaluation's metrics), the method and its paper, the
resolved configs of every stage it was made from, the speed-up and quality against the
teacher, and the lineage. Without a ``report`` input the card says "not evaluated".
A new artifact: the student's own is never changed; its files are hard links to the
student's where the store's file system allows (the weights stored once). ``distill
export`` does the same for a committed student without a stage (copies: the folder is the
user's). The card is written by ``pipelines.export``."""

from __future__ import annotations

from pipelines.errors import allowed_list, bad_value
from pipelines.stage import Model, Report, Stage, StageConfig, registry


class Export(Stage):
    kind = "export"
    version = "3"  # 2: base_model from the teacher card's own Hub id; 3: the card's Auto class by task

    class Config(StageConfig):
        pass

    inputs = {"model": Model}
    optional_inputs = {"report": Report}  # the evaluation that scored the student
    outputs = {"folder": Model}

    def run(self, ctx, model, report=None):
        from pipelines._internal.store import Store
        from pipelines.export import export
        from pipelines.mlmodel import read_metadata
        where = f"stage '{ctx.name}' ({self.kind}) input 'model'"
        if model.source is None or read_metadata(model.path) is None:
            kinds = [k for k, cls in registry().items() if cls.mlflow_outputs]
            raise bad_value(where, "model", getattr(model.source, "stage", model.path),
                            f"a student: the model output of a stage of a kind that makes one "
                            f"({allowed_list(kinds)})")
        store = Store.open(model.source.store, create=False)
        manifest = store.manifest(model.source.kind, model.source.key)
        reports = [(report.source.stage if report.source else "report", report.metrics())
                   ] if report is not None else []
        out = export(store, manifest, model.source.output, model.path,
                     ctx.output_dir("folder"), reports, link=True)
        return {"folder": Model(path=out, info={"student": model.source.stage,
                                                 "evaluated": bool(reports)})}
