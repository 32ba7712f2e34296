"""What the stages that run a teacher over a dataset share (``teacher-outputs``,
``reinforce-data``): the classifier teacher's Ray Data actor, the inference settings, the
actor pool, the resumable shards of a teacher pass and the signal they write."""

from __future__ import annotations

import os
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from pipelines.context import alive_nodes
from pipelines.errors import bad_value
from pipelines.stage import Model, StageConfig
from stages.data.tables import parquet
from stages.models.classifiers import load_classifier
from stages.models.device import device as torch_device
from stages.teacher.text_teacher import DTYPES, TEXT_SIGNALS
from stages.lazy import lazy

ray = lazy("ray")

CLASSIFIER_SIGNALS = ("logits", "probabilities")
SIGNALS = (*CLASSIFIER_SIGNALS, *TEXT_SIGNALS)


class TeacherActor:
    """Ray Data actor: holds one teacher in memory, maps a batch to its logits. It gets the
    teacher's artifact, never a path: ``model.path`` here is a verified copy on the
    actor's own node."""

    def __init__(self, model: Model, precision: str, where: str, probabilities: bool = False):
        import torch
        self.probabilities = probabilities
        self.torch = torch
        self.device = torch_device()
        self.model = load_classifier(model.path, where).to(self.device).eval()
        self.dtype = DTYPES[precision]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self.torch.tensor(np.asarray(batch["x"]), dtype=self.torch.float32,
                              device=self.device)  # a copy: batches are read-only views
        with self.torch.inference_mode():
            logits = self.model(x).float()
            if self.probabilities:
                return {**batch, "probabilities":
                        logits.softmax(1).cpu().numpy().astype(self.dtype)}
        return {**batch, "logits": logits.cpu().numpy().astype(self.dtype)}


class InferenceConfig(StageConfig):
    """Settings of a teacher pass over a dataset, shared by the stages that make one."""

    precision: Literal[tuple(DTYPES)] = "float32"
    # auto: one actor per GPU Ray reports, else per free CPU (``pool_size``)
    actors: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    batch_size: int = Field(256, ge=1)
    # the rows are the same whatever the pool and its batches (equal within float
    # tolerance): how the pass runs, not in the cache key
    execution = ("actors", "batch_size")


def pool_size(actors, rows: int | None, batch_size: int, free_cpus: float,
              gpus: float) -> int:
    """The teacher actors of a pass: ``actors`` when the config gives a number; ``auto``:
    one per GPU Ray reports (an actor holds one), else one per CPU free in the cluster
    when the pass starts (a CPU actor holds one CPU, so one torch thread: the pool fills
    the cores), never more than the pass has batches (each actor loads the teacher)."""
    if actors != "auto":
        return actors
    slots = int(gpus) if gpus >= 1 else int(free_cpus)
    batches = -(-rows // batch_size) if rows is not None else slots
    return max(1, min(slots, batches))


def free_cpus() -> float:
    """The CPUs free in the cluster; on one node at most its cores (the embedded Ray
    advertises at least 4 CPUs, so that pools and workers fit on a 2-core laptop)."""
    free = ray.available_resources().get("CPU", 1.0)
    if alive_nodes() == 1:
        free = min(free, os.cpu_count() or 1)
    return free


def with_teacher(ds, actor, kwargs: dict, cfg: InferenceConfig, ctx, rows: int | None = None):
    """``ds`` (``rows`` rows, when known) mapped by a pool of teacher actors (``pool_size``,
    reported as the metric ``actors``, 0 for a pass ``in_task``; on GPUs when the cluster
    has them). ``kwargs`` carry
    the teacher's artifact (``model``), never its path: each actor reads ``model.path`` on
    its own node."""
    size = pool_size(cfg.actors, rows, cfg.batch_size, free_cpus(), ctx.num_gpus_available)
    ctx.log_metrics({"actors": size})
    return ds.map_batches(
        actor, batch_format="numpy", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=size),
        num_gpus=1 if ctx.num_gpus_available > 0 else 0, fn_constructor_kwargs=kwargs)


# rows x teacher parameters: 0.7 s of a 2-core CPU at the rate of the teacher_generation
# benchmark's 300k rows x 409k-parameter ConvNet1D (42.5 s), 2.9 s at its example's
# 5000 rows x 8k parameters (0.06 s)
SMALL_PASS = 2e9


def in_task(actors, rows: int, params: int, gpus: float, nodes: int) -> bool:
    """Whether a teacher pass runs in the stage's own task instead of an actor pool: when
    the pool is left to ``auto``, Ray has one node and no GPU, and the pass is small
    (rows x the teacher's parameters at most ``SMALL_PASS``). Starting a pool costs 2-3 s
    (a worker process per actor, each importing torch and loading the teacher), many
    times such a pass. The rows are the same either way (up to float summation order)."""
    return actors == "auto" and gpus == 0 and nodes == 1 and rows * params <= SMALL_PASS


def teacher_in_task(data, actor, batch_size: int, ctx):
    """The pass of ``actor`` (an instance of a pool's actor class) over ``data``'s rows in
    this process: batches of ``batch_size`` rows in the numpy format Ray Data hands the
    pool, made back into Arrow the way Ray Data does, so the table has the pool's columns
    and types; torch at ``task_threads`` (metric ``teacher_threads``)."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor
    from stages.models.device import task_torch_threads

    table = parquet(data).to_table()  # local files or the store's URIs, checksums verified
    ctx.log_metrics({"actors": 0})
    out = []
    with task_torch_threads() as threads:
        for start in range(0, table.num_rows, batch_size):
            batch = BlockAccessor.for_block(table.slice(start, batch_size))
            out.append(BlockAccessor.batch_to_block(actor(batch.to_batch_format("numpy"))))
            ctx.progress(min(start + batch_size, table.num_rows), table.num_rows, "rows")
    ctx.log_metrics({"teacher_threads": threads})
    return pa.concat_tables(out) if out else table


def with_teacher_logits(ds, model: Model, cfg: InferenceConfig, ctx, where: str,
                        probabilities: bool = False, rows: int | None = None):
    """``ds`` plus a ``logits`` (or ``probabilities``) column from a classifier."""
    return with_teacher(ds, TeacherActor, {"model": model, "where": where,
                                           "precision": cfg.precision,
                                           "probabilities": probabilities}, cfg, ctx, rows)


def write_signal(ctx, ds, cfg: InferenceConfig, num_classes: int, data, signal="logits",
                 shards=None, **extra_info):
    """Write the signal kd-student reads, with the info it checks; report its rows."""
    info = {"signal": signal, "precision": cfg.precision, "num_classes": num_classes,
            **extra_info}
    if "input_shape" in data.info:
        info["input_shape"] = data.info["input_shape"]
    return write_rows(ctx, ds, info, shards)


def resumable(ctx, data, shard_rows: int, output: str = "signal"):
    """``(rows, shards)``: the input rows still to run the teacher on, in blocks of at most
    about ``shard_rows`` rows (each becomes a shard), and the signal's shards that outlive
    a failed attempt (``ctx.resumable_write``); without an ``id`` column, every row and
    None."""
    table = parquet(data)
    groups = sum(f.metadata.num_row_groups for f in table.get_fragments())
    blocks = -(-table.count_rows() // shard_rows)
    rows = data.read(override_num_blocks=blocks) if blocks > groups else data.read()
    if "id" not in table.schema.names:
        return rows, None
    shards = ctx.resumable_write(output, "id")
    if shards.done_rows:
        ctx.progress(shards.done_rows, None, "rows resumed from earlier shards", force=True)
    return shards.remaining(rows), shards


def write_rows(ctx, ds, info: dict, shards=None, output: str = "signal"):
    signal = shards.write(ds, info) if shards else ctx.write_dataset(output, ds, info=info)
    rows = parquet(signal).count_rows()
    if not rows:
        raise bad_value(f"stage '{ctx.name}' ({ctx.kind}) input 'data'", "rows", 0,
                        "at least one row")
    ctx.progress(rows, rows, "rows", force=True)
    ctx.log_metrics({"rows": rows, "rows_resumed": shards.done_rows if shards else 0})
    return signal


def describe(model: Model) -> dict:
    """The teacher a text signal was made from, for the record, for ``kd-student``'s check
    that its ``teacher`` input is that artifact, and for its advice on wiring it:
    ``teacher`` (``<kind>/<key>`` of the committed input) and ``teacher_stage`` (the
    stage that made it); None for a model given by path (a unit test). Never a path to
    load from: a student gets the teacher as its own input, fetched on every node that
    uses it."""
    source = getattr(model, "source", None)
    if source is None:
        return {"teacher": None, "teacher_stage": None}
    return {"teacher": f"{source.kind}/{source.key}", "teacher_stage": source.stage}
