"""Small torch image classifiers: teachers and students for knowledge distillation
and the fresh networks of dataset distillation.

- ``ConvNet``: the "ConvNet" of the dataset-distillation literature (Gidaris & Komodakis
  2018; used by DC/DM/MTT, Zhao et al. 2021, Cazenavette et al. 2022): ``depth`` blocks of
  conv3x3(width) -> norm -> ReLU -> avgpool2, then one linear classifier.
- ``ConvNet1D``: the same blocks in one dimension, for signals shaped (channels, length)
  such as MNIST-1D (Greydanus 2020): ``depth`` blocks of conv1d(width, kernel 3) -> norm ->
  ReLU -> avgpool2, then one linear classifier.
- ``MLP``: flatten -> [linear -> ReLU] * len(hidden) -> linear.

All are ``nn.Module`` + ``huggingface_hub.PyTorchModelHubMixin`` (in ``classifier_nets``: this
module names them without importing torch): ``save_pretrained``
writes ``config.json`` (the constructor arguments) and ``model.safetensors``, and
``from_pretrained(path)`` rebuilds the module. ``save_classifier`` also writes
``classifier.json`` with the architecture name, so ``load_classifier(path)`` knows which
class to rebuild.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Literal

from pydantic import PositiveInt

from pipelines.errors import UserError, allowed_list, bad_value
from pipelines.stage import StageConfig
from stages.lazy import lazy

torch = lazy("torch")
if TYPE_CHECKING:
    from torch import nn

ARCH_FILE = "classifier.json"
ARCH_NAMES = ("convnet", "convnet1d", "mlp")  # stages.models.classifier_nets.ARCHITECTURES
NORM_NAMES = ("batch", "instance", "none")     # ... and its NORMS
CONV_INPUTS = {"convnet": (3, "(channels, height, width)"),
               "convnet1d": (2, "(channels, length)")}
ArchName = Literal[ARCH_NAMES]  # pydantic rejects anything not in the registry
NormName = Literal[NORM_NAMES]
NETS = ("ConvNet", "ConvNet1D", "MLP", "ARCHITECTURES", "NORMS", "NORMS_1D")


def __getattr__(name: str):  # the networks, imported (with torch) when first named
    if name in NETS:
        from stages.models import classifier_nets
        return getattr(classifier_nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
            others = " or ".join(n for n in NORM_NAMES if n != "batch")
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
            from stages.models.classifier_nets import ARCHITECTURES
            return ARCHITECTURES[self.arch](width=self.width, depth=self.depth, norm=self.norm,
                                            **kwargs)
        from stages.models.classifier_nets import MLP
        return MLP(hidden=list(self.hidden), **kwargs)


def architecture_of(model: nn.Module) -> str:
    from stages.models.classifier_nets import ARCHITECTURES
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
    expected = f"a folder written by save_classifier (architectures: {allowed_list(ARCH_NAMES)})"
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
                        f'{{"architecture": one of {allowed_list(ARCH_NAMES)}}}') from e
    if arch not in ARCH_NAMES:
        raise bad_value(where, "architecture", arch, ARCH_NAMES)
    from stages.models.classifier_nets import ARCHITECTURES
    model = ARCHITECTURES[arch].from_pretrained(path)
    return model.eval()


def predict_logits(model: nn.Module, x, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``x`` (an ndarray or tensor) in eval mode, batch by batch, on CPU."""
    model.eval()
    with torch.inference_mode():
        x = torch.as_tensor(x, dtype=torch.float32)
        device = next(model.parameters()).device
        return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(x), batch_size)])
