"""``fit-classifier``: supervised training of a classifier (``ConvNet`` or ``MLP``) on the
``split == "train"`` rows of a dataset, in the stage task itself: the teacher of a
knowledge-distillation pipeline when no pretrained teacher exists.

Loss: cross-entropy, L = -log softmax(z)_y, minimised with AdamW (Loshchilov & Hutter
2019). A fraction ``val_fraction`` of the training rows (drawn from the seed) is held out
and scored every epoch as ``val_accuracy``; the test rows are never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from pipelines.stage import Dataset, Model, Stage
from stages.data.tables import read_split
from stages.models.classifiers import ClassifierArch, predict_logits, save_classifier
from stages.train.loop import OptimConfig, train_epoch
from stages.models.device import device as torch_device


class FitClassifier(Stage):
    kind = "fit-classifier"
    version = "1"

    class Config(ClassifierArch, OptimConfig):
        epochs: int = Field(15, ge=1)
        val_fraction: float = Field(0.1, ge=0, lt=1)

    inputs = {"data": Dataset}
    outputs = {"model": Model}
    metrics = ("train_loss", "train_accuracy", "val_accuracy")  # per epoch

    def run(self, ctx, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind}) input 'data'"
        cols = read_split(data, "train", ["x", "label"], where)
        x = torch.tensor(cols["x"], dtype=torch.float32)
        y = torch.tensor(cols["label"], dtype=torch.int64)
        num_classes = int(data.info.get("num_classes", int(y.max()) + 1))
        gen = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(len(y), generator=gen)
        n_val = int(len(y) * cfg.val_fraction)
        val, train = order[:n_val], order[n_val:]

        device = torch_device()  # the GPU of resources.num_gpus
        x, y = x.to(device), y.to(device)
        torch.manual_seed(ctx.seed)
        model = cfg.build(x.shape[1:], num_classes, where).to(device)
        opt = cfg.optimizer(model)

        def loss_fn(model, idx):
            logits = model(x[idx])
            return F.cross_entropy(logits, y[idx]), logits, y[idx]

        for epoch in range(cfg.epochs):
            perm = train[torch.randperm(len(train), generator=gen)]
            metrics = train_epoch(model, perm.split(cfg.batch_size), opt, loss_fn, epoch)
            if n_val:
                pred = predict_logits(model, x[val]).argmax(1)
                metrics["val_accuracy"] = (pred == y[val].cpu()).float().mean().item()
            ctx.log_metrics(metrics, step=epoch)
            ctx.progress(epoch + 1, cfg.epochs, "epochs")

        path = save_classifier(model.cpu(), ctx.output_dir("model"))
        info = {"architecture": cfg.arch, "num_classes": num_classes,
                "input_shape": list(x.shape[1:]), **{k: float(v) for k, v in metrics.items()}}
        return {"model": Model(path=path, info=info)}
