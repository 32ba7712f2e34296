"""``kd-student``: knowledge distillation of a student from a stored teacher signal (the
``teacher-outputs`` artifact), trained with Ray Train (``TorchTrainer``, data-parallel
workers, DDP). The signal decides the student and the losses it allows
(``stages.train.kd_tasks``): classifier logits or probabilities -> a torch classifier
(``hinton``, ``taid``); a causal LM's top-k log-probabilities -> a smaller causal LM
(``hinton``, ``taid``); sentence embeddings -> a smaller encoder (``cosine``, ``mse``,
``cosine_mse``); hidden states -> a smaller encoder (``feature_mse``). Text students are
``transformers`` models made from the teacher's folder (``stages.models.text``): every
n-th teacher layer (DistilBERT), a shrunk config, or a local folder. ``loss`` defaults to
the first one the signal allows; a loss or student the signal cannot serve is a clear
error before any training.

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
per epoch as ``taid_t``. Every epoch each worker reports its metrics and
rank 0 a checkpoint (model, optimiser, epoch, resolved config); a re-run with the same
artifact key resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Literal

import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator

from pipelines.artifacts import column_to_numpy
from pipelines.errors import UserError, bad_value
from pipelines.stage import Dataset, Model, Resources, Stage
from stages.data.tables import parquet, require_columns
from stages.models.classifiers import ArchName, ClassifierArch
from stages.models.text import TextStudentArch
from stages.train.kd_tasks import TASKS, ClassifierTask, hinton_kd_loss  # noqa: F401
from stages.train.loop import (OptimConfig, hold_in_memory, hold_tables, permuted_batches,
                               read_share, train_epoch, train_share_bytes)
from stages.train.taid import TAIDSchedule

STATE_FILE, CONFIG_FILE = "state.pt", "config.json"
LOSSES = tuple(dict.fromkeys(loss for task in TASKS.values() for loss in task.losses))


def _load_state(checkpoint) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg, ctx = KDStudent.Config(**config["cfg"]), config["ctx"]
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(ctx.seed)
    task = TASKS[config["meta"]["signal"]](cfg, config["meta"])
    model = task.build()
    state, start = _load_state(ray.train.get_checkpoint()), 0
    if state:  # resume: same run name, or a restart under FailureConfig
        model.load_state_dict(state["model"])
        start = state["epoch"] + 1
    # to the worker's device, DDP-wrapped; transformers backbones have parameters a task
    # leaves unused (BERT's pooler), which DDP must be told about
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={
        "find_unused_parameters": not isinstance(task, ClassifierTask)})
    opt = cfg.optimizer(model)
    if state:
        opt.load_state_dict(state["optimizer"])  # moves its tensors to the params' device
    if config["files"] is not None:  # this worker's share of the rows, read once into memory
        world = ray.train.get_context().get_world_size()
        held = hold_tables(read_share(config["files"], list(task.columns), rank, world),
                           task.columns)
    else:  # streamed from the object store every epoch
        held, shard = None, ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()

    taid = _taid_schedule(cfg, state)
    if taid:  # same number of steps on every worker: the rows are split equally
        world = ray.train.get_context().get_world_size()
        total_steps = cfg.epochs * -(-(config["num_train"] // world) // cfg.batch_size)

    def loss_fn(model, batch):
        loss, logits, labels = task.loss(model, batch, taid)
        if taid:
            taid.update(_mean_over_workers(loss.detach()), taid.step + 1, total_steps)
        return loss, logits, labels

    for epoch in range(start, cfg.epochs):
        if held is not None:  # a fresh permutation of the held rows, as a torch loop does
            batches = permuted_batches(held, cfg.batch_size, ctx.seed + epoch, device)
        else:  # streamed from the object store, shuffled within a buffer
            batches = shard.iter_torch_batches(
                batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer,
                local_shuffle_seed=ctx.seed + epoch, dtypes=task.columns)
        metrics = {**train_epoch(model, batches, opt, loss_fn, epoch), "start_epoch": start}
        if taid:
            metrics["taid_t"] = taid.t
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                net = getattr(model, "module", model)
                saved = {"model": net.state_dict(), "optimizer": opt.state_dict(),
                         "epoch": epoch}
                if taid:
                    saved["taid"] = taid.state_dict()
                torch.save(saved, os.path.join(d, STATE_FILE))
                with open(os.path.join(d, CONFIG_FILE), "w") as f:
                    json.dump(config["cfg"], f, indent=2)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            ctx.log_metrics(metrics, step=epoch)
            ctx.progress(epoch + 1, cfg.epochs, "epochs")


def _taid_schedule(cfg, state: dict | None) -> TAIDSchedule | None:
    """The TAID schedule for ``loss: taid`` (None for Hinton), resumed from the checkpoint."""
    if cfg.loss != "taid":
        return None
    schedule = TAIDSchedule(cfg.taid_t_start, cfg.taid_t_end, cfg.taid_alpha, cfg.taid_beta)
    if state and "taid" in state:
        schedule.load_state_dict(state["taid"])
    return schedule


def _mean_over_workers(value: torch.Tensor) -> float:
    """The scalar's mean over the Ray Train workers (itself with a single worker)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value.item()


class KDStudent(Stage):
    kind = "kd-student"
    version = "5"  # 2: ``loss: taid``; 3: text signals, probabilities; 4: shards in memory;
    # 5: a held share is read by its worker (pyarrow) rather than by Ray Data in the stage

    class Config(ClassifierArch, TextStudentArch, OptimConfig):
        # classifier students: ClassifierArch's fields; text students: TextStudentArch's
        arch: ArchName = "mlp"
        hidden: list[PositiveInt] = [32]
        lr: float = Field(1e-2, gt=0)
        temperature: float = Field(4.0, gt=0)
        alpha: float = Field(0.9, ge=0, le=1)
        loss: Literal[LOSSES] | None = None   # None: the first loss the signal allows
        topk_rest: Literal["uniform", "renormalize"] = "uniform"  # top-k LM signals
        # TAID (stages.train.taid): t rises from t_start to t_end, never slower than linear
        taid_t_start: float = Field(0.4, ge=0, le=1)
        taid_t_end: float = Field(1.0, ge=0, le=1)
        taid_alpha: float = Field(5e-4, ge=0, le=1)     # adaptive step size
        taid_beta: float = Field(0.99, ge=0, lt=1)      # momentum of the loss improvement
        shuffle_buffer: int = Field(1024, ge=1)   # streamed shards only
        # a worker whose share of the rows is at most this large reads it (pyarrow, only its
        # row groups) once into memory and draws a fresh permutation every epoch (what a
        # torch loop does, without Ray Data's per-batch cost); larger shares stream through
        # Ray Data every epoch; 0: always stream
        in_memory_mib: int = Field(2048, ge=0)
        num_workers: int = Field(1, ge=1)
        use_gpu: bool = True       # used only when the cluster has GPUs
        max_failures: int = Field(0, ge=-1)
        # hold the training rows in Ray's object store (spilled to disk when large) rather
        # than re-reading the parquet files every epoch (seconds per epoch on small data)
        cache: bool = True

        @model_validator(mode="after")
        def _taid_interval(self):
            if self.taid_t_start > self.taid_t_end:
                raise ValueError(
                    f"taid_t_start ({self.taid_t_start}) must not exceed taid_t_end "
                    f"({self.taid_t_end}): TAID's t only rises, from t_start to t_end")
            return self

    inputs = {"signal": Dataset}
    outputs = {"model": Model}
    metrics = ("train_loss", "train_accuracy", "start_epoch", "taid_t")  # per epoch
    resources = Resources(num_cpus=0)  # only launches Ray Train work

    def run(self, ctx, signal):
        from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
        from ray.train import ScalingConfig, TrainingFailedError
        from ray.data.expressions import col
        from ray.train.torch import TorchTrainer

        where = f"stage '{ctx.name}' ({self.kind})"
        meta = self._check_signal(ctx, signal)
        task_cls = TASKS[meta["signal"]]
        cfg = self.config.model_copy(update={"loss": self.config.loss or task_cls.losses[0]})
        if cfg.loss not in task_cls.losses:
            raise bad_value(f"{where} field 'loss'", "loss", cfg.loss,
                            f"for a '{meta['signal']}' signal: {', '.join(task_cls.losses)}")
        task = task_cls(cfg, meta)
        task.build(where)  # a student that does not fit the signal fails before training
        use_gpu = ctx.num_gpus_available > 0 and cfg.use_gpu
        columns = list(task.columns)
        files = signal.files()
        in_memory = cfg.cache and hold_in_memory(
            train_share_bytes(files, columns, cfg.num_workers), cfg.in_memory_mib)
        datasets, extra = {}, {"files": files if in_memory else None}
        if not in_memory:  # streamed from Ray Data every epoch (cached in the object store)
            train = signal.read(columns=columns + ["split"]).filter(
                expr=col("split") == "train").select_columns(columns)
            datasets = {"train": train.materialize() if cfg.cache else train}
        if cfg.loss == "taid":  # the schedule's length in steps needs the row count
            extra["num_train"] = parquet(signal).count_rows(filter=pc.field("split") == "train")
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": cfg.model_dump(), "ctx": ctx, "meta": meta, **extra},
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers, use_gpu=use_gpu,
                resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}),
            run_config=RunConfig(
                name="kd-" + ctx.key[:16],
                storage_path=ctx.train_storage,
                failure_config=FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2)),
            datasets=datasets or None,
            dataset_config=DataConfig(datasets_to_split=list(datasets)))
        try:
            result = trainer.fit()
        except TrainingFailedError as e:
            raise _original_error(e) from e

        state = _load_state(result.checkpoint)
        model = task.build()
        model.load_state_dict(state["model"])
        out = ctx.output_dir("model")
        info = {**task.save(model, out), "signal": meta["signal"], "loss": cfg.loss,
                "epochs": state["epoch"] + 1, "shard_in_memory": in_memory,
                **(result.metrics or {})}
        return {"model": Model(path=out, info=info)}

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


def _original_error(error: Exception) -> Exception:
    """The worker's own exception (the FloatingPointError naming the step, a UserError)
    from the error Ray Train wraps it in, so the caller of the stage sees that message."""
    for failure in getattr(error, "worker_failures", {}).values():
        if isinstance(failure, (FloatingPointError, UserError)):
            return failure
    return error
