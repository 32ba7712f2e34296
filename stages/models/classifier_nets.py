"""The classifier networks (``nn.Module`` + ``huggingface_hub.PyTorchModelHubMixin``) of
``stages.models.classifiers``, which names them without importing torch (its
``ARCH_NAMES`` and ``NORM_NAMES`` are checked against these dicts on import)."""

from __future__ import annotations

import math

from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from stages.models.classifiers import ARCH_NAMES, NORM_NAMES

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

if tuple(ARCHITECTURES) != ARCH_NAMES or tuple(NORMS) != NORM_NAMES:
    raise ImportError(f"stages.models.classifiers names {ARCH_NAMES} / {NORM_NAMES}; the "
                      f"networks are {tuple(ARCHITECTURES)} / {tuple(NORMS)}")
