"""``kd-student``: knowledge distillation of a student from a stored teacher signal (the
``teacher-outputs`` artifact), trained with Ray Train (``TorchTrainer``, data-parallel
workers, DDP). The signal decides the student and the losses it allows
(``stages.train.kd_tasks``): classifier logits or probabilities -> a torch classifier
(``hinton``, ``taid``); a causal LM's top-k log-probabilities -> a smaller causal LM
(``hinton``, ``taid``); sentence embeddings -> a smaller encoder (``cosine``, ``mse``,
``cosine_mse``); hidden states -> a smaller encoder (``feature_mse``). Text students are
``transformers`` models made from the teacher's folder (``stages.models.text``): every
n-th teacher layer (DistilBERT), a shrunk config, or a local folder, saved with the
teacher's tokenizer. The teacher is then a declared input, ``teacher`` (optional: only the
text signals need it; wire the teacher model the signal was made from,
``inputs: {signal: teacher_outputs, teacher: teacher}``); the Ray Train workers get the
artifact and each fetches it onto its own node. ``loss`` defaults to the first one the
signal allows; a loss or student the signal cannot serve, or a text signal without its
teacher wired, is a clear error before any training.

Hinton knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in
a Neural Network", arXiv 1503.02531):

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(y, z_s)

z_t: teacher logits from the ``teacher-outputs`` signal, z_s: student logits, T: the
temperature (the T^2 factor keeps soft-target gradients on the scale of the hard loss),
alpha = 0 is plain supervised training.

``loss: taid`` replaces the fixed teacher target by TAID's interpolated one (Shing et al.
2025, arXiv 2501.16937; see ``stages.train.taid``): the teacher logits z_t above become
(1 - t) stopgrad(z_s) + t z_t, with t rising from ``taid_t_start`` to ``taid_t_end`` on
TAID's adaptive schedule, updated after every optimisation step. In data-parallel training
each step's loss is averaged over the workers (one scalar all-reduce) before the update, so
every worker computes the same t without broadcasting it; t and the schedule's state (m,
previous loss, step) are saved in each checkpoint and restored on resume, and t is logged
per epoch as ``taid_t``.

Training goes through the one harness (``stages.train.harness``): Ray Train workers
(``num_workers``, DDP) or the stage's process (``num_workers: 0``; ``auto``, the default:
the stage's process for small held rows, see ``drivers.workers_for``), a global ``batch_size``
split across the workers, one global permutation per epoch of the held rows, a checkpoint
(model, optimiser, TAID state, epoch, resolved config) every epoch; a re-run with the same
artifact key resumes from the last checkpoint.
"""

from __future__ import annotations

from typing import Annotated, Literal

import pyarrow.compute as pc
from pydantic import Field, PositiveInt, model_validator

from pipelines.artifacts import column_to_numpy
from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Resources, Stage
from stages.data.tables import parquet, require_columns
from stages.models.classifiers import ArchName, ClassifierArch
from stages.models.text import TextStudentArch
from stages.train.harness import AdamWConfig, Loss, TrainMethod, fit, over_workers
from stages.train.kd_responses import ResponseTask
from stages.train.kd_tasks import TASKS as SIGNAL_TASKS
from stages.train.kd_tasks import (ClassifierTask, hinton_kd_loss,  # noqa: F401
                                   missing_teacher, wrong_teacher)
from stages.train.rows import Rows, hold_in_memory, train_share_bytes
from stages.train.taid import TAIDSchedule

TASKS = {**SIGNAL_TASKS, "responses": ResponseTask}
LOSS_PAPERS = {  # what a student's model card cites for its loss
    "hinton": "Hinton et al. 2015, Distilling the Knowledge in a Neural Network",
    "taid": "Shing et al. 2025, TAID: Temporally Adaptive Interpolated Distillation",
    "sft": "Kim & Rush 2016, Sequence-Level Knowledge Distillation",
    "forward_kl": "Hinton et al. 2015 (token-level KL on the teacher's responses)",
    "reverse_kl": "Gu et al. 2024, MiniLLM (reverse KL)",
    "jsd": "Agarwal et al. 2024, On-Policy Distillation of Language Models (GKD)",
    "tvd": "Agarwal et al. 2024, GKD (total variation)",
    "cosine": "Reimers & Gurevych 2020, Making Monolingual Sentence Embeddings "
              "Multilingual using Knowledge Distillation",
    "mse": "Reimers & Gurevych 2020 (MSE to the teacher's embeddings)",
    "cosine_mse": "Reimers & Gurevych 2020 (cosine and MSE)",
    "feature_mse": "Romero et al. 2015, FitNets: Hints for Thin Deep Nets",
}  # generate-responses' output
LOSSES = tuple(dict.fromkeys(loss for task in TASKS.values() for loss in task.losses))


class Distill(TrainMethod):
    """A student fitted to the stored teacher signal with the task's loss (and TAID's
    schedule, updated after every step from the loss averaged over the workers)."""

    def __init__(self, cfg, meta: dict, teacher=None):
        # ``teacher``: the artifact (text signals), never its path; ``setup`` runs on each
        # Ray Train worker, where ``teacher.path`` is a verified copy on its own node
        self.cfg, self.meta, self.teacher = cfg, meta, teacher
        task = TASKS[meta["signal"]](cfg, meta)
        self.columns = task.columns
        # transformers backbones have parameters a task leaves unused (BERT's pooler)
        self.find_unused_parameters = not isinstance(task, ClassifierTask)
        self.taid, self.total_steps = None, 0

    def setup(self, device):
        self.task = TASKS[self.meta["signal"]](self.cfg, self.meta, self.teacher)
        self.taid = _taid_schedule(self.cfg, None)
        return {"model": self.task.build().to(device)}

    def begin(self, total_steps: int) -> None:
        self.total_steps = total_steps  # TAID's schedule length

    def optimizers(self, nets):
        return {"model": self.cfg.adamw(nets["model"])}

    def loss(self, nets, emas, batch, gen):
        if hasattr(self.task, "bind"):  # on-policy draws come from the worker's generator
            self.task.bind(gen)
        loss, logits, labels = self.task.loss(nets["model"], batch, self.taid)
        if self.taid:
            mean = over_workers(loss.detach(), loss.device, "mean")  # the same t everywhere
            self.taid.update(mean, self.taid.step + 1, self.total_steps)
        sums = {} if logits is None else {"accuracy": (logits.argmax(1) == labels).sum().item()}
        return Loss({"model": loss}, len(labels), sums)

    def epoch_metrics(self, nets):
        return {"taid_t": self.taid.t} if self.taid else {}

    def state_dict(self):
        return {"taid": self.taid.state_dict()} if self.taid else {}

    def load_state_dict(self, state):
        self.taid = _taid_schedule(self.cfg, state)


PRUNE_SAMPLES = 64  # sequences the block importance of depth-prune is measured on


def depth_prune(cfg, signal, teacher_path: str, use: str, where: str) -> dict:
    """The teacher layers a depth-pruned student keeps, from the block importance on the
    first ``PRUNE_SAMPLES`` train sequences of the signal (a response's prompt and response
    tokens, or a text row's tokens); with every layer's importance, for the record."""
    import transformers

    from stages.models.text import depth_pruned_layers
    from stages.train.rows import RAGGED_PAD
    responses = signal.info.get("signal") == "responses"
    columns = ["prompt_ids", "response_ids"] if responses else ["input_ids", "attention_mask"]
    rows = parquet(signal).head(PRUNE_SAMPLES, columns=columns,
                                filter=pc.field("split") == "train").to_pylist()
    if responses:
        sequences = [r["prompt_ids"] + r["response_ids"] for r in rows]
    else:
        sequences = [[t for t, m in zip(r["input_ids"], r["attention_mask"]) if m]
                     for r in rows]
    sequences = [[t for t in s if t != RAGGED_PAD] for s in sequences if s]
    total = transformers.AutoConfig.from_pretrained(teacher_path).num_hidden_layers
    keep, importance = depth_pruned_layers(teacher_path, use, sequences,
                                           cfg.pruned_count(total), where)
    return {"pruned_layers": keep, "block_importance": [round(b, 5) for b in importance]}


def _taid_schedule(cfg, state: dict | None) -> TAIDSchedule | None:
    """The TAID schedule for ``loss: taid`` (None for Hinton), resumed from the checkpoint."""
    if cfg.loss != "taid":
        return None
    schedule = TAIDSchedule(cfg.taid_t_start, cfg.taid_t_end, cfg.taid_alpha, cfg.taid_beta)
    if state and "taid" in state:
        schedule.load_state_dict(state["taid"])
    return schedule


class KDStudent(Stage):
    kind = "kd-student"
    version = "8"  # 2: ``loss: taid``; 3: text signals, probabilities; 4: shards in memory;
    # 5: a held share is read by its worker (pyarrow) rather than by Ray Data in the stage;
    # 6: the training harness: a global batch_size, one global permutation per epoch;
    # 7: text signals take the teacher from the ``teacher`` input, not the signal's info;
    # text students distilled without dropout (``dropout``); a last partial batch dropped;
    # 8: a teacher's responses (sft, token-level divergences, on-policy GKD)

    class Config(ClassifierArch, TextStudentArch, AdamWConfig):
        # classifier students: ClassifierArch's fields; text students: TextStudentArch's
        arch: ArchName = "mlp"
        hidden: list[PositiveInt] = [32]
        lr: float = Field(1e-2, gt=0)
        temperature: float = Field(4.0, gt=0)
        alpha: float = Field(0.9, ge=0, le=1)
        loss: Literal[LOSSES] | None = None   # None: the first loss the signal allows
        topk_rest: Literal["uniform", "renormalize"] = "uniform"  # top-k LM signals
        # a teacher's responses (``stages.train.kd_responses``): jsd's beta, the weight of
        # the cross-entropy added to a divergence, on-policy GKD's lmbda and sampling,
        # tokens per sequence (prompt + response)
        beta: float = Field(0.5, ge=0, le=1)
        ce_weight: float = Field(0.0, ge=0)
        lmbda: float = Field(0.0, ge=0, le=1)
        student_temperature: float = Field(1.0, gt=0)
        max_new_tokens: PositiveInt | None = None  # on-policy; None: the responses' own
        max_length: int = Field(512, ge=8)
        # TAID (stages.train.taid): t rises from t_start to t_end, never slower than linear
        taid_t_start: float = Field(0.4, ge=0, le=1)
        taid_t_end: float = Field(1.0, ge=0, le=1)
        taid_alpha: float = Field(5e-4, ge=0, le=1)     # adaptive step size
        taid_beta: float = Field(0.99, ge=0, lt=1)      # momentum of the loss improvement
        shuffle_buffer: int = Field(1024, ge=1)   # streamed shards only
        # training rows at most this large are read (pyarrow, only the columns used) once
        # into memory by every worker, which draws the same global permutation every epoch
        # (what DistributedSampler does, without Ray Data's per-batch cost); larger tables
        # stream through Ray Data every epoch; 0: always stream
        in_memory_mib: int = Field(2048, ge=0)
        num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
        # streamed rows: hold them in Ray's object store (spilled to disk when large) rather
        # than re-reading the parquet files every epoch (seconds per epoch on small data)
        cache: bool = True
        execution = ("cache",)  # with the harness's num_workers and max_failures

        def keyed_execution(self) -> dict[str, str]:
            kept = super().keyed_execution()
            if self.in_memory_mib == 0:
                kept["num_workers"] = ("the rows stream (in_memory_mib: 0): each worker "
                                       "shuffles its own shard")
            elif self.dropout != 0:
                kept["num_workers"] = (f"a text student trains with dropout ({self.dropout}: "
                                       f"None is its config's own), whose masks each worker "
                                       f"draws")
            return kept

        @model_validator(mode="after")
        def _taid_interval(self):
            if self.taid_t_start > self.taid_t_end:
                raise ValueError(
                    f"taid_t_start ({self.taid_t_start}) must not exceed taid_t_end "
                    f"({self.taid_t_end}): TAID's t only rises, from t_start to t_end")
            return self

    inputs = {"signal": Dataset}
    optional_inputs = {"teacher": Model}  # text signals: the teacher the signal came from
    outputs = {"model": Model}
    mlflow_outputs = ("model",)
    metrics = ("train_loss", "train_accuracy", "start_epoch", "taid_t")  # per epoch
    resources = Resources(num_cpus=0)  # only launches Ray Train work

    def content_paths(self) -> dict[str, str]:
        """A student folder of one's own (``student_init: folder``) is keyed by content."""
        cfg = self.config
        return {"student_path": cfg.student_path} if cfg.student_init == "folder" else {}

    def run(self, ctx, signal, teacher=None):
        from ray.data.expressions import col

        where = f"stage '{ctx.name}' ({self.kind})"
        meta = self._check_signal(ctx, signal)
        task_cls = TASKS[meta["signal"]]
        cfg = self.config.model_copy(update={"loss": self.config.loss or task_cls.losses[0]})
        if cfg.loss not in task_cls.losses:
            raise bad_value(f"{where} field 'loss'", "loss", cfg.loss,
                            f"for a '{meta['signal']}' signal: {', '.join(task_cls.losses)}")
        if not task_cls.needs_teacher:
            teacher = None  # a classifier signal holds all its student needs
        elif teacher is None:
            raise missing_teacher(where, signal)
        elif error := wrong_teacher(where, signal, teacher):
            raise error
        pruned = {}
        if cfg.student_init == "depth-prune":  # the layers to keep, measured once, here
            pruned = depth_prune(cfg, signal, teacher.path, task_cls.use, f"{where} field "
                                 f"'student_init'")
            cfg = cfg.model_copy(update={"teacher_layers": pruned["pruned_layers"]})
        task = task_cls(cfg, meta, teacher)
        task.build(where)  # a student that does not fit the signal fails before training
        columns = list(task.columns)
        files = signal.files()
        num_train = parquet(signal).count_rows(filter=pc.field("split") == "train")
        in_memory = hold_in_memory(train_share_bytes(files, columns, 1), cfg.in_memory_mib)
        if task_cls is ResponseTask and not in_memory:  # ragged token lists: held only
            raise bad_value(f"{where} field 'in_memory_mib'", "in_memory_mib",
                            cfg.in_memory_mib, f"at least the train rows' size "
                            f"({train_share_bytes(files, columns, 1) / 2**20:.0f} MiB): a "
                            f"responses signal is held in memory")
        if in_memory:  # every worker reads the train rows once (pyarrow)
            rows = Rows(task.columns, files=files, num_rows=num_train)
        else:  # streamed from Ray Data every epoch (cached in the object store)
            train = signal.read(columns=columns + ["split"]).filter(
                expr=col("split") == "train").select_columns(columns)
            rows = Rows(task.columns, stream=train.materialize() if cfg.cache else train,
                        num_rows=num_train, shuffle_buffer=cfg.shuffle_buffer)
        trained = fit(ctx, Distill(cfg, meta, teacher), rows, cfg)

        model = task.build()
        model.load_state_dict(trained.state["nets"]["model"])
        out = ctx.output_dir("model")
        info = {**task.save(model, out), "signal": meta["signal"], "loss": cfg.loss,
                "epochs": trained.state["epoch"] + 1, "shard_in_memory": in_memory, **pruned,
                **trained.metrics}
        return {"model": Model(path=out, info=info)}

    def mlflow_model(self, output: str, artifact: Model):
        """Classifiers: images in, label and probabilities out; causal LMs: text in, their
        answer out; encoders: text in, embedding out."""
        info = artifact.info
        meta = {"method": f"kd ({info['loss']})", "stage_kind": self.kind,
                "signal": info["signal"], "paper": LOSS_PAPERS.get(info["loss"], "")}
        if TASKS[info["signal"]] is ClassifierTask:
            from stages.serving.classifier import spec
            return spec(info["input_shape"], info["num_classes"],
                        {**meta, "architecture": info["architecture"]})
        from stages.serving.text import EMBED, GENERATE, spec
        return spec(GENERATE if TASKS[info["signal"]].use == "causal-lm" else EMBED, meta)

    def _check_signal(self, ctx, signal) -> dict:
        """The signal's info (what it is, its settings) plus, for classifier signals, the
        class count and input shape; a signal this stage cannot use is a UserError."""
        where = f"stage '{ctx.name}' ({self.kind}) input 'signal'"
        kind = signal.info.get("signal")
        if kind not in TASKS:
            raise bad_value(where, "info.signal", kind, TASKS)
        meta = {**signal.info}
        columns = list(TASKS[kind](self.config, meta).columns)
        table = require_columns(signal, columns + ["split"], where)
        head = table.head(1, columns=columns, filter=pc.field("split") == "train")
        if not head.num_rows:
            raise bad_value(where, "number of rows with split == 'train'", 0, "at least one")
        if TASKS[kind] is ClassifierTask:
            x, z = (column_to_numpy(head.column(c)) for c in ("x", kind))
            meta.update(num_classes=int(z.shape[1]), input_shape=list(x.shape[1:]))
        return meta
