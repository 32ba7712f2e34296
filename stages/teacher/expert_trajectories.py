"""``expert-trajectories``: the teacher signal of trajectory matching (Cazenavette et al.
2022, "Dataset Distillation by Matching Training Trajectories", CVPR): E expert ConvNets
trained on the real ``split == "train"`` rows with plain SGD,
theta_{t+1} = theta_t - lr * grad L_CE(theta_t) (one epoch of minibatch steps per t),
recording the flat parameter vector theta_t after every epoch t = 0..epochs.

Storage: one parquet file per expert (``expert-00003.parquet``), one row per epoch with
columns ``expert``, ``epoch`` and ``params`` (a fixed-size list of float32 or float16), one
row group per row, so a consumer reads exactly the (expert, epoch) rows it needs
(``ExpertReader``) and never the whole artifact. The architecture and the dataset
fingerprint are in the manifest info: ``mtt`` and ``herding`` refuse experts of another
architecture or dataset.

The experts train as parallel Ray tasks (``num_cpus=1`` each, one torch thread). Each
expert's file is put in the stage's work files (``ctx.work_files``: the store's work
location, seen by every node) as soon as it finishes, so a re-run after an interruption,
on any node, trains only the missing experts.

FTD's flat experts (Du et al. 2023, CVPR, "Minimizing the Accumulated Trajectory Error to
Improve Dataset Distillation", arXiv 2211.11004): with ``sam_rho`` > 0 every expert step is
sharpness-aware (SAM: the gradient taken at w + rho g / ||g||), which FTD uses so that the
trajectories the synthetic set is matched against are flat and its matching errors do not
accumulate; with it ``mtt``'s ``ema_decay`` is FTD's second half.
"""

from __future__ import annotations

import os
import shutil
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from pipelines.stage import Dataset, Resources, Stage
from stages.distill.dd_common import (NetConfig, accuracy, dataset_key,
                                      flat_params, num_classes_of, real_split, task_gpus,
                                      train_net)
from stages.distill.experts import shard_name

PRECISIONS = {"float32": np.float32, "float16": np.float16}


def train_expert(arch: dict, x, y, x_test, y_test, cfg: dict, seed: int, expert: int,
                 work) -> float:
    """Train one expert and put its trajectory in the work files ``work`` (whole, as
    ``experts/expert-NNNNN.parquet``); returns its final test accuracy (also stored in the
    file's metadata)."""
    rows = []
    net = train_net(arch, x, y, cfg["epochs"], cfg["lr"], seed, momentum=cfg["momentum"],
                    weight_decay=0.0, batch_size=cfg["batch_size"], augment=cfg["augment"],
                    sam_rho=cfg["sam_rho"],
                    on_epoch=lambda e, n: rows.append(flat_params(n).cpu().numpy()))
    acc = accuracy(net, x_test, y_test)
    params = np.stack(rows).astype(PRECISIONS[cfg["precision"]])
    table = pa.table({
        "expert": pa.array(np.full(len(rows), expert, dtype=np.int32)),
        "epoch": pa.array(np.arange(len(rows), dtype=np.int32)),
        "params": pa.FixedSizeListArray.from_arrays(pa.array(params.reshape(-1)),
                                                    params.shape[1])})
    table = table.replace_schema_metadata({"test_accuracy": str(acc)})
    rel = f"experts/{shard_name(expert)}"
    tmp = work.new_file(rel)
    pq.write_table(table, tmp, row_group_size=1)
    work.put(rel, tmp)
    return acc


class ExpertTrajectories(Stage):
    kind = "expert-trajectories"
    version = "1"

    class Config(NetConfig):
        # added after artifacts existed: at their defaults, left out of the key
        added = ('sam_rho',)
        experts: int = Field(8, ge=1)                # E
        epochs: int = Field(20, ge=1)                # recorded epochs per expert
        lr: float = Field(0.01, gt=0)                # expert SGD learning rate
        momentum: float = Field(0.0, ge=0, lt=1)
        batch_size: int = Field(256, ge=1)
        augment: bool = False                        # DSA while training the experts
        precision: Literal[tuple(PRECISIONS)] = "float32"
        sam_rho: float = Field(0.0, ge=0, le=1)      # FTD: SAM's radius (the examples: 0.01)

    inputs = {"data": Dataset}
    outputs = {"experts": Dataset}
    resources = Resources(num_cpus=0)  # only launches the expert Ray tasks

    def run(self, ctx, data):
        import ray

        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind}) input 'data'"
        x, y = real_split(data, "train", where)
        x_test, y_test = real_split(data, "test", where)
        arch = cfg.arch(x.shape[1:], num_classes_of(data, y))
        key = dataset_key(data, where)

        # 1. launch the experts whose trajectory is not in the work files yet
        work = ctx.work_files
        todo = [e for e in range(cfg.experts) if not work.exists(f"experts/{shard_name(e)}")]
        task = ray.remote(num_cpus=1, num_gpus=task_gpus(ctx),
                          max_retries=1)(train_expert)
        refs = [ray.put(a.numpy()) for a in (x, y, x_test, y_test)]
        pending = {task.remote(arch, *refs, cfg.model_dump(), ctx.seed * 1000 + e, e,
                               work): e for e in todo}
        # 2. each expert's file is committed as it finishes (resume unit)
        done = cfg.experts - len(pending)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            e = pending.pop(ready[0])
            ctx.log_metrics({"expert_test_accuracy": ray.get(ready[0])}, step=e)
            done += 1
            ctx.progress(done, cfg.experts, "experts")

        # 3. the artifact: the shards, with architecture and dataset in the manifest
        out = ctx.output_dir("experts")
        accs = []
        for e in range(cfg.experts):
            dst = os.path.join(out, shard_name(e))
            shutil.copyfile(work.get(f"experts/{shard_name(e)}"), dst)
            accs.append(float(pq.read_schema(dst).metadata[b"test_accuracy"]))
        num_params = pq.ParquetFile(os.path.join(out, shard_name(0))).schema_arrow.field(
            "params").type.list_size
        info = {"arch": arch, "dataset": key, "experts": cfg.experts, "epochs": cfg.epochs,
                "lr": cfg.lr, "precision": cfg.precision, "sam_rho": cfg.sam_rho, "num_params": num_params,
                "expert_test_accuracy_mean": float(np.mean(accs))}
        ctx.log_metrics({"expert_test_accuracy_mean": float(np.mean(accs))})
        return {"experts": Dataset(path=out, info=info)}
