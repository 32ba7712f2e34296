"""Pieces shared by the dataset-distillation stages (``expert-trajectories``, ``mtt``,
``dm``, ``random-subset``, ``herding``, ``evaluate-synthetic``):

- the network: the ConvNet of the literature (``stages.models.classifiers.ConvNet``,
  conv3x3-norm-ReLU-avgpool blocks, default GroupNorm(c, c) = instance norm), described by
  a plain ``arch`` dict that is recorded in manifests and compared between stages, and its
  functional forward ``f(theta, x)`` on a flat parameter vector (``torch.func``);
- Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021): a random affine warp
  (scale, rotation, translation) and brightness/contrast jitter, differentiable in x;
- the synthetic-set artifact (columns id, x, label, split) and its checks (IPC against the
  smallest class), atomic checkpoints in ``ctx.work_files``;
- ``train_net``: plain SGD training of a fresh network (experts and evaluation).

Every tensor computation runs on ``device()``: the GPU when the process was given one (a
stage with ``resources: {num_gpus: ...}``, or a network task launched with a GPU share
because Ray reports a GPU), else the CPU; artifacts are CPU arrays, and checkpoints load
onto the CPU (``map_location``) whatever device saved them.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import PositiveInt

from pipelines.errors import UserError, bad_value
from pipelines.stage import Dataset, StageConfig
from stages.data.tables import read_split
from stages.models.classifiers import ConvNet, NormName
from stages.models.device import device  # noqa: F401  (re-exported to the family)


NETWORK_GPU_SHARE = 0.25  # four of these small ConvNets train side by side on one GPU


def task_gpus(ctx) -> float:
    """The GPU share of one network's Ray task (experts, evaluation networks):
    ``NETWORK_GPU_SHARE`` when Ray reports a GPU, else none. Not a config field: where a
    network trains does not change what it computes, so it stays out of the cache key."""
    return NETWORK_GPU_SHARE if ctx.num_gpus_available > 0 else 0.0


class NetConfig(StageConfig):
    """The ConvNet every stage of the family builds."""

    width: PositiveInt = 64
    depth: PositiveInt = 2
    norm: NormName = "instance"

    def arch(self, in_shape, num_classes: int) -> dict:
        return {"arch": "convnet", "width": self.width, "depth": self.depth, "norm": self.norm,
                "in_shape": [int(s) for s in in_shape], "num_classes": int(num_classes)}


def build_net(arch: dict, seed: int | None = None) -> ConvNet:
    if seed is not None:
        torch.manual_seed(seed)
    return ConvNet(in_shape=arch["in_shape"], num_classes=arch["num_classes"],
                   width=arch["width"], depth=arch["depth"], norm=arch["norm"])


def flat_params(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def functional_forward(net: torch.nn.Module, flat: torch.Tensor, x: torch.Tensor,
                       features: bool = False) -> torch.Tensor:
    """``net`` evaluated with the parameters in the flat vector ``flat`` (differentiable in
    both); ``features`` gives the embedding before the linear head."""
    params, i = {}, 0
    for name, p in net.named_parameters():
        params[name] = flat[i:i + p.numel()].view_as(p)
        i += p.numel()
    module = net.features if features else net
    if features:
        params = {k[len("features."):]: v for k, v in params.items() if k.startswith("features.")}
    out = torch.func.functional_call(module, params, (x,))
    return out.flatten(1) if features else out


# -- data -------------------------------------------------------------------------------
def real_split(data: Dataset, split: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    cols = read_split(data, split, ["x", "label"], where)
    return torch.tensor(cols["x"], dtype=torch.float32), torch.tensor(cols["label"])


def num_classes_of(data: Dataset, y: torch.Tensor) -> int:
    return int(data.info.get("num_classes", int(y.max()) + 1))


def train_set(data: Dataset, ipc: int, where: str, net: NetConfig | None = None):
    """(x, y, num_classes, arch) of the real training rows, once ``ipc`` is checked."""
    x, y = real_split(data, "train", f"{where} input 'data'")
    num_classes = num_classes_of(data, y)
    check_ipc(ipc, y, num_classes, f"{where} config")
    return x, y, num_classes, net.arch(x.shape[1:], num_classes) if net else None


def dataset_key(data: Dataset, where: str) -> str:
    """A fingerprint of the training rows (ids, labels, input shape): identifies the
    dataset an expert artifact was trained on, whatever the store path."""
    cols = read_split(data, "train", ["id", "label"], where)
    order = np.argsort(cols["id"])
    h = hashlib.sha256(np.asarray(cols["id"])[order].astype(np.int64).tobytes())
    h.update(np.asarray(cols["label"])[order].astype(np.int64).tobytes())
    h.update(str(data.info.get("input_shape")).encode())
    return h.hexdigest()[:16]


def check_ipc(ipc: int, y: torch.Tensor, num_classes: int, where: str) -> None:
    counts = torch.bincount(y, minlength=num_classes)
    smallest = int(counts.min())
    if ipc > smallest:
        raise bad_value(where, "ipc", ipc, f"at most {smallest}, the size of the smallest "
                        f"training class (class {int(counts.argmin())})")


def check_experts(experts: Dataset, arch: dict, key: str, where: str) -> None:
    """The expert artifact must come from the same architecture and dataset."""
    theirs_arch, theirs_key = experts.info.get("arch"), experts.info.get("dataset")
    if theirs_arch != arch:
        raise UserError(f"{where}: input 'experts' was trained with architecture "
                        f"{theirs_arch}, but this stage distils for {arch}; regenerate the "
                        f"experts with the same width/depth/norm on the same data")
    if theirs_key != key:
        raise UserError(f"{where}: input 'experts' was trained on dataset {theirs_key!r}, "
                        f"but input 'data' is dataset {key!r}; connect the experts trained "
                        f"on this data")


def real_init(x: torch.Tensor, y: torch.Tensor, ipc: int, num_classes: int,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random real images per class (the random-subset baseline and the
    initialisation of DM and MTT)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()),
                     generator=gen)[:ipc]] for c in range(num_classes)])
    return x[idx].clone(), y[idx].clone()


def write_synthetic(ctx, x: torch.Tensor, y: torch.Tensor, info: dict,
                    soft: torch.Tensor | None = None) -> Dataset:
    """The synthetic-set artifact: ``id``, ``x``, ``label`` (hard), ``split``, and with
    ``soft`` a ``soft_label`` column (one probability vector per image; info
    ``soft_labels``: true)."""
    x = x.detach().float().cpu().numpy()
    columns = {"id": np.arange(len(x), dtype=np.int64), "x": x,
               "label": y.cpu().numpy().astype(np.int64), "split": np.full(len(x), "train")}
    if soft is not None:
        columns["soft_label"] = soft.detach().float().cpu().numpy()
    info = {"input_shape": list(x.shape[1:]), "num_rows": len(x), **info,
            "soft_labels": soft is not None}
    return ctx.write_dataset("synthetic", columns, info=info)


def read_synthetic(syn: Dataset, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    return real_split(syn, "train", where)


def read_soft_labels(syn: Dataset, where: str) -> torch.Tensor | None:
    """The ``soft_label`` column of a synthetic set ([N, classes], rows in ``read_synthetic``'s
    order), or None when it has none."""
    from stages.data.tables import parquet
    if "soft_label" not in parquet(syn).schema.names:
        return None
    cols = read_split(syn, "train", ["soft_label"], where)
    return torch.tensor(np.stack(cols["soft_label"]), dtype=torch.float32)


# -- differentiable siamese augmentation ---------------------------------------------
def dsa(x: torch.Tensor, seed: int, per_sample: bool = True, scale: float = 1.2,
        rotate_deg: float = 15.0, shift: float = 0.125, color: float = 0.2) -> torch.Tensor:
    """Random affine warp + brightness/contrast jitter, differentiable in ``x``. The same
    ``seed`` gives the same transformation (the siamese part: real and synthetic batches of
    DM share it); ``per_sample=False`` draws one transformation for the whole batch."""
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    n = len(x) if per_sample else 1
    u = (torch.rand(n, 7, generator=gen) * 2 - 1).to(x.device)  # uniform in [-1, 1]
    s = scale ** u[:, :2]                                  # scale factors in [1/s, s]
    a = u[:, 2] * math.radians(rotate_deg)
    t = u[:, 3:5] * shift * 2                              # grid units: 2 = whole image
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.stack([torch.stack([s[:, 0] * cos, -s[:, 0] * sin, t[:, 0]], 1),
                         torch.stack([s[:, 1] * sin, s[:, 1] * cos, t[:, 1]], 1)], 1)
    theta = theta.expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, align_corners=False)
    brightness = (u[:, 5] * color).view(-1, 1, 1, 1)
    contrast = (1 + u[:, 6] * color).view(-1, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * contrast + mean + brightness


# -- checkpoints ---------------------------------------------------------------------
def save_checkpoint(work, name: str, state: dict) -> None:
    """``state`` as the work file ``name`` (``ctx.work_files``), put whole: a crash never
    leaves half a checkpoint, and a retry on another node finds it."""
    tmp = work.new_file(name)
    torch.save({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
                for k, v in state.items()}, tmp)
    work.put(name, tmp)


def load_checkpoint(work, name: str) -> dict | None:
    path = work.get(name)
    if path is None:
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# -- training a fresh network --------------------------------------------------------
def train_net(arch: dict, x, y, epochs: int, lr: float, seed: int, momentum: float = 0.9,
              weight_decay: float = 5e-4, batch_size: int = 256, augment: bool = False,
              on_epoch=None, soft=None, teacher: torch.nn.Module | None = None,
              sam_rho: float = 0.0) -> ConvNet:
    """SGD on (x, y) for ``epochs``; ``on_epoch(epoch, net)`` after every epoch (and with
    epoch 0 before training). Targets: the hard labels ``y`` (cross-entropy); or soft ones,
    -sum_k p_k log q_k, with p the rows of ``soft`` ([N, classes]) or the ``teacher``'s
    softmax on the same (augmented) batch (SRe2L's relabelling, as its evaluation does).
    ``sam_rho`` > 0: sharpness-aware steps (``train_epoch``), FTD's flat experts.
    One thread: callers run several of these as Ray tasks; on ``device()``, so on a GPU when
    the task was given a share of one."""
    torch.set_num_threads(1)
    dev = device()
    x = torch.tensor(np.array(x), dtype=torch.float32, device=dev)
    y = torch.tensor(np.array(y), device=dev)
    soft = None if soft is None else torch.tensor(np.array(soft), dtype=torch.float32,
                                                  device=dev)
    teacher = None if teacher is None else teacher.to(dev).eval().requires_grad_(False)
    net = build_net(arch, seed).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    if on_epoch:
        on_epoch(0, net)

    def loss_fn(model, idx):
        xb = dsa(x[idx], int(torch.randint(2**62, (1,), generator=gen))) if augment else x[idx]
        logits = model(xb)
        if teacher is not None:
            with torch.no_grad():
                p = teacher(xb).softmax(1)
        elif soft is not None:
            p = soft[idx]
        else:
            return F.cross_entropy(logits, y[idx]), logits, y[idx]
        return -(p * logits.log_softmax(1)).sum(1).mean(), logits, y[idx]

    for epoch in range(1, epochs + 1):
        train_epoch(net, torch.randperm(len(y), generator=gen).split(batch_size), opt, loss_fn,
                    epoch, sam_rho)
        if on_epoch:
            on_epoch(epoch, net)
    return net.eval()


@torch.no_grad()
def accuracy(net: torch.nn.Module, x, y) -> float:
    net.eval()
    dev = next(net.parameters()).device
    x = torch.tensor(np.array(x), dtype=torch.float32, device=dev)
    y = torch.tensor(np.array(y), device=dev)
    pred = torch.cat([net(x[i:i + 1024]).argmax(1) for i in range(0, len(x), 1024)])
    return float((pred == y).float().mean())


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_grid(x: torch.Tensor, y: torch.Tensor, num_classes: int, title: str):
    """The synthetic images as a grid: one column per class, one row per image."""
    plt = pyplot()
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    per = max(int((y == c).sum()) for c in range(num_classes))
    fig, axes = plt.subplots(per, num_classes, figsize=(num_classes * 0.8, per * 0.8 + 0.4),
                             squeeze=False)
    for c in range(num_classes):
        imgs = x[y == c]
        for r in range(per):
            ax = axes[r][c]
            ax.axis("off")
            if r < len(imgs):
                ax.imshow(imgs[r, 0].numpy(), cmap="gray")
            if r == 0:
                ax.set_title(str(c), fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def train_epoch(model: torch.nn.Module, batches, opt: torch.optim.Optimizer,
                loss_fn, epoch: int, sam_rho: float = 0.0) -> dict[str, float]:
    """One pass over ``batches``; ``loss_fn(model, batch) -> (loss, logits, labels)``.
    ``sam_rho`` > 0: each step is sharpness-aware (SAM, Foret et al. 2021, arXiv
    2010.01412, as FTD trains flat experts, Du et al. 2023): the gradient is taken at
    w + rho g / ||g|| (g the batch's gradient at w) and applied at w.
    Returns the mean loss and the training accuracy (no accuracy when ``logits`` is None;
    ``labels`` then only counts the examples); a NaN/inf loss raises
    ``FloatingPointError`` naming the epoch and the step within it."""
    model.train()
    total_loss, correct, seen, scored = 0.0, 0, 0, False
    for step, batch in enumerate(batches):
        loss, logits, labels = loss_fn(model, batch)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss is {loss.item()} at epoch {epoch} "
                                     f"step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sam_rho > 0:
            sharpness_aware_grad(model, batch, loss_fn, sam_rho)
        opt.step()
        total_loss += loss.item() * len(labels)
        if logits is not None:
            correct, scored = correct + (logits.argmax(1) == labels).sum().item(), True
        seen += len(labels)
    metrics = {"train_loss": total_loss / max(seen, 1)}
    if scored or not seen:
        metrics["train_accuracy"] = correct / max(seen, 1)
    return metrics


def sharpness_aware_grad(model: torch.nn.Module, batch, loss_fn, rho: float) -> None:
    """Replace the parameters' gradients g (at w) by the gradient at w + rho g / ||g||."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2).clamp(min=1e-12)
    with torch.no_grad():
        steps = [rho * p.grad / norm for p in params]
        for p, e in zip(params, steps):
            p.add_(e)
    for p in params:
        p.grad = None
    loss_fn(model, batch)[0].backward()
    with torch.no_grad():
        for p, e in zip(params, steps):
            p.sub_(e)
