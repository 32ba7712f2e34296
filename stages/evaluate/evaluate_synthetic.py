"""``evaluate-synthetic``: the honest scorecard of a distilled dataset (the protocol of
DC/DM/MTT, made strict as in DD-Ranking, Li et al. 2025, arXiv 2505.13300).

``networks`` (N >= 5) fresh ConvNets, each from its own seed, are trained as parallel Ray
tasks on the synthetic set with SGD (lr, momentum 0.9, weight decay 5e-4) for ``epochs``
and scored on the real ``split == "test"`` rows with the FINAL weights (never the best
epoch). In the same run, with the same protocol: N networks on random real subsets of the
same IPC (a different subset per network) and ``full_networks`` on the full training data
(``full_epochs`` each; 0 networks: no full-data figures, for pipelines that train the
converged full-data reference once, in one cell, rather than in every cell).

    accuracy_mean / accuracy_std          over the N synthetic-set networks
    random_accuracy_mean / _std           random subset of the same IPC
    full_accuracy_mean / _std             the full training split (if full_networks)
    ior = accuracy_mean - random_accuracy_mean   (DD-Ranking's improvement over random)
    hlr = full_accuracy_mean - accuracy_mean     (DD-Ranking's hard-label recovery gap)

``augment``: DSA (``dd_common.dsa``) on every training batch of every network, synthetic,
random and full alike: the evaluation protocol of DSA, DM and MTT (Zhao & Bilen 2021,
arXiv 2102.08259), for sets learned under DSA; sets learned without augmentation (``mtt``
with ``augment: false``) are scored without it.

With ``use_learned_lr`` the synthetic networks use the learning rate learned by the
distillation (``info.synthetic_lr`` of ``mtt``), as MTT's own evaluation does; the baselines
keep ``lr``.

Labels: the figures above always train on the hard labels (cross-entropy). Soft labels are
reported beside them, never mixed in, when the set has them or a teacher is wired: N more
networks trained with the soft cross-entropy -sum_k p_k log q_k against

- the optional input ``teacher`` (a classifier folder, e.g. ``fit-classifier`` with batch
  norm): its softmax on every (augmented) training batch, SRe2L's relabelling as its
  evaluation does (Yin et al. 2023, arXiv 2306.13092); the random subsets get the same
  teacher, so the comparison stays honest;
- else the set's own ``soft_label`` column (``mtt`` with ``soft_labels``, DATM); the random
  subsets have no learned labels, so no soft random figure is reported (info says so).

    accuracy_soft_mean / _std             the synthetic set with soft labels
    random_accuracy_soft_mean / _std      the random subsets relabelled by the teacher
    ior_soft = accuracy_soft_mean - random_accuracy_soft_mean
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from pipelines.errors import bad_value
from pipelines.stage import Dataset, Model, Report, Resources, Stage
from stages.distill.dd_common import (NetConfig, accuracy, check_ipc, image_grid,
                                      num_classes_of, pyplot, read_soft_labels, read_synthetic,
                                      real_init, real_split, task_gpus, train_net)


def fresh_accuracy(arch, x, y, x_test, y_test, protocol: dict, seed: int, soft=None,
                   teacher_path: str | None = None) -> float:
    """Train one fresh ConvNet on (x, y) (soft targets: ``soft`` or the teacher's); its
    final test accuracy."""
    teacher = None
    if teacher_path is not None:
        from stages.models.classifiers import load_classifier
        teacher = load_classifier(teacher_path, "evaluate-synthetic input 'teacher'")
    net = train_net(arch, x, y, seed=seed, soft=soft, teacher=teacher, **protocol)
    return accuracy(net, x_test, y_test)


class EvaluateSynthetic(Stage):
    kind = "evaluate-synthetic"
    version = "1"

    class Config(NetConfig):
        networks: int = Field(5, ge=5)               # N fresh networks per set
        epochs: int = Field(300, ge=1)
        lr: float = Field(0.01, gt=0)
        momentum: float = Field(0.9, ge=0, lt=1)
        weight_decay: float = Field(5e-4, ge=0)
        batch_size: int = Field(256, ge=1)
        augment: bool = False                        # DSA while training the fresh networks
        use_learned_lr: bool = False                 # synthetic nets use info.synthetic_lr
        full_networks: int = Field(3, ge=0)          # networks on the full data (0: none)
        full_epochs: int = Field(50, ge=1)

    inputs = {"synthetic": Dataset, "data": Dataset}
    optional_inputs = {"teacher": Model}   # a classifier: soft labels by relabelling
    outputs = {"report": Report}
    resources = Resources(num_cpus=0)  # only launches the training Ray tasks

    def run(self, ctx, synthetic, data, teacher=None):
        import ray

        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind})"
        xs, ys = read_synthetic(synthetic, f"{where} input 'synthetic'")
        x, y = real_split(data, "train", f"{where} input 'data'")
        x_test, y_test = real_split(data, "test", f"{where} input 'data'")
        num_classes = num_classes_of(data, y)
        if list(xs.shape[1:]) != list(x.shape[1:]):
            raise bad_value(f"{where} input 'synthetic'", "image shape", list(xs.shape[1:]),
                            f"the shape of input 'data', {list(x.shape[1:])}")
        ipc = int(torch.bincount(ys, minlength=num_classes).max())
        check_ipc(ipc, y, num_classes, f"{where} input 'synthetic'")
        arch = cfg.arch(x.shape[1:], num_classes)
        protocol = {"epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum,
                    "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
                    "augment": cfg.augment}
        syn_lr = float(synthetic.info.get("synthetic_lr", cfg.lr)) if cfg.use_learned_lr else cfg.lr
        soft = read_soft_labels(synthetic, f"{where} input 'synthetic'")
        if teacher is not None:
            check_teacher(teacher.path, x.shape[1:], num_classes, f"{where} input 'teacher'")
        elif soft is not None and soft.shape[1] != num_classes:
            raise bad_value(f"{where} input 'synthetic'", "soft_label length", soft.shape[1],
                            f"{num_classes}, the classes of input 'data'")
        labels = "teacher" if teacher is not None else "stored" if soft is not None else None

        # 1. every network of every set is one Ray task (num_cpus=1, one torch thread, a
        #    share of a GPU when Ray reports one)
        task = ray.remote(num_cpus=1, num_gpus=task_gpus(ctx))(fresh_accuracy)
        test = [ray.put(a.numpy()) for a in (x_test, y_test)]
        refs = {"synthetic": [], "random": []}
        refs.update({"full": []} if cfg.full_networks else {})
        refs.update({"synthetic_soft": []} if labels else {})
        refs.update({"random_soft": []} if labels == "teacher" else {})
        by = {}  # what the soft-label networks learn from: the teacher, or the stored labels
        if teacher is not None:
            by = {"teacher_path": teacher.path}
        elif soft is not None:
            by = {"soft": ray.put(soft.numpy())}
        for n in range(cfg.networks):
            seed = ctx.seed * 1000 + n
            refs["synthetic"].append(task.remote(arch, xs.numpy(), ys.numpy(), *test,
                                                 {**protocol, "lr": syn_lr}, seed))
            xr, yr = real_init(x, y, ipc, num_classes, seed=seed + 7919)
            refs["random"].append(task.remote(arch, xr.numpy(), yr.numpy(), *test, protocol,
                                              seed))
            if labels:
                refs["synthetic_soft"].append(task.remote(
                    arch, xs.numpy(), ys.numpy(), *test, {**protocol, "lr": syn_lr}, seed, **by))
            if labels == "teacher":
                refs["random_soft"].append(task.remote(arch, xr.numpy(), yr.numpy(), *test,
                                                       protocol, seed, **by))
        full = [ray.put(a.numpy()) for a in (x, y)]
        for n in range(cfg.full_networks):
            refs["full"].append(task.remote(arch, *full, *test,
                                            {**protocol, "epochs": cfg.full_epochs},
                                            ctx.seed * 1000 + n))
        # 2. wait, reporting progress
        total = sum(len(r) for r in refs.values())
        pending = [r for rs in refs.values() for r in rs]
        while pending:
            _, pending = ray.wait(pending, num_returns=1)
            ctx.progress(total - len(pending), total, "networks")
        acc = {k: np.array(ray.get(r)) for k, r in refs.items()}

        # 3. the report
        metrics = {
            "accuracy_mean": acc["synthetic"].mean(), "accuracy_std": acc["synthetic"].std(),
            "random_accuracy_mean": acc["random"].mean(),
            "random_accuracy_std": acc["random"].std(),
            "ior": acc["synthetic"].mean() - acc["random"].mean(),
            "ipc": ipc, "synthetic_lr": syn_lr}
        if cfg.full_networks:  # 0: the full-data reference is another cell's
            metrics.update(full_accuracy_mean=acc["full"].mean(),
                           full_accuracy_std=acc["full"].std(),
                           hlr=acc["full"].mean() - acc["synthetic"].mean())
        if labels:
            metrics.update(accuracy_soft_mean=acc["synthetic_soft"].mean(),
                           accuracy_soft_std=acc["synthetic_soft"].std())
        if labels == "teacher":
            metrics.update(random_accuracy_soft_mean=acc["random_soft"].mean(),
                           random_accuracy_soft_std=acc["random_soft"].std(),
                           ior_soft=acc["synthetic_soft"].mean() - acc["random_soft"].mean())
        method = synthetic.info.get("method", "synthetic")
        figures = {"synthetic.png": image_grid(xs, ys, num_classes, f"{method}, ipc {ipc}"),
                   "accuracy.png": _accuracy_plot(acc, method, ipc)}
        info = {"method": method, "ipc": ipc, "networks": cfg.networks,
                "per_network": {k: [float(a) for a in v] for k, v in acc.items()},
                "protocol": protocol, "full_epochs": cfg.full_epochs,
                "soft_labels": labels or "none",
                "random_soft": ("relabelled by the teacher" if labels == "teacher" else
                                "not reported: only a teacher input relabels random subsets")}
        report = ctx.write_report("report", metrics, figures=figures, info=info)
        for fig in figures.values():
            pyplot().close(fig)
        return {"report": report}


def _accuracy_plot(acc: dict, method: str, ipc: int):
    fig, ax = pyplot().subplots(figsize=(5 + len(acc) - 3, 3.5))
    bars = [(f"random ipc {ipc}", "random", "tab:gray"),
            (f"random ipc {ipc}\nsoft", "random_soft", "silver"),
            (f"{method} ipc {ipc}", "synthetic", "tab:blue"),
            (f"{method} ipc {ipc}\nsoft", "synthetic_soft", "lightsteelblue"),
            ("full data", "full", "tab:green")]
    bars = [b for b in bars if b[1] in acc]
    vals = [acc[key] for _, key, _ in bars]
    drawn = ax.bar([b[0] for b in bars], [v.mean() for v in vals],
                   yerr=[v.std() for v in vals], capsize=4, color=[b[2] for b in bars])
    ax.bar_label(drawn, fmt="%.3f")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("final test accuracy (mean ± std)")
    return fig


def check_teacher(path: str, in_shape, num_classes: int, where: str) -> None:
    """The teacher classifier must take the data's images and give its classes."""
    from stages.models.classifiers import load_classifier
    net = load_classifier(path, where)
    if list(net.in_shape) != list(in_shape) or net.num_classes != num_classes:
        raise bad_value(where, "classifier (input shape, classes)",
                        [list(net.in_shape), net.num_classes],
                        f"{[list(in_shape), num_classes]}, those of input 'data'")
