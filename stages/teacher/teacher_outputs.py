"""``teacher-outputs``: the teacher's signal for every row, by Ray Data batch inference
(the stored "soft targets" of Hinton et al. 2015, arXiv 1503.02531, computed once and
reused by every student; cf. dataset reinforcement, Faghri et al. 2023).

Signals (``signal``), by teacher:
- a classifier saved by ``fit-classifier``: ``logits``, z_t(x_i) = teacher(x_i) of shape
  (num_classes,), or ``probabilities``, softmax(z_t); students apply their own temperature
  T: p_t = softmax(z_t / T) (from probabilities, log p_t is z_t up to a constant, so the
  same tempering applies);
- a ``transformers`` model folder, over the ``text_column``: ``topk_logprobs`` (a causal
  LM's top-k next-token log-probabilities and the mass left outside them),
  ``hidden_states`` of chosen ``layers``, or mean-pooled sentence ``embeddings``; see
  ``stages.teacher.text_teacher``.

Values are stored in ``precision``. The signal, its settings (top_k, layers, max_length,
precision) and the teacher's vocabulary and widths go in the manifest's info, which
training stages check before using the signal; a text signal's ``teacher`` names the
teacher artifact (``<kind>/<key>``), never a path: a student built from the teacher wires
it as its own input. A pool of ``actors`` Ray actors each gets the teacher's artifact,
fetches it onto its own node (``model.path`` there) and loads it once with its real
``from_pretrained``, on a GPU when the cluster has one. Rows keep the input's stable
``id``.

Shard-level resume: the pass writes its parquet shards into the stage's work location as
it goes (``ctx.resumable_write``). If it is cut short (the driver killed, retries spent),
the next attempt of the same key keeps every complete shard and runs the teacher only on
the rows whose ``id`` no shard holds (metric ``rows_resumed``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from pipelines.context import alive_nodes
from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Resources, Stage
from stages.data.tables import parquet, require_columns
from stages.models.classifiers import load_classifier
from stages.models.text import is_transformers_folder, load_text_model
from stages.teacher.signals import (CLASSIFIER_SIGNALS, SIGNALS, InferenceConfig, TeacherActor,
                                    describe, in_task, resumable, teacher_in_task, with_teacher,
                                    with_teacher_logits, write_rows, write_signal)
from stages.teacher.text_teacher import TEXT_SIGNALS, TextTeacherActor


class TeacherOutputs(Stage):
    kind = "teacher-outputs"
    version = "4"  # 2: probabilities and the text signals; 3: shard-level resume;
    # 4: a text signal's info names its teacher (``teacher``) but no node-local path

    class Config(InferenceConfig):
        signal: Literal[SIGNALS] = "logits"
        top_k: PositiveInt = 32          # topk_logprobs
        layers: list[int] = [-1]         # hidden_states: indices into (embeddings, layer 1, ...)
        max_length: int = Field(64, ge=2)  # text signals: tokens per row (padded/truncated)
        text_column: str = "text"
        shard_rows: int = Field(10_000, ge=1)  # rows per shard at most: the unit of resume
        execution = ("shard_rows",)  # with InferenceConfig's actors and batch_size

    inputs = {"model": Model, "data": Dataset}
    outputs = {"signal": Dataset}
    # rows_resumed: kept from an earlier attempt's shards; actors 0: a small pass ran in the
    # stage's own task (``signals.in_task``), at teacher_threads torch threads
    metrics = ("rows", "rows_resumed", "actors", "teacher_threads")
    resources = Resources(num_cpus=0)  # only launches Ray Data work

    def run(self, ctx, model, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        text = is_transformers_folder(model.path)
        allowed = tuple(TEXT_SIGNALS) if text else CLASSIFIER_SIGNALS
        if cfg.signal not in allowed:
            teacher = "a transformers model" if text else "a classifier"
            raise bad_value(f"{where} field 'signal'", "signal", cfg.signal,
                            f"for {teacher} teacher: {', '.join(allowed)}")
        if text:
            return {"signal": self._text_signal(ctx, model, data, where)}
        teacher = load_classifier(model.path, f"{where} input 'model'")
        table = require_columns(data, ["x"], f"{where} input 'data'")  # before any work
        num_classes, n = teacher.num_classes, table.count_rows()
        params = sum(p.numel() for p in teacher.parameters())
        probabilities = cfg.signal == "probabilities"
        if in_task(cfg.actors, n, params, ctx.num_gpus_available, alive_nodes()):
            actor = TeacherActor(model, cfg.precision, f"{where} input 'model'", probabilities)
            table = teacher_in_task(data, actor, cfg.batch_size, ctx)  # a small pass
            return {"signal": write_signal(ctx, table, cfg, num_classes, data,
                                           signal=cfg.signal)}
        rows, shards = resumable(ctx, data, cfg.shard_rows)  # 1. keep earlier attempts' rows
        ds = with_teacher_logits(rows, model, cfg, ctx, f"{where} input 'model'",
                                 probabilities=probabilities, rows=n)  # 2. the rest
        return {"signal": write_signal(ctx, ds, cfg, num_classes, data, signal=cfg.signal,
                                       shards=shards)}  # 3. earlier shards + new ones

    def _text_signal(self, ctx, model, data, where):
        cfg = self.config
        teacher, tokenizer = load_text_model(model.path, TEXT_SIGNALS[cfg.signal],
                                             f"{where} input 'model'")
        c, n_states = teacher.config, int(teacher.config.num_hidden_layers) + 1
        bad = [i for i in cfg.layers if not -n_states <= i < n_states]
        if cfg.signal == "hidden_states" and bad:
            raise bad_value(f"{where} field 'layers'", "layers", bad,
                            f"indices in -{n_states}..{n_states - 1} (0: embeddings)")
        if cfg.signal == "topk_logprobs" and cfg.top_k > c.vocab_size:
            raise bad_value(f"{where} field 'top_k'", "top_k", cfg.top_k,
                            f"at most the vocabulary size {c.vocab_size}")
        require_columns(data, [cfg.text_column], f"{where} input 'data'")
        kwargs = {"model": model, "signal": cfg.signal, "precision": cfg.precision,
                  "top_k": cfg.top_k, "layers": list(cfg.layers), "max_length": cfg.max_length,
                  "text_column": cfg.text_column, "where": f"{where} input 'model'"}
        rows, shards = resumable(ctx, data, cfg.shard_rows)
        ds = with_teacher(rows, TextTeacherActor, kwargs, cfg, ctx, parquet(data).count_rows())
        info = {"signal": cfg.signal, "precision": cfg.precision, "model_type": c.model_type,
                "vocab_size": int(c.vocab_size), "hidden_size": int(c.hidden_size),
                "num_layers": int(c.num_hidden_layers), "max_length": cfg.max_length,
                "text_column": cfg.text_column, **describe(model),
                "teacher_params": sum(p.numel() for p in teacher.parameters())}
        if cfg.signal == "topk_logprobs":
            info["top_k"] = cfg.top_k
        if cfg.signal == "hidden_states":
            info["layers"] = [i % n_states for i in cfg.layers]
        return write_rows(ctx, ds, info, shards)

