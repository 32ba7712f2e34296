"""Small torch image classifiers: teachers and students for knowledge distillation
and the fresh networks of dataset distillation.

- ``ConvNet``: the "ConvNet" of the dataset-distillation literature (Gidaris & Komodakis
  2018; used by DC/DM/MTT, Zhao et al. 2021, Cazenavette et al. 2022): ``depth`` blocks of
  conv3x3(width) -> norm -> ReLU -> avgpool2, then one linear classifier.
- ``ConvNet1D``: the same blocks in one dimension, for signals shaped (channels, length)
  such as MNIST-1D (Greydanus 2020): ``depth`` blocks of conv1d(width, kernel 3) -> norm ->
  ReLU -> avgpool2, then one linear classifier.
- ``MLP``: flatten -> [linear -> ReLU] * len(hidden) -> linear.

All are ``nn.Module`` + ``huggingface_hub.PyTorchModelHubMixin``: ``save_pretrained``
writes ``config.json`` (the constructor arguments) and ``model.safetensors``, and
``from_pretrained(path)`` rebuilds the module. ``save_classifier`` also writes
``classifier.json`` with the architecture name, so ``load_classifier(path)`` knows which
class to rebuild.
"""

from __future__ import annotations

import json
import math
import os
from typing import Literal

import torch
from huggingface_hub import PyTorchModelHubMixin
from pydantic import PositiveInt
from torch import nn

from pipelines.errors import UserError, allowed_list, bad_value
from pipelines.stage import StageConfig

ARCH_FILE = "classifier.json"
NORMS = {"batch": nn.BatchNorm2d, "instance": lambda c: nn.GroupNorm(c, c),
         "none": lambda c: nn.Identity()}
NORMS_1D = {**NORMS, "batch": nn.BatchNorm1d}


class ConvNet(nn.Module, PyTorchModelHubMixin):
    def __init__(self, in_shape: list[int] = (1, 8, 8), num_classes: int = 10,
                 width: int = 32, depth: int = 2, norm: str = "batch"):
        super().__init__()
        self.in_shape, self.num_classes = list(in_shape), num_classes
        c, h, w = in_shape
        blocks = []
        for _ in range(depth):
            pool = nn.AvgPool2d(2) if min(h, w) >= 2 else nn.Identity()
            blocks += [nn.Conv2d(c, width, 3, padding=1), NORMS[norm](width), nn.ReLU(), pool]
            c = width
            h, w = (h // 2, w // 2) if min(h, w) >= 2 else (h, w)
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(c * h * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class ConvNet1D(nn.Module, PyTorchModelHubMixin):
    def __init__(self, in_shape: list[int] = (1, 40), num_classes: int = 10,
                 width: int = 32, depth: int = 2, norm: str = "batch"):
        super().__init__()
        self.in_shape, self.num_classes = list(in_shape), num_classes
        c, length = in_shape
        blocks = []
        for _ in range(depth):
            pool = nn.AvgPool1d(2) if length >= 2 else nn.Identity()
            blocks += [nn.Conv1d(c, width, 3, padding=1), NORMS_1D[norm](width), nn.ReLU(), pool]
            c, length = width, length // 2 if length >= 2 else length
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(c * length, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module, PyTorchModelHubMixin):
    def __init__(self, in_shape: list[int] = (1, 8, 8), num_classes: int = 10,
                 hidden: list[int] = (64,)):
        super().__init__()
        self.in_shape, self.num_classes = list(in_shape), num_classes
        layers, n_in = [nn.Flatten()], math.prod(in_shape)
        for n_out in hidden:
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
            n_in = n_out
        layers.append(nn.Linear(n_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {"convnet": ConvNet, "convnet1d": ConvNet1D,
                                             "mlp": MLP}
CONV_INPUTS = {"convnet": (3, "(channels, height, width)"),
               "convnet1d": (2, "(channels, length)")}
ArchName = Literal[tuple(ARCHITECTURES)]  # pydantic rejects anything not in the registry
NormName = Literal[tuple(NORMS)]


class ClassifierArch(StageConfig):
    """The architecture fields shared by every stage that builds a classifier."""

    arch: ArchName = "convnet"
    width: PositiveInt = 32          # ConvNet / ConvNet1D channels
    depth: PositiveInt = 2           # ConvNet / ConvNet1D blocks
    norm: NormName = "batch"         # ConvNet / ConvNet1D normalisation
    hidden: list[PositiveInt] = [64]  # MLP hidden sizes

    def keyed_execution(self) -> dict[str, str]:
        kept = super().keyed_execution()
        if self.arch in CONV_INPUTS and self.norm == "batch":
            others = " or ".join(n for n in NORMS if n != "batch")
            kept["num_workers"] = (f"BatchNorm's statistics are each worker's own batch's "
                                   f"(norm: {others} keeps the maths)")
        return kept

    def build(self, in_shape, num_classes: int, where: str = "build") -> nn.Module:
        kwargs = dict(in_shape=list(in_shape), num_classes=int(num_classes))
        if self.arch in CONV_INPUTS:
            ndim, layout = CONV_INPUTS[self.arch]
            if len(in_shape) != ndim:
                fits = [f"for {lay} inputs use arch '{a}' (or 'mlp', which flattens)"
                        for a, (n, lay) in CONV_INPUTS.items() if n == len(in_shape)]
                hint = fits[0] if fits else "use arch 'mlp' for flat inputs"
                raise bad_value(where, f"input shape for arch '{self.arch}'", list(in_shape),
                                f"{layout}; {hint}")
            return ARCHITECTURES[self.arch](width=self.width, depth=self.depth, norm=self.norm,
                                            **kwargs)
        return MLP(hidden=list(self.hidden), **kwargs)


def architecture_of(model: nn.Module) -> str:
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise TypeError(f"{type(model).__name__} is not a registered classifier "
                    f"({allowed_list(ARCHITECTURES)})")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_classifier(model: nn.Module, path: str) -> str:
    """``save_pretrained`` (config.json + model.safetensors) plus the architecture name."""
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    model.save_pretrained(path)
    with open(os.path.join(path, ARCH_FILE), "w") as f:
        json.dump({"architecture": architecture_of(model)}, f)
    return path


def load_classifier(path: str, where: str = "load_classifier") -> nn.Module:
    """Rebuild a classifier saved by ``save_classifier`` with the real
    ``Cls.from_pretrained(path)``; a bad folder is a ``UserError`` naming ``where``."""
    expected = f"a folder written by save_classifier (architectures: {allowed_list(ARCHITECTURES)})"
    if not os.path.isdir(path):
        raise bad_value(where, "model folder", path, f"{expected}; it does not exist")
    arch_file = os.path.join(path, ARCH_FILE)
    if not os.path.isfile(arch_file) or not os.path.isfile(os.path.join(path, "config.json")):
        raise bad_value(where, "model folder", path,
                        f"{expected}; it has no {ARCH_FILE} or config.json")
    try:
        with open(arch_file) as f:
            arch = json.load(f)["architecture"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{where}: {arch_file} is unreadable ({e}); expected "
                        f'{{"architecture": one of {allowed_list(ARCHITECTURES)}}}') from e
    if arch not in ARCHITECTURES:
        raise bad_value(where, "architecture", arch, ARCHITECTURES)
    model = ARCHITECTURES[arch].from_pretrained(path)
    return model.eval()


@torch.inference_mode()
def predict_logits(model: nn.Module, x, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``x`` (an ndarray or tensor) in eval mode, batch by batch, on CPU."""
    model.eval()
    x = torch.as_tensor(x, dtype=torch.float32)
    device = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])
