"""What both paths of ``evaluate-generation`` (pixel-space and latent text-to-image) share:
the sample-quality metrics on classifier features, the feature extractor and its input,
the label accuracy, and the FID plot. The formulas are in
``stages.evaluate.evaluate_generation``'s docstring.

FID and KID are torchmetrics' (``torchmetrics.image.FrechetInceptionDistance`` and
``KernelInceptionDistance``), fed the classifier features already extracted (``Given``:
an identity module with ``num_features``, so torchmetrics never probes it with a 299x299
image). Precision / recall (Kynkaanniemi et al. 2019) is our own code: torchmetrics (1.9)
has no improved precision / recall of generative models (its precision / recall are
classification and retrieval metrics)."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import torch

from stages.data.tables import parquet
from stages.evaluate.timing import pyplot

RESERVED = ("teacher", "real")  # model names of the metrics that are not students
LUMA = (0.299, 0.587, 0.114)    # ITU-R BT.601


class Given(torch.nn.Module):
    """torchmetrics' feature extractor for features extracted already: the identity, with
    their width as ``num_features``."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _features(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets ``a`` (real) and ``b`` (generated), in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=Given(a.shape[1]), sync_on_compute=False)
    metric.update(_features(a), real=True)
    metric.update(_features(b), real=False)
    return float(metric.compute())


def kid(a: np.ndarray, b: np.ndarray, subsets: int, size: int, seed: int) -> float:
    """KID (mean over ``subsets`` random subsets of min(``size``, |a|, |b|) rows of each
    set); the subsets drawn by torch's CPU generator seeded with ``seed`` inside a fork of
    its state, so the value is reproducible and the caller's random state untouched."""
    from torchmetrics.image.kid import KernelInceptionDistance
    with warnings.catch_warnings():  # "will save all extracted features": they are given
        warnings.filterwarnings("ignore", message=".*Kernel Inception Distance.*")
        metric = KernelInceptionDistance(feature=Given(a.shape[1]), subsets=subsets,
                                         subset_size=min(size, len(a), len(b)),
                                         sync_on_compute=False)
    metric.update(_features(a), real=True)
    metric.update(_features(b), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        return float(metric.compute()[0])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)

    def radii(x):  # distance to the k-th nearest neighbour within the set (self excluded)
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values

    def coverage(support, r, query):  # share of query points inside some support ball
        return (torch.cdist(query, support) <= r[None, :]).any(1).float().mean().item()

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


class Features:
    """The classifier's penultimate features (input of its last ``nn.Linear``) and logits."""

    def __init__(self, classifier):
        self.model = classifier.eval()
        last = [m for m in classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.register_forward_hook(lambda mod, inp, out: setattr(self, "_feat", inp[0]))

    @torch.inference_mode()
    def __call__(self, x01: torch.Tensor, batch: int = 1000):
        feats, logits = [], []
        for i in range(0, len(x01), batch):
            logits.append(self.model(x01[i:i + batch].float()))
            feats.append(self._feat.flatten(1))
        return torch.cat(feats).double().numpy(), torch.cat(logits).argmax(1).numpy()


def real_halves(count: int, num_samples: int | None, seed: int):
    """Rows 0..count-1 split in two random halves A and B (seeded); B cut to the
    generated-set size n (``num_samples``, at most |B|)."""
    order = np.random.default_rng(seed).permutation(count)
    half_a, half_b = order[: count // 2], order[count // 2:]
    return half_a, half_b[:min(num_samples or len(half_b), len(half_b))]


def real_floor(features, real: np.ndarray, cfg, seed: int, halves=None):
    """The features of A, the generated-set size n and the real-vs-real floors FID(A,
    B[:n]) and KID (``halves``: ``real_halves`` of the real images by default)."""
    half_a, half_b = halves or real_halves(len(real), cfg.num_samples, seed)
    feat_a, _ = features(torch.as_tensor(real[half_a]))
    feat_b, _ = features(torch.as_tensor(real[half_b]))
    floors = {"fid/real/floor": fid(feat_a, feat_b),
              "kid/real/floor": kid(feat_a, feat_b, cfg.kid_subsets, cfg.kid_subset_size, seed)}
    return feat_a, len(half_b), floors


def paired_rows(data_prompts, eval_prompts: list[str], num_samples: int | None, seed: int):
    """The paired reference of a text-to-image evaluation (as COCO's FID takes the captions
    of its reference images): the data rows whose prompt is one of ``eval_prompts``, in
    halves A and B (``real_halves``); generated row r is prompted with B[r]'s prompt, so
    the generated and the real sets share one prompt distribution. Returns (indices of
    A, indices of B, the eval-prompt index of each generated row), indices into
    ``data_prompts``."""
    at = {p: i for i, p in enumerate(eval_prompts)}
    index = np.array([at.get(str(p), -1) for p in data_prompts], dtype=np.int64)
    rows = np.flatnonzero(index >= 0)
    half_a, half_b = real_halves(len(rows), num_samples, seed)
    return rows[half_a], rows[half_b], index[rows[half_b]]


def prompt_labels(data, prompts: list[str]) -> np.ndarray | None:
    """Each prompt's label, the majority label of the data rows with that prompt (-1:
    none); None when ``data`` has no ``prompt`` and ``label`` columns."""
    if not {"prompt", "label"} <= set(parquet(data).schema.names):
        return None
    cols = data.to_numpy(["prompt", "label"])
    counts: dict[str, Counter] = {}
    for p, y in zip(cols["prompt"], cols["label"]):
        counts.setdefault(str(p), Counter())[int(y)] += 1
    return np.array([counts[p].most_common(1)[0][0] if p in counts else -1 for p in prompts])


def accuracy(metrics: dict, key: str, pred, row_label) -> None:
    """The accuracy on the labelled rows as ``metrics[key]``; nothing when none is."""
    if row_label is not None and (row_label >= 0).any():
        mask = row_label >= 0
        metrics[key] = float((pred[mask] == row_label[mask]).mean())


CLASSIFIER_VIEWS = ("resize", "crop")
REFERENCES = ("auto", "paired", "test-split")  # evaluate-generation's t2i real reference


def to_classifier(images: torch.Tensor, in_shape, view: str = "resize") -> torch.Tensor:
    """Images in [0, 1] (B, 3, H, W) as the classifier's input (c, h, w): grey (BT.601
    luma) for a one-channel classifier; ``view`` "resize": centre-cropped to its aspect
    ratio, then resized (bilinear, antialiased); "crop": the centre (h, w) crop where the
    image is larger (a teacher trained on padded images), resized only where smaller."""
    c, h, w = in_shape
    if c == 1 and images.shape[1] == 3:  # grey
        images = (images * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if view == "crop":
        big_h, big_w = images.shape[-2:]
        top, left = max(big_h - h, 0) // 2, max(big_w - w, 0) // 2
        images = images[..., top:top + min(h, big_h), left:left + min(w, big_w)]
    big_h, big_w = images.shape[-2:]
    if big_h * w > big_w * h:           # too tall: crop rows around the centre
        keep = round(big_w * h / w)
        images = images[..., (big_h - keep) // 2:(big_h - keep) // 2 + keep, :]
    elif big_h * w < big_w * h:         # too wide: crop columns
        keep = round(big_h * w / h)
        images = images[..., (big_w - keep) // 2:(big_w - keep) // 2 + keep]
    if tuple(images.shape[-2:]) != (h, w):
        images = torch.nn.functional.interpolate(images.float(), size=(h, w), mode="bilinear",
                                                 antialias=True, align_corners=False)
    return images.float().clamp(0, 1)


def fid_plot(metrics: dict, teacher_steps, student_steps: dict, best: int,
             students: list[str], best_label: str = "teacher best"):
    """FID against sampling steps, one line per model (``student_steps``: each student's
    step counts), the real-vs-real floor dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ["teacher", *students]:
        steps = sorted(teacher_steps if name == "teacher" else student_steps[name])
        ax.plot(steps, [metrics[f"fid/{name}/{s}"] for s in steps], marker="o", label=name)
    ax.axhline(metrics["fid/real/floor"], color="gray", ls="--", label="real vs real")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FID (classifier features)")
    ax.set_title(f"FID against steps ({best_label}: {best} steps)")
    ax.legend()
    return fig
