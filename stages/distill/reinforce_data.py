"""``reinforce-data``: dataset reinforcement (Faghri et al. 2023, "Reinforce Data, Multiply
Impact: Improved Model Accuracy and Robustness with Dataset Reinforcement", arXiv
2303.08983): K augmented views of every training input are stored once together with the
teacher's logits on each view, so students train on augmented data with teacher targets
without ever running the teacher again.

What is stored, one row per (train id, view v) for v = 0..K-1: ``id`` (the source row's
id), ``view``, ``x`` = aug(x_id; seed, id, v), ``label``, ``split`` ("train") and ``logits``
= z_t(aug(x_id)), the teacher's full raw logits on that very view in ``precision`` (other
input columns are repeated). Test rows are passed through once, un-augmented, as view 0 with
their teacher logits, so the output is a ``signal`` that ``kd-student`` accepts unchanged
(``info.signal == "logits"``) and evaluation still sees the real test inputs.

Augmentations for small images and 1-D signals (inputs are channels first): a random
shift (zero-pad by ``max_shift`` positions, crop back at a random offset in [-max_shift,
max_shift] on each axis after the channel one), then gaussian noise of standard deviation
``noise_std``. With ``include_original`` view 0 is the input itself.

Determinism contract: view v of row ``id`` depends only on (stage seed, id, v, the
augmentation settings): ``augment_view`` draws from its own ``numpy`` Generator seeded with
``SeedSequence([seed, id, v])`` (each taken mod 2**64), never from shared state, so any
shard, row or view can be regenerated exactly, on any worker, in any order. The settings and
the seed are recorded in the manifest's ``info["augmentations"]``.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from pipelines.stage import Dataset, Model, Resources, Stage
from stages.data.tables import parquet, require_columns
from stages.models.classifiers import load_classifier
from stages.teacher.signals import InferenceConfig, with_teacher_logits, write_signal


def view_rng(seed: int, row_id: int, view: int) -> np.random.Generator:
    """The Generator of view ``view`` of row ``row_id``: a function of the three alone."""
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed) % 2**64, int(row_id) % 2**64, int(view) % 2**64]))


def augment_view(x: np.ndarray, seed: int, row_id: int, view: int, max_shift: int,
                 noise_std: float, include_original: bool = True) -> np.ndarray:
    """View ``view`` of one input ``x``, channels first: (C, H, W) images or (C, L)
    signals, shifted by up to ``max_shift`` positions along every axis after the channel
    one (zero padding) plus gaussian noise; view 0 is ``x`` itself with
    ``include_original``. Always a new float32 array."""
    x = np.array(x, dtype=np.float32)  # a copy: batches are read-only views
    if view == 0 and include_original:
        return x
    rng = view_rng(seed, row_id, view)
    if max_shift > 0:
        s, spatial = max_shift, x.shape[1:]
        offsets = rng.integers(-s, s + 1, size=len(spatial))
        padded = np.pad(x, [(0, 0)] + [(s, s)] * len(spatial))
        x = padded[(slice(None),) + tuple(
            slice(s + d, s + d + n) for d, n in zip(offsets, spatial))].copy()
    if noise_std > 0:
        x += rng.normal(0.0, noise_std, size=x.shape).astype(np.float32)
    return x


def expand_views(batch: dict[str, np.ndarray], seed: int, views: int, max_shift: int,
                 noise_std: float, include_original: bool) -> dict[str, np.ndarray]:
    """A batch of n rows in, one row per (train row, view) plus each test row once out."""
    train = np.asarray(batch["split"]) == "train"
    counts = np.where(train, views, 1)
    rows = np.repeat(np.arange(len(train)), counts)
    view = np.concatenate([np.arange(c, dtype=np.int64) for c in counts] or
                          [np.zeros(0, np.int64)])
    out = {name: np.asarray(col)[rows] for name, col in batch.items()}
    out["view"] = view
    ids, x = np.asarray(batch["id"]), np.asarray(batch["x"], dtype=np.float32)
    out["x"] = np.array([
        augment_view(x[r], seed, ids[r], v, max_shift, noise_std, include_original)
        if train[r] else x[r] for r, v in zip(rows, view)], dtype=np.float32).reshape(
            (len(rows),) + x.shape[1:])
    return out

class ReinforceData(Stage):
    kind = "reinforce-data"
    version = "2"  # 2: 1-D (C, L) inputs shift along L (1 shifted the channel axis)

    class Config(InferenceConfig):                  # precision, actors, batch_size
        views: int = Field(4, ge=1)                 # K augmented views per training row
        max_shift: int = Field(1, ge=0)             # pixels, each axis
        noise_std: float = Field(0.05, ge=0)
        include_original: bool = True               # view 0 is the un-augmented input

    inputs = {"model": Model, "data": Dataset}
    outputs = {"signal": Dataset}
    resources = Resources(num_cpus=0)  # only launches Ray Data work

    def run(self, ctx, model, data):
        cfg = self.config
        where = f"stage '{ctx.name}' ({self.kind}) input 'model'"
        num_classes = load_classifier(model.path, where).num_classes  # fail before any work
        require_columns(data, ["id", "x", "label", "split"],
                        f"stage '{ctx.name}' ({self.kind}) input 'data'")
        augmentations = {"max_shift": cfg.max_shift, "noise_std": cfg.noise_std,
                         "include_original": cfg.include_original, "seed": ctx.seed}
        ds = data.read().map_batches(
            expand_views, batch_format="numpy",
            fn_kwargs={"seed": ctx.seed, "views": cfg.views, "max_shift": cfg.max_shift,
                       "noise_std": cfg.noise_std, "include_original": cfg.include_original})
        ds = with_teacher_logits(ds, model, cfg, ctx, where,
                                 rows=parquet(data).count_rows() * cfg.views)
        return {"signal": write_signal(ctx, ds, cfg, num_classes, data, views=cfg.views,
                                       augmentations=augmentations)}
