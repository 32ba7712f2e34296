"""``fit-classifier``: supervised training of a classifier (``ConvNet`` or ``MLP``) on the
``split == "train"`` rows of a dataset, through the training harness
(``stages.train.harness``; in the stage's own process by default, ``num_workers: 0``):
the teacher of a knowledge-distillation pipeline when no pretrained teacher exists.

Loss: cross-entropy, L = -log softmax(z)_y, minimised with AdamW (Loshchilov & Hutter
2019). A fraction ``val_fraction`` of the training rows (drawn from the seed) is held out
and scored every epoch as ``val_accuracy``; the test rows are never touched. A killed run
resumes from its last epoch's checkpoint.
"""

from __future__ import annotations

from pydantic import Field

from pipelines.stage import Dataset, Model, Stage
from stages.data.tables import read_split
from stages.models.classifiers import ClassifierArch, predict_logits, save_classifier
from stages.train.harness import AdamWConfig, Loss, TrainMethod, fit
from stages.train.rows import Rows
from stages.lazy import lazy

torch = lazy("torch")
F = lazy("torch.nn.functional")


class CrossEntropy(TrainMethod):
    """A classifier fitted to its labels; ``val_accuracy`` on the held-out rows."""

    @property
    def columns(self):
        return {"x": torch.float32, "label": torch.int64}

    def __init__(self, cfg, in_shape, num_classes: int, x_val, y_val, where: str):
        self.cfg, self.in_shape, self.num_classes = cfg, list(in_shape), num_classes
        self.x_val, self.y_val, self.where = x_val, y_val, where

    def setup(self, device):
        return {"model": self.cfg.build(self.in_shape, self.num_classes, self.where).to(device)}

    def optimizers(self, nets):
        return {"model": self.cfg.adamw(nets["model"])}

    def loss(self, nets, emas, batch, gen):
        logits, y = nets["model"](batch["x"]), batch["label"]
        correct = (logits.argmax(1) == y).sum().item()
        return Loss({"model": F.cross_entropy(logits, y)}, len(y), {"accuracy": correct})

    def epoch_metrics(self, nets):
        if not len(self.y_val):
            return {}
        pred = predict_logits(nets["model"], self.x_val).argmax(1)
        return {"val_accuracy": (pred == self.y_val).float().mean().item()}


class FitClassifier(Stage):
    kind = "fit-classifier"
    version = "3"  # 2: the training harness (one global permutation per epoch, resume)
    # 3: a last partial batch dropped, the same steps whatever the number of workers

    class Config(ClassifierArch, AdamWConfig):
        epochs: int = Field(15, ge=1)
        val_fraction: float = Field(0.1, ge=0, lt=1)
        num_workers: int = Field(0, ge=0)  # 0: in the stage's process; N: Ray Train workers

    inputs = {"data": Dataset}
    outputs = {"model": Model}
    metrics = ("train_loss", "train_accuracy", "val_accuracy", "start_epoch")  # per epoch

    def run(self, ctx, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind}) input 'data'"
        cols = read_split(data, "train", ["x", "label"], where)                # 1. rows
        x = torch.tensor(cols["x"], dtype=torch.float32)
        y = torch.tensor(cols["label"], dtype=torch.int64)
        num_classes = int(data.info.get("num_classes", int(y.max()) + 1))
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(ctx.seed))
        n_val = int(len(y) * cfg.val_fraction)
        val, train = order[:n_val], order[n_val:]
        cfg.build(x.shape[1:], num_classes, where)  # a bad architecture fails here, once

        method = CrossEntropy(cfg, x.shape[1:], num_classes, x[val], y[val], where)  # 2.
        rows = Rows(method.columns, tensors={"x": x[train], "label": y[train]})
        trained = fit(ctx, method, rows, cfg)

        model = cfg.build(x.shape[1:], num_classes, where)                   # 3. save
        model.load_state_dict(trained.state["nets"]["model"])
        path = save_classifier(model, ctx.output_dir("model"))
        info = {"architecture": cfg.arch, "num_classes": num_classes,
                "input_shape": list(x.shape[1:]), "epochs": trained.state["epoch"] + 1,
                **{k: float(v) for k, v in trained.metrics.items()}}
        return {"model": Model(path=path, info=info)}
